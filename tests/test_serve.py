"""phi1_jax.serve as a real subprocess on a free port, driven by the `openai` package (sync and async) over HTTP.

Two servers run for the module: the tiny config's model with random weights and the embedded corpus's tokenizer
(greedy text checked against phi1_jax.generate, batching, streaming, errors, SIGTERM), and a "scripted" model whose
weights are set by hand so that it writes one fixed, valid textbook reply whatever it is asked (phi1_jax.data_gen.generate end to
end, chat, EvalPlus-style samples scored by `python -m phi1_jax.evals`). The SIGTERM test stops the first server, so it is last.
"""

from __future__ import annotations

import asyncio
import json
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

    def wait_ready(self, timeout=180.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("server not ready in time")

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
def servers(tmp_path_factory, embedded):
    root = tmp_path_factory.mktemp("serve")
    tiny = Served(_tiny_checkpoint(root / "tiny", embedded), "--slots=16")
    scripted = Served(_scripted_checkpoint(root / "scripted"), "--slots=8")
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
    """Greedy text of phi1_jax.generate for a prompt, from the served checkpoint loaded in this process."""
    from phi1_jax import checkpoint
    from phi1_jax.generate import for_decoding, generate
    from phi1_jax.tokenizer import Tokenizer

    model = for_decoding(checkpoint.load_model(tiny_server.name))
    tok = Tokenizer.load(Path(tiny_server.name) / "tokenizer.model")

    def greedy(prompt: str, max_tokens: int) -> tuple[str, int, int]:
        ids = tok.encode(prompt)
        out = generate(model, [ids], max_new_tokens=max_tokens, eos_id=tok.eos_id)[0]
        return tok.decode(out), len(ids), len(out)

    greedy.tok = tok
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
           dict(stop=[""]), dict(logprobs=2), dict(extra_body={"prompt": 7}), dict(extra_body={"prompt": [[]]}),
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
