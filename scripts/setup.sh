#!/usr/bin/env bash
# Creates a virtual environment and installs phi1_jax with its test and notebook extras (pytest, Jupyter), and on
# Python 3.11 also the parity extra (torch, pinned to the CPU build, installed first so nothing resolves it to a
# multi-GB CUDA build; transformers).
#
#   bash scripts/setup.sh                       Python 3.11 -> .venv       (JAX 0.10.2, torch: the parity tests)
#   PYTHON=python3.12 bash scripts/setup.sh     Python 3.12 -> .venv-3.12  (the newest JAX the project allows)
#
# PYTHON may be a command or a path; a version that pyenv has but has not put on PATH is found in pyenv's versions.
# VENV overrides the directory. A second run is a no-op unless pyproject.toml or this script changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if ! "$PY" -c "" 2>/dev/null; then
  found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"${PY#python}"*/bin/"$PY" 2>/dev/null \
          | sort -V | tail -n 1 || true)
  [ -n "$found" ] || { echo "error: PYTHON=$PY: no such interpreter (give a command or a path)" >&2; exit 2; }
  PY=$found
fi
version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$version" = 3.11 ]; then default_venv=.venv; extras="test,notebook,parity"; else default_venv=.venv-$version; extras="test,notebook"; fi
VENV=${VENV:-$default_venv}
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" != "$version" ]; then
  echo "error: $VENV holds another Python than $PY ($version); remove it or set VENV" >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.phi1_jax_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$version" = 3.11 ]; then
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
