#!/usr/bin/env bash
# Creates .venv (if missing) and installs phi1_jax with its test and notebook extras (pytest, transformers, Jupyter).
# torch is installed first, pinned, so nothing later resolves it to a multi-GB CUDA build.
# A second run is a no-op unless pyproject.toml or this script changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.phi1_jax_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,notebook]"
  touch "$stamp"
fi
