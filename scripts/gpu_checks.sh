#!/usr/bin/env bash
# The project's GPU checks and GPU benchmarks as one command on a CUDA host (a lent device machine, or yours), ending
# within 9 minutes with a report: docs/gpu.md says what each step measures, the bars, and the device call.
#
#   bash scripts/gpu_checks.sh [--dry] [STEP ...]
#       STEP: env kernels kbench train generate (the default), and tune, dryrun (only when named)
#
#   env       versions (python, jax, jaxlib, flax, torch, transformers, triton, ...), the devices, nvidia-smi, whether
#             this JAX deprecates Pallas' Triton backend; stops the run at once when JAX sees no GPU
#   kernels   tests/test_flash_attention.py compiled (on a GPU its interpret-mode cases run the compiled kernel) and
#             tests/test_model.py's cuDNN test
#   kbench    python -m phi1_jax.kernels.bench at phi-1's shape (bf16, causal, batch 8, 32 heads of 64, seq 2048), with and
#             without segment ids, forward and forward+backward TFLOP/s: pallas, cudnn, cudnn_mask, xla
#   train     python -m phi1_jax.bench_train: phi-1 1.3B tokens/s and MFU on one GPU, over a ladder of
#             attention:microbatch:remat settings in increasing memory order (GPU_CHECKS_TRAIN), the first out-of-memory
#             ending the ladder; the best one counts
#   generate  python -m phi1_jax.evals.bench --part=generation --model=phi1 --dtype=bfloat16 --batches=1,16, transformers on
#             CUDA beside it
#   tune      python -m phi1_jax.kernels.tune (block sizes, Triton warps/stages): minutes, so not in the default run
#   dryrun    python -m phi1_jax.train --config=configs/phi1.py --config.dry_run=True on this host's devices
#
# --dry (or GPU_CHECKS_DRY=1): the same steps on CPU (JAX_PLATFORMS=cpu) at tiny shapes (configs/tiny.py, the kernel
# interpreted, seq 128, the cuDNN calls through jax.nn's XLA implementation), about two minutes on 2 cores: the
# plumbing check tests/test_gpu_checks.py runs, so no device minute is lost to a typo. Its figures mean nothing.
#
# Output, in OUTDIR ($OUT on the device tool, else ./gpu_checks): report.json and report.md (environment, each step's
# status, time and figures, the bars), log.txt (the end of each step's log) and logs.tar.gz (every log, whole). They
# are written even when steps fail or run out of time. Every step is time-boxed (seconds: env 30, kernels 110, kbench
# 90, train 180, generate 100; tune 240, dryrun 120) and the whole run by GPU_CHECKS_BUDGET (540 s): a step that would
# outlast the budget gets what is left, or is skipped. Exit status 0 when every step ran ok, else 1.
#
# Environment: PYTHON (default python3; with --dry, .venv/bin/python when there is one), OUT, GPU_CHECKS_BUDGET,
# GPU_CHECKS_TRAIN (the ladder, e.g. "pallas:8:none pallas:16:none"). The checkout runs from PYTHONPATH, not
# installed. The host's own jax (CUDA), flax, optax, orbax, torch and transformers are used as they are; wheels in
# .whl/ (scripts/gpu_wheels.sh) are installed into a scratch folder only for the packages this Python lacks.
set -uo pipefail
cd "$(dirname "$0")/.."
all_steps=(env kernels kbench train generate tune dryrun)
default_steps=(env kernels kbench train generate)
declare -A box=([env]=30 [kernels]=110 [kbench]=90 [train]=180 [generate]=100 [tune]=240 [dryrun]=120)
dry=${GPU_CHECKS_DRY:-0}
steps=()
for arg in "$@"; do
  case $arg in
    --dry) dry=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) [[ " ${all_steps[*]} " == *" $arg "* ]] || { echo "unknown step '$arg'; steps: ${all_steps[*]}" >&2; exit 2; }
       steps+=("$arg") ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=("${default_steps[@]}")
[ "$dry" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
py=${PYTHON:-python3}
out=${OUT:-gpu_checks}
mkdir -p "$out" && rm -f "$out"/report.json "$out"/report.md "$out"/log.txt "$out"/logs.tar.gz
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
trap 'rm -rf "$work"' EXIT
t_start=$SECONDS
budget=${GPU_CHECKS_BUDGET:-540}
reserve=10  # seconds kept for the report at the end
echo "gpu_checks: steps ${steps[*]}; dry=$dry; python $py; budget ${budget}s; output $out" | tee "$work/main.log"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ "$dry" = 1 ]; then
  export JAX_PLATFORMS=cpu
fi

# Wheels for what this Python lacks (nothing it has is reinstalled).
site=$work/site
missing=$("$py" - .whl/*.whl 2>>"$work/main.log" <<'EOF'
import importlib.metadata as md, os, sys
for path in sys.argv[1:]:
    if not os.path.isfile(path):
        continue  # no wheels: the glob stayed literal
    name = os.path.basename(path).split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(path)
EOF
)
if [ -n "$missing" ]; then
  echo "installing into $site: $(echo $missing | xargs -n1 basename | tr '\n' ' ')" | tee -a "$work/main.log"
  # shellcheck disable=SC2086
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" $missing \
    >> "$work/main.log" 2>&1 || { echo "installing the wheels failed (see the log)" | tee -a "$work/main.log";
                                  touch "$work/wheels_failed"; }
fi
echo "$missing" | xargs -rn1 basename > "$work/wheels.txt"
export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH}

left() { echo $((budget - reserve - (SECONDS - t_start))); }

record() {  # record NAME RC SECONDS LIMIT NOTE: one status line for the report
  printf '{"name": "%s", "rc": %s, "seconds": %s, "limit": %s, "note": "%s"}\n' "$1" "$2" "$3" "$4" "$5" \
    >> "$work/status.jsonl"
}

run() {  # run NAME SECONDS CMD...: CMD, time-boxed (and cut to the budget left), its output in WORK/NAME.log
  local name=$1 limit=$2 start rc
  shift 2
  (( limit > $(left) )) && limit=$(left)
  if (( limit < 5 )); then
    echo "== $name: skipped, the budget is spent" | tee -a "$work/main.log"
    record "$name" null 0 0 "skipped: budget spent"
    return 99
  fi
  echo "== $name (${limit}s): $*" | tee -a "$work/main.log" >> "$work/$name.log"
  start=$SECONDS
  timeout -k 5 "$limit" "$@" >> "$work/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$work/main.log"
  record "$name" "$rc" $((SECONDS - start)) "$limit" ""
  return $rc
}

# --- the steps ---------------------------------------------------------------------------------------------------------
cat > "$work/env.py" <<'EOF'
"""Environment facts as JSON (argv[1]); exits 3 when a GPU run finds no GPU."""
import importlib.metadata as md, json, os, platform, shutil, subprocess, sys

env = dict(python=sys.version.split()[0], executable=sys.executable, machine=platform.machine(), cores=os.cpu_count())
packages = {}
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint", "grain",
             "ml-collections", "jmp", "numpy", "torch", "transformers", "triton", "nvidia-cudnn-cu13",
             "nvidia-cudnn-cu12", "pytest"):
    try:
        packages[name] = md.version(name)
    except md.PackageNotFoundError:
        pass
env["packages"] = packages
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    env["nvidia_smi"] = (q.stdout or q.stderr).strip()
import jax  # noqa: E402

env.update(jax_backend=jax.default_backend(), devices=[f"{d.platform}:{d.device_kind}" for d in jax.devices()])
try:  # JAX 0.12 registers this deprecation (and warns at every Triton lowering); 0.10 does not have it
    from jax._src import deprecations
    env["pallas_triton_deprecated"] = "jax-pallas-triton" in deprecations._registered_deprecations
    env["pallas_triton_removed"] = deprecations.is_accelerated("jax-pallas-triton") \
        if env["pallas_triton_deprecated"] else False
except Exception as e:  # noqa: BLE001
    env["pallas_triton_deprecated"] = f"unknown ({type(e).__name__})"
import phi1_jax.model, phi1_jax.kernels.flash_attention  # noqa: E401,E402,F401  the checkout imports with what is installed

json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
if sys.argv[2] == "gpu" and env["jax_backend"] != "gpu":
    sys.exit(3)
EOF

step_env() {
  run env "${box[env]}" "$py" "$work/env.py" "$work/env.json" "$([ "$dry" = 1 ] && echo cpu || echo gpu)"
  local rc=$?
  if [ "$dry" != 1 ] && [ "$rc" = 3 ]; then
    echo "JAX sees no GPU here: the other steps are skipped" | tee -a "$work/main.log"
    no_gpu=1
  fi
}

step_kernels() {
  local sel=()
  [ "$dry" = 1 ] && sel=(-k "bad_shapes or gpu")  # the CPU-cheap cases and the GPU ones (which skip there)
  run kernels "${box[kernels]}" "$py" -m pytest -q -p no:cacheprovider --durations=5 --junitxml="$work/kernels.xml" \
    "${sel[@]}" tests/test_flash_attention.py "tests/test_model.py::test_cudnn_on_gpu_equals_xla"
}

step_kbench() {
  local shape=(--seqs=2048 --iters=10)
  [ "$dry" = 1 ] && shape=(--batch=1 --heads=2 --seqs=128 --iters=1 --cudnn-stand-in)
  run kbench "${box[kbench]}" "$py" -m phi1_jax.kernels.bench --dtypes=bfloat16 --segments=none,packed "${shape[@]}" \
    --json="$work/kbench.json"
}

step_tune() {
  local shape=(--iters=10)
  [ "$dry" = 1 ] && shape=(--batch=1 --seq=128 --heads=2 --iters=1 --quick)
  run tune "${box[tune]}" "$py" -m phi1_jax.kernels.tune "${shape[@]}" --json="$work/tune.json"
}

step_train() {
  # phi-1 as configured (bf16, fp32 master weights, dropout 0.1) at seq 2048 on one GPU; no gradient accumulation.
  local ladder base entry impl mb remat i=0 step_end limit extra
  if [ "$dry" = 1 ]; then
    ladder=${GPU_CHECKS_TRAIN:-"pallas:2:none xla:4:full"}
    base=(--config=configs/tiny.py --steps=2 --warmup=1)
  else
    ladder=${GPU_CHECKS_TRAIN:-"pallas:8:none pallas:16:none pallas:32:dots"}
    base=(--config=configs/phi1.py --steps=6 --warmup=2 --config.seq_len=2048)
  fi
  step_end=$((SECONDS + box[train]))
  : > "$work/train_runs.txt"
  for entry in $ladder; do
    IFS=: read -r impl mb remat <<< "$entry"
    i=$((i + 1))
    limit=$((step_end - SECONDS))
    extra=()
    [ "$impl" = cudnn ] && extra=(--config.model.attn_dropout=0.0)  # cuDNN through JAX has no attention dropout
    echo "train_$i $impl $mb $remat" >> "$work/train_runs.txt"
    run "train_$i" "$limit" "$py" -m phi1_jax.bench_train --peer=none "${base[@]}" --config.mesh.fsdp=1 \
      --config.batch_size="$mb" --config.grad_accum_steps=1 --config.model.attention_impl="$impl" \
      --config.model.remat="$remat" "${extra[@]}"
    if grep -qE "RESOURCE_EXHAUSTED|[Oo]ut of memory" "$work/train_$i.log" 2>/dev/null; then
      echo "train: $entry ran out of memory: the ladder ends here" | tee -a "$work/main.log"
      break
    fi
    (( step_end - SECONDS < 5 )) && break
  done
}

step_generate() {
  local peer=transformers args=(--model=phi1 --dtype=bfloat16)
  "$py" -c "import torch, transformers" 2>/dev/null || peer=none  # recorded in the report
  [ "$dry" = 1 ] && args=(--model=tiny --dtype=float32 --prompt-len=16 --new-tokens=8)
  run generate "${box[generate]}" "$py" -m phi1_jax.evals.bench --part=generation "${args[@]}" --batches=1,16 --peer=$peer \
    --json="$work/generate.json"
}

step_dryrun() {
  local args=(--config=configs/phi1.py --config.model.attention_impl=pallas --config.grad_accum_steps=128)
  [ "$dry" = 1 ] && args=(--config=configs/tiny.py)
  run dryrun "${box[dryrun]}" "$py" -m phi1_jax.train "${args[@]}" --workdir="$work/dryrun_workdir" \
    --config.dry_run=True --config.mesh.fsdp=-1
}

no_gpu=0
for step in "${steps[@]}"; do
  if [ "$no_gpu" = 1 ] && [ "$step" != env ]; then
    record "$step" null 0 0 "skipped: JAX sees no GPU"
    continue
  fi
  "step_$step"
done

# --- the report ---------------------------------------------------------------------------------------------------------
cat > "$work/report.py" <<'EOF'
"""Assembles WORK's step results into OUT/report.json and OUT/report.md (standard library only)."""
import glob, json, os, re, sys
import xml.etree.ElementTree as ET

work, out, dry, steps, elapsed, budget = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4].split(), \
    int(sys.argv[5]), int(sys.argv[6])


def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read(name):
    try:
        with open(os.path.join(work, name), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


runs = {}
for line in read("status.jsonl").splitlines():
    r = json.loads(line)
    runs[r["name"]] = r


def status_of(r):
    if r is None:
        return "not run"
    if r["rc"] is None:
        return r["note"] or "skipped"
    return {0: "ok", 124: "timeout", 137: "timeout"}.get(r["rc"], f"failed (exit {r['rc']})")


wheels = dict(missing_here=read("wheels.txt").split(), installed=not os.path.exists(os.path.join(work, "wheels_failed")))
boxes = dict(kv.split("=") for kv in os.environ.get("GPU_CHECKS_BOXES", "").split())
report = dict(dry=dry, steps=steps, elapsed_s=elapsed, budget_s=budget, env=load("env.json"), wheels=wheels,
              results={}, bars={})
md = [f"# GPU checks{' (dry run on CPU: plumbing only, figures meaningless)' if dry else ''}", ""]
env = report["env"] or {}
md += ["## Environment", ""]
if env:
    md += [f"- python {env.get('python')} ({env.get('executable')}), {env.get('cores')} cores",
           f"- packages: {', '.join(f'{k} {v}' for k, v in env.get('packages', {}).items())}",
           f"- JAX backend {env.get('jax_backend')}, devices: {', '.join(env.get('devices', []))}",
           f"- nvidia-smi: {env.get('nvidia_smi', 'not found')}",
           f"- Pallas Triton backend deprecated in this JAX: {env.get('pallas_triton_deprecated')}"]
else:
    md += ["- (the env step wrote nothing: see log.txt)"]
md += [f"- wheels from .whl/ for what this Python lacked: {', '.join(wheels['missing_here']) or 'none'}"
       + ("" if wheels["installed"] else " (their installation FAILED: see log.txt)"), ""]

# kernels: the pytest junit report
kernels = None
if os.path.exists(os.path.join(work, "kernels.xml")):
    try:
        root = ET.parse(os.path.join(work, "kernels.xml")).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        cases = suite.findall("testcase")
        failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
        skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
        kernels = dict(tests=len(cases), failed=failed, skipped=skipped,
                       passed=len(cases) - len(failed) - len(skipped))
    except (ET.ParseError, AttributeError) as e:
        kernels = dict(error=f"unreadable junit report: {e}")
report["results"]["kernels"] = kernels

kbench = load("kbench.json")
report["results"]["kbench"] = kbench
tune = load("tune.json")
report["results"]["tune"] = tune

# train: one bench_train run per ladder entry, figures read off its output
train = []
for line in read("train_runs.txt").splitlines():
    name, impl, mb, remat = line.split()
    log = read(f"{name}.log")
    r = dict(name=name, attention_impl=impl, microbatch=int(mb), remat=remat, status=status_of(runs.get(name)),
             seconds=(runs.get(name) or {}).get("seconds"))
    m = re.search(r"phi1_jax:\s+([\d,]+) tokens/s\s+MFU (\S+).*\(loss (\S+)\)", log)
    if m:
        r.update(tokens_per_s=float(m.group(1).replace(",", "")), loss=float(m.group(3)),
                 mfu=float(m.group(2).rstrip("%")) / 100 if m.group(2).endswith("%") else None)
    if re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory", log):
        r["status"] = "out of memory"
    elif r["status"] == "ok" and (not m or r["loss"] != r["loss"]):
        r["status"] = "failed (no figure or NaN loss)"
    train.append(r)
ok_train = [r for r in train if r["status"] == "ok"]
best = max(ok_train, key=lambda r: r["tokens_per_s"]) if ok_train else None
report["results"]["train"] = dict(runs=train, best=best)
generate = load("generate.json")
report["results"]["generate"] = generate
dryrun_log = read("dryrun.log")
report["results"]["dryrun"] = dict(memory_lines=[l.strip() for l in dryrun_log.splitlines()
                                                 if "GiB per device" in l or "dry run:" in l]) if dryrun_log else None

# step statuses: the command's own, then what its results say
step_status = {}
for step in steps:
    if step == "train":
        # ok: a best figure, and no run that broke (running out of memory or out of the step's time is a finding)
        broken = [r["status"] for r in train if r["status"].startswith("failed") or r["status"].startswith("skipped")]
        step_status[step] = ("ok" if ok_train and not broken else
                             broken[0] if broken else train[0]["status"] if train else "not run")
        continue
    s = status_of(runs.get(step))
    if s == "ok" and step == "kernels" and (not kernels or kernels.get("error") or kernels["failed"]):
        s = "failed"
    if s == "ok" and step in ("kbench", "tune", "generate") and report["results"][step] is None:
        s = "failed (no JSON written)"
    if s == "ok" and step == "kbench" and any("error" in r for r in kbench["rows"]):
        s = "ok, with failed rows"
    step_status[step] = s
report["step_status"] = step_status
report["ok"] = all(s == "ok" for s in step_status.values())

# bars: kernel fwd+bwd >= cuDNN; phi-1 >= 50% MFU on one H100/H200; generation at batch 16 >= 5x transformers
bars = report["bars"]
if kbench:
    for seg in ("none", "packed"):
        rows = {r["impl"]: r for r in kbench["rows"] if r["segments"] == seg and "error" not in r}
        if "pallas" in rows and "cudnn" in rows:
            ours, theirs = rows["pallas"]["fwd_bwd_tflops"], rows["cudnn"]["fwd_bwd_tflops"]
            bars[f"kernel_fwd_bwd_vs_cudnn_{seg}"] = dict(value=ours / theirs, bar=1.0, met=ours >= theirs)
kind = env.get("devices", [""])[0] if env.get("devices") else ""
if best and best.get("mfu") is not None:
    bars["phi1_mfu"] = dict(value=best["mfu"], bar=0.5, met=best["mfu"] >= 0.5,
                            applies=bool(re.search(r"H100|H200", kind)))
if generate and generate.get("generation"):
    b16 = [r for r in generate["generation"]["rows"] if r["batch"] == 16 and "ratio" in r]
    if b16:
        bars["generation_batch16_vs_transformers"] = dict(value=b16[0]["ratio"], bar=5.0, met=b16[0]["ratio"] >= 5.0)
if dry:
    for b in bars.values():
        b["applies"] = False  # CPU figures at tiny shapes say nothing

md += ["## Steps", "", "| step | status | seconds | time box |", "|---|---|---|---|"]
for step in steps:
    names = [n for n in runs if n == step or (step == "train" and n.startswith("train_"))]
    secs = sum((runs[n]["seconds"] or 0) for n in names)
    report.setdefault("step_seconds", {})[step] = secs
    md.append(f"| {step} | {step_status[step]} | {secs} | {boxes.get(step, '')} |")
md += ["", f"Total {elapsed} s of a {budget} s budget. Overall: {'ok' if report['ok'] else 'NOT ok'}.", ""]

if kernels:
    md += ["## Kernel tests", ""]
    if kernels.get("error"):
        md += [f"- {kernels['error']}", ""]
    else:
        md += [f"- {kernels['passed']} passed, {len(kernels['failed'])} failed, {len(kernels['skipped'])} skipped "
               f"of {kernels['tests']}"] + [f"- FAILED {n}" for n in kernels["failed"]] + [""]
if kbench:
    md += [f"## Attention at batch {kbench['batch']}, {kbench['heads']} heads of {kbench['head_dim']}, causal "
           f"({kbench['device']}, jax {kbench['jax']})", "",
           "| dtype | seq | segment ids | impl | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd ms | fwd+bwd ms |",
           "|---|---|---|---|---|---|---|---|"]
    for r in kbench["rows"]:
        impl = r["impl"] + (" (stand-in)" if r.get("stand_in") else "")
        if "error" in r:
            md.append(f"| {r['dtype']} | {r['seq']} | {r['segments']} | {impl} | failed: {r['error'][:60]} | | | |")
        else:
            md.append(f"| {r['dtype']} | {r['seq']} | {r['segments']} | {impl} | {r['fwd_tflops']:.1f} | "
                      f"{r['fwd_bwd_tflops']:.1f} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |")
    md.append("")
if tune:
    md += ["## Tuned block sizes", "", f"- fastest: {tune['best']}", ""]
if train:
    md += ["## Training (phi1_jax.bench_train, one device)", "",
           "| attention | microbatch | remat | status | tokens/s | MFU | loss |", "|---|---|---|---|---|---|---|"]
    for r in train:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else ""
        md.append(f"| {r['attention_impl']} | {r['microbatch']} | {r['remat']} | {r['status']} | {tps} | {mfu} | "
                  f"{r.get('loss', '')} |")
    md += ["", f"Best: {best['attention_impl']} microbatch {best['microbatch']} remat {best['remat']}" if best
           else "Best: none ran", ""]
if generate and generate.get("generation"):
    g = generate["generation"]
    md += [f"## Generation ({g['model']}, {g['dtype']}, prompt {g['prompt_len']}, {g['new_tokens']} new tokens, "
           f"greedy; peer {g['peer']} on {g['peer_device']})", "",
           "| batch | phi1_jax tokens/s | transformers tokens/s | ratio | identical rows |", "|---|---|---|---|---|"]
    for r in g["rows"]:
        theirs = (f"{r['transformers_tokens_per_s']:.1f} | {r['ratio']:.2f} | {r['identical_rows']}/{r['batch']}"
                  if "ratio" in r else "- | - | -")
        md.append(f"| {r['batch']} | {r['ours_tokens_per_s']:.1f} | {theirs} |")
    md.append("")
if report["results"]["dryrun"]:
    md += ["## Dry run (memory per device)", ""] + [f"    {l}" for l in report["results"]["dryrun"]["memory_lines"]] \
        + [""]
md += ["## Bars", ""]
for name, b in bars.items():
    verdict = ("met" if b["met"] else "NOT met") if b.get("applies", True) else "n/a here"
    md.append(f"- {name}: {b['value']:.3g} against {b['bar']:g}: {verdict}")
if not bars:
    md.append("- no figures to judge")
md.append("")

with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md))
print("\n".join(md))
sys.exit(0 if report["ok"] else 1)
EOF

elapsed=$((SECONDS - t_start))
GPU_CHECKS_BOXES=$(for s in "${!box[@]}"; do printf '%s=%s ' "$s" "${box[$s]}"; done)
export GPU_CHECKS_BOXES
"$py" "$work/report.py" "$work" "$out" "$dry" "${steps[*]}" "$elapsed" "$budget" 2> "$work/report.err"
rc=$?
if [ $rc -gt 1 ]; then  # the report script itself broke (or this Python does not run): try the system's
  python3 "$work/report.py" "$work" "$out" "$dry" "${steps[*]}" "$elapsed" "$budget" 2>> "$work/report.err"
  rc=$?
fi
[ $rc -gt 1 ] && { echo "the report could not be written:"; cat "$work/report.err"; } | tee "$out/report.md"
{
  cat "$work/main.log"
  for f in "$work"/*.log; do
    [ "$f" = "$work/main.log" ] && continue
    echo; echo "### $(basename "$f") (last 200 lines)"; tail -n 200 "$f"
  done
  [ -s "$work/report.err" ] && { echo; echo "### report errors"; cat "$work/report.err"; }
} > "$out/log.txt"
tar -C "$work" -czf "$out/logs.tar.gz" --exclude=site --exclude=dryrun_workdir --exclude='*.py' . 2>/dev/null
echo "report: $out/report.md, $out/report.json; logs: $out/log.txt, $out/logs.tar.gz; $((SECONDS - t_start)) s"
exit $([ $rc = 0 ] && echo 0 || echo 1)
