#!/usr/bin/env bash
# The project's GPU checks and GPU benchmarks as one command on a CUDA host (a lent device machine, or yours), ending
# within 9 minutes with a report: docs/gpu.md says what each step measures, the bars, and the device call.
#
#   bash scripts/gpu_checks.sh [--dry] [STEP ...]      (STEP: env kernels kbench train generate; tune, dryrun if named)
#
# A launcher: it installs into a scratch folder the wheels in .whl/ (scripts/gpu_wheels.sh) for the packages this
# Python lacks (the host's own jax, flax, torch, transformers, ... are used as they are), puts the checkout on
# PYTHONPATH (not installed), and runs `python -m phi1_jax.bench.gpu_checks`, which runs the steps, each time-boxed,
# and writes the report from the benchmarks' --json files: see its --help for the steps, the output and the exit
# status. --dry (or GPU_CHECKS_DRY=1): the same steps on CPU at tiny shapes, the plumbing check
# tests/test_gpu_checks.py runs.
#
# Environment: PYTHON (default python3; with --dry, .venv/bin/python when there is one), OUT (the report folder,
# default ./gpu_checks), GPU_CHECKS_BUDGET (seconds, 540), GPU_CHECKS_TRAIN (the training ladder, e.g.
# "pallas:8:none pallas:16:none").
set -uo pipefail
cd "$(dirname "$0")/.."
dry=${GPU_CHECKS_DRY:-0}
for arg in "$@"; do [ "$arg" = --dry ] && dry=1; done
[ "$dry" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
py=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Wheels for what this Python lacks (nothing it has is reinstalled).
missing=$("$py" - .whl/*.whl 2>>"$work/main.log" <<'PYEOF'
import importlib.metadata as md, os, sys
for path in sys.argv[1:]:
    if not os.path.isfile(path):
        continue  # no wheels: the glob stayed literal
    try:
        md.version(os.path.basename(path).split("-")[0])
    except md.PackageNotFoundError:
        print(path)
PYEOF
)
if [ -n "$missing" ]; then
  echo "installing into $work/site: $(echo $missing | xargs -n1 basename | tr '\n' ' ')" | tee -a "$work/main.log"
  # shellcheck disable=SC2086
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" $missing \
    >> "$work/main.log" 2>&1 || { echo "installing the wheels failed (see the log)" | tee -a "$work/main.log";
                                  touch "$work/wheels_failed"; }
fi
echo "$missing" | xargs -rn1 basename > "$work/wheels.txt"
export PYTHONPATH=$PWD:$work/site${PYTHONPATH:+:$PYTHONPATH}
"$py" -m phi1_jax.bench.gpu_checks --work="$work" "$@"
