#!/usr/bin/env bash
# Refreshes the locks: for each Python lane, resolves the versions pyproject.toml's ranges allow and writes exactly
# what got installed to requirements/lock-py3XX.txt, the constraints scripts/setup.sh installs within.
#
#   bash scripts/lock.sh              both lanes (3.11 and 3.12), every package at the newest allowed version (the
#                                     environments of `LOCK=none bash scripts/setup.sh`: .venv-latest, .venv-latest-3.12)
#   bash scripts/lock.sh 3.12         one lane
#   bash scripts/lock.sh --keep [V]   keeps every pin of the current lock and adds what pyproject.toml gained since (a
#                                     new dependency at its newest allowed version): after adding a dependency, without
#                                     moving the rest (in .venv-lock-3.XX, made afresh)
#
# Without --keep, run `bash scripts/test.sh --latest` first (it resolves the same environments and runs the suite on
# them); commit new locks only when the suite passes on them, then `bash scripts/test.sh` installs and tests exactly them.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=
if [ "${1:-}" = --keep ]; then keep=1; shift; fi
lanes=("$@")
[ ${#lanes[@]} -gt 0 ] || lanes=(3.11 3.12)
mkdir -p requirements
for v in "${lanes[@]}"; do
  lock=requirements/lock-py${v/./}.txt
  if [ -n "$keep" ]; then
    venv=.venv-lock-$v
    rm -rf "$venv"
    PYTHON=python$v VENV=$venv LOCK=$lock bash scripts/setup.sh
    how="'bash scripts/lock.sh --keep $v' (the pins before, plus what pyproject.toml added)"
  else
    venv=.venv-latest; [ "$v" = 3.11 ] || venv=.venv-latest-$v
    PYTHON=python$v LOCK=none bash scripts/setup.sh
    how="'bash scripts/lock.sh $v'"
  fi
  {
    echo "# The versions CI installs for Python $v (constraints for scripts/setup.sh). Made by $how"
    echo "# on $(date -u +%Y-%m-%d) from pyproject.toml's ranges; edit pyproject.toml, not this file."
    # Local version labels go (torch 2.13.0+cpu is pinned as 2.13.0, as pyproject.toml asks for it), pip itself too.
    "$venv/bin/python" -m pip freeze --exclude-editable --all | grep -vE '^pip==' \
      | sed -E 's/^([A-Za-z0-9_.-]+==[^+ ]+)\+[A-Za-z0-9.]+$/\1/' | LC_ALL=C sort -f
  } > "$lock.tmp"
  mv "$lock.tmp" "$lock"
  echo "wrote $lock ($(grep -vc '^#' "$lock") packages)"
  if [ -n "$keep" ]; then rm -rf "$venv"; fi
done
