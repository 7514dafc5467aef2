#!/usr/bin/env bash
# Figure 2.1 at CPU scale (configs/tiny_fig2_1.py): two tiny runs, stdlib alone and stdlib + exercises, with HumanEval
# measured as they train, then the figure. Rerunning resumes each run where it stopped; the figure is redrawn.
#   bash scripts/fig2_1_demo.sh [OUT_PNG]     (default docs/figures/fig2_1_tiny.png; about 6 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-3.12/bin/python}
[ -x "$PY" ] || PY=python
OUT=${1:-docs/figures/fig2_1_tiny.png}
W=workdirs/fig2_1
mkdir -p "$W"
"$PY" -m phi1_jax.train --config=configs/tiny_fig2_1.py --workdir="$W/stdlib"
if [ ! -f "$W/exercises/manifest.json" ]; then
  "$PY" -m phi1_jax.data_gen.stdlib_exercises --out="$W/exercises.jsonl"
  "$PY" -m phi1_jax.data_gen.shards --input="$W/exercises.jsonl" --prompt-field=prompt \
    --tokenizer="$W/stdlib/tokenizer.model" --out="$W/exercises"
fi
"$PY" -m phi1_jax.train --config=configs/tiny_fig2_1.py:exercises --workdir="$W/exercises-run"
"$PY" -m phi1_jax.figures fig2_1 --runs="stdlib=$W/stdlib,stdlib+exercises=$W/exercises-run" --out="$OUT"
echo "figure: $OUT"
