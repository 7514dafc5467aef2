#!/usr/bin/env bash
# Downloads, into .whl/, the wheels of the Python packages phi1_jax needs that the lent GPU machines' image lacks
# (that image has jax with CUDA, flax, optax, orbax, torch, transformers, ...; see /work/.library/device/KINDS.md),
# for its Python 3.12 on x86-64. Run here (pip reaches the registry; the GPU machine reaches nothing), then name .whl in
# the device call's `carry`; scripts/gpu_checks.sh installs them into /tmp/site there.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
mkdir -p .whl
plat=()
for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
# ml-collections (configs), jmp (mixed precision), grain + array-record + portpicker (the data loader), tensorboardX.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" --platform manylinux2014_x86_64 --platform any -d .whl \
  "ml-collections==1.1.0" "jmp==0.0.4" "grain==0.2.18" "array-record==0.8.6" "tensorboardX==2.6.5" "portpicker==1.6.0"
du -sh .whl
