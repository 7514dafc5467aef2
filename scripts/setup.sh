#!/usr/bin/env bash
# Creates a virtual environment and installs phi1_jax with its test and notebook extras (pytest, Jupyter), and on
# Python 3.11 also the parity extra (torch, pinned to the CPU build, installed first so nothing resolves it to a
# multi-GB CUDA build; transformers). Versions come from the lock of that Python (requirements/lock-py3XX.txt): a
# fresh machine gets exactly what CI passed with, whatever was released since.
#
#   bash scripts/setup.sh                       Python 3.11 -> .venv       (JAX 0.10.2, torch: the parity tests)
#   PYTHON=python3.12 bash scripts/setup.sh     Python 3.12 -> .venv-3.12  (the newest JAX the project allows)
#   LOCK=none bash scripts/setup.sh             the newest versions pyproject.toml's ranges allow, in .venv-latest
#                                               (.venv-latest-3.12 for 3.12): scripts/test.sh --latest, scripts/lock.sh
#   EXTRAS=gpu-plan PYTHON=python3.12 bash scripts/setup.sh
#                                               opt-in: .venv-gpu-plan, the 3.12 lane plus JAX's CUDA plugin and CUDA
#                                               wheels (~4 GB) to compile for a GPU on this host (phi1_jax/gpu_plan.py);
#                                               the CUDA packages are pinned by requirements/lock-py312-gpu-plan.txt
#
# PYTHON may be a command or a path; a version that pyenv has but has not put on PATH is found in pyenv's versions.
# VENV overrides the directory, LOCK the constraints file. A second run is a no-op unless pyproject.toml, the lock or
# this script changed since. A failed first install removes the environment it created (no empty venv is left behind).
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
case "$version" in
  3.11) default_venv=.venv; extras="test,notebook,parity" ;;
  *) default_venv=.venv-$version; extras="test,notebook" ;;
esac
extra_lock=
case "${EXTRAS:-}" in
  "") ;;
  gpu-plan)
    [ "$version" = 3.12 ] || { echo "error: EXTRAS=gpu-plan is for Python 3.12 (give PYTHON=python3.12)" >&2; exit 2; }
    default_venv=.venv-gpu-plan; extras="$extras,gpu-plan"; extra_lock=requirements/lock-py312-gpu-plan.txt ;;
  *) echo "error: EXTRAS=$EXTRAS: the opt-in extras are: gpu-plan" >&2; exit 2 ;;
esac
LOCK=${LOCK:-requirements/lock-py${version/./}.txt}
if [ "$LOCK" = none ]; then
  default_venv=.venv-latest${default_venv#.venv}
elif [ ! -f "$LOCK" ]; then
  echo "error: $LOCK: no lock for Python $version (make one with 'bash scripts/lock.sh', or LOCK=none for the newest" \
       "versions the ranges allow)" >&2
  exit 2
fi
VENV=${VENV:-$default_venv}
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" != "$version" ]; then
  echo "error: $VENV holds another Python than $PY ($version); remove it or set VENV" >&2
  exit 2
fi
created=
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  created=1
fi
stamp=$VENV/.phi1_jax_installed
if [ "$LOCK" = none ]; then
  # The newest allowed versions, whatever is installed already: resolve afresh every time.
  pins=(--upgrade --upgrade-strategy eager)
else
  pins=(-c "$LOCK")
  if [ -n "$extra_lock" ]; then pins+=(-c "$extra_lock"); fi
  if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ ! scripts/setup.sh -nt "$stamp" ] \
     && [ ! "$LOCK" -nt "$stamp" ] && { [ -z "$extra_lock" ] || [ ! "$extra_lock" -nt "$stamp" ]; } \
     && [ "$(cat "$stamp")" = "$LOCK" ]; then
    exit 0
  fi
fi
install() {
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$version" = 3.11 ]; then
    "$VENV/bin/python" -m pip install -q "${pins[@]}" "torch==2.13.0"
  fi
  "$VENV/bin/python" -m pip install -q "${pins[@]}" -e ".[$extras]"
}
if ! install; then
  if [ -n "$created" ]; then rm -rf "$VENV"; echo "error: the install failed; removed $VENV" >&2; fi
  exit 1
fi
echo "$LOCK" > "$stamp"
