#!/usr/bin/env bash
# What code evals during training cost: configs/tiny.py for STEPS steps without evals and with HumanEval (all 164
# problems, greedy, 64 new tokens) every EVERY steps, run back to back in turns (off, on, off, on, ...) on fresh
# workdirs; prints each run's wall time, the evals' own seconds (code_eval_seconds) and the on/off ratio.
#   bash scripts/bench_code_eval.sh [STEPS=2000] [EVERY=1000] [ROUNDS=2]
#   CONFIG=configs/phi1_small.py EXTRA="--config.data.tokenizer=... ..." bash scripts/bench_code_eval.sh 3000 1000 1
#       (the GPU measurement: phi-1-small's shape; EXTRA carries its data flags)
# The issue's budget: at most 5% more wall time at an eval every 1,000 steps over 164 problems (phi-1-small, GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-3.12/bin/python}
[ -x "$PY" ] || PY=python
STEPS=${1:-2000}; EVERY=${2:-1000}; ROUNDS=${3:-2}
CONFIG=${CONFIG:-configs/tiny.py}; EXTRA=${EXTRA:-}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -c "from phi1_jax import embedded_corpus; embedded_corpus.build(2048, progress=False)"  # built once, untimed
for r in $(seq "$ROUNDS"); do
  for mode in off on; do
    every=0; [ "$mode" = on ] && every=$EVERY
    t0=$EPOCHREALTIME
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    "$PY" -m phi1_jax.train --config="$CONFIG" --workdir="$TMP/$mode$r" --config.steps="$STEPS" \
      --config.code_eval.every="$every" --config.checkpoint_every="$STEPS" $EXTRA >"$TMP/$mode$r.log" 2>&1
    echo "$mode $r $t0 $EPOCHREALTIME" >>"$TMP/times"
  done
done
"$PY" - "$TMP" "$STEPS" "$EVERY" "$CONFIG" <<'PYEOF'
import json, sys
from pathlib import Path
tmp, steps, every, config = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
wall = {"off": 0.0, "on": 0.0}
evals = 0.0
for line in (tmp / "times").read_text().splitlines():
    mode, r, t0, t1 = line.split()
    wall[mode] += float(t1) - float(t0)
    if mode == "on":
        rows = [json.loads(x) for x in (tmp / f"on{r}" / "metrics.jsonl").read_text().splitlines()]
        e = sum(x.get("code_eval_seconds", 0.0) for x in rows)
        evals += e
        print(f"round {r}: evals at steps {[x['step'] for x in rows if 'code_eval_seconds' in x]}, {e:.1f} s")
print(f"{config}, {steps} steps, HumanEval (164 problems) every {every} steps: wall {wall['on']:.1f} s with, "
      f"{wall['off']:.1f} s without: {wall['on'] / wall['off']:.3f}x; the evals are {100 * evals / wall['on']:.1f}% "
      "of the runs with them")
PYEOF
