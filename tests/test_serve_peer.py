"""phi1_jax.bench.serve_peer: its load generator driven against our own server on a tiny random-weights model (the
Hugging Face directory the side-by-side run gives both servers), its figures checked against the responses."""

import json
import sys

import pytest

from phi1_jax.bench import serve_peer


def test_percentile_is_nearest_rank():
    values = [0.4, 0.1, 0.3, 0.2]
    assert serve_peer.percentile(values, 50) == 0.2  # the 2nd of 4: half are at or below it
    assert serve_peer.percentile(values, 99) == 0.4
    assert serve_peer.percentile(list(range(1, 101)), 99) == 99
    assert serve_peer.percentile([7.0], 50) == 7.0


def test_bad_command_lines_are_one_error_line(capsys):
    assert serve_peer.main(["--base-url=http://127.0.0.1:1/v1", "--model=m", "--clients=0"]) == 2
    assert "error: --clients=0: every count must be at least 1" in capsys.readouterr().err
    assert serve_peer.main(["--clients=1"]) == 2
    assert "give --base-url and --model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    """phi1_jax.serve on the tiny config exported by serve_peer.export_model (2 slots, a 128-token context), with a
    small byte-level BPE tokenizer.json trained on the benchmark's own prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("serve_peer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(serve_peer.PROMPTS * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=[serve_peer.EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(root / "tokenizer.json"))
    hf = serve_peer.export_model("tiny", 128, root / "hf", tokenizer_json=root / "tokenizer.json")
    assert {p.name for p in hf.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json", "generation_config.json"}
    from phi1_jax.tokenizer import Tokenizer

    padded = Tokenizer.load(hf / "tokenizer.json")  # one <|padN|> per head row past the 400 BPE ids
    assert padded.vocab_size == 2048 and padded.decode([400, 2047]) == "<|pad400|><|pad2047|>"
    port = serve_peer.free_port()
    cache = request.config.cache.mkdir("phi1_jax_compile_serve_peer")  # later runs start in seconds
    server = serve_peer.Server("phi1_jax.serve", [sys.executable, "-m", "phi1_jax.serve", f"--checkpoint={hf}",
                                                  f"--port={port}", "--slots=2", "--max-len=128",
                                                  f"--compile-cache={cache}"],
                               port, str(hf), root / "server.log", timeout=900)
    try:
        yield server, hf
    finally:
        server.stop()


def test_load_generator_figures_match_the_responses(served, tmp_path):
    import openai

    from phi1_jax.tokenizer import Tokenizer

    server, hf = served
    out = tmp_path / "figures.json"
    assert serve_peer.main([f"--base-url={server.url}", f"--model={server.model}", "--clients=1,2", "--requests=5",
                            "--max-tokens=6", f"--json={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["bench"] == "serve_peer" and result["date"] and result["machine"] and result["load_average_after"]
    assert [lv["clients"] for lv in result["levels"]] == [1, 2]

    tok = Tokenizer.load(hf / "tokenizer.json")
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    truth = {}  # prompt index -> the same request, not streamed (5 requests use the first 5 prompts: 10-96 tokens)
    for p in range(5):
        r = client.completions.create(model=server.model, prompt=serve_peer.PROMPTS[p], max_tokens=6, temperature=0)
        truth[p] = (r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens)

    for level, row in zip(result["levels"], result["rows"]):
        records = level["records"]
        assert row == {"server": server.url, **{k: v for k, v in level.items() if k != "records"}}
        assert level["requests"] == 5 and level["errors"] == 0 and level["usage_missing"] == 0
        assert [r["index"] for r in records] == list(range(5))
        assert [r["prompt"] for r in records] == [i % len(serve_peer.PROMPTS) for i in range(5)]
        for r in records:
            text, prompt_tokens, completion_tokens = truth[r["prompt"]]
            assert (r["text"], r["prompt_tokens"], r["completion_tokens"]) == (text, prompt_tokens, completion_tokens)
            assert r["prompt_tokens"] == len(tok.encode(serve_peer.PROMPTS[r["prompt"]]))
            assert 1 <= r["completion_tokens"] <= 6
            assert (r["completion_tokens"] == 6) == (r["finish_reason"] == "length")
            assert 0 < r["ttft_s"] <= r["latency_s"] <= level["wall_s"] + 5e-5  # each rounded on its own
        tokens = sum(r["completion_tokens"] for r in records)
        assert level["completion_tokens"] == tokens

        def rate_of(n):  # the rates come from the unrounded wall time, which lies within half a rounding step
            return n / (level["wall_s"] + 5e-5), n / (level["wall_s"] - 5e-5)

        lo, hi = rate_of(tokens)
        assert lo * 0.999 <= level["tok_per_s"] <= hi * 1.001
        lo, hi = rate_of(5)
        assert lo * 0.999 <= level["req_per_s"] <= hi * 1.001
        latencies = sorted(r["latency_s"] for r in records)
        ttfts = sorted(r["ttft_s"] for r in records)
        assert level["latency_p50_s"] == pytest.approx(latencies[2], abs=1e-4)  # nearest rank: the 3rd of 5
        assert level["latency_p99_s"] == pytest.approx(latencies[-1], abs=1e-4)
        assert level["ttft_p50_s"] == pytest.approx(ttfts[2], abs=1e-4)
        assert level["ttft_p99_s"] == pytest.approx(ttfts[-1], abs=1e-4)


def test_side_by_side_comparison_counts_agreement():
    def rec(i, prompt, text, prompt_tokens, tokens):
        return {"index": i, "prompt": prompt, "text": text, "prompt_tokens": prompt_tokens, "completion_tokens": tokens}

    ours = {"records": [rec(0, 0, "a", 3, 2), rec(1, 1, "b", 5, 2), rec(2, 2, "c", 7, 2), {"index": 3, "error": "x"}]}
    peer = {"records": [rec(0, 0, "a", 3, 2), rec(1, 1, "B", 5, 1), rec(2, 2, "c", 8, 2), rec(3, 3, "d", 9, 2)]}
    assert serve_peer._compare(ours, peer) == {"compared": 3, "prompt_token_mismatches": 1, "same_text": 2,
                                                "prompts_with_other_text": [1], "same_completion_tokens": 2}
