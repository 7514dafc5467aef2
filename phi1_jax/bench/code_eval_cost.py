"""What code evals during training cost: a config trained without evals and with HumanEval every --every steps, run
back to back in turns (off, on, off, on, ...) on fresh workdirs; each run's wall time, the evals' own seconds
(metrics.jsonl's code_eval_seconds) and the on/off ratio.

Command:  python -m phi1_jax.bench.code_eval_cost [--steps=2000] [--every=1000] [--rounds=2] [--config=configs/tiny.py]
          [--json=PATH] [-- EXTRA TRAINER FLAGS]
          e.g. --config=configs/phi1_small.py --steps=3000 --rounds=1 -- --config.data.tokenizer=... (the GPU figure)
Expect:   about 10 minutes on 2 cores at the defaults (configs/tiny.py, all 164 problems, greedy, 64 new tokens).
The issue's budget: at most 5% more wall time at an eval every 1,000 steps over 164 problems (phi-1-small, GPU).
`--json=PATH` also writes the figures as one JSON object ({"config", "steps", "every", "rounds", "runs", "ratio"}).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phi1_jax import cli, files


def _run(config: str, workdir: Path, steps: int, every: int, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "phi1_jax.train", f"--config={config}", f"--workdir={workdir}",
           f"--config.steps={steps}", f"--config.code_eval.every={every}", f"--config.checkpoint_every={steps}", *extra]
    t0 = time.perf_counter()
    with open(workdir.with_suffix(".log"), "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise cli.UsageError(f"the training run failed (exit {r.returncode}); see {workdir.with_suffix('.log')}")
    return time.perf_counter() - t0


@cli.reports_user_errors
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(prog="python -m phi1_jax.bench.code_eval_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=1000, help="steps between code evals in the runs with them")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--json", default=None, help="also write the figures here, as one JSON object")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if min(args.steps, args.every, args.rounds) < 1:
        raise cli.UsageError("--steps, --every and --rounds must be at least 1")
    from phi1_jax import embedded_corpus

    embedded_corpus.build(2048, progress=False)  # built once, untimed
    runs, wall = [], {"off": 0.0, "on": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, args.rounds + 1):
            for mode in ("off", "on"):
                workdir = Path(tmp) / f"{mode}{r}"
                seconds = _run(args.config, workdir, args.steps, args.every if mode == "on" else 0, extra)
                wall[mode] += seconds
                rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
                evals = [x for x in rows if "code_eval_seconds" in x]
                runs.append(dict(round=r, mode=mode, wall_s=seconds, eval_steps=[x["step"] for x in evals],
                                 eval_s=sum(x["code_eval_seconds"] for x in evals)))
                if mode == "on":
                    print(f"round {r}: evals at steps {runs[-1]['eval_steps']}, {runs[-1]['eval_s']:.1f} s", flush=True)
    eval_s = sum(x["eval_s"] for x in runs)
    result = dict(config=args.config, steps=args.steps, every=args.every, rounds=args.rounds, extra=extra, runs=runs,
                  wall_on_s=wall["on"], wall_off_s=wall["off"], ratio=wall["on"] / wall["off"],
                  eval_share=eval_s / wall["on"])
    print(f"{args.config}, {args.steps} steps, HumanEval every {args.every} steps: wall "
          f"{wall['on']:.1f} s with, {wall['off']:.1f} s without: {result['ratio']:.3f}x; the evals are "
          f"{100 * result['eval_share']:.1f}% of the runs with them")
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
