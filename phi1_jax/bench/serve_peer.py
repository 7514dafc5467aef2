"""A load generator for any OpenAI-compatible server, and `python -m phi1_jax.serve` side by side with `transformers
serve` on the same weights, the same tokenizer and the same prompts.

    python -m phi1_jax.bench.serve_peer --base-url=http://127.0.0.1:8000/v1 --model=NAME [--clients=1,16,64]
        [--requests=32] [--max-tokens=32] [--json=PATH]            # drive one server that is already running
    python -m phi1_jax.bench.serve_peer --side-by-side --shape=tiny [--peer-python=.venv/bin/python] [--json=PATH]

Load: at each concurrency level C, C clients (one `openai.AsyncOpenAI`) take the next of --requests greedy
(temperature 0) completion requests in turn, each streamed with `stream_options.include_usage`, until all are done;
prompt i is PROMPTS[i % len(PROMPTS)] and every request asks for --max-tokens. Per level: requests/s and completion
tokens/s over the level's wall time (first request sent to last answer), p50/p99 latency, p50/p99 time to first token
(the first streamed chunk with text), and the usage token counts. Percentiles are nearest-rank. A request that fails
is counted under `errors` (and the command exits 1); figures are over the requests that succeeded.

Side by side (--side-by-side): a random-weights model of --shape (configs/tiny.py or configs/phi1_small.py, context
--max-len) is written once as a Hugging Face directory by the project's converter (`phi1_jax.convert.to_hf`), with a
byte-level BPE `tokenizer.json` (the kind phi-1's own CodeGen tokenizer is) trained on the embedded corpus, and a
`tokenizer_config.json`/`generation_config.json` for transformers; a model with more head rows than the tokenizer has
ids (phi1_small: 51200) gets one added token `<|padN|>` per extra row, so both servers choose among the same ids. Every
server loads that one directory: ours as `--checkpoint=DIR` (phi1_jax.loader reads the HF layout and the tokenizer.json
beside it), the peer as `transformers serve DIR --device=cpu --dtype=float32`, once as it is (plain: one
`model.generate()` at a time) and once with `--continuous-batching` (its paged-attention batching engine, its cache
sized for the most clients at --max-len tokens each), per --peer-modes; the peers run under --peer-python, the
environment that has torch and transformers[serving], offline (no hub access). All run at once; each level runs on every
server in turn, who goes first rotating from level to level, each server warmed first with --warmup requests. The report
adds, per level and peer, whether both sides counted the same prompt tokens for every request (the same tokenizer) and
how many greedy completions are identical text (the same weights, both fp32), and `uptime`'s load average before each
measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phi1_jax import cli, files
from phi1_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
EOS = "<|endoftext|>"

# The same prompts on both sides: code of a few lengths (about 10 to 150 tokens with the benchmark's tokenizer).
PROMPTS = [
    "def add(a, b):\n",
    "import os\n\n\ndef list_python_files(root):\n    \"\"\"Return the .py files under root.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n\n    def pop(self):\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\ndef is_prime(n):\n",
    "from collections import Counter\n\n\ndef most_common_words(text, k):\n"
    "    \"\"\"The k most common words of text, most common first, ties in order of first appearance.\n\n"
    "    >>> most_common_words('a b a c b a', 2)\n    ['a', 'b']\n    \"\"\"\n",
    "import json\nimport sys\n\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n\n"
    "def save(path, obj):\n    with open(path, 'w') as f:\n        json.dump(obj, f, indent=2)\n\n\n"
    "def merge(a, b):\n    \"\"\"Merge dict b into dict a recursively and return a.\"\"\"\n"
    "    for key, value in b.items():\n"
    "        if isinstance(value, dict) and isinstance(a.get(key), dict):\n",
]


class BenchError(UserError, RuntimeError):
    """A server that would not start or answer; the message names it."""


# --- the load generator -----------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list: the smallest value with at least q% at or below."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def _one(client, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, chunks, text, usage, finish = None, 0, [], None, None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices:
            piece = chunk.choices[0].text or ""
            if piece:
                chunks += 1
                text.append(piece)
                if first is None:
                    first = time.perf_counter() - t0
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    latency = time.perf_counter() - t0
    return {"text": "".join(text), "text_chunks": chunks, "finish_reason": finish, "latency_s": latency,
            "ttft_s": first if first is not None else latency,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None}


async def drive(base_url: str, model: str, *, clients: int, requests: int, max_tokens: int,
                prompts: list[str] = PROMPTS, timeout: float = 3600) -> dict:
    """`requests` streamed greedy completions from `clients` concurrent clients; the figures and each request.

    Each record: index, prompt index, text, completion_tokens and prompt_tokens (the server's usage; None when it sent
    none), latency_s, ttft_s, finish_reason; or index and error. tokens/s counts usage completion tokens (a request
    without usage counts its streamed text chunks, and `usage_missing` says how many did)."""
    import openai

    records: list[dict | None] = [None] * requests
    next_index = iter(range(requests))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=timeout) as client:
        async def worker():
            for i in next_index:  # one shared iterator: each client takes the next request when it is free
                p = i % len(prompts)
                try:
                    r = await _one(client, model, prompts[p], max_tokens)
                    records[i] = {"index": i, "prompt": p, **r}
                except Exception as e:  # noqa: BLE001 - any failure is counted and reported, not fatal to the level
                    records[i] = {"index": i, "prompt": p, "error": f"{type(e).__name__}: {e}"[:300]}

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return summarize(records, clients=clients, wall_s=wall)


def summarize(records: list[dict], *, clients: int, wall_s: float) -> dict:
    ok = [r for r in records if "error" not in r]
    tokens = [r["completion_tokens"] if r["completion_tokens"] is not None else r["text_chunks"] for r in ok]
    out = {"clients": clients, "requests": len(records), "errors": len(records) - len(ok), "wall_s": round(wall_s, 4),
           "req_per_s": round(len(ok) / wall_s, 3), "tok_per_s": round(sum(tokens) / wall_s, 2),
           "completion_tokens": sum(tokens), "usage_missing": sum(r["completion_tokens"] is None for r in ok)}
    if ok:
        lat, ttft = [r["latency_s"] for r in ok], [r["ttft_s"] for r in ok]
        out.update({"latency_p50_s": round(percentile(lat, 50), 4), "latency_p99_s": round(percentile(lat, 99), 4),
                    "ttft_p50_s": round(percentile(ttft, 50), 4), "ttft_p99_s": round(percentile(ttft, 99), 4)})
    out["records"] = records
    return out


def _levels(spec: str) -> list[int]:
    try:
        levels = [int(x) for x in spec.split(",")]
    except ValueError:
        raise cli.UsageError(f"--clients={spec}: a comma-separated list of client counts, e.g. 1,16,64") from None
    if not levels or min(levels) < 1:
        raise cli.UsageError(f"--clients={spec}: every count must be at least 1")
    return levels


def _row(name: str, level: dict) -> dict:
    return {"server": name, **{k: v for k, v in level.items() if k != "records"}}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- the side-by-side run ---------------------------------------------------------------------------------------------


def train_tokenizer(path: Path, vocab_size: int = 2048) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2/CodeGen's kind, EOS `<|endoftext|>`) trained on the embedded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from phi1_jax import embedded_corpus

    docs, _ = embedded_corpus.collect_documents()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((d.text for d in docs), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path))
    return path


def export_model(shape: str, max_len: int, out: Path, tokenizer_json: Path | None = None) -> Path:
    """A random-weights model of configs/{shape}.py (seed 0, context max_len) as a Hugging Face directory both
    servers load: `phi1_jax.convert.to_hf`'s config.json + model.safetensors, the tokenizer.json (trained here
    unless given), and the two small files transformers reads beside them."""
    import importlib

    from flax import nnx

    from phi1_jax import convert
    from phi1_jax.model import Phi, PhiConfig
    from phi1_jax.tokenizer import Tokenizer

    config = importlib.import_module(f"configs.{shape}").get_config().model
    config.max_seq_len = max_len
    model = Phi(PhiConfig.from_dict(config), rngs=nnx.Rngs(0))
    convert.to_hf(model, out)
    if tokenizer_json is None:
        train_tokenizer(out / "tokenizer.json")
    else:
        shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    tok = Tokenizer.load(out / "tokenizer.json")
    if tok.vocab_size > model.cfg.vocab_size:
        raise BenchError(f"{out}/tokenizer.json: {tok.vocab_size} ids do not fit the model's {model.cfg.vocab_size}")
    if tok.vocab_size < model.cfg.vocab_size:
        # One token per padding row: phi1_jax.serve picks only ids its tokenizer has, transformers any row of the
        # head, so without them the two would generate different tokens (phi1_small's 51200 rows, 2048 BPE ids).
        from tokenizers import Tokenizer as HFTokenizer

        padded = HFTokenizer.from_file(str(out / "tokenizer.json"))
        padded.add_tokens([f"<|pad{i}|>" for i in range(tok.vocab_size, model.cfg.vocab_size)])
        padded.save(str(out / "tokenizer.json"))
        tok = Tokenizer.load(out / "tokenizer.json")
        assert tok.vocab_size == model.cfg.vocab_size, (tok.vocab_size, model.cfg.vocab_size)
    files.write_text(out / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": max_len}, indent=2))
    files.write_text(out / "generation_config.json", json.dumps(
        {"eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id, "do_sample": False}, indent=2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server command as a subprocess (its output in LOG); ready once /v1/models answers 200 and one request does."""

    def __init__(self, name: str, cmd: list[str], port: int, model: str, log: Path, timeout: float, env=None):
        import httpx

        self.name, self.cmd, self.model, self.url = name, cmd, model, f"http://127.0.0.1:{port}/v1"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{name} exited {self.proc.returncode} before it was ready: "
                                 f"{log.read_text()[-1500:]}")
            try:
                if httpx.get(f"{self.url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise BenchError(f"{name} not ready after {timeout:.0f} s: {log.read_text()[-1500:]}")
            time.sleep(0.5)
        self.ready_s = round(time.perf_counter() - t0, 1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _compare(ours: dict, peer: dict) -> dict:
    """Per level: prompts whose prompt-token counts differ between the sides, and identical greedy completions."""
    a = {r["index"]: r for r in ours["records"] if "error" not in r}
    b = {r["index"]: r for r in peer["records"] if "error" not in r}
    both = sorted(set(a) & set(b))
    return {"compared": len(both),
            "prompt_token_mismatches": sum(a[i]["prompt_tokens"] != b[i]["prompt_tokens"] for i in both),
            "same_text": sum(a[i]["text"] == b[i]["text"] for i in both),
            "prompts_with_other_text": sorted({a[i]["prompt"] for i in both if a[i]["text"] != b[i]["text"]}),
            "same_completion_tokens": sum(a[i]["completion_tokens"] == b[i]["completion_tokens"] for i in both)}


PEER_MODES = ("plain", "continuous-batching")  # transformers serve's two engines
CB_BLOCK = 32  # tokens per block of the peer's paged cache


def peer_mode_flags(mode: str, clients: int, max_len: int) -> list[str]:
    """transformers serve's flags for a mode. Continuous batching gets a cache of its own size, room for `clients`
    rows of max_len tokens, and prefill steps of at most 2048 tokens: left to itself, on a CPU it sizes the cache from
    the machine's free memory (it was OOM-killed at 10.8 GB on this shared machine)."""
    if mode not in PEER_MODES:
        raise cli.UsageError(f"--peer-modes: {mode!r} is not one of {list(PEER_MODES)}")
    if mode == "plain":
        return []
    return ["--continuous-batching", f"--cb-block-size={CB_BLOCK}",
            f"--cb-num-blocks={math.ceil(clients * max_len / CB_BLOCK)}", "--cb-max-batch-tokens=2048"]


def side_by_side(a, folder: Path) -> dict:
    hf = export_model(a.shape, a.max_len, folder / f"{a.shape}-hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ours = "phi1_jax.serve"
    commands = {ours: [sys.executable, "-m", "phi1_jax.serve", f"--checkpoint={hf}", f"--slots={a.slots}",
                       f"--max-len={a.max_len}", *([f"--compile-cache={a.compile_cache}"] if a.compile_cache else [])]}
    for mode in a.peer_modes.split(","):
        commands[f"transformers serve ({mode})"] = [
            a.peer_python, "-m", "transformers.cli.transformers", "serve", str(hf), "--device=cpu", "--dtype=float32",
            "--host=127.0.0.1", *peer_mode_flags(mode, max(_levels(a.clients)), a.max_len)]
    servers: dict[str, Server] = {}
    try:
        for name, cmd in commands.items():
            port = free_port()
            cmd.append(f"--port={port}")
            servers[name] = Server(name, cmd, port, str(hf), folder / f"{port}.log", a.ready_timeout, env=env)
            print(f"{name}: ready in {servers[name].ready_s} s", file=sys.stderr, flush=True)
        for s in servers.values():  # warm-up, not counted
            w = asyncio.run(drive(s.url, s.model, clients=min(a.warmup, 4), requests=a.warmup,
                                  max_tokens=a.max_tokens))
            if w["errors"]:
                raise BenchError(f"{s.name}: warm-up failed: {[r['error'] for r in w['records'] if 'error' in r][0]}")
        rows, comparisons, names = [], [], list(servers)
        for n, c in enumerate(_levels(a.clients)):
            got = {}
            for name in names[n % len(names):] + names[:n % len(names)]:  # who goes first rotates level by level
                load = load_average()
                got[name] = asyncio.run(drive(servers[name].url, servers[name].model, clients=c,
                                              requests=max(a.requests, c) if a.at_least_clients else a.requests,
                                              max_tokens=a.max_tokens))
                rows.append({**_row(name, got[name]), "load_average": load})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            for name in names[1:]:
                comparisons.append({"clients": c, "peer": name, **_compare(got[ours], got[name])})
                print(json.dumps(comparisons[-1]), file=sys.stderr, flush=True)
    finally:
        for s in servers.values():
            s.stop()
    return {"shape": a.shape, "max_len": a.max_len, "max_tokens": a.max_tokens,
            "commands": {k: " ".join(v) for k, v in commands.items()},
            "ready_s": {k: s.ready_s for k, s in servers.items()}, "rows": rows, "comparisons": comparisons}


# --- command line -----------------------------------------------------------------------------------------------------


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.bench.serve_peer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server's base URL, e.g. http://HOST:PORT/v1")
    p.add_argument("--model", default=None, help="the model name to send (with --base-url)")
    p.add_argument("--side-by-side", action="store_true", help="start phi1_jax.serve and transformers serve here")
    p.add_argument("--clients", default="1,16,64", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--at-least-clients", action="store_true",
                   help="send max(--requests, C) requests at level C, so every client sends at least one")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (greedy)")
    p.add_argument("--warmup", type=int, default=4, help="(side by side) requests to each server before measuring")
    p.add_argument("--shape", choices=["tiny", "phi1_small"], default="tiny", help="(side by side) the model's config")
    p.add_argument("--max-len", type=int, default=256, help="(side by side) the model's context")
    p.add_argument("--slots", type=int, default=16, help="(side by side) phi1_jax.serve --slots")
    p.add_argument("--compile-cache", default=None, help="(side by side) phi1_jax.serve --compile-cache")
    p.add_argument("--peer-python", default=str(ROOT / ".venv" / "bin" / "python"),
                   help="(side by side) the Python with torch and transformers[serving] (default: .venv's)")
    p.add_argument("--peer-modes", default="plain,continuous-batching",
                   help="(side by side) transformers serve as is (plain) and/or with --continuous-batching")
    p.add_argument("--ready-timeout", type=float, default=1800, help="(side by side) seconds for a server to be ready")
    p.add_argument("--json", default=None, help="also write the figures here (JSON; with --base-url each request too)")
    a = p.parse_args(argv)
    if min(a.requests, a.max_tokens, a.warmup) < 1:
        raise cli.UsageError("--requests, --max-tokens and --warmup must be at least 1")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if a.side_by_side:
        if a.base_url:
            raise cli.UsageError("--side-by-side starts its own servers; drop --base-url")
        if not Path(a.peer_python).exists():
            raise cli.UsageError(f"--peer-python={a.peer_python}: not found (a Python with transformers[serving])")
        folder = Path(tempfile.mkdtemp(prefix="bench_serve_peer."))
        try:
            result = side_by_side(a, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        if not (a.base_url and a.model):
            raise cli.UsageError("give --base-url and --model (a running server), or --side-by-side")
        levels = [asyncio.run(drive(a.base_url, a.model, clients=c, requests=a.requests, max_tokens=a.max_tokens))
                  for c in _levels(a.clients)]
        result = {"base_url": a.base_url, "model": a.model, "max_tokens": a.max_tokens,
                  "rows": [_row(a.base_url, lv) for lv in levels], "levels": levels}
        for row in result["rows"]:
            print(json.dumps(row), flush=True)
    command = " ".join(["python -m phi1_jax.bench.serve_peer", *(argv if argv is not None else sys.argv[1:])])
    result = {"bench": "serve_peer", "command": command,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": started,
              "load_average_after": load_average(), **result}
    if a.json:
        files.write_text(a.json, json.dumps(result, indent=2) + "\n")
    errors = sum(r["errors"] for r in result["rows"])
    if errors:
        print(f"{errors} requests failed (see the records)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
