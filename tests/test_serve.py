"""phi1_jax.serve as a real subprocess on a free port, driven by the `openai` package (sync and async) over HTTP.

Two servers run for the module: the tiny config's model with random weights and the embedded corpus's tokenizer
(greedy text checked against phi1_jax.decoding.generate, log-probabilities against the model's log-softmax, no compile
under traffic, lm-evaluation-harness, batching, streaming, errors, SIGTERM; it starts cold, without the persistent
compilation cache, so its warm-up is seen), and a "scripted" model whose
weights are set by hand so that it writes one fixed, valid textbook reply whatever it is asked (phi1_jax.data_gen.generate end to
end, chat, EvalPlus-style samples scored by `python -m phi1_jax.evals`). The SIGTERM test stops the first server, so it is last.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="phi1_jax.serve needs starlette (pip install starlette uvicorn)")
pytest.importorskip("uvicorn", reason="phi1_jax.serve needs uvicorn (pip install starlette uvicorn)")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]

# The scripted model's reply: one vocabulary entry per piece, each followed by the next (see _scripted_checkpoint).
SCRIPT = ["Recursion solves a problem by reducing it to smaller copies of itself. ",
          "Every recursive function needs a base case that stops the descent, and a step that moves toward it. ",
          "The factorial shows both parts clearly:\n", "```python\n", "def factorial(n):\n",
          "    return 1 if n < 2 else n * factorial(n - 1)\n", "```\n",
          "Each call waits for the smaller one, so deep inputs need care."]
REPLY = "".join(SCRIPT)


class Served:
    def __init__(self, checkpoint: Path, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.name = str(checkpoint)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen([sys.executable, "-m", "phi1_jax.serve", f"--checkpoint={checkpoint}",
                                      f"--port={self.port}", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout=600.0):
        """Polls until /v1/models answers; keeps what /health said while it did not (`self.warming`) and the
        health counters at the moment it became ready (`self.ready_health`)."""
        deadline, self.warming = time.time() + timeout, []
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()[-3000:]}")
            try:
                models = httpx.get(f"{self.base_url}/models", timeout=5)
                if models.status_code == 200:
                    self.ready_health = self.health()
                    return self
                self.warming.append((models.status_code, models.json()["error"]["code"], self.health()))
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("server not ready in time")

    def health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=10).json()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=120, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _tiny_checkpoint(path: Path, embedded) -> Path:
    from flax import nnx

    from configs import tiny
    from phi1_jax import checkpoint
    from phi1_jax.model import Phi, PhiConfig

    checkpoint.save_model(path, Phi(PhiConfig.from_dict(tiny.get_config().model), rngs=nnx.Rngs(0)))
    shutil.copyfile(embedded.tokenizer_path, path / "tokenizer.model")
    return path


def _scripted_checkpoint(path: Path) -> Path:
    """A model that replies REPLY to any prompt ending in ":" (chat prompts end in "Assistant:"), even when sampling.

    The tokenizer has one entry per printable character and one per SCRIPT piece. The blocks' output projections are
    zero, so the last hidden state is LayerNorm(embedding of the current token), and the LM head maps each piece to
    the next one (":" to the first, the last to EOS) with a margin of hundreds of nats: a bigram table in weights."""
    import jax.numpy as jnp
    from flax import nnx
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from phi1_jax import checkpoint
    from phi1_jax.model import Phi, PhiConfig
    from phi1_jax.tokenizer import EOS_PIECE

    vocab = {"<unk>": 0, EOS_PIECE: 1}
    for piece in [*sorted(set(string.printable)), *SCRIPT]:
        vocab[piece] = len(vocab)
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # prompts: one token per character
    hf.decoder = decoders.Fuse()
    cfg = PhiConfig(vocab_size=128, num_layers=1, d_model=128, num_heads=2, head_dim=64, mlp_dim=128, rotary_dim=8,
                    max_seq_len=1024)
    model = Phi(cfg, rngs=nnx.Rngs(0))
    emb = np.random.default_rng(0).choice([-1.0, 1.0], size=(cfg.vocab_size, cfg.d_model)).astype(np.float32)
    model.embed[...] = jnp.asarray(emb)
    for layer in model.layers:
        for proj in (layer.attn.dense, layer.mlp.fc2):
            proj.kernel[...] = jnp.zeros_like(proj.kernel[...])
            proj.bias[...] = jnp.zeros_like(proj.bias[...])
    normed = (emb - emb.mean(1, keepdims=True)) / emb.std(1, keepdims=True)  # final LayerNorm at its init
    head = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
    chain = [vocab[":"], *(vocab[p] for p in SCRIPT), vocab[EOS_PIECE]]
    for a, b in zip(chain, chain[1:]):
        head[:, b] += 10.0 * normed[a]
    model.lm_head.kernel[...] = jnp.asarray(head)
    checkpoint.save_model(path, model)
    hf.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory, embedded, request):
    root = tmp_path_factory.mktemp("serve")
    tiny = Served(_tiny_checkpoint(root / "tiny", embedded), "--slots=16", "--compile-cache=none")
    # The scripted server keeps its compiled programs in pytest's cache folder, so later runs start in seconds.
    scripted = Served(_scripted_checkpoint(root / "scripted"), "--slots=4",
                      f"--compile-cache={request.config.cache.mkdir('phi1_jax_compile')}")
    try:
        yield tiny.wait_ready(), scripted.wait_ready()
    finally:
        tiny.stop()
        scripted.stop()


@pytest.fixture(scope="module")
def tiny_server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def scripted_server(servers):
    return servers[1]


@pytest.fixture(scope="module")
def reference(tiny_server):
    """Greedy text of phi1_jax.decoding.generate for a prompt, from the served checkpoint loaded in this process."""
    import jax
    import jax.numpy as jnp

    from phi1_jax import checkpoint
    from phi1_jax.decoding import for_decoding, generate
    from phi1_jax.tokenizer import Tokenizer

    plain = checkpoint.load_model(tiny_server.name)
    model = for_decoding(plain)
    tok = Tokenizer.load(Path(tiny_server.name) / "tokenizer.model")

    def greedy(prompt: str, max_tokens: int) -> tuple[str, int, int]:
        ids = tok.encode(prompt)
        out = generate(model, [ids], max_new_tokens=max_tokens, eos_id=tok.eos_id)[0]
        return tok.decode(out), len(ids), len(out)

    def log_softmax(ids: list[int]) -> np.ndarray:
        """[T, V]: the model's own fp32 log-softmax after each token of `ids` (one sequence, no padding)."""
        return np.asarray(jax.nn.log_softmax(plain(jnp.asarray([ids])).logits[0].astype(jnp.float32), axis=-1))

    greedy.tok, greedy.log_softmax = tok, log_softmax
    greedy.greedy_ids = lambda ids, n: generate(model, [ids], max_new_tokens=n, eos_id=tok.eos_id)[0]
    return greedy


PROMPTS = ["def add(a, b):\n", "import os\n\n", "class Stack:\n    def push(self, x):", "for i in range(10):"]


def test_models_health_and_greedy_completions_equal_generate(tiny_server, reference):
    client = tiny_server.client()
    assert [m.id for m in client.models.list().data] == [tiny_server.name]
    assert httpx.get(f"http://127.0.0.1:{tiny_server.port}/health").json()["status"] == "ok"
    for prompt, max_tokens in zip(PROMPTS, (24, 40, 8, 64)):
        r = client.completions.create(model=tiny_server.name, prompt=prompt, max_tokens=max_tokens, temperature=0)
        text, n_prompt, n_new = reference(prompt, max_tokens)
        assert r.choices[0].text == text
        assert r.choices[0].finish_reason == ("length" if n_new == max_tokens else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_new)
    # A list of prompts is one request with a choice per prompt; echo puts the prompt in front.
    r = client.completions.create(model=tiny_server.name, prompt=PROMPTS, max_tokens=16, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [p + reference(p, 16)[0] for p in PROMPTS]
    # Token ids as the prompt.
    ids = reference.tok.encode(PROMPTS[0])
    r = client.completions.create(model=tiny_server.name, prompt=ids, max_tokens=24, temperature=0)
    assert r.choices[0].text == reference(PROMPTS[0], 24)[0]


def test_prompts_sharing_a_prefix_reuse_its_keys_and_values_with_generates_text_and_logprobs(tiny_server, reference):
    """Four prompts that share their first 48 tokens, in one request: one is prefilled whole, the other three copy its
    row's keys and values for those 48 and prefill only their own ends, the three in one program (a group of 4 rows,
    one of them padding; the health counters say so); every text is still generate's greedy text and every token's
    log-probability the model's own log-softmax."""
    tok = reference.tok
    shared = tok.encode(PROMPTS[2] * 8)[:48]
    prompts = [shared + tok.encode(p)[:6] for p in PROMPTS]
    before = tiny_server.health()
    r = tiny_server.client().completions.create(model=tiny_server.name, prompt=prompts, max_tokens=10, temperature=0,
                                                logprobs=1)
    after = tiny_server.health()
    assert after["extends"] - before["extends"] == len(prompts) - 1
    assert after["extend_calls"] - before["extend_calls"] == 1
    assert after["reused_tokens"] - before["reused_tokens"] == 48 * (len(prompts) - 1)
    for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts):
        want = reference.greedy_ids(ids, 10)
        assert choice.text == tok.decode(want)
        scores = reference.log_softmax(ids + want)
        np.testing.assert_allclose(choice.logprobs.token_logprobs,
                                   [scores[len(ids) - 1 + i, t] for i, t in enumerate(want)], atol=1e-5)


def test_warm_up_compiles_every_shape_before_models_answers(tiny_server, scripted_server, request):
    warming = tiny_server.warming  # the tiny server starts cold: /v1/models was a 503 while /health said warming
    assert warming and all(code == 503 and why == "warming" for code, why, _ in warming)
    assert any(h["status"] == "warming" and h["compiling"] for _, _, h in warming)
    ready = tiny_server.ready_health
    # 16 slots, 128 positions: admit 2 group sizes x 2 prompt buckets, decode 3 row counts x 1 window, compact 1,
    # extend (prefix reuse) 2 group sizes x 1 prompt bucket (64: a 128-token rest leaves no room for a reused prefix).
    assert ready["status"] == "ok" and ready["shapes"] == 10 and ready["compiles"] >= ready["shapes"]
    cache = request.config.cache.mkdir("phi1_jax_compile")  # the scripted server's persistent cache holds its programs
    assert scripted_server.ready_health["shapes"] > 0 and any(cache.iterdir())


def test_echo_logprobs_equal_the_models_log_softmax(tiny_server, reference):
    client, tok = tiny_server.client(), reference.tok
    ids = tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    # What lm-evaluation-harness sends for a log-likelihood: token ids, echo, logprobs, max_tokens 0 (or 1).
    r = client.completions.create(model=tiny_server.name, prompt=ids, max_tokens=0, echo=True, logprobs=5,
                                  temperature=0)
    lp, want = r.choices[0].logprobs, reference.log_softmax(ids)
    assert r.choices[0].text == tok.decode(ids) and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], [want[i - 1, t] for i, t in enumerate(ids) if i], atol=1e-5)
    for i in range(1, len(ids)):
        best = np.sort(want[i - 1])[::-1][:5]
        got = sorted(lp.top_logprobs[i].values(), reverse=True)
        np.testing.assert_allclose(got[:5], best[:len(got[:5])], atol=1e-5)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(r.choices[0].text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    # Echo with generated tokens: one sequence of log-probabilities, prompt then completion, as the model's.
    r = client.completions.create(model=tiny_server.name, prompt=ids, max_tokens=6, echo=True, logprobs=1,
                                  temperature=0)
    full = ids + reference.greedy_ids(ids, 6)
    want = reference.log_softmax(full)
    assert len(r.choices[0].logprobs.token_logprobs) == len(full)
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs[1:], [want[i - 1, t] for i, t in enumerate(full)
                                                                          if i], atol=1e-5)
    # Greedy: each generated token is the best of its top_logprobs.
    for t, top in zip(r.choices[0].logprobs.token_logprobs[len(ids):], r.choices[0].logprobs.top_logprobs[len(ids):]):
        assert t == max(top.values())
    # Chat: logprobs of the reply's tokens, with top_logprobs alternatives.
    r = client.chat.completions.create(model=tiny_server.name, messages=[{"role": "user", "content": "hello"}],
                                       max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    prompt = tok.encode("User: hello\nAssistant:")
    content = r.choices[0].logprobs.content
    reply = reference.greedy_ids(prompt, 5)
    assert "".join(c.token for c in content) == r.choices[0].message.content == tok.decode(reply)
    assert len(content) == r.usage.completion_tokens == len(reply) and all(len(c.top_logprobs) == 3 for c in content)
    want = reference.log_softmax(prompt + reply)
    np.testing.assert_allclose([c.logprob for c in content], [want[len(prompt) - 1 + i, t] for i, t in
                                                               enumerate(reply)], atol=1e-5)


def _lm_eval_tasks(folder: Path) -> None:
    """Two lm-evaluation-harness tasks reading local JSONL (no hub): one generate_until, one loglikelihood."""
    gen = ["def add(a, b):\n", "import os\n", "class Stack:\n", "for i in range(3):\n"]
    ll = [("def add(a, b):\n", "    return a + b"), ("import", " os"), ("x = ", "1"), ("for i in", " range(10):")]
    (folder / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": "x"}) + "\n" for p in gen))
    (folder / "ll.jsonl").write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in ll))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    (folder / "phi1_gen.yaml").write_text(
        "task: phi1_gen\n" + common.format(path=folder / "gen.jsonl") +
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 16\n  do_sample: false\n  temperature: 0\n'
        "metric_list:\n  - metric: exact_match\n")
    (folder / "phi1_ll.yaml").write_text(
        "task: phi1_ll\n" + common.format(path=folder / "ll.jsonl") +
        'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')


def test_lm_evaluation_harness_runs_both_kinds_of_task_against_the_server(tiny_server, reference, tmp_path):
    pytest.importorskip("lm_eval", reason="pip install 'lm-eval[api]' (the test extra)")
    _lm_eval_tasks(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                        f"model={tiny_server.name},base_url={tiny_server.base_url}/completions,tokenizer_backend=remote,"
                        "max_length=128,num_concurrent=2,max_retries=1", "--tasks", "phi1_gen,phi1_ll",
                        "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = {p.name.split("_20")[0]: [json.loads(x) for x in p.read_text().splitlines()]
               for p in (tmp_path / "out").rglob("samples_*.jsonl")}
    assert len(samples["samples_phi1_gen"]) == len(samples["samples_phi1_ll"]) == 4
    tok = reference.tok
    for s in samples["samples_phi1_ll"]:  # lm-eval splits context and continuation as its remote tokenizer says
        context, continuation = s["doc"]["context"], s["doc"]["continuation"]
        # lm-eval's _encode_pair: the context's trailing whitespace moves to the continuation, the context is encoded
        # alone and the continuation is what follows as many tokens in the encoding of the whole
        head = tok.encode(context.rstrip())
        whole, n = head + tok.encode(context + continuation)[len(head):], len(head)
        want = reference.log_softmax(whole)
        assert float(s["resps"][0][0][0]) == pytest.approx(sum(want[i - 1, whole[i]] for i in range(n, len(whole))),
                                                           abs=1e-4)
    for s in samples["samples_phi1_gen"]:
        text = reference(s["doc"]["prompt"], 16)[0]
        assert s["resps"][0][0] == text.split("\n\n")[0]


def test_evalplus_request_shape_chat_n_max_completion_tokens_top_p(scripted_server):
    """EvalPlus's `--backend openai` asks chat completions for n samples at once with max_completion_tokens."""
    client, name = scripted_server.client(), scripted_server.name
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Complete the function."}],
                                       n=5, max_completion_tokens=4, temperature=0.8, top_p=0.95, seed=3)
    assert [c.index for c in r.choices] == list(range(5))
    assert [(c.message.content, c.finish_reason) for c in r.choices] == [("".join(SCRIPT[:4]), "length")] * 5
    assert r.usage.completion_tokens == 20


def test_concurrent_async_requests_share_the_batch_and_keep_their_text(tiny_server, reference):
    before = httpx.get(f"http://127.0.0.1:{tiny_server.port}/health").json()

    async def run():
        client = openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="none", max_retries=0, timeout=120)
        greedy = [client.completions.create(model=tiny_server.name, prompt=PROMPTS[i % 4], max_tokens=8 + 4 * i,
                                            temperature=0) for i in range(12)]
        sampled = [client.completions.create(model=tiny_server.name, prompt=PROMPTS[0], max_tokens=20,
                                             temperature=1.0, top_p=0.9, seed=s) for s in (1, 1, 2, 3)]
        return await asyncio.gather(*greedy, *sampled)

    results = asyncio.run(run())
    for i, r in enumerate(results[:12]):
        assert r.choices[0].text == reference(PROMPTS[i % 4], 8 + 4 * i)[0], i
    sampled = [r.choices[0].text for r in results[12:]]
    assert sampled[0] == sampled[1] and len(set(sampled)) >= 2  # a seed fixes the sample whatever shares the batch
    after = httpx.get(f"http://127.0.0.1:{tiny_server.port}/health").json()
    jobs, prefills = after["jobs"] - before["jobs"], after["prefills"] - before["prefills"]
    steps, row_steps = after["steps"] - before["steps"], after["row_steps"] - before["row_steps"]
    assert jobs == 16 and prefills < jobs  # prompts prefilled together
    assert row_steps > 4 * steps  # most decode steps ran many requests at once


def test_streaming_delivers_the_text_of_a_plain_request(tiny_server):
    client = tiny_server.client()
    cases = [dict(prompt=PROMPTS[1], max_tokens=48, temperature=0),
             dict(prompt=PROMPTS[2], max_tokens=30, temperature=0.8, top_p=0.9, seed=5, n=2, echo=True),
             dict(prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=["ing", "\n\n"])]
    for case in cases:
        plain = client.completions.create(model=tiny_server.name, **case)
        pieces, finish = {}, {}
        chunks = list(client.completions.create(model=tiny_server.name, stream=True,
                                                stream_options={"include_usage": True}, **case))
        for chunk in chunks[:-1]:
            for c in chunk.choices:
                pieces.setdefault(c.index, []).append(c.text)
                if c.finish_reason:
                    finish[c.index] = c.finish_reason
        assert len(chunks) > 3 and not chunks[-1].choices and chunks[-1].usage == plain.usage
        assert {i: "".join(p) for i, p in pieces.items()} == {c.index: c.text for c in plain.choices}
        assert finish == {c.index: c.finish_reason for c in plain.choices}


def test_stop_strings_cut_the_text(tiny_server, reference):
    client = tiny_server.client()
    full = reference(PROMPTS[1], 48)[0]
    stop = full[10:13]
    r = client.completions.create(model=tiny_server.name, prompt=PROMPTS[1], max_tokens=48, temperature=0, stop=stop)
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 48


def test_bad_requests_are_400s_and_the_server_lives_on(tiny_server):
    client, name = tiny_server.client(), tiny_server.name
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="x" * 400, max_tokens=16)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 128 tokens" in e.value.message
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=name, prompt="def f():", max_tokens=500)
    bad = [dict(temperature=-1), dict(temperature="hot"), dict(top_p=0), dict(n=0), dict(max_tokens=0),
           dict(stop=[""]), dict(logprobs=21), dict(logprobs=1, stream=True), dict(extra_body={"prompt": 7}), dict(extra_body={"prompt": [[]]}),
           dict(extra_body={"prompt": [5000]}), dict(echo="yes")]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=name, **{"prompt": "def f():", "max_tokens": 4, **kw})
        assert e.value.status_code == 400 and e.value.body["message"], kw
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="each message needs a role"):
        client.chat.completions.create(model=name, messages=[{"role": "wizard", "content": "hi"}])
    raw = httpx.post(f"{tiny_server.base_url}/completions", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{tiny_server.base_url}/nowhere", timeout=30).json()["error"]["message"]
    r = client.completions.create(model=name, prompt="def f():", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4


def test_chat_with_the_plain_template_sync_async_and_streamed(scripted_server):
    client, name = scripted_server.client(), scripted_server.name
    r = client.chat.completions.create(model=name, messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Teach recursion."}])
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(SCRIPT)  # EOS ends the reply and is not counted
    assert r.usage.prompt_tokens == len("System: Be brief.\nUser: Teach recursion.\nAssistant:")
    streamed = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], stream=True,
                                              temperature=1.0)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == REPLY

    async def run():
        aclient = openai.AsyncOpenAI(base_url=scripted_server.base_url, api_key="none", max_retries=0)
        rs = await asyncio.gather(*(aclient.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"topic {i}"}], max_tokens=4, seed=i)
            for i in range(6)))
        return [(x.choices[0].message.content, x.choices[0].finish_reason) for x in rs]

    assert asyncio.run(run()) == [("".join(SCRIPT[:4]), "length")] * 6


def test_data_gen_runs_to_completion_against_the_server_and_resumes(scripted_server, tmp_path):
    def run(n):
        cmd = [sys.executable, "-m", "phi1_jax.data_gen.generate", "--kind=textbooks", f"--n={n}", f"--out={tmp_path}",
               f"--base-url={scripted_server.base_url}", f"--model={scripted_server.name}", "--concurrency=4",
               "--max-tokens=64", "--dedup-threshold=0", "--no-progress", "--timeout=60"]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    r = run(3)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "textbooks.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(rec["text"] == REPLY + "\n" for rec in records)
    assert all(rec["meta"]["completion_tokens"] == len(SCRIPT) and rec["meta"]["prompt_tokens"] > 100
               for rec in records)
    r = run(3)  # nothing left to do
    assert r.returncode == 0 and "already holds 3 records" in r.stdout
    r = run(5)  # resumes: the three are kept, two more are made
    assert r.returncode == 0, r.stderr[-3000:]
    more = [json.loads(x) for x in (tmp_path / "textbooks.jsonl").read_text().splitlines()]
    assert more[:3] == records and len(more) == 5 and "5/5 records" in r.stderr


def test_evalplus_style_samples_through_the_server_are_scored_by_evals(scripted_server, tmp_path):
    from phi1_jax.evals import tasks

    task = tasks.load("humaneval", None)
    client = scripted_server.client()
    samples = []
    for task_id in list(task.problems)[:3]:
        r = client.completions.create(model=scripted_server.name, prompt=task.problems[task_id].prompt,
                                      max_tokens=64, temperature=0, stop=task.stop)
        samples.append({"task_id": task_id, "completion": r.choices[0].text})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    out = tmp_path / "he.json"
    r = subprocess.run([sys.executable, "-m", "phi1_jax.evals", "--task=humaneval", f"--samples={path}", f"--out={out}",
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["n_samples"] == 3 and summary["pass@1"] == 0.0


def test_command_line_errors_are_one_line(tmp_path):
    for args, said in ([[], "the following arguments are required: --checkpoint"],
                       [[f"--checkpoint={tmp_path / 'nope'}"], "does not exist"],
                       [[f"--checkpoint={tmp_path}", "--slots=0"], "--slots=0: must be at least 1"]):
        r = subprocess.run([sys.executable, "-m", "phi1_jax.serve", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr
    # A port in use: one error line naming it, before the model loads and before any "serving ... on" (#30).
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "phi1_jax.serve", f"--checkpoint={tmp_path / 'nope'}",
                            "--host=127.0.0.1", f"--port={port}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --port={port}: cannot listen on 127.0.0.1:{port} (Address already in use); stop what holds it, or "
        "pick another --port"], r.stderr


def test_no_compilation_under_mixed_traffic(tiny_server):
    """16 concurrent requests of every prompt length bucket, choice count and setting: nothing compiles (the health
    route counts every program JAX lowers in the server process)."""
    before = tiny_server.health()

    async def run():
        client = openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="none", max_retries=0, timeout=300)
        calls = []
        for i in range(16):
            prompt = list(range(3, 3 + [1, 5, 63, 64, 65, 100, 120][i % 7]))
            room = 128 - len(prompt)
            kw = dict(max_tokens=[1, room, 7, room // 2][i % 4], temperature=[0, 0.7][i % 2], n=[1, 2, 5][i % 3])
            if i % 5 == 0:
                kw.update(echo=True, logprobs=3, max_tokens=0 if i % 2 else 2)
            calls.append(client.completions.create(model=tiny_server.name, prompt=prompt, **kw))
        return await asyncio.gather(*calls)

    for _ in range(2):
        assert all(r.choices for r in asyncio.run(run()))
    after = tiny_server.health()
    assert after["jobs"] - before["jobs"] > 60 and after["compactions"] >= before["compactions"]
    assert after["compiles"] == tiny_server.ready_health["compiles"], "the server compiled under traffic"


def test_an_idle_engines_wave_ends_once_its_jobs_fill_every_slot(tok):
    """The engine alone, in this process, 4 slots and a 30 s arrival wave: 4 jobs submitted at once fill every slot,
    so they are admitted at once and finish long before the wave would have closed (before, the wave waited its whole
    `wave_s` after the last job: nothing later could have joined)."""
    import threading

    from flax import nnx

    from configs import tiny
    from phi1_jax.model import Phi, PhiConfig
    from phi1_jax.serving.batching import Engine, Job

    engine = Engine(Phi(PhiConfig.from_dict(tiny.get_config().model), rngs=nnx.Rngs(0)), tok, slots=4, wave_ms=30_000)
    engine.start()
    try:
        assert engine.ready.wait(600)
        done = [threading.Event() for _ in range(4)]
        for i, d in enumerate(done):
            engine.submit(Job(prompt=tok.encode(PROMPTS[i]), max_tokens=4, temperature=0.0, top_p=1.0, seed=0, stop=(),
                              emit=lambda ev, d=d: ev[0] != "text" and d.set()))
        assert all(d.wait(20) for d in done), "the jobs waited for the wave to close"
    finally:
        engine.stop()


def test_sigterm_finishes_requests_in_flight_then_exits(tiny_server):
    """Last: it stops the module's tiny server. 32 choices of 100 tokens need two waves of the 16 slots, so the
    request is still being generated when the signal comes."""
    client, got = tiny_server.client(), {}
    stream = client.completions.create(model=tiny_server.name, prompt=PROMPTS[0], max_tokens=100, temperature=1.0,
                                       n=32, seed=0, stream=True, stream_options={"include_usage": True})
    first = next(iter(stream))

    def finish():
        got["chunks"] = [first, *stream]

    reader = threading.Thread(target=finish)
    reader.start()
    tiny_server.proc.send_signal(signal.SIGTERM)
    reader.join(timeout=120)
    assert tiny_server.proc.wait(timeout=120) == 0
    log = tiny_server.proc.stdout.read()
    assert "finishing 1 requests in flight" in log and log.rstrip().endswith("stopped"), log[-2000:]
    finished = {c.index: c.finish_reason for chunk in got["chunks"] for c in chunk.choices if c.finish_reason}
    assert sorted(finished) == list(range(32)) and set(finished.values()) <= {"stop", "length"}
    assert got["chunks"][-1].usage.completion_tokens > 32
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tiny_server.base_url}/models", timeout=5)
