#!/usr/bin/env bash
# The whole test suite, in three lanes (CI runs exactly this):
#   1. Python 3.11 (.venv, JAX 0.10.2, torch): the tests that need torch or transformers (the Hugging Face parity
#      tests, and the packaging test: Hugging Face's `kernels` is the one transformers imports, not ours);
#   2. Python 3.12 (.venv-3.12, the newest JAX the project allows): every test that needs no torch (the parity tests
#      skip there, saying so). tests/test_readme.py runs the README's commands with .venv, as the README writes them.
#   3. .venv-gpu-plan (Python 3.12 plus JAX's CUDA plugin, the gpu-plan extra): tests/test_gpu_target.py, the tiny
#      config compiled for an H100 on this CPU (they skip in lane 2). 3-4 minutes to install (from scratch 160 s,
#      from the pip cache 225 s on a busier machine: it is unpacking ~4 GB), 2-5 minutes to run.
# Each lane's set-up is scripts/setup.sh, installing the committed lock of its Python, a no-op when nothing changed.
# Extra arguments go to every pytest run.
#
#   bash scripts/test.sh --latest [PYTEST ARGS]   not CI: lanes 1 and 2 on the newest versions pyproject.toml's
#       ranges allow today (.venv-latest, .venv-latest-3.12), so a breaking release shows up here as a report and not
#       as a broken main. It ends with a table of what differs from the locks and each lane's result, and exits
#       non-zero if a lane failed. When it passes, `bash scripts/lock.sh` writes those versions into the locks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != --latest ]; then
  bash scripts/setup.sh
  .venv/bin/python -m pytest -q tests/test_convert.py tests/test_packaging.py "$@"
  PYTHON=python3.12 bash scripts/setup.sh
  .venv-3.12/bin/python -m pytest -q "$@"
  EXTRAS=gpu-plan PYTHON=python3.12 bash scripts/setup.sh
  .venv-gpu-plan/bin/python -m pytest -q tests/test_gpu_target.py "$@"
  exit 0
fi
shift
status=0
report=()
for v in 3.11 3.12; do
  venv=.venv-latest; [ "$v" = 3.11 ] || venv=.venv-latest-$v
  if ! PYTHON=python$v LOCK=none bash scripts/setup.sh; then
    report+=("Python $v: set-up FAILED (the newest allowed versions do not install)"); status=1; continue
  fi
  tests=(); [ "$v" = 3.11 ] && tests=(tests/test_convert.py tests/test_packaging.py)
  if "$venv/bin/python" -m pytest -q "${tests[@]}" "$@"; then result=passed; else result=FAILED; status=1; fi
  changed=$("$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort \
            | LC_ALL=C comm -13 <(grep -v '^#' "requirements/lock-py${v/./}.txt" | LC_ALL=C sort) - | tr '\n' ' ' \
            || echo "(could not compare with the lock)")
  report+=("Python $v: $result; newer than the lock: ${changed:-nothing}")
done
echo
echo "scripts/test.sh --latest ($(date -u +%Y-%m-%d)):"
printf '  %s\n' "${report[@]}"
exit $status
