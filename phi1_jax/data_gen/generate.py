"""Synthetic textbooks and CodeExercises through an OpenAI-compatible server (arXiv 2306.11644 §2.2).

    python -m phi1_jax.data_gen.generate --kind=textbooks --n=1000 --out=gen/textbooks --base-url=http://localhost:8000/v1 \\
        --model=NAME --concurrency=16 [--seed=0] [--budget-usd=20 --price-in=0.0005 --price-out=0.0015] [--batch]

Writes `OUT/<kind>.jsonl`, one record per line as results arrive:
    {"id": "exercises-s0-0000042", "text": ..., "prompt": <exercises: signature + docstring>,
     "meta": {"kind", "attempt", "factors", "llm_prompt", "model", "prompt_tokens", "completion_tokens"}}

How a run stays exact and cheap across interruptions:
- attempt k of a run draws its factors and prompt from (kind, seed, k) alone (phi1_jax.data_gen.prompts), so the same attempt
  always sends the same request; every reply is cached in `OUT/cache.sqlite` before it is judged;
- a reply becomes a record only if it passes phi1_jax.data_gen.validate and is not a near-duplicate (MinHash, phi1_jax.data_gen.dedup) of
  a record already kept; the record is appended and flushed at once;
- rerunning the same command on the same folder skips attempts already written, replays the others from the cache
  (free), and continues until exactly N records exist. A SIGKILL loses at most the requests in flight.
- `OUT/run.json` holds the run's identity (kind, seed, model, sampling, template version): a folder made by another
  run is refused rather than mixed. `--n` may grow between runs.
- `--batch` sends through the OpenAI Batch API (half price, results within 24 h): batches are submitted in rounds,
  their ids saved in `OUT/batches.json`, and a rerun resumes polling them instead of resubmitting.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from phi1_jax.data_gen import prompts, validate
from phi1_jax.data_gen.dedup import NearDuplicateIndex
from phi1_jax.data_gen.llm import BudgetExceeded, Completion, LLMClient, LLMError, resolve_api_key
from phi1_jax import cli, files
from phi1_jax.errors import UserError

RUN_FILE, CACHE_FILE, BATCH_FILE = "run.json", "cache.sqlite", "batches.json"
IDENTITY_KEYS = ("kind", "seed", "model", "temperature", "max_tokens", "template_version")


class GenerateError(UserError, RuntimeError):
    """A run that cannot start or go on; the message says why."""


# --- the output folder -----------------------------------------------------------------------------------------------


def check_folder(out: Path, identity: dict) -> None:
    """Refuse a folder holding another run's records; create run.json for a new one."""
    run_file = out / RUN_FILE
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except json.JSONDecodeError as e:
            raise GenerateError(f"{run_file} is not valid JSON ({e.msg}); is this a phi1_jax.data_gen.generate folder?") from None
        diff = {k: (previous.get(k), identity[k]) for k in IDENTITY_KEYS if previous.get(k) != identity[k]}
        if diff:
            said = ", ".join(f"{k}: folder has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            raise GenerateError(f"{out} holds records of another run ({said}); use another --out or the same settings")
        return
    if strays := sorted(p.name for p in out.glob("*.jsonl")):
        raise GenerateError(f"{out} already holds {strays} but no {RUN_FILE}: not a folder this command made; "
                            "use an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(run_file, json.dumps(identity, indent=2) + "\n")


def load_records(path: Path) -> list[dict]:
    """Records already written. A last line cut short by a kill is removed (it was never a record); any other bad line
    is an error naming it, and nothing is changed."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    if cut < len(raw):
        try:
            json.loads(raw[cut:])
            path.open("ab").write(b"\n")  # complete record, only its newline missing
            cut = len(raw) + 1
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"note: {path}: dropping an incomplete last line ({len(raw) - cut} bytes) left by an interrupted "
                  "run", file=sys.stderr)
            os.truncate(path, cut)
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerateError(f"{path}:{lineno}: malformed JSON line ({e.msg}); fix or remove it") from None
        if not (isinstance(rec, dict) and isinstance(rec.get("id"), str) and isinstance(rec.get("text"), str)
                and isinstance(rec.get("meta", {}).get("attempt"), int)):
            raise GenerateError(f"{path}:{lineno}: not a generate record (needs id, text, meta.attempt)")
        records.append(rec)
    return records


# --- one attempt -----------------------------------------------------------------------------------------------------


def attempt_request(kind: str, seed: int, k: int) -> tuple[dict, list[dict], int]:
    f = prompts.factors(kind, seed, k)
    return f, [{"role": "user", "content": prompts.render(kind, f)}], seed * 1_000_003 + k


def record_id(kind: str, seed: int, k: int) -> str:
    return f"{kind}-s{seed}-{k:07d}"


class Generator:
    def __init__(self, client: LLMClient, kind: str, seed: int, n: int, out: Path, *, temperature: float,
                 max_tokens: int, dedup_threshold: float, progress: bool = True):
        self.client, self.kind, self.seed, self.n, self.out = client, kind, seed, n, out
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self.path = out / f"{kind}.jsonl"
        self.records = load_records(self.path)
        self.done = {r["meta"]["attempt"] for r in self.records}  # attempts written, by this run or an earlier one
        self.index = NearDuplicateIndex(dedup_threshold) if dedup_threshold > 0 else None
        if self.index is not None:
            for r in self.records:
                self.index.insert(r["id"], r["text"])
        self.rejected: collections.Counter = collections.Counter()
        self.judged: set[int] = set()  # attempts this process has rejected: never judged (or counted) twice
        self.progress = progress

    def request(self, k: int):
        f, messages, s = attempt_request(self.kind, self.seed, k)
        return f, messages, {**self.params, "seed": s}

    def judge(self, k: int, f: dict, messages: list[dict], c: Completion, sink) -> bool:
        """Validate, dedup and (if good) append one reply; returns whether it became a record."""
        v = validate.check(self.kind, c.text, f)
        if not v.ok:
            self.rejected[v.reason] += 1
            self.judged.add(k)
            return False
        rid = record_id(self.kind, self.seed, k)
        if self.index is not None:
            dup, m = self.index.duplicate_of(rid, v.text)
            if dup is not None:
                self.rejected["near-duplicate"] += 1
                self.judged.add(k)
                return False
            self.index.insert(rid, v.text, m)
        rec = {"id": rid, "text": v.text}
        if self.kind == "exercises":
            rec["prompt"] = v.prompt
        rec["meta"] = {"kind": self.kind, "attempt": k, "factors": f, "llm_prompt": messages[0]["content"],
                       "model": self.client.model, "prompt_tokens": c.prompt_tokens,
                       "completion_tokens": c.completion_tokens}
        sink.write(json.dumps(rec) + "\n")
        sink.flush()  # one write per record: a kill never leaves half of an earlier record
        self.records.append(rec)
        self.done.add(k)
        return True

    def _max_attempts(self) -> int:
        return 20 * self.n + 200

    def _bar(self):
        return tqdm(total=self.n, initial=min(len(self.records), self.n), desc=f"{self.kind}", unit="rec",
                    disable=not self.progress, dynamic_ncols=True)

    def _too_many(self) -> GenerateError:
        return GenerateError(f"gave up after {self._max_attempts()} attempts with {len(self.records)}/{self.n} records: "
                             f"replies keep failing validation ({dict(self.rejected.most_common())})")

    async def run(self) -> None:
        """Live mode: up to `concurrency` attempts in flight; stop as soon as N records are written."""
        if len(self.records) >= self.n:
            return
        pending: dict[asyncio.Task, tuple] = {}
        k = 0
        with self.path.open("a", encoding="utf-8") as sink, self._bar() as bar:
            try:
                while len(self.records) < self.n:
                    while len(pending) < self.client.concurrency and k < self._max_attempts():
                        if k not in self.done:
                            f, messages, params = self.request(k)
                            task = asyncio.ensure_future(self.client.complete(messages, **params))
                            pending[task] = (k, f, messages)
                        k += 1
                    if not pending:
                        raise self._too_many()
                    finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in sorted(finished, key=lambda t: pending[t][0]):
                        kk, f, messages = pending.pop(task)
                        c = task.result()  # LLMError / BudgetExceeded propagate (the finally cancels the rest)
                        if len(self.records) < self.n and self.judge(kk, f, messages, c, sink):
                            bar.update(1)
                    bar.set_postfix(rejected=sum(self.rejected.values()), sent=self.client.requests_sent, refresh=False)
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)

    def run_batches(self, poll_interval: float) -> None:
        """Batch mode: judge what the cache holds; submit the next attempts as a batch; repeat until N."""
        from phi1_jax.data_gen.batch import BatchRunner

        runner = BatchRunner(self.client, self.out / BATCH_FILE, poll_interval=poll_interval, progress=self.progress)
        runner.resume()  # batches submitted by an earlier, interrupted run
        with self.path.open("a", encoding="utf-8") as sink, self._bar() as bar:
            while len(self.records) < self.n:
                todo, k = [], 0
                while len(self.records) < self.n and k < self._max_attempts():
                    if k not in self.done and k not in self.judged:
                        f, messages, params = self.request(k)
                        c = self.client.cached(messages, **params)
                        if c is None:
                            todo.append(self.client.request(messages, **params))
                        elif self.judge(k, f, messages, c, sink):
                            bar.update(1)
                    if len(todo) >= max(8, int(1.25 * (self.n - len(self.records)))):
                        break
                    k += 1
                if len(self.records) >= self.n:
                    break
                if not todo:
                    raise self._too_many()
                if not runner.submit_and_collect(todo):
                    why = runner.last_error()
                    raise GenerateError("a whole batch came back without a single usable reply"
                                        + (f" (first error: {why})" if why else "")
                                        + f"; batch ids in {self.out / BATCH_FILE}")


# --- the command -----------------------------------------------------------------------------------------------------


def estimate(client: LLMClient, kind: str, seed: int, n: int, max_tokens: int, batch: bool) -> str:
    sample = [prompts.render(kind, prompts.factors(kind, seed, k)) for k in range(50)]
    prompt_tokens = sum(len(s) for s in sample) / len(sample) / 4 + 8  # ~4 characters a token, + chat framing
    requests = int(n * 1.15) + 1  # ~15% of replies are expected to be rejected or duplicates
    cost = client.estimate_cost(requests, prompt_tokens, max_tokens) * (0.5 if batch else 1.0)
    priced = f", at most ${cost:.2f}{' (Batch API: half price)' if batch else ''}" if cost else " (no prices given)"
    return (f"plan: {n} {kind} records, about {requests} requests of ~{prompt_tokens:.0f} prompt and <= {max_tokens} "
            f"completion tokens{priced}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.data_gen.generate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=prompts.KINDS)
    p.add_argument("--n", required=True, type=int, help="number of valid, distinct records the folder should hold")
    p.add_argument("--out", required=True, help="output folder (created; rerun on it to continue)")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                   help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL or OpenAI)")
    p.add_argument("--model", required=True, help="model name the server knows")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0, help="seeds the factor sampling (and the request seed)")
    p.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY (not needed for a local --base-url)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=None, help="per reply (default 2048 textbooks, 768 exercises)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--budget-usd", type=float, default=None, help="hard spending limit (needs --price-in/--price-out)")
    p.add_argument("--price-in", type=float, default=0.0, help="USD per 1k prompt tokens")
    p.add_argument("--price-out", type=float, default=0.0, help="USD per 1k completion tokens")
    p.add_argument("--dedup-threshold", type=float, default=0.8,
                   help="MinHash Jaccard above which a reply duplicates a kept record (0: exact dedup off too)")
    p.add_argument("--batch", action="store_true", help="use the OpenAI Batch API (half price, slow)")
    p.add_argument("--poll-interval", type=float, default=30.0, help="seconds between batch status checks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@cli.reports_user_errors  # a run that cannot start or go on (GenerateError, LLMError): exit 2
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.n < 1 or a.concurrency < 1:
        print("error: --n and --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        api_key = resolve_api_key(a.api_key, a.base_url)
    except LLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_tokens = a.max_tokens or (2048 if a.kind == "textbooks" else 768)
    out = Path(a.out)
    identity = {"kind": a.kind, "seed": a.seed, "model": a.model, "temperature": a.temperature,
                "max_tokens": max_tokens, "template_version": prompts.TEMPLATE_VERSION}
    gen = None
    try:
        if a.budget_usd is not None and not (a.price_in or a.price_out):
            raise GenerateError("--budget-usd needs --price-in and/or --price-out to count spending")
        client = LLMClient(base_url=a.base_url, api_key=api_key, model=a.model, concurrency=a.concurrency,
                           timeout_s=a.timeout, max_retries=a.max_retries, cache_path=None,
                           budget_usd=a.budget_usd, price_in_per_1k=a.price_in, price_out_per_1k=a.price_out)
        check_folder(out, identity)
        client.open_cache(out / CACHE_FILE)
        gen = Generator(client, a.kind, a.seed, a.n, out, temperature=a.temperature, max_tokens=max_tokens,
                        dedup_threshold=a.dedup_threshold, progress=not a.no_progress)
        if len(gen.records) >= a.n:
            print(f"{gen.path} already holds {len(gen.records)} records (>= {a.n}); nothing to do")
            return 0
        print(estimate(client, a.kind, a.seed, a.n - len(gen.records), max_tokens, a.batch), file=sys.stderr)
        if a.n > prompts.space_size(a.kind):
            print(f"warning: --n={a.n} exceeds the {prompts.space_size(a.kind)} distinct factor combinations of "
                  f"{a.kind}; combinations will repeat (extend the lists in phi1_jax/data_gen/prompts.py)", file=sys.stderr)
        if a.batch:
            gen.run_batches(a.poll_interval)
        else:
            asyncio.run(gen.run())
    except BudgetExceeded as e:
        print(f"stopped: {e}. {_summary(gen)}", file=sys.stderr)
        return 3
    except OSError as e:  # --out, its files or the request cache cannot be read or written
        print(f"error: {e}", file=sys.stderr)
        return cli.USER_ERROR
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to continue. {_summary(gen)}", file=sys.stderr)
        return 130
    print(_summary(gen), file=sys.stderr)
    return 0


def _summary(gen: Generator | None) -> str:
    if gen is None:
        return ""
    c = gen.client
    return (f"{len(gen.records)}/{gen.n} records in {gen.path}; requests sent {c.requests_sent}, cached replies "
            f"reused {c.cache_hits}, rejected {dict(gen.rejected.most_common())}, tokens {c.prompt_tokens} in / "
            f"{c.completion_tokens} out" + (f", ${c.spent_usd:.4f}" if c.spent_usd else ""))


if __name__ == "__main__":
    sys.exit(main())
