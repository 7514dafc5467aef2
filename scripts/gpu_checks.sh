#!/usr/bin/env bash
# The project's GPU checks and GPU benchmarks in one command, for a CUDA host (a lent device machine, or yours).
#
#   bash scripts/gpu_checks.sh [STEP ...]    STEP: env kernels kbench tune train dryrun generate   (default: all)
#
#   env       nvidia-smi, versions, jax.devices()
#   kernels   tests/test_flash_attention.py compiled (the interpret-mode tests run the compiled kernel on a GPU host,
#             plus the gpu-marked test with the tuned default block sizes), and tests/test_model.py's GPU test
#   kbench    python -m kernels.bench (Pallas vs XLA vs cuDNN, fwd and fwd+bwd, bf16 and fp16, seq sweep), then with
#             the paper's attention dropout 0.1 at seq 2048
#   tune      python -m kernels.tune: block sizes and Triton warps/stages at phi-1's shape, bf16; prints the fastest
#             BlockSizes (put it into BlockSizes.default, then rerun kbench)
#   train     python -m phi1_jax.bench_train: tokens/s and MFU of phi-1 1.3B at seq 2048 on one GPU, a few settings
#   dryrun    python -m phi1_jax.train --config=configs/phi1.py --config.dry_run=True on this host's devices
#   generate  python -m evals.bench --part=generation --model=phi1 --dtype=bfloat16 (transformers on CUDA beside it)
#
# Each step writes LOGDIR/<step>.log (LOGDIR: $OUT on the device tool, else ./gpu_checks) and a line to
# LOGDIR/summary.txt; a failing step does not stop the rest. Each step is time-boxed so that `env kernels kbench`,
# `tune train` and `dryrun generate` each fit one 10-minute device call. On the lent machines the image's own jax
# (CUDA), flax, optax, orbax, torch and transformers are used; the few packages it lacks travel as wheels: run
# scripts/gpu_wheels.sh here first and carry `.whl`. The checkout itself is used from PYTHONPATH, not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
all_steps=(env kernels kbench tune train dryrun generate)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=("${all_steps[@]}")
for step in "${steps[@]}"; do
  [[ " ${all_steps[*]} " == *" $step "* ]] || { echo "unknown step '$step'; steps: ${all_steps[*]}" >&2; exit 2; }
done
logs=${OUT:-gpu_checks}
mkdir -p "$logs"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

run() {  # run NAME SECONDS CMD...: CMD's output to LOGDIR/NAME.log, its status and time to summary.txt
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name: $*" | tee -a "$logs/$name.log"
  start=$(date +%s)
  timeout "$limit" "$@" >> "$logs/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - start)) s: $*" | tee -a "$logs/summary.txt"
  tail -n 30 "$logs/$name.log"
}

# phi-1 1.3B training steps on one GPU, timed (the run lines add --config.* overrides)
phi1_bench=("$py" -m phi1_jax.bench_train --config=configs/phi1.py --peer=none --steps=8 --warmup=2 --config.mesh.fsdp=1
            --config.seq_len=2048)

for step in "${steps[@]}"; do
  case $step in
    env)
      run env 120 bash -c "nvidia-smi; $py -c 'import sys, jax, flax, optax, orbax.checkpoint as o, torch, transformers
print(sys.version); print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \"torch\",
torch.__version__, \"transformers\", transformers.__version__); print(jax.devices())'" ;;
    kernels)
      run kernels 420 "$py" -m pytest -q -p no:cacheprovider tests/test_flash_attention.py \
        "tests/test_model.py::test_cudnn_on_gpu_equals_xla" ;;
    kbench)
      run kbench 300 "$py" -m kernels.bench --iters=10
      run kbench_dropout 120 "$py" -m kernels.bench --iters=10 --seqs=2048 --dropout=0.1 ;;
    tune)
      run tune 420 "$py" -m kernels.tune --iters=10 ;;
    train)
      # phi-1's settings (bf16, dropout 0.1, Pallas attention with its dropout) at microbatch 8 on one GPU, under the
      # three remat policies: "full" (configs/phi1.py's, for 8-way meshes) recomputes every block, which caps model
      # FLOPs at 3/4 of the hardware's; on one 80 GB GPU "dots" or "none" may fit (~11 GB of activations at
      # microbatch 4 without remat, by estimate) and should score higher.
      for remat in none dots full; do
        run "train_pallas_b8_remat_$remat" 170 "${phi1_bench[@]}" --config.batch_size=8 --config.grad_accum_steps=1 \
          --config.model.attention_impl=pallas "--config.model.remat=$remat"
      done ;;
    dryrun)
      run dryrun 200 "$py" -m phi1_jax.train --config=configs/phi1.py --workdir=/tmp/phi1_dry --config.dry_run=True \
        --config.mesh.fsdp=-1 --config.model.attention_impl=pallas --config.grad_accum_steps=128 ;;
    generate)
      run generate 300 "$py" -m evals.bench --part=generation --model=phi1 --dtype=bfloat16 --batches=1,16 ;;
  esac
done
cat "$logs/summary.txt"
