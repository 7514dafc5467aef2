"""Benchmark phi1_jax.serve: requests/s and tokens/s at 1, 4 and 16 concurrent clients, beside `generate` directly.

    python -m phi1_jax.bench_serve --model=tiny                      # configs/tiny.py's shape, random weights
    python -m phi1_jax.bench_serve --model=phi1_small --max-tokens=32 # phi-1-small's shape (350M), random weights

A random-weights checkpoint of the shape is written to a temporary folder with the embedded corpus's tokenizer, served
by `python -m phi1_jax.serve` as a subprocess, and driven by the `openai` async client: at each concurrency C, C
clients each send --rounds greedy requests one after another (after one warm-up round, so compiles are not timed).
The same C prompts then go through `phi1_jax.generate` as one batch in this process (warm): the device-side work the
server's batching is meant to match, so the ratio is the server's overhead (HTTP, JSON, tokenizer, chunking, waiting
for a slot). "16 vs 1" is the wall time of one round of 16 concurrent requests over that of one request alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phi1_jax import cli

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main():\n", "class Stack:\n    def __init__(self):",
           "# Sort a list of numbers\ndef sort_numbers(xs):", "def is_prime(n: int) -> bool:\n    \"\"\"",
           "for i in range(10):\n    print(", "def read_json(path):\n    with open(path) as f:",
           "async def fetch(url):\n"]


def _checkpoint(shape: str, folder: Path):
    from flax import nnx

    from phi1_jax import checkpoint, embedded_corpus
    from phi1_jax.model import Phi, PhiConfig

    if shape == "tiny":
        from configs import tiny as config
    else:
        from configs import phi1_small as config
    emb = embedded_corpus.build(2048, progress=False)
    model = Phi(PhiConfig.from_dict(config.get_config().model), rngs=nnx.Rngs(0))
    checkpoint.save_model(folder, model)
    shutil.copyfile(emb.tokenizer_path, folder / "tokenizer.model")
    return model, emb.tokenizer()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _round(base_url: str, name: str, concurrency: int, rounds: int, max_tokens: int):
    """C clients, each sending `rounds` requests in sequence: (wall seconds, requests, completion tokens, latencies)."""
    import openai

    latencies, tokens = [], []

    async def one_client(c: int):
        for r in range(rounds):
            t0 = time.perf_counter()
            resp = await client.completions.create(model=name, prompt=PROMPTS[(c + r) % len(PROMPTS)],
                                                   max_tokens=max_tokens, temperature=0)
            latencies.append(time.perf_counter() - t0)
            tokens.append(resp.usage.completion_tokens)

    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(concurrency)))
        return time.perf_counter() - t0, len(latencies), sum(tokens), latencies


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.bench_serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", choices=["tiny", "phi1_small"], default="tiny")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-len", type=int, default=256, help="the server's cache slots per row")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",")]

    import httpx
    import jax

    from phi1_jax.generate import for_decoding, generate

    folder = Path(tempfile.mkdtemp(prefix="bench_serve."))
    ckpt = folder / a.model
    model, tok = _checkpoint(a.model, ckpt)
    model = for_decoding(model)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "phi1_jax.serve", f"--checkpoint={ckpt}", f"--port={port}",
                               f"--slots={max(levels)}", f"--max-len={a.max_len}"], stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 1800
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
            try:
                httpx.get(f"{url}/models", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise SystemExit("server not ready") from None
                time.sleep(0.5)
        for c in levels:
            asyncio.run(_round(url, str(ckpt), c, 1, a.max_tokens))  # warm: compiles for this batch shape
            wall, n, toks, lat = asyncio.run(_round(url, str(ckpt), c, a.rounds, a.max_tokens))
            single, _, _, _ = asyncio.run(_round(url, str(ckpt), c, 1, a.max_tokens))  # one round: C at once
            prompts = [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(c)]
            generate(model, prompts, max_new_tokens=a.max_tokens, eos_id=tok.eos_id)  # warm
            t0 = time.perf_counter()
            outs = []
            for _ in range(a.rounds):
                outs += generate(model, prompts, max_new_tokens=a.max_tokens, eos_id=tok.eos_id)
            gen_wall = time.perf_counter() - t0
            gen_toks = sum(len(o) for o in outs)
            rows.append({"concurrency": c, "requests": n, "wall_s": round(wall, 3), "req_per_s": round(n / wall, 3),
                         "tok_per_s": round(toks / wall, 1), "p50_latency_s": round(sorted(lat)[len(lat) // 2], 3),
                         "one_round_s": round(single, 3), "generate_req_per_s": round(len(outs) / gen_wall, 3),
                         "generate_tok_per_s": round(gen_toks / gen_wall, 1),
                         "server_over_generate": round((gen_toks / gen_wall) / (toks / wall), 2)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)
    one = {r["concurrency"]: r["one_round_s"] for r in rows}
    print(f"\n{a.model} ({platform.processor() or platform.machine()}, {jax.default_backend()}, "
          f"{jax.device_count()} device), {a.max_tokens} new tokens per request, greedy:")
    print(f"{'clients':>7} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'generate req/s':>15} {'generate tok/s':>15} "
          f"{'gen/server':>10}")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['req_per_s']:>8} {r['tok_per_s']:>8} {r['p50_latency_s']:>7} "
              f"{r['generate_req_per_s']:>15} {r['generate_tok_per_s']:>15} {r['server_over_generate']:>10}")
    if 1 in one and 16 in one:
        print(f"16 concurrent requests took {one[16] / one[1]:.2f}x the time of one")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "max_tokens": a.max_tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
