#!/usr/bin/env bash
# The whole test suite, in two lanes (CI runs exactly this):
#   1. Python 3.11 (.venv, JAX 0.10.2, torch): the tests that need torch, i.e. the Hugging Face parity tests;
#   2. Python 3.12 (.venv-3.12, the newest JAX the project allows): every test that needs no torch (the parity tests
#      skip there, saying so). tests/test_readme.py runs the README's commands with .venv, as the README writes them.
# Each lane's set-up is scripts/setup.sh, a no-op when nothing changed. Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests/test_convert.py "$@"
PYTHON=python3.12 bash scripts/setup.sh
.venv-3.12/bin/python -m pytest -q "$@"
