"""Benchmark phi1_jax.serve: stalls under changing traffic, decode speed beside `generate`, clients side by side.

    python -m phi1_jax.bench.serve_speed --scenario=stalls  [--json=PATH]   # issue #28's latency check, tiny model, 512 ctx
    python -m phi1_jax.bench.serve_speed --scenario=engine_rounds  # the stalls mix on the engine alone, no HTTP
    python -m phi1_jax.bench.serve_speed --scenario=decode --model=phi1_small  # engine decode vs generate, 16 rows
    python -m phi1_jax.bench.serve_speed --scenario=prefix --max-tokens=32  # prefix reuse on/off, data_gen-like
    python -m phi1_jax.bench.serve_speed --scenario=clients     # 1, 16, 64 clients: req/s, tok/s, p50/p99, TTFT

Every scenario writes a random-weights checkpoint of the shape (configs/tiny.py or configs/phi1_small.py, the context
set by --max-len) with the embedded corpus's tokenizer into a temporary folder.

stalls: `python -m phi1_jax.serve` started cold (an empty compilation cache of its own) and timed until /v1/models
  answers; one warm request of the longest shape (a 300-token prompt, 100 new tokens; best of 3); then 5 rounds of 16
  concurrent greedy requests with prompt lengths drawn from 4..300 tokens and max_tokens from 1..100 (a new mix each
  round). The bar: the slowest round at most 3x the median, the median at most 4x the single request. Then a restart
  on the now warm cache, timed until ready. One `openai` async client sends everything, as a harness would (before
  2026-12-05 each round built its own: ~30 ms of SSL context and connection pool, charged to every round and single);
  prompts go as text (--prompts=text, each exactly n tokens, checked against the answers' usage) or as token ids
  (--prompts=ids, before 2026-12-05 the only way: the `openai` client then spends ~5 ms of its own type checks per
  300 ids in this process before the request leaves, ~40 ms of a round, which the server never sees).
engine_rounds: the same single request and 5 rounds, submitted to the engine in this process (every program compiled
  first, as the server does): the device and engine share of the stalls figures, without HTTP, JSON or a client.
decode: in this process, 16 prompts of 16 tokens through `phi1_jax.decoding.generate` and through the engine
  (16 rows, compiled first), each warm, greedy, --max-tokens new tokens: decode tokens/s side by side, prefill left
  out (generate: its chunks after the first 64 tokens, timed at its host visits between chunks, so --max-tokens must
  exceed 64; the engine: its chunks timed after the prompts are admitted), --reps times, the two sides back to back
  in each repeat; the medians and each repeat's load average are kept.
prefix: a data_gen-like load on the engine in this process: --requests prompts sharing a --prefix-tokens header
  with short distinct tails, submitted at once; one engine with prefix reuse off and on in turn: tokens/s.
clients: C clients (1, 16, 64) each send --rounds streamed greedy requests one after another (after one warm-up
  round): requests/s, tokens/s, p50/p99 latency, time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from phi1_jax import cli, files
from phi1_jax.bench.serve_peer import Server, free_port

ROOT = Path(__file__).resolve().parents[2]
PROMPT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
          "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nclass Stack:\n    def __init__(self):\n"
          "        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n\n")


def _checkpoint(shape: str, max_len: int, folder: Path):
    from flax import nnx

    from phi1_jax import checkpoint, embedded_corpus
    from phi1_jax.model import Phi, PhiConfig

    if shape == "tiny":
        from configs import tiny as config
    else:
        from configs import phi1_small as config
    emb = embedded_corpus.build(2048, progress=False)
    cfg = config.get_config().model
    cfg.max_seq_len = max_len
    model = Phi(PhiConfig.from_dict(cfg), rngs=nnx.Rngs(0))
    checkpoint.save_model(folder, model)
    shutil.copyfile(emb.tokenizer_path, folder / "tokenizer.model")
    return model, emb.tokenizer()


def _health(server: Server) -> dict:
    import httpx

    return httpx.get(server.url.removesuffix("/v1") + "/health", timeout=30).json()


def _serve(ckpt: Path, port: int, cache: Path | str, *extra: str) -> Server:
    """`python -m phi1_jax.serve` on CKPT as a subprocess, its output in a log beside CKPT; ready at /v1/models."""
    return Server("phi1_jax.serve", [sys.executable, "-m", "phi1_jax.serve", f"--checkpoint={ckpt}", f"--port={port}",
                                     f"--compile-cache={cache}", *extra], port, str(ckpt),
                  ckpt.parent / f"serve-{port}.log", timeout=3600)


def _client(url: str):
    """One `openai` async client for a whole scenario, as a harness keeps one: a client per round would charge each
    round its construction (~30 ms here: an SSL context and a connection pool) and new connections."""
    import openai

    return openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)


async def _requests(client, name: str, specs: list[dict], stream: bool = False) -> list[dict]:
    """Sends the requests at once; per request: latency, time to first token (streamed), prompt and completion
    tokens."""
    async def one(spec):
        t0 = time.perf_counter()
        if not stream:
            r = await client.completions.create(model=name, temperature=0, **spec)
            return {"latency_s": time.perf_counter() - t0, "tokens": r.usage.completion_tokens,
                    "prompt_tokens": r.usage.prompt_tokens}
        first, tokens = None, 0
        async for chunk in await client.completions.create(model=name, temperature=0, stream=True,
                                                            stream_options={"include_usage": True}, **spec):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return {"latency_s": time.perf_counter() - t0, "ttft_s": first, "tokens": tokens}

    return await asyncio.gather(*(one(s) for s in specs))


# --- scenarios ----------------------------------------------------------------------------------------------------------


def stalls(a, folder: Path) -> dict:
    ckpt = folder / "model"
    _, tok = _checkpoint(a.model, a.max_len, ckpt)
    base = tok.encode(PROMPT * 20)
    cache = folder / "compile_cache"
    extra = [f"--slots={a.slots}", *([f"--chunk-tokens={a.chunk_tokens}"] if a.chunk_tokens else [])]
    server = _serve(ckpt, free_port(), cache, *extra)
    # Text prompts by default (each decodes from base[:n] and encodes back to exactly n tokens, checked below from
    # the answers' usage): a token-id prompt costs the `openai` client ~5 ms of its own type checks per 300 ids in
    # this process, before the request leaves it (--prompts=ids measures that way).
    prompt = (lambda n: base[:n]) if a.prompts == "ids" else (lambda n: tok.decode(base[:n]))

    async def measure():
        async with _client(server.url) as client:
            longest = {"prompt": prompt(300), "max_tokens": 100}
            singles = [(await _requests(client, str(ckpt), [longest]))[0] for _ in range(3)]
            rounds, work, lengths = [], [], []
            for mix in _mixes(a.rounds):
                specs = [{"prompt": prompt(n), "max_tokens": m} for n, m in mix]
                before = _health(server)
                t0 = time.perf_counter()
                got = await _requests(client, str(ckpt), specs)
                rounds.append(time.perf_counter() - t0)
                after = _health(server)  # what the engine ran for the round
                work.append({k: after[k] - before[k] for k in ("prefills", "extends", "chunks", "steps",
                                                               "compactions")})
                if [g["prompt_tokens"] for g in got] != [n for n, _ in mix]:
                    raise cli.UserError(f"prompt lengths served {[g['prompt_tokens'] for g in got]}, "
                                        f"sent {[n for n, _ in mix]}")
                lengths += [g["prompt_tokens"] for g in got]
            return singles, rounds, work, lengths

    try:
        cold = server.ready_s
        singles, rounds, work, lengths = asyncio.run(measure())
        if singles[0]["prompt_tokens"] != 300:
            raise cli.UserError(f"the longest prompt was served as {singles[0]['prompt_tokens']} tokens, not 300")
        single = min(s["latency_s"] for s in singles)
    finally:
        server.stop()
    restart = _serve(ckpt, free_port(), cache, *extra)
    restart.stop()
    median = statistics.median(rounds)
    out = {"cold_start_s": round(cold, 2), "restart_s": round(restart.ready_s, 2), "prompts": a.prompts,
           "single_prompt_tokens": singles[0]["prompt_tokens"], "round_prompt_tokens": [min(lengths), max(lengths)],
           "single_longest_s": round(single, 3), "singles_s": [round(s["latency_s"], 3) for s in singles],
           "rounds_s": [round(r, 3) for r in rounds], "slowest_over_median": round(max(rounds) / median, 2),
           "median_over_single": round(median / single, 2), "per_round": work}
    out["met"] = out["slowest_over_median"] <= 3 and out["median_over_single"] <= 4
    print(json.dumps(out), flush=True)
    return out


def _mixes(rounds: int) -> list[list[tuple[int, int]]]:
    """The stalls scenario's rounds: 16 (prompt tokens, max_tokens) pairs each, drawn from 4..300 and 1..100."""
    rng = np.random.default_rng(0)
    return [[(int(rng.integers(4, 301)), int(rng.integers(1, 101))) for _ in range(16)] for _ in range(rounds)]


def engine_rounds(a, folder: Path) -> dict:
    import threading

    from phi1_jax.serving.batching import Engine, Job

    model, tok = _checkpoint(a.model, a.max_len, folder / "model")
    base = tok.encode(PROMPT * 20)
    engine = Engine(model, tok, slots=a.slots, max_len=a.max_len,
                    **({} if a.chunk_tokens is None else {"chunk_tokens": a.chunk_tokens}))
    engine.start()
    engine.ready.wait()

    def run(specs) -> float:
        done = [threading.Event() for _ in specs]
        t0 = time.perf_counter()
        for (n, m), d in zip(specs, done):
            engine.submit(Job(prompt=base[:n], max_tokens=m, temperature=0.0, top_p=1.0, seed=0, stop=(),
                              emit=lambda ev, d=d: ev[0] != "text" and d.set()))
        for d in done:
            d.wait()
        return time.perf_counter() - t0

    single = min(run([(300, 100)]) for _ in range(3))
    rounds = [run(specs) for specs in _mixes(a.rounds)]
    engine.stop()
    median = statistics.median(rounds)
    out = {"single_longest_s": round(single, 3), "rounds_s": [round(r, 3) for r in rounds],
           "slowest_over_median": round(max(rounds) / median, 2), "median_over_single": round(median / single, 2)}
    print(json.dumps(out), flush=True)
    return out


def prefix(a, folder: Path) -> dict:
    """A data_gen-like load on the engine in this process: --requests prompts that share one long instruction header
    (--prefix-tokens) and differ in a short tail, all submitted at once, greedy, --max-tokens each; the same engine
    with prefix reuse on and off in turn (--reps times each, interleaved): generated tokens/s and wall time."""
    import os
    import threading

    from phi1_jax.serving.batching import Engine, Job

    model, tok = _checkpoint(a.model, a.max_len, folder / "model")
    header = tok.encode(PROMPT * 20)[:a.prefix_tokens]
    tails = [tok.encode(f"# exercise {i}: write a function that returns the {i}-th square number\n") for i in
             range(a.requests)]
    prompts = [header + t for t in tails]
    engine = Engine(model, tok, slots=a.slots, max_len=a.max_len,
                    **({} if a.chunk_tokens is None else {"chunk_tokens": a.chunk_tokens}))
    engine.start()
    engine.ready.wait()

    def run(reuse: bool) -> dict:
        engine.prefix_reuse = reuse
        done = [threading.Event() for _ in prompts]
        jobs = [Job(prompt=p, max_tokens=a.max_tokens, temperature=0.0, top_p=1.0, seed=0, stop=(), stream=False,
                    emit=lambda ev, d=d: ev[0] != "text" and d.set()) for p, d in zip(prompts, done)]
        before, load, t0 = dict(engine.stats), os.getloadavg()[0], time.perf_counter()
        for job in jobs:
            engine.submit(job)
        for d in done:
            d.wait()
        wall = time.perf_counter() - t0
        tokens = sum(len(j.tokens) for j in jobs)
        return {"prefix_reuse": reuse, "wall_s": round(wall, 2), "tok_per_s": round(tokens / wall, 1),
                "prefills": engine.stats["prefills"] - before["prefills"],
                "extends": engine.stats["extends"] - before["extends"],
                "reused_tokens": engine.stats["reused_tokens"] - before["reused_tokens"], "load_1min": round(load, 1)}

    run(True), run(False)  # warm
    rows = []
    for _ in range(a.reps):
        for reuse in (False, True):
            rows.append(run(reuse))
            print(json.dumps(rows[-1]), flush=True)
    engine.stop()
    med = {r: statistics.median(x["tok_per_s"] for x in rows if x["prefix_reuse"] == r) for r in (False, True)}
    out = {"model": a.model, "requests": a.requests, "prefix_tokens": len(header),
           "tail_tokens": [min(map(len, tails)), max(map(len, tails))], "max_tokens": a.max_tokens, "rows": rows,
           "tok_per_s_without": med[False], "tok_per_s_with": med[True],
           "with_over_without": round(med[True] / med[False], 2)}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
    return out


def decode(a, folder: Path) -> dict:
    import os
    import threading

    import jax

    from phi1_jax.decoding import for_decoding, generate
    from phi1_jax.serving.batching import Engine, Job

    model, tok = _checkpoint(a.model, a.max_len, folder / "model")
    prompts = [tok.encode(PROMPT * 4)[i:i + 16] for i in range(16)]
    n = a.max_tokens
    fast = for_decoding(model)

    def timed_generate() -> tuple[float, int, float]:
        """generate's decode alone: (seconds, tokens) of its chunks after the first, timed where generate visits the
        host between chunks (its `stop` callable), and the seconds until the first chunk's end (prefill and chunk)."""
        marks = {}  # tokens per row so far -> when generate's host loop first looked at them

        def stop(row):
            marks.setdefault(len(row), time.perf_counter())
            return False

        t0 = time.perf_counter()
        generate(fast, prompts, max_new_tokens=n, stop=stop)
        (first, t1), (last, t2) = min(marks.items()), max(marks.items())
        return t2 - t1, (last - first) * len(prompts), t1 - t0

    engine = Engine(model, tok, slots=16, max_len=a.max_len,
                    **({} if a.chunk_tokens is None else {"chunk_tokens": a.chunk_tokens}))
    if a.engine_weights == "param":  # the engine before its weights were cast once (the "before" figure)
        from flax import nnx

        engine.graphdef, engine.state = nnx.split(fast)
    # only what this run uses (phi-1-small's programs take minutes each to compile here)
    needed = {("admit", g, 64) for g in engine.group_sizes}
    for w in engine.windows:
        if w <= max(128, 2 * (64 + n)):
            needed |= {("decode", 16, w), ("compact", w)}
    for shape in sorted(needed):
        engine.compile(shape)

    def run() -> tuple[float, int, float]:
        """(decode seconds, tokens, admit seconds): the 16 prompts admitted first, then the chunks timed alone."""
        done = [threading.Event() for _ in prompts]
        jobs = [Job(prompt=p, max_tokens=n, temperature=0.0, top_p=1.0, seed=0, stop=(),
                    emit=lambda ev, d=d: ev[0] != "text" and d.set()) for p, d in zip(prompts, done)]
        engine.waiting += jobs
        t0 = time.perf_counter()
        engine._admit()
        jax.block_until_ready(engine.logits)
        t1 = time.perf_counter()
        while not all(d.is_set() for d in done):
            engine._chunk()
        return time.perf_counter() - t1, sum(len(j.tokens) for j in jobs), t1 - t0

    timed_generate(), run()  # compiles generate's programs; warms both
    reps = []
    for _ in range(a.reps):  # interleaved: the machine's load moves, so each repeat times both sides back to back
        load = os.getloadavg()[0]
        gen_s, gen_tokens, first_s = timed_generate()
        eng_s, eng_tokens, admit_s = run()
        gen, eng = gen_tokens / gen_s, eng_tokens / eng_s
        reps.append({"generate_tok_per_s": round(gen, 1), "engine_tok_per_s": round(eng, 1),
                     "generate_over_engine": round(gen / eng, 2), "generate_prefill_and_first_chunk_s": round(first_s, 2),
                     "engine_admit_s": round(admit_s, 2), "load_1min": round(load, 1)})
        print(json.dumps(reps[-1]), flush=True)
    med = lambda k: statistics.median(r[k] for r in reps)  # noqa: E731
    out = {"model": a.model, "rows": 16, "new_tokens": n, "chunk_tokens": engine.chunk_tokens,
           "engine_weights": a.engine_weights, "repeats": reps,
           "generate_tok_per_s": med("generate_tok_per_s"), "engine_tok_per_s": med("engine_tok_per_s"),
           "generate_over_engine": med("generate_over_engine")}
    print(json.dumps({k: v for k, v in out.items() if k != "repeats"}), flush=True)
    return out


def clients(a, folder: Path) -> dict:
    ckpt = folder / "model"
    _, tok = _checkpoint(a.model, a.max_len, ckpt)
    levels = [int(x) for x in a.concurrency.split(",")]
    prompt = tok.encode(PROMPT)[:48]
    servers = {"phi1_jax.serve": lambda port: _serve(ckpt, port, folder / "compile_cache", f"--slots={a.slots}")}
    rows = []
    for name, start in servers.items():
        server = start(free_port())
        try:
            for c in levels:
                specs = [{"prompt": prompt, "max_tokens": a.max_tokens}] * c

                async def level():
                    async with _client(server.url) as client:
                        await _requests(client, str(ckpt), specs, stream=True)  # warm
                        t0, got = time.perf_counter(), []
                        for _ in range(a.rounds):
                            got += await _requests(client, str(ckpt), specs, stream=True)
                        return got, time.perf_counter() - t0

                got, wall = asyncio.run(level())
                lat = sorted(g["latency_s"] for g in got)
                ttft = sorted(g["ttft_s"] or g["latency_s"] for g in got)
                rows.append({"server": name, "clients": c, "requests": len(got), "req_per_s": round(len(got) / wall, 2),
                             "tok_per_s": round(sum(g["tokens"] for g in got) / wall, 1),
                             "p50_s": round(lat[len(lat) // 2], 3), "p99_s": round(lat[min(len(lat) - 1,
                                                                                           int(len(lat) * 0.99))], 3),
                             "ttft_p50_s": round(ttft[len(ttft) // 2], 3)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    return {"model": a.model, "max_tokens": a.max_tokens, "rows": rows}


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.bench.serve_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--scenario", choices=["stalls", "engine_rounds", "decode", "prefix", "clients"], default="stalls")
    p.add_argument("--model", choices=["tiny", "phi1_small"], default="tiny")
    p.add_argument("--max-len", type=int, default=512, help="the model's context (and the server's cache row)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--reps", type=int, default=3, help="decode: interleaved repeats of both sides (the median is kept)")
    p.add_argument("--prompts", choices=["text", "ids"], default="text",
                   help="stalls: send each prompt as its text (n tokens when encoded) or as its n token ids")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="decode, stalls, engine_rounds: the engine's chunk (default: the engine's own)")
    p.add_argument("--engine-weights", choices=["compute", "param"], default="compute",
                   help="decode: the engine's projections in the compute dtype (as it runs) or in the parameters' "
                        "dtype (fp32, cast at every chunk: the engine before 2026-12-05)")
    p.add_argument("--requests", type=int, default=48, help="prefix: requests sharing the header")
    p.add_argument("--prefix-tokens", type=int, default=256, help="prefix: the shared header's length")
    p.add_argument("--json", default=None, help="also write the figures here (JSON)")
    a = p.parse_args(argv)
    if a.scenario == "decode" and a.max_tokens <= 64:
        p.error("--scenario=decode needs --max-tokens above 64: generate's first 64-token chunk (with its prefill) is "
                "left out of its decode time")
    import jax

    folder = Path(tempfile.mkdtemp(prefix="bench_serve."))
    try:
        result = {"stalls": stalls, "engine_rounds": engine_rounds, "decode": decode, "prefix": prefix,
                  "clients": clients}[a.scenario](a, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"scenario": a.scenario, "args": vars(a), "machine": f"{platform.machine()}, {jax.default_backend()}",
              "date": time.strftime("%Y-%m-%d"), **result}
    if a.json:
        files.write_text(a.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
