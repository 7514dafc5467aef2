"""Compiling for a GPU on this CPU host (phi1_jax/gpu_plan.py, `--config.dry_run_target`): the tiny config's train step
compiled by XLA:GPU for an H100 from the shipped target config, the kernel through Triton and never the interpreter;
the fit mode; the kernel's tiles; the errors.

The compiles need the gpu-plan extra (JAX's CUDA plugin): they skip with the reason where it is absent, and run in
CI's gpu-plan lane (`EXTRAS=gpu-plan PYTHON=python3.12 bash scripts/setup.sh`, then
`.venv-gpu-plan/bin/python -m pytest -q tests/test_gpu_target.py`). Each compile runs in a subprocess with
JAX_PLATFORMS=cpu, as a user's run does (the plugin only registers its topology when JAX starts on the CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phi1_jax import gpu_plan

ROOT = Path(__file__).parents[1]
PROBLEM = gpu_plan.cuda_plugin_problem()
needs_plugin = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


def _train(tmp_path, *overrides, timeout=600, tmpdir=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    return subprocess.run([sys.executable, "-m", "phi1_jax.train", "--config=configs/tiny.py",
                           f"--workdir={tmp_path / 'w'}", *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# --- No plugin needed: names, specs, the ladder, the errors ------------------------------------------------------------


def test_target_names_and_counts():
    assert gpu_plan.parse_target("h100_sxm") == gpu_plan.Target("h100_sxm", 1)
    assert gpu_plan.parse_target("a100_80:8") == gpu_plan.Target("a100_80", 8)
    assert str(gpu_plan.parse_target("h200:4")) == "h200:4"
    two_hosts = gpu_plan.parse_target("h100_sxm:8:2")
    assert two_hosts == gpu_plan.Target("h100_sxm", 8, 2) and two_hosts.count == 16 and str(two_hosts) == "h100_sxm:8:2"
    assert gpu_plan.parse_target("h100_sxm:8:1") == gpu_plan.Target("h100_sxm", 8)
    for bad, says in [("h100", "unknown GPU 'h100'"), ("h100_sxm:0", "number of GPUs"), ("a100_40:x", "number"),
                      ("h100_sxm:8:0", "number of hosts"), ("h100_sxm:8:", "NAME:N:H"),
                      ("h100_sxm:8:2:1", "number of hosts")]:
        with pytest.raises(gpu_plan.GpuPlanError, match=says):
            gpu_plan.parse_target(bad)


def test_every_target_ships_a_spec_with_its_memory():
    sizes = {name: gpu_plan.Target(name).device_bytes for name in gpu_plan.TARGETS}
    gib = {name: size / 2 ** 30 for name, size in sizes.items()}
    assert 38 < gib["a100_40"] < 40 < 78 < gib["a100_80"] < 80 and 78 < gib["h100_sxm"] < 80
    assert 139 < gib["h200"] < 142
    for name in gpu_plan.TARGETS:
        spec = gpu_plan.Target(name).spec
        assert 'platform_name: "CUDA"' in spec and "cuda_compute_capability" in spec
        hopper = "cuda_compute_capability { major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }" in spec
        assert hopper == name.startswith(("h100", "h200"))


def test_ladder_skips_what_the_model_or_batch_cannot_take():
    from configs import phi1

    c = phi1.get_config()  # attention dropout 0.1: no cudnn rungs
    rungs = gpu_plan.ladder(c, gpu_plan.Target("h100_sxm", 8))
    assert rungs[0] == ("pallas", 8, "dots", 1024 // (8 * 8))
    assert not [r for r in rungs if r[0] == "cudnn"] and rungs[-1][0] == "xla"
    c.model.attn_dropout = 0.0
    assert [r for r in gpu_plan.ladder(c, gpu_plan.Target("h100_sxm", 8)) if r[0] == "cudnn"]
    c.batch_size = 24  # of micro-batches x 8 GPUs, only 1 x 8 divides it (3 x 8 would, but is no rung)
    assert {r[1] for r in gpu_plan.ladder(c, gpu_plan.Target("h100_sxm", 8))} == {1}
    assert all(accum * micro * 8 == 24 for _, micro, _, accum in gpu_plan.ladder(c, gpu_plan.Target("h100_sxm", 8)))


def test_a_target_needs_a_dry_run_and_a_known_name(tmp_path):
    r = _train(tmp_path, "--config.dry_run_target=h100_sxm")
    assert r.returncode == 2 and _error_line(r.stderr).endswith("add --config.dry_run=True (or drop the target to "
                                                                 "train here)"), r.stderr[-2000:]
    r = _train(tmp_path, "--config.dry_run=True", "--config.dry_run_target=b200")
    assert r.returncode == 2 and "unknown GPU 'b200'" in _error_line(r.stderr), r.stderr[-2000:]
    assert not (tmp_path / "w").exists()


@pytest.mark.skipif(PROBLEM is None, reason="the gpu-plan extra is installed here")
def test_without_the_plugin_the_error_says_how_to_install_it(tmp_path):
    r = _train(tmp_path, "--config.dry_run=True", "--config.dry_run_target=h100_sxm")
    assert r.returncode == 2 and "EXTRAS=gpu-plan PYTHON=python3.12 bash scripts/setup.sh" in _error_line(r.stderr)
    r = _gpu_plan("decode", "--config=configs/tiny.py", "--target=a100_80")  # names its own option
    line = _error_line(r.stderr)
    assert r.returncode == 2 and line.startswith("error: --target=a100_80: ") and "scripts/setup.sh" in line, line


LIVE_RANGE = """HloLiveRange (max 9):
  InstructionSequence:
    0:p0
  BufferLiveRange:
    p0{}:0-9
  Live ranges at 4 (peak):
    fusion.1{}: 8388608 bytes (cumulative: 8388608 bytes)
    p0{}: 4096 bytes (cumulative: 8392704 bytes)
  Stack trace breakdown for peak usage: 8 392 704 bytes
    main.1 (100.0%, total: 8 392 704 bytes, current: 0 bytes, remaining: 8 392 704 bytes)
"""


def test_live_peak_is_read_from_the_dump_or_reported_unknown_without_raising(tmp_path):
    assert gpu_plan.parse_live_peak(LIVE_RANGE) == 8392704
    # Without the peak section, the stack-trace line (digits grouped by spaces) still gives it.
    assert gpu_plan.parse_live_peak(LIVE_RANGE.replace("Live ranges at 4 (peak):", "Live ranges:")) == 8392704
    assert gpu_plan.parse_live_peak("HloLiveRange (max 9):\n  something else\n") is None
    assert gpu_plan.parse_live_peak("") is None
    peak, note = gpu_plan.read_live_peak(tmp_path / "absent")
    assert peak is None and "wrote no" in note
    name = "module_0001.jit_traced.sm_9.0a_gpu_after_optimizations-live-range.txt"
    (tmp_path / name).write_text("a format nobody knows\n")
    peak, note = gpu_plan.read_live_peak(tmp_path)
    assert peak is None and name in note and "format" in note
    (tmp_path / name).write_text(LIVE_RANGE)
    assert gpu_plan.read_live_peak(tmp_path) == (8392704, "")
    assert gpu_plan.live_peak_options(tmp_path)["xla_dump_to"] == str(tmp_path)


# --- With the CUDA plugin: real XLA:GPU compiles --------------------------------------------------------------------


@needs_plugin
def test_tiny_step_compiles_for_h100_with_the_triton_kernel_not_the_interpreter(tmp_path):
    (tmp_path / "tmp").mkdir()
    r = _train(tmp_path, "--config.dry_run=True", "--config.dry_run_target=h100_sxm",
               "--config.model.attention_impl=pallas", tmpdir=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = _last_json(r.stdout)
    for field in ("target", "devices", "attention_impl", "micro_batch", "remat", "argument_bytes", "temp_bytes",
                  "peak_bytes", "device_bytes", "fits", "flops_per_token", "kernels"):
        assert field in plan, field
    assert plan["target"] == "h100_sxm" and plan["devices"] == 1 and plan["attention_impl"] == "pallas"
    assert plan["kernels"]["triton"] >= 3  # forward, and the dK/dV and dQ kernels of the backward pass
    assert plan["interpreted_kernels"] == 0
    assert plan["device_bytes"] == gpu_plan.Target("h100_sxm").device_bytes and plan["fits"]
    assert 0 < plan["argument_bytes"] <= plan["peak_bytes"] < 2 ** 30
    # The compiled program's FLOPs (the kernel counting 0) are the formula's less attention's share, which is small
    # at the tiny shape: within 10%.
    assert 0.9 < plan["flops_per_token"] / plan["flops_per_token_formula"] < 1.1
    assert "attention kernels: triton" in r.stdout and "fits: yes" in r.stdout
    # XLA's most bytes live at once, from the dump of this compile (on by default): under the buffer assignment's
    # peak (which packs those buffers into a heap), above the arguments, and the table shows the difference.
    assert 0 < plan["argument_bytes"] <= plan["live_peak_bytes"] <= plan["peak_bytes"], plan
    assert plan["packing_loss_bytes"] == plan["peak_bytes"] - plan["live_peak_bytes"] and plan["live_peak_note"] == ""
    assert "live peak:" in r.stdout and "packing loss:" in r.stdout
    assert (tmp_path / "tmp").is_dir() and not list((tmp_path / "tmp").iterdir())  # the dump is cleaned up


@needs_plugin
def test_hosts_are_processes_of_the_topology():
    """NAME:N:H describes H hosts of N GPUs: H processes' devices, which the train step is sharded over."""
    code = """
import json
from phi1_jax import gpu_plan
d = gpu_plan.topology_devices(gpu_plan.parse_target("h100_sxm:2:3"))
print(json.dumps({"n": len(d), "processes": sorted({x.process_index for x in d})}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _last_json(r.stdout) == {"n": 6, "processes": [0, 1, 2]}


@needs_plugin
def test_the_detector_sees_an_interpreted_kernel(tmp_path):
    """The check above can fail: the same step traced as if for a CPU (the interpreter) counts its kernels as
    interpreted and calls no Triton."""
    code = """
import json, sys
from configs import tiny
from phi1_jax import attention, gpu_plan
attention.compile_platform = lambda: "cpu"  # what attend did before it read the mesh's platform
c = tiny.get_config(); c.model.attention_impl = "pallas"; c.batch_size = 2; c.seq_len = 32
p = gpu_plan.compile_train_step(c, gpu_plan.Target("h100_sxm"))
print(json.dumps({"kernels": p.kernels, "interpreted": p.interpreted_kernels}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _last_json(r.stdout)
    assert got["kernels"]["triton"] == 0 and got["interpreted"] > 0


@needs_plugin
def test_fit_mode_prints_the_overrides_of_the_first_setting_that_fits(tmp_path):
    r = _train(tmp_path, "--config.dry_run=True", "--config.dry_run_target=h100_sxm:2", "--config.dry_run_fit=True",
               "--config.batch_size=8", "--config.dry_run_live_peak=False")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = _last_json(r.stdout)
    assert plan["live_peak_bytes"] is None and plan["packing_loss_bytes"] is None  # not asked for: no dump
    assert "not asked for" in plan["live_peak_note"] and "live peak: unknown: not asked for" in r.stdout
    # Batch 8 over 2 GPUs: a micro-batch of 8 per GPU does not divide it, so (pallas, 4, full) is the first rung
    # compiled, and the tiny model fits.
    assert (plan["attention_impl"], plan["micro_batch"], plan["remat"], plan["devices"]) == ("pallas", 4, "full", 2)
    assert plan["fits"] and plan["grad_accum_steps"] == 1
    assert ("fit: --config.model.attention_impl=pallas --config.grad_accum_steps=1 --config.model.remat=full"
            in r.stdout)


@needs_plugin
def test_kernel_tiles_compile_or_fail_at_compile_time():
    """BlockSizes.default compiles for A100 and H100; a tile too big for shared memory is refused by the compiler
    here, on the CPU, not on a GPU."""
    code = """
import json
from phi1_jax import gpu_plan
from phi1_jax.kernels.flash_attention import BlockSizes
out = {}
for name in ("a100_80", "h100_sxm"):
    out[name] = [e for _, e in gpu_plan.check_tiles(gpu_plan.Target(name), [BlockSizes.default(64, "gpu")],
                                                    batch=1, seq=512, heads=2)]
huge = BlockSizes(512, 512, 512, 512, 512, 512)
out["huge"] = [e for _, e in gpu_plan.check_tiles(gpu_plan.Target("a100_80"), [huge], batch=1, seq=512, heads=2,
                                                  head_dim=256)]
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _last_json(r.stdout)
    assert got["a100_80"] == [None] and got["h100_sxm"] == [None]
    assert got["huge"][0] is not None and "shared memory" in got["huge"][0].lower(), got["huge"]


# --- Decoding ---------------------------------------------------------------------------------------------------------


def _gpu_plan(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "phi1_jax.gpu_plan", *args], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=timeout)


def test_decode_refuses_what_it_cannot_compile(tmp_path):
    for args, says in [(["--target=h100_sxm:2"], "decoding is compiled for one GPU"),
                       (["--rows=0"], "--rows='0': positive row counts"),
                       (["--programs=generate,beam"], "'beam' is not one of generate, serve"),
                       (["--cache-len=4096"], "--cache-len=4096: between 1 and the model's max_seq_len 128"),
                       (["--config=configs/nope.py"], "--config=configs/nope.py: no such config file")]:
        r = _gpu_plan("decode", "--config=configs/tiny.py", *args, f"--json={tmp_path / 'out.json'}")
        assert r.returncode == 2 and says in _error_line(r.stderr), (args, r.stderr[-2000:])
    assert not (tmp_path / "out.json").exists()


@needs_plugin
def test_decode_step_compiles_for_h100_with_the_cache_in_place(tmp_path):
    """generate's decode chunk (evals) and the serving engine's decode program, compiled for one H100 at two cache
    sizes: the weights and the whole cache are arguments, the cache is updated in place (donated: its bytes are
    aliased outputs), and the peak stays below the arguments plus a second copy of the cache."""
    r = _gpu_plan("decode", "--config=configs/tiny.py", "--target=h100_sxm", "--rows=2,8",
                  "--programs=generate,serve,prefill", f"--json={tmp_path / 'decode.json'}")
    assert r.returncode == 0, r.stderr[-3000:]
    got = _last_json(r.stdout)
    assert got == json.loads((tmp_path / "decode.json").read_text())
    assert got["target"] == "h100_sxm" and got["cache_len"] == 128 and got["fits"]
    plans = {(p["program"], p["rows"]): p for p in got["plans"]}
    assert sorted(plans) == [("generate", 2), ("generate", 8), ("prefill", 2), ("prefill", 8), ("serve", 2),
                             ("serve", 8)]
    for rows in (2, 8):  # the prefill writes the cache (an output, not an argument) from a 64-token prompt
        p = plans.pop(("prefill", rows))
        assert p["prompt_len"] == 64 and p["compiles"] and p["fits"]
        assert p["weight_bytes"] <= p["argument_bytes"] < p["weight_bytes"] + p["cache_bytes"], p
        assert p["output_bytes"] >= p["cache_bytes"] and p["alias_bytes"] == 0, p
    for (program, rows), p in plans.items():
        # tiny: 2 layers x (k, v) x rows x 4 heads x 128 slots x 16 dims x 4 bytes (fp32) + segment ids
        assert p["cache_bytes"] == 2 * 2 * rows * 4 * 128 * 16 * 4 + rows * 128 * 4
        assert p["compiles"] and p["fits"] and p["fits_whole_memory"] and p["device_bytes"] > 79 * 2 ** 30
        assert p["argument_bytes"] >= p["weight_bytes"] + p["cache_bytes"], p
        assert p["alias_bytes"] >= p["cache_bytes"], p  # the cache is written in place
        assert p["argument_bytes"] <= p["peak_bytes"] < p["argument_bytes"] + p["cache_bytes"], p
    for program in ("generate", "serve"):
        small, big = plans[(program, 2)], plans[(program, 8)]
        grew, cache = big["argument_bytes"] - small["argument_bytes"], big["cache_bytes"] - small["cache_bytes"]
        assert cache <= grew < 1.5 * cache  # the cache, and the rows' logits and tokens
    assert "KV cache" in r.stdout and "the serving engine's decode program" in r.stdout
