"""Compiling for a GPU this host lacks: the train step's real XLA:GPU memory, FLOPs and kernels, from a CPU machine.

Command:   python -m phi1_jax.train --config=configs/phi1.py --workdir=W --config.dry_run=True \\
               --config.dry_run_target=h100_sxm [--config.dry_run_fit=True]
           python -m phi1_jax.gpu_plan tiles --target=h100_sxm       (the kernel's tune candidates, compiled)
           python -m phi1_jax.gpu_plan decode --config=configs/phi1.py --target=h100_sxm --rows=16,64   (decoding)
Needs:     the gpu-plan extra (JAX's CUDA plugin and the CUDA wheels, ~4 GB; Python 3.12):
           `EXTRAS=gpu-plan PYTHON=python3.12 bash scripts/setup.sh`, then .venv-gpu-plan/bin/python. No GPU, no driver.
Expect:    phi-1 1.3B: 5-13 minutes per train-step compile on a 2-core CPU, 15-75 s per decode program; configs/tiny.py:
           seconds. docs/gpu.md has the figures.

How: JAX's CUDA plugin describes a GPU from a target-config text file (phi1_jax/gpu_targets/NAME.txtpb, written from the
published device figures) without a device (`jax.experimental.topologies.get_topology_desc`); the train state and batch
are ShapeDtypeStructs sharded on a mesh of that topology's devices, and XLA:GPU compiles the real step (Triton for the
Pallas kernel: phi1_jax.attention picks the backend from the mesh being traced for, so the interpreter is never
compiled). `memory_analysis()` is XLA:GPU's buffer assignment: what one device needs. The CUDA plugin only registers
when JAX's platforms are limited to the CPU (else its CUPTI check fails without a driver): this module sets that when
JAX has not started yet, and says so when it has.

`dry_run_target` is NAME[:N[:H]] (N GPUs on each host, default 1; H hosts, default 1: the topology JAX's CUDA plugin
describes is 1 slice x H hosts x N GPUs, and the step is sharded over all H x N as `config.mesh` says); NAME is one of
TARGETS. The report: a per-device table (arguments, outputs, temporaries, peak; whether the peak fits under JAX's
default preallocation, 75% of the memory, and under the whole memory), FLOPs per token of the compiled program next
to docs/flops.md's formula, the attention kernels the program calls, XLA's own memory warnings, the compile time; then
one JSON line (`Plan.as_json`).

Live peak (`dry_run_live_peak`, on by default): XLA's live-range analysis of the scheduled program, the most bytes live
at once, read from a text dump of this one compile (compiler options, into a temporary directory removed after; the
`*after_optimizations-live-range.txt` file). `peak_bytes` (what the buffer assignment allocates, and what `fits` is
judged on) minus it is the packing loss: heap slots that buffers live at different times cannot share. A missing file
or an unknown format gives one "unknown" line and a null, never an error.

FLOPs: XLA's HloCostAnalysis over the optimized GPU module (the executable's own `cost_analysis()` is None without a
device). It counts custom kernels (the Triton flash attention, cuDNN) as 0 and a loop body once: the gradient
accumulation loop is one micro-batch, so FLOPs per token = the module's FLOPs / the tokens of one micro-batch per
device (the optimizer update, counted once, adds < 0.1%). With remat the compiled program recomputes the forward pass,
so it is above the formula (which counts each FLOP once).

Decoding (`decode`): the decode step of `phi1_jax.decoding.generate` (evals) and of the serving engine, compiled for
one GPU with a KV cache of each --rows rows x --cache-len slots: weights, cache, arguments, aliased outputs,
temporaries, peak, fits; the last stdout line is one JSON object (`decode_plans`).

Fit mode (`dry_run_fit`): walks LADDER (attention x micro-batch per device x remat, fastest-likely first), compiling
each rung, and prints the first whose peak fits under the preallocation as `--config.` overrides to paste.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from phi1_jax import cli, files
from phi1_jax.errors import UserError

TARGETS = {
    "a100_40": "NVIDIA A100 SXM4 40 GB",
    "a100_80": "NVIDIA A100 SXM4 80 GB",
    "h100_sxm": "NVIDIA H100 SXM5 80 GB",
    "h100_pcie": "NVIDIA H100 PCIe 80 GB",
    "h200": "NVIDIA H200 SXM 141 GB",
}
PREALLOCATE = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs
LIVE_PEAK_DEFAULT = True  # config.dry_run_live_peak when a config lacks it (docs/gpu.md: what the dump costs)
GIB = 1024 ** 3
SETUP = "EXTRAS=gpu-plan PYTHON=python3.12 bash scripts/setup.sh (then run with .venv-gpu-plan/bin/python)"
# Fit mode: (attention, micro-batch per device, remat), fastest-likely first. A fused kernel before plain XLA (which
# holds every layer's [B, N, T, T] scores); within one, bigger micro-batches and less recomputation first, from 8
# sequences per device (16k tokens at phi-1's 2048, enough to keep a GPU's matmuls large; each rung is a compile of
# minutes). Rungs the model cannot take (pallas at an unsupported head_dim, cudnn with attention dropout) or the batch
# cannot divide into are skipped without compiling.
LADDER = (
    ("pallas", 8, "dots"), ("pallas", 8, "full"), ("pallas", 4, "full"),
    ("pallas", 2, "full"), ("pallas", 1, "full"),
    ("cudnn", 8, "full"), ("cudnn", 4, "full"), ("cudnn", 2, "full"),
    ("xla", 8, "full"), ("xla", 4, "full"), ("xla", 2, "full"), ("xla", 1, "full"),
)
# Custom-call targets of attention kernels in an optimized XLA:GPU module.
KERNEL_CALLS = {"triton": "__gpu$xla.gpu.triton", "cudnn": "__cudnn$fmha"}


class GpuPlanError(UserError, ValueError):
    """A target that cannot be compiled for here (unknown name, no CUDA plugin, JAX already started on another
    platform); the message says what to change."""


# ---------------------------------------------------------------------------------------------------------------------
# Targets and their devices
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # a key of TARGETS
    devices: int = 1  # GPUs on each host
    hosts: int = 1  # hosts (processes), each with `devices` GPUs

    def __str__(self) -> str:
        if self.hosts > 1:
            return f"{self.name}:{self.devices}:{self.hosts}"
        return self.name if self.devices == 1 else f"{self.name}:{self.devices}"

    @property
    def count(self) -> int:
        """GPUs in all: the devices the step is sharded over."""
        return self.devices * self.hosts

    @property
    def description(self) -> str:
        return TARGETS[self.name]

    @property
    def spec(self) -> str:
        """The GpuTargetConfigProto text: the shipped file, plus the installed cuDNN's version (what a run with the
        same wheels loads; XLA picks cuDNN fusions by it)."""
        text = resources.files("phi1_jax").joinpath("gpu_targets", f"{self.name}.txtpb").read_text()
        cudnn = _installed_cudnn()
        if cudnn:
            major, minor, patch = (list(cudnn) + [0, 0, 0])[:3]
            text += f"dnn_version_info {{ major: {major} minor: {minor} patch: {patch} }}\n"
        return text

    @property
    def device_bytes(self) -> int:
        return int(re.search(r"device_memory_size:\s*(\d+)", self.spec).group(1))


def parse_target(text: str, field: str = "config.dry_run_target") -> Target:
    """'NAME', 'NAME:N' (N GPUs on one host) or 'NAME:N:H' (N GPUs on each of H hosts) -> Target; a GpuPlanError
    names the field (`field`) and the choices."""
    name, _, rest = text.partition(":")
    count, _, hosts = rest.partition(":")
    if name not in TARGETS:
        raise GpuPlanError(f"{field}={text!r}: unknown GPU {name!r}; choose one of "
                           f"{', '.join(TARGETS)} (optionally :N for N GPUs on one host, :N:H for N on each of H "
                           "hosts)")
    if rest and not (count.isdigit() and int(count) >= 1):
        raise GpuPlanError(f"{field}={text!r}: after ':' comes the number of GPUs per host (1 or more)")
    if hosts and not (hosts.isdigit() and int(hosts) >= 1):
        raise GpuPlanError(f"{field}={text!r}: after the second ':' comes the number of hosts (1 or more)")
    if ":" in hosts or (rest.endswith(":") and not hosts):
        raise GpuPlanError(f"{field}={text!r}: NAME, NAME:N or NAME:N:H (N GPUs per host, H hosts)")
    return Target(name, int(count) if count else 1, int(hosts) if hosts else 1)


def _installed_cudnn() -> tuple[int, ...] | None:
    for dist in ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
        try:
            return tuple(int(x) for x in importlib.metadata.version(dist).split(".")[:3])
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cuda_plugin_problem() -> str | None:
    """Why this environment cannot compile for a GPU (None: it can). Tests skip with this reason."""
    if importlib.util.find_spec("jax_plugins") is None or not any(
            importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (13, 12)):
        return f"JAX's CUDA plugin is not installed (the gpu-plan extra): {SETUP}"
    return None


def topology_devices(target: Target, field: str = "config.dry_run_target") -> list:
    """The target's devices, described by its spec: no GPU, no driver needed. Errors name `field` (the command's
    option that gave the target)."""
    import jax
    from jax._src import xla_bridge
    from jax.experimental import topologies

    problem = cuda_plugin_problem()
    if problem:
        raise GpuPlanError(f"{field}={target}: {problem}")
    started = xla_bridge.backends_are_initialized()
    if not started:
        jax.config.update("jax_platforms", "cpu")  # else the CUDA plugin's CUPTI check fails without a driver
    try:
        topo = topologies.get_topology_desc(platform="cuda", topology=f"1x{target.hosts}x{target.devices}",
                                            target_config=target.spec)
    except Exception as e:  # noqa: BLE001  the plugin raises plain RuntimeErrors
        hint = (" (JAX had started on its default platforms before the target was set up: run with JAX_PLATFORMS=cpu)"
                if started and os.environ.get("JAX_PLATFORMS") != "cpu" else "")
        raise GpuPlanError(f"{field}={target}: JAX's CUDA plugin could not describe the GPU: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{hint}") from None
    return list(topo.devices)


# ---------------------------------------------------------------------------------------------------------------------
# Compiling the train step
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """One compile of the train step for a target: per-device figures, and what the program calls."""

    target: str
    devices: int  # GPUs in all (hosts x GPUs per host)
    hosts: int
    attention_impl: str
    micro_batch: int  # sequences per device per micro-batch
    grad_accum_steps: int
    remat: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    device_bytes: int
    fits: bool  # peak under JAX's default preallocation (75% of the memory)
    fits_whole_memory: bool  # peak under the whole memory (XLA_PYTHON_CLIENT_PREALLOCATE=false or MEM_FRACTION=.95)
    flops_per_token: float  # from the compiled program (custom kernels count 0; remat's recomputation counts)
    flops_per_token_formula: float  # docs/flops.md
    kernels: dict  # attention kernel calls in the program: {"triton": n, "cudnn": n}
    interpreted_kernels: int  # Pallas kernels compiled as the interpreter (must be 0 for a GPU target)
    xla_warnings: list
    compile_seconds: float
    jax_version: str
    # XLA's live-range analysis of the scheduled program: the most bytes live at once (arguments included), read from
    # the compile's dump (`live_peak`); None when not asked for or unreadable. peak_bytes - live_peak_bytes is what
    # the buffer assignment loses packing those buffers into the heap (`packing_loss_bytes`).
    live_peak_bytes: int | None = None
    packing_loss_bytes: int | None = None
    live_peak_note: str = ""  # why live_peak_bytes is None ("" when it is not)

    def as_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False)


LIVE_RANGE_SUFFIX = "-live-range.txt"
_LIVE_SECTION = re.compile(r"^\s*Live ranges at \d+ \(peak\):\s*$")
_CUMULATIVE = re.compile(r"\(cumulative: (\d+) bytes\)\s*$")
_STACK_PEAK = re.compile(r"^\s*Stack trace breakdown for peak usage: ([\d ,']+) bytes\s*$")


def parse_live_peak(text: str) -> int | None:
    """The most bytes live at once from the text of XLA's `*-live-range.txt` (HloLiveRange's dump): the last
    `(cumulative: N bytes)` of its `Live ranges at T (peak):` section, else its `Stack trace breakdown for peak usage:
    N bytes` line; None when the text has neither (an XLA whose format changed)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if _LIVE_SECTION.match(line):
            last = None
            for entry in lines[i + 1:]:
                m = _CUMULATIVE.search(entry)
                if not m:
                    break
                last = int(m.group(1))
            if last:
                return last
    for line in lines:
        m = _STACK_PEAK.match(line)
        if m:
            digits = re.sub(r"\D", "", m.group(1))
            if digits and int(digits) > 0:
                return int(digits)
    return None


def read_live_peak(dump_dir: Path) -> tuple[int | None, str]:
    """(live peak bytes, "") from the optimized module's live-range file XLA dumped into `dump_dir`, or (None, why)
    when it is missing or its format is unknown; never raises."""
    try:
        files = sorted(f for f in Path(dump_dir).glob(f"*after_optimizations{LIVE_RANGE_SUFFIX}") if f.is_file())
    except OSError as e:
        return None, f"XLA's dump in {dump_dir} could not be listed ({e})"
    if not files:
        return None, f"XLA wrote no *after_optimizations{LIVE_RANGE_SUFFIX} into {dump_dir}"
    if len(files) > 1:  # one module per compile; several (a cache hit, sub-compiles) would be ambiguous
        files = [max(files, key=lambda f: f.stat().st_size)]
    try:
        text = files[0].read_text(errors="replace")
    except OSError as e:
        return None, f"{files[0].name} could not be read ({e})"
    peak = parse_live_peak(text)
    if peak is None:
        return None, f"{files[0].name} has no peak this parser knows (neither 'Live ranges at T (peak):' nor " \
                     "'Stack trace breakdown for peak usage:'; XLA's format changed?)"
    return peak, ""


def live_peak_options(dump_dir: Path) -> dict:
    """Compiler options that make XLA dump this one compile's optimized module as text, with its buffer assignment
    and live ranges, into `dump_dir` (per compile, so XLA_FLAGS and other compiles are untouched)."""
    return {"xla_dump_to": str(dump_dir), "xla_dump_hlo_as_text": True}


def _peak(mem) -> int:
    """The most memory one device holds at once: XLA:GPU's own peak from its buffer assignment when it reports one,
    else arguments + outputs + temporaries less what outputs share with donated arguments."""
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    return peak or int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                       + mem.temp_size_in_bytes)


def kernel_calls(hlo_text: str) -> dict:
    return {name: hlo_text.count(f'custom_call_target="{target}') for name, target in KERNEL_CALLS.items()}


def interpreted_kernels(hlo_text: str) -> int:
    """Pallas kernels compiled as the interpreter: its lowering keeps the kernel's name in the op metadata of plain
    HLO (a compiled kernel is one custom call, whose body XLA never sees)."""
    names = set(re.findall(r'op_name="[^"]*?(flash_attention_\w+)', hlo_text))
    calls = {m for line in hlo_text.splitlines() if "custom-call(" in line
             for m in re.findall(r'op_name="[^"]*?(flash_attention_\w+)', line)}
    return len(names - calls)


def _flops(compiled) -> float:
    """HloCostAnalysis FLOPs of the optimized module (see the module docstring for what it counts)."""
    import jax
    from jax._src.lib import _jax

    modules = compiled.runtime_executable().hlo_modules()
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, modules[0])
    return float(cost.get("flops", 0.0))


@contextlib.contextmanager
def _captured_stderr(sink: list):
    """Collects what native code writes to fd 2 (XLA's C++ warnings) into `sink`, and writes it on to stderr after."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sys.stderr.write(text)
            sink.extend(text.splitlines())


def compile_train_step(config, target: Target, want_live_peak: bool | None = None) -> Plan:
    """The config's train step compiled by XLA:GPU for `target`; nothing is allocated. `want_live_peak` (default:
    `config.dry_run_live_peak`) also reads XLA's most-bytes-live-at-once from a dump of the compile into a temporary
    directory, removed after."""
    if want_live_peak is None:
        want_live_peak = bool(config.get("dry_run_live_peak", LIVE_PEAK_DEFAULT))
    import jax

    from phi1_jax import flops as flops_lib
    from phi1_jax.step import build

    devices = topology_devices(target)
    b = build(config, devices)
    batch_devices = b.mesh.shape["data"] * b.mesh.shape["fsdp"]
    micro = config.batch_size // config.grad_accum_steps // batch_devices
    log: list[str] = []
    live_peak, note = None, "not asked for (--config.dry_run_live_peak=True)"
    with tempfile.TemporaryDirectory(prefix="phi1-xla-dump-") as dump:
        options = live_peak_options(Path(dump)) if want_live_peak else None
        t0 = time.perf_counter()
        with _captured_stderr(log), jax.sharding.use_abstract_mesh(b.mesh.abstract_mesh):
            compiled = b.step_fn.lower(b.state, b.batch).compile(compiler_options=options)
        seconds = time.perf_counter() - t0
        if want_live_peak:
            live_peak, note = read_live_peak(Path(dump))
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    peak, device_bytes = _peak(mem), target.device_bytes
    return Plan(
        target=str(target), devices=target.count, hosts=target.hosts, attention_impl=b.cfg.attention_impl,
        micro_batch=micro, grad_accum_steps=config.grad_accum_steps, remat=b.cfg.remat,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes), peak_bytes=peak,
        device_bytes=device_bytes, fits=peak <= PREALLOCATE * device_bytes, fits_whole_memory=peak <= device_bytes,
        flops_per_token=_flops(compiled) / (micro * config.seq_len),
        flops_per_token_formula=flops_lib.flops_per_token(b.cfg, config.seq_len),
        kernels=kernel_calls(text), interpreted_kernels=interpreted_kernels(text),
        xla_warnings=[line for line in log if "memory" in line.lower() or "rematerializ" in line.lower()],
        compile_seconds=round(seconds, 1), jax_version=jax.__version__,
        live_peak_bytes=live_peak, packing_loss_bytes=None if live_peak is None else peak - live_peak,
        live_peak_note=note if live_peak is None else "")


def report(plan: Plan, n_params: int | None = None, out=None) -> None:
    """The human table for one plan (the JSON line is printed by the caller, last)."""
    out = out or sys.stdout
    t = parse_target(plan.target)
    params = f"; {n_params:,} parameters" if n_params else ""
    hosts = f" on {t.hosts} hosts" if t.hosts > 1 else ""
    print(f"dry run: train step compiled by XLA:GPU for {plan.devices} x {t.description}{hosts} ({plan.target}) in "
          f"{plan.compile_seconds:.0f} s, JAX {plan.jax_version}{params}", file=out)
    print(f"  attention {plan.attention_impl}, micro-batch {plan.micro_batch} per device x {plan.grad_accum_steps} "
          f"accumulation steps, remat {plan.remat}", file=out)
    rows = [("arguments", plan.argument_bytes), ("outputs", plan.output_bytes),
            ("  (aliased to args)", plan.alias_bytes), ("temporaries", plan.temp_bytes), ("peak", plan.peak_bytes)]
    for name, v in rows:
        print(f"  {name:>20}: {v / GIB:8.2f} GiB per device", file=out)
    if plan.live_peak_bytes is None:
        print(f"  {'live peak':>20}: unknown: {plan.live_peak_note}", file=out)
    else:
        print(f"  {'live peak':>20}: {plan.live_peak_bytes / GIB:8.2f} GiB per device (XLA's most bytes live at once)",
              file=out)
        print(f"  {'packing loss':>20}: {plan.packing_loss_bytes / GIB:8.2f} GiB per device (peak - live peak: what "
              "the buffer assignment loses packing buffers into the heap)", file=out)
    pre = PREALLOCATE * plan.device_bytes
    print(f"  {'fits':>20}: {'yes' if plan.fits else 'NO'} under JAX's default preallocation ({pre / GIB:.1f} GiB = "
          f"{PREALLOCATE:.0%}); {'yes' if plan.fits_whole_memory else 'NO'} under the whole "
          f"{plan.device_bytes / GIB:.1f} GiB", file=out)
    print(f"  {'FLOPs per token':>20}: {plan.flops_per_token / 1e9:.2f} G compiled (custom kernels count 0), "
          f"{plan.flops_per_token_formula / 1e9:.2f} G by docs/flops.md", file=out)
    calls = ", ".join(f"{k} {v}" for k, v in plan.kernels.items())
    interp = f"; {plan.interpreted_kernels} INTERPRETED Pallas kernels" if plan.interpreted_kernels else ""
    print(f"  {'attention kernels':>20}: {calls}{interp}", file=out)
    for line in plan.xla_warnings:
        print(f"  XLA: {line.strip()}", file=out)
    if not plan.xla_warnings:
        print(f"  {'XLA warnings':>20}: none about memory", file=out)


def dry_run(config) -> dict:
    """train.py's dry run for `config.dry_run_target` (and `config.dry_run_fit`): prints the table(s), then one JSON
    line; returns that line's fields."""
    target = parse_target(config.dry_run_target)
    if not config.dry_run:
        raise GpuPlanError(f"config.dry_run_target={config.dry_run_target!r} compiles for a GPU without training: "
                           "add --config.dry_run=True (or drop the target to train here)")
    if config.dry_run_fit:
        plan = fit(config, target)
    else:
        plan = compile_train_step(config, target)
        report(plan, _n_params(config))
    print(plan.as_json(), flush=True)
    return dataclasses.asdict(plan)


def _n_params(config) -> int:
    from phi1_jax.model import PhiConfig, abstract_model, count_params

    return count_params(abstract_model(PhiConfig.from_dict(config.model)))


# ---------------------------------------------------------------------------------------------------------------------
# Fit mode
# ---------------------------------------------------------------------------------------------------------------------


def ladder(config, target: Target) -> list[tuple[str, int, str, int]]:
    """LADDER's rungs this config can take on `target`: (attention, micro-batch per device, remat, grad_accum_steps)."""
    from phi1_jax import attention, sharding

    data, fsdp, _ = sharding.mesh_shape(config.mesh, target.count)
    rungs = []
    for impl, micro, remat in LADDER:
        if attention.training_problem(impl, config.model.head_dim, config.model.attn_dropout):
            continue
        per_step = micro * data * fsdp
        if config.batch_size % per_step:
            continue
        rungs.append((impl, micro, remat, config.batch_size // per_step))
    return rungs


def overrides(plan: Plan) -> str:
    return (f"--config.model.attention_impl={plan.attention_impl} --config.grad_accum_steps={plan.grad_accum_steps} "
            f"--config.model.remat={plan.remat}")


def fit(config, target: Target) -> Plan:
    """The first rung of `ladder` whose peak fits under the preallocation, each rung compiled and printed as it goes;
    a GpuPlanError when none does."""
    rungs = ladder(config, target)
    if not rungs:
        raise GpuPlanError(f"config.batch_size={config.batch_size}: no micro-batch of the ladder divides it over "
                           f"{target}'s data-parallel devices")
    print(f"fit: compiling up to {len(rungs)} settings for {target} ({target.description}) until one fits under "
          f"{PREALLOCATE:.0%} of its memory", flush=True)
    for impl, micro, remat, accum in rungs:
        c = config.copy_and_resolve_references()
        c.model.attention_impl, c.model.remat, c.grad_accum_steps = impl, remat, accum
        plan = compile_train_step(c, target)
        print(f"  {impl:>6} micro-batch {micro:>2} remat {remat:>4}: peak {plan.peak_bytes / GIB:6.2f} GiB "
              f"({plan.compile_seconds:.0f} s compile) -> {'fits' if plan.fits else 'does not fit'}", flush=True)
        if plan.fits:
            report(plan)
            print(f"fit: {overrides(plan)}", flush=True)
            return plan
    raise GpuPlanError(f"no setting of the ladder fits {target} under {PREALLOCATE:.0%} of its memory: use more "
                       "GPUs (dry_run_target NAME:N), a bigger GPU, or a smaller model")


# ---------------------------------------------------------------------------------------------------------------------
# Decoding: the evals' decode loop and the serving engine's decode program
# ---------------------------------------------------------------------------------------------------------------------

DECODE_PROGRAMS = ("generate", "serve", "prefill")


@dataclasses.dataclass
class DecodePlan:
    """One decode program compiled for one GPU of a target, with a KV cache of `rows` rows x `cache_len` slots."""

    target: str
    program: str  # "generate": phi1_jax.decoding's decode chunk (evals); "serve": the serving engine's decode program;
    # "prefill": generate's prompt pass (rows x prompt_len tokens into a cache of cache_len slots)
    rows: int
    cache_len: int
    param_dtype: str
    compute_dtype: str
    weight_bytes: int  # the parameters, as the program takes them
    cache_bytes: int  # keys and values of every layer (+ the slots' segment ids)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs written into donated arguments (the cache)
    temp_bytes: int
    peak_bytes: int
    device_bytes: int
    fits: bool  # peak under JAX's default preallocation (75% of the memory)
    fits_whole_memory: bool
    compiles: bool
    xla_warnings: list
    compile_seconds: float
    jax_version: str
    prompt_len: int = 0  # "prefill" only: the prompt's tokens (cache_len - new_tokens)


def load_config(path: str):
    """The ConfigDict of a configs/*.py file (its get_config()), for the commands that take --config=PATH."""
    import importlib.util as iu

    file = Path(path)
    if not file.is_file():
        raise GpuPlanError(f"--config={path}: no such config file (e.g. configs/phi1.py)")
    spec = iu.spec_from_file_location(f"_gpu_plan_config_{file.stem}", file)
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise GpuPlanError(f"--config={path}: has no get_config() (configs/*.py define one)")
    return module.get_config()


def _on(device_sharding, tree):
    """`tree`'s arrays or ShapeDtypeStructs as ShapeDtypeStructs placed by `device_sharding`."""
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device_sharding), tree)


def compile_decode(model_cfg, target: Target, program: str, rows: int, cache_len: int, *,
                   new_tokens: int = 0) -> DecodePlan:
    """`program`'s decode step compiled by XLA:GPU for one GPU of `target`, every argument abstract (the weights in
    model_cfg.param_dtype, the cache in its compute dtype): nothing is allocated.

    "generate" is phi1_jax.decoding's jitted decode chunk (what `generate` runs after the prefill, so what evals and
    the in-training code evals run: greedy, a `new_tokens` token buffer (0: min(384, cache_len // 2); 384 is the code
    evals' max_new_tokens), the cache donated); "serve" is the serving
    engine's own decode program for (rows, window cache_len), built by its `Engine.compile` on an engine whose cache
    and weights are abstract (no tokenizer, no server; its chunk of steps and everything else as `serve` sets them);
    "prefill" is `generate`'s prompt pass, its jitted `_prefill`, at a prompt of cache_len - new_tokens tokens (the
    cache is its output, the prompt's [rows, heads, prompt, prompt] fp32 scores per layer its largest temporary)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from phi1_jax.model import KVCache, abstract_model

    if program not in DECODE_PROGRAMS:
        raise GpuPlanError(f"decode program {program!r}: choose one of {', '.join(DECODE_PROGRAMS)}")
    if target.count != 1:
        raise GpuPlanError(f"--target={target}: decoding is compiled for one GPU (the model and its cache on each; "
                           "give NAME without :N)")
    if not 1 <= cache_len <= model_cfg.max_seq_len:
        raise GpuPlanError(f"--cache-len={cache_len}: between 1 and the model's max_seq_len {model_cfg.max_seq_len}")
    new_tokens = new_tokens or min(384, cache_len // 2)
    if program in ("generate", "prefill") and not 1 <= new_tokens < cache_len:
        raise GpuPlanError(f"--new-tokens={new_tokens}: between 1 and the cache length {cache_len} less one (the "
                           "cache holds the prompt and the new tokens)")
    devices = topology_devices(target, "--target")
    mesh = jax.sharding.Mesh(devices[:1], ("x",))
    on = NamedSharding(mesh, PartitionSpec())
    graphdef, state = nnx.split(abstract_model(model_cfg))
    state = _on(on, state)
    cache = _on(on, jax.eval_shape(lambda: KVCache.init(model_cfg, rows, cache_len)))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v, cache.segment_ids)))
    log: list[str] = []
    t0 = time.perf_counter()
    with _captured_stderr(log), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=on)  # noqa: E731
        i32 = jnp.int32
        if program == "generate":
            from phi1_jax.decoding import _decode_chunk

            key = _on(on, jax.eval_shape(lambda: jax.random.key(0)))
            sampling = (0.0, 0, 1.0, None)  # greedy, as the evals' pass@1
            compiled = _decode_chunk.lower(
                graphdef, sampling, state, cache, spec((rows, model_cfg.vocab_size), jnp.float32),
                spec((rows, new_tokens), i32), spec((rows,), i32), spec((rows,), jnp.bool_), spec((), i32),
                spec((), i32), key, spec((), i32)).compile()
        elif program == "prefill":
            from phi1_jax.decoding import _prefill

            prompt = spec((rows, cache_len - new_tokens), i32)  # ids, segment ids, positions
            compiled = _prefill.lower(graphdef, state, prompt, prompt, prompt, cache_len).compile()
        else:
            compiled = _serving_decode(graphdef, state, model_cfg, on, rows, cache_len)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak, device_bytes = _peak(mem), target.device_bytes
    return DecodePlan(
        target=str(target), program=program, rows=rows, cache_len=cache_len, param_dtype=model_cfg.param_dtype,
        compute_dtype=model_cfg.dtype, weight_bytes=int(weight_bytes), cache_bytes=int(cache_bytes),
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes), peak_bytes=peak,
        device_bytes=device_bytes, fits=peak <= PREALLOCATE * device_bytes, fits_whole_memory=peak <= device_bytes,
        compiles=True,
        xla_warnings=[line for line in log if "memory" in line.lower() or "rematerializ" in line.lower()],
        compile_seconds=round(seconds, 1), jax_version=jax.__version__,
        prompt_len=cache_len - new_tokens if program == "prefill" else 0)


def _serving_decode(graphdef, state, model_cfg, on, rows: int, cache_len: int):
    """The serving engine's ("decode", rows, cache_len) program, compiled by the engine's own `compile` on an engine
    made without `__init__` (which allocates the cache and needs a tokenizer): its weights, cache and logits are
    abstract and placed on the target's device; every other attribute `compile` reads is what `__init__` sets."""
    import jax.numpy as jnp

    from phi1_jax.serving import batching

    engine = batching.Engine.__new__(batching.Engine)
    engine.cfg, engine.graphdef, engine.state = model_cfg, graphdef, state
    engine.slots, engine.max_len = rows, cache_len
    engine.chunk_tokens = batching.Engine.__init__.__kwdefaults__["chunk_tokens"]
    shape = (rows, model_cfg.num_heads, cache_len, model_cfg.head_dim)
    layer = jax_struct(shape, model_cfg.compute_dtype, on)
    engine.k = engine.v = tuple(layer for _ in range(model_cfg.num_layers))
    engine.seg = jax_struct((rows, cache_len), jnp.int32, on)
    engine.logits = jax_struct((rows, model_cfg.vocab_size), jnp.float32, on)
    engine.compiled, engine.compile_s = {}, {}
    shape = ("decode", rows, cache_len)
    try:
        engine.compile(shape)
        return engine.compiled[shape]
    except (AttributeError, KeyError) as e:  # the engine's compile reads an attribute set here no more
        raise GpuPlanError(f"the serving engine's decode program could not be built without its __init__ ({e!r}): "
                           "gpu_plan._serving_decode needs the attribute too") from None


def jax_struct(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def decode_report(plan: DecodePlan, out=None) -> None:
    out = out or sys.stdout
    t = parse_target(plan.target)
    what = {"generate": "phi1_jax.decoding's decode chunk (generate, evals)",
            "serve": "the serving engine's decode program",
            "prefill": f"phi1_jax.decoding's prefill (generate's prompt pass, {plan.prompt_len} tokens)"}[plan.program]
    print(f"decode: {what} compiled by XLA:GPU for one {t.description} ({plan.target}) in {plan.compile_seconds:.0f} "
          f"s, JAX {plan.jax_version}: {plan.rows} rows x {plan.cache_len} cache slots, weights {plan.param_dtype}, "
          f"cache {plan.compute_dtype}", file=out)
    rows = [("weights", plan.weight_bytes), ("KV cache", plan.cache_bytes), ("arguments", plan.argument_bytes),
            ("outputs", plan.output_bytes), ("  (aliased to args)", plan.alias_bytes),
            ("temporaries", plan.temp_bytes), ("peak", plan.peak_bytes)]
    for name, v in rows:
        print(f"  {name:>20}: {_size(v)}", file=out)
    pre = PREALLOCATE * plan.device_bytes
    print(f"  {'fits':>20}: {'yes' if plan.fits else 'NO'} under JAX's default preallocation ({pre / GIB:.1f} GiB = "
          f"{PREALLOCATE:.0%}); {'yes' if plan.fits_whole_memory else 'NO'} under the whole "
          f"{plan.device_bytes / GIB:.1f} GiB", file=out)
    for line in plan.xla_warnings:
        print(f"  XLA: {line.strip()}", file=out)


def _size(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:8.2f} MiB"


def decode_plans(config, target: Target, rows: list[int], programs: list[str], cache_len: int | None = None,
                 new_tokens: int = 0, param_dtype: str | None = None) -> dict:
    """Every (program, rows) compiled and reported; returns the JSON object the command prints last."""
    from phi1_jax.model import PhiConfig

    model = dict(config.model)
    if param_dtype:
        model["param_dtype"] = param_dtype
    try:
        cfg = PhiConfig.from_dict(model)
    except UserError as e:
        raise GpuPlanError(f"--config: {e}") from None
    cache_len = cache_len or cfg.max_seq_len
    plans = []
    for program in programs:
        for r in rows:
            plan = compile_decode(cfg, target, program, r, cache_len, new_tokens=new_tokens)
            decode_report(plan)
            plans.append(dataclasses.asdict(plan))
    return {"target": str(target), "devices": 1, "cache_len": cache_len, "fits": all(p["fits"] for p in plans),
            "plans": plans}


# ---------------------------------------------------------------------------------------------------------------------
# The kernel's tiles
# ---------------------------------------------------------------------------------------------------------------------


def check_tiles(target: Target, candidates, *, batch=8, seq=2048, heads=32, head_dim=64, dtype="bfloat16"):
    """Each BlockSizes in `candidates` compiled (forward and backward, causal) by Triton for `target`: yields
    (blocks, None) when it compiles, (blocks, first line of the compiler's error) when not (shared memory, say)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from phi1_jax.kernels.flash_attention import flash_attention

    devices = topology_devices(Target(target.name, 1), "--target")
    mesh = jax.sharding.Mesh(devices[:1], ("x",))
    x = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.dtype(dtype), sharding=NamedSharding(mesh,
                                                                                                    PartitionSpec()))
    for blocks in candidates:
        def loss(q, k, v, blocks=blocks):
            out = flash_attention(q, k, v, causal=True, block_sizes=blocks, backend="gpu")
            return out.astype(jnp.float32).sum()

        try:
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
            if not kernel_calls(text)["triton"]:
                raise RuntimeError("no Triton kernel in the compiled program")
            yield blocks, None
        except Exception as e:  # noqa: BLE001  the compiler's refusal is the finding
            msg = str(e).strip().splitlines()
            yield blocks, (msg[0] if msg else type(e).__name__)[:200]


@cli.reports_user_errors
def main(argv=None) -> int:
    """`python -m phi1_jax.gpu_plan tiles`: the kernel's tune candidates compiled for a GPU on this host;
    `python -m phi1_jax.gpu_plan decode`: phi-1's decode step compiled for a GPU, per-device memory."""
    import argparse
    import itertools

    from phi1_jax.kernels.flash_attention import TUNE_BWD_LAUNCH, TUNE_FWD_LAUNCH, TUNE_TILES, BlockSizes

    p = argparse.ArgumentParser(prog="python -m phi1_jax.gpu_plan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tiles", help="compile the kernel's tune candidates (phi1_jax.kernels.flash_attention.TUNE_*) "
                                     "for a GPU; the ones the compiler refuses are dropped before any GPU minute is "
                                     "spent")
    t.add_argument("--target", default="h100_sxm", help=f"one of {', '.join(TARGETS)}")
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--defaults", action="store_true", help="only BlockSizes.default for GPUs, not the candidates")
    t.add_argument("--json", default="", help="also write every candidate's result to this file")
    d = sub.add_parser("decode", help="compile phi-1's decode step (generate's, which evals run, and the serving "
                                      "engine's) for one GPU with a KV cache of each --rows rows; the last line is "
                                      "JSON")
    d.add_argument("--config", default="configs/phi1.py", help="the config whose model is compiled (configs/*.py)")
    d.add_argument("--target", default="h100_sxm", help=f"one of {', '.join(TARGETS)} (one GPU)")
    d.add_argument("--rows", default="16,64", help="KV cache rows (sequences decoded at once), comma-separated")
    d.add_argument("--cache-len", type=int, default=0, help="cache slots per row (0: the model's max_seq_len)")
    d.add_argument("--programs", default="generate,serve",
                   help=f"of {', '.join(DECODE_PROGRAMS)}, comma-separated (prefill: generate's prompt pass at "
                        "cache slots - new tokens)")
    d.add_argument("--new-tokens", type=int, default=0,
                   help="generate's token buffer (0: min(384, cache slots / 2); 384 is the code evals' "
                        "max_new_tokens); the cache holds prompt + these")
    d.add_argument("--param-dtype", default="", help="weights' dtype (default: the config's; a trainer checkpoint "
                                                     "and a converted Hugging Face model load as float32)")
    d.add_argument("--json", default="", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if args.command == "decode":
        return _decode_main(args)
    target = parse_target(args.target, "--target")
    base = BlockSizes.default(args.head_dim, "gpu")
    if args.defaults:
        candidates = [base]
    else:  # tune's two sweeps: forward tiles x launch settings, then backward tiles x launch settings
        candidates = [dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=nw, num_stages=ns)
                      for (bq, bk), (nw, ns) in itertools.product(TUNE_TILES, TUNE_FWD_LAUNCH)]
        candidates += [dataclasses.replace(base, block_q_dkv=bq, block_k_dkv=bk, block_q_dq=bq, block_k_dq=bk,
                                           num_warps_bwd=nw, num_stages_bwd=ns)
                       for (bq, bk), (nw, ns) in itertools.product(TUNE_TILES, TUNE_BWD_LAUNCH)]
    rows, t0 = [], time.perf_counter()
    for blocks, error in check_tiles(target, candidates, head_dim=args.head_dim):
        rows.append({"blocks": dataclasses.asdict(blocks), "compiles": error is None, "error": error})
        print(f"  {blocks}: {'compiles' if error is None else 'FAILS: ' + error}", flush=True)
    ok = sum(r["compiles"] for r in rows)
    print(f"{target}: {ok} of {len(rows)} candidates compile ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        files.write_text(Path(args.json), json.dumps({"target": str(target), "candidates": rows}, indent=1))
    return 0 if ok else 1


def _decode_main(args) -> int:
    target = parse_target(args.target, "--target")
    try:
        rows = [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise GpuPlanError(f"--rows={args.rows!r}: positive row counts, comma-separated (e.g. 16,64)")
    programs = [x.strip() for x in args.programs.split(",") if x.strip()]
    for x in programs or [""]:
        if x not in DECODE_PROGRAMS:
            raise GpuPlanError(f"--programs={args.programs!r}: {x!r} is not one of {', '.join(DECODE_PROGRAMS)}")
    result = decode_plans(load_config(args.config), target, rows, programs, args.cache_len or None,
                          args.new_tokens, args.param_dtype or None)
    line = json.dumps(result)
    if args.json:
        files.write_text(Path(args.json), line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
