"""The trainer end to end on CPU: exact resume after SIGKILL, 8-device mesh parity, dry run, bad input."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from phi1_jax.metrics import read_metrics

STEPS, N = 16, 8


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "phi1_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.steps={STEPS}", "--config.optimizer.warmup_steps=4", "--config.log_every=1",
            f"--config.checkpoint_every={N}", *overrides]


def _env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _losses(workdir):
    """{step: loss}, the last line written for each step (a resumed run rewrites the steps after its checkpoint)."""
    return {step: row["loss"] for step, row in read_metrics(workdir)[0].items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, embedded):
    workdir = tmp_path_factory.mktemp("full")
    r = subprocess.run(_cmd(workdir), env=_env(), capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def test_loss_falls_and_files_are_written(uninterrupted):
    losses = _losses(uninterrupted)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = (sum(losses[s] for s in steps) / 4 for steps in (range(1, 5), range(STEPS - 3, STEPS + 1)))
    assert last < first - 0.15, (first, last)  # single batches are noisy; four-step means fall steadily
    row = read_metrics(uninterrupted)[0][STEPS]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(row)
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == [N, STEPS]
    evals = read_metrics(uninterrupted)[1]
    assert list(evals) == [STEPS] and 0 < evals[STEPS] < losses[1]  # held-out loss at the end of the run
    assert (uninterrupted / "loss.png").stat().st_size > 10_000
    assert any((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))


def test_8_device_mesh_matches_1_device(uninterrupted, tmp_path):
    workdir = tmp_path / "mesh"
    r = subprocess.run(_cmd(workdir, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"),
                       env=_env(8), capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 8 devices" in r.stdout
    want, got = _losses(uninterrupted), _losses(workdir)
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    # What 8 devices saved, this process (one CPU device) reads, as evals and notebooks do: the 1-device run's weights.
    from phi1_jax.checkpoint import load_params

    ours, theirs = load_params(workdir), load_params(uninterrupted)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)  # 16 Adam steps amplify reduction-order noise


def _run(*args, devices=1):
    return subprocess.run([sys.executable, "-m", "phi1_jax.train", *args], env=_env(devices), capture_output=True,
                          text=True, cwd=Path(__file__).parents[1])


def test_bad_input_is_a_clear_error(tmp_path, uninterrupted):
    r = _run("--config=configs/tiny.py", f"--workdir={tmp_path / 'a'}", "--config.optimizer.lr=1")
    assert r.returncode == 2 and "--config.optimizer.lr: the config has no field 'optimizer.lr'" in r.stderr
    r = _run("--config=configs/tiny.py", f"--workdir={tmp_path / 'b'}", "--config.mesh.data=3", devices=8)
    assert r.returncode == 2 and "does not divide the 8 devices" in r.stderr
    r = _run("--config=configs/tiny.py", f"--workdir={tmp_path / 'c'}", "--config.mesh.data=8",
             "--config.batch_size=12", devices=8)
    assert r.returncode == 2 and "does not divide over the 8 data-parallel devices" in r.stderr
    r = _run("--config=configs/phi1.py", f"--workdir={tmp_path / 'd'}", "--config.model.num_layers=1",
             "--config.data.tokenizer=/nonexistent/tok.model", "--config.grad_accum_steps=1", "--config.batch_size=2")
    assert r.returncode == 2 and "/nonexistent/tok.model: tokenizer file not found" in r.stderr
    before = {p: p.stat().st_mtime for p in uninterrupted.rglob("*")}
    r = _run("--config=configs/tiny.py", f"--workdir={uninterrupted}", "--config.model.d_model=32",
             "--config.model.head_dim=8")
    assert r.returncode == 2 and "holds checkpoints of another model (d_model 64 there, 32 now" in r.stderr
    assert {p: p.stat().st_mtime for p in uninterrupted.rglob("*")} == before  # nothing written
    r = _run("--config=configs/tiny.py")
    assert r.returncode == 2 and "--workdir is required" in r.stderr


def test_finetune_from_a_workdir_and_from_hugging_face(uninterrupted, tmp_path):
    """init_from loads parameters only: the step, optimizer and schedule start fresh; both sources give the same run."""
    from phi1_jax import checkpoint
    from phi1_jax.convert import to_hf

    to_hf(checkpoint.load_model(uninterrupted), tmp_path / "hf")
    runs = {}
    for name, source in (("workdir", uninterrupted), ("hf", tmp_path / "hf")):
        r = subprocess.run(_cmd(tmp_path / name, f"--config.init_from={source}", "--config.steps=3"), env=_env(),
                           capture_output=True, text=True, cwd=Path(__file__).parents[1])
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"initialized parameters from {source}" in r.stdout
        runs[name] = read_metrics(tmp_path / name)[0]
    assert sorted(runs["workdir"]) == [1, 2, 3]  # fresh step counter
    assert runs["workdir"][1]["lr"] == 0.0  # fresh schedule: warmup starts again
    assert runs["workdir"][1]["loss"] < _losses(uninterrupted)[1] - 0.2  # starts from the trained weights
    for step in (1, 2, 3):
        assert runs["hf"][step]["loss"] == pytest.approx(runs["workdir"][step]["loss"], rel=1e-6)
    r = subprocess.run(_cmd(tmp_path / "bad", f"--config.init_from={tmp_path / 'hf'}", "--config.model.mlp_dim=128"),
                       env=_env(), capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and "is another model shape (mlp_dim 256 there, 128 in the config)" in r.stderr


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, *overrides):
    port = _free_port()
    procs = [subprocess.Popen(_cmd(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   f"--process_id={i}", *overrides),
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1]) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_through_jax_distributed(uninterrupted, tmp_path):
    """2 processes x 4 CPU devices on localhost (JAX's own runtime and CPU collectives), mesh 2 x 2 x 2."""
    mesh = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    outs = _two_processes(tmp_path / "rows", *mesh, "--config.data.shard_by=row")
    assert "on 8 devices" in outs[0][0]
    want, got = _losses(uninterrupted), _losses(tmp_path / "rows")
    for step in range(1, STEPS + 1):  # the same global batches as one process: the same losses
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    # The scalable default: each process reads its own half of the documents; it runs, learns and checkpoints.
    _two_processes(tmp_path / "docs", *mesh)
    losses = _losses(tmp_path / "docs")
    assert sorted(losses) == list(range(1, STEPS + 1)) and losses[STEPS] < losses[1]
    assert sorted(int(p.name) for p in (tmp_path / "docs" / "checkpoints").iterdir() if p.name.isdigit()) == [N, STEPS]
    assert len(list((tmp_path / "docs" / "checkpoints" / str(STEPS) / "data_iter").glob("process_*-of-2.json"))) == 2


def test_inspection_notebook_runs_against_a_tiny_checkpoint(uninterrupted):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = Path(__file__).parents[1] / "notebooks" / "inspect_checkpoint.ipynb"
    nb = nbformat.read(path, as_version=4)
    os.environ["PHI1_WORKDIR"] = str(uninterrupted)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        del os.environ["PHI1_WORKDIR"]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"checkpoints at steps [{N}, {STEPS}]; loaded step {STEPS}" in text
    assert "layers/0/attn/q_proj/kernel" in text and "relative_change" in text and "def add(a, b):" in text
    assert any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))  # the plot


def test_inspect_command_line(uninterrupted, tmp_path):
    r = subprocess.run([sys.executable, "-m", "phi1_jax.inspect", str(uninterrupted), f"--step={N}", "--tokens=5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"step {N} of [{N}, {STEPS}]" in r.stdout and "lm_head/kernel" in r.stdout
    r = subprocess.run([sys.executable, "-m", "phi1_jax.inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "not a phi1_jax model checkpoint" in r.stderr


def test_fp16_with_dynamic_loss_scaling(uninterrupted, tmp_path):
    r = subprocess.run(_cmd(tmp_path / "f16", "--config.model.dtype=float16"), env=_env(), capture_output=True,
                       text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    rows, fp32 = read_metrics(tmp_path / "f16")[0], _losses(uninterrupted)
    assert all(rows[s]["skipped"] == 0 and rows[s]["loss_scale"] == 2.0**15 for s in rows)
    for step in (1, STEPS):  # fp16 tracks fp32 (10 bits of mantissa: agreement to ~1e-2 over 16 steps)
        assert rows[step]["loss"] == pytest.approx(fp32[step], abs=5e-2)
    # A scale far too large: the overflowing steps are skipped (nothing updated) and the scale halves until it fits.
    r = subprocess.run(_cmd(tmp_path / "big", "--config.model.dtype=float16", "--config.loss_scale.initial=16777216"),
                       env=_env(), capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(tmp_path / "big")[0]
    assert rows[1]["skipped"] == 1 and rows[1]["grad_norm"] is None and rows[1]["loss_scale"] == 2.0**23
    assert rows[STEPS]["skipped"] == 0 and rows[STEPS]["loss_scale"] < 1e6
    first_good = min(s for s in rows if rows[s]["skipped"] == 0)
    assert rows[first_good]["loss"] == pytest.approx(fp32[1], abs=5e-2)  # skipped steps left the weights untouched


def test_keep_policy_nan_stop_and_missing_data(tmp_path, embedded):
    r = subprocess.run(_cmd(tmp_path / "keep", "--config.checkpoint_every=4", "--config.keep_checkpoints=2"),
                       env=_env(), capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(int(p.name) for p in (tmp_path / "keep" / "checkpoints").iterdir() if p.name.isdigit()) == [12, 16]

    r = subprocess.run(_cmd(tmp_path / "nan", "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=1",
                            "--config.checkpoint_every=2"), env=_env(), capture_output=True, text=True,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 2 and "stopping without saving this state" in r.stderr, r.stderr[-2000:]
    bad_step = int(re.search(r"error: loss is (?:nan|inf|-inf) at step (\d+)", r.stderr).group(1))
    saved = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad_step for s in saved)  # no checkpoint holds the diverged state

    r = _run("--config=configs/phi1.py", f"--workdir={tmp_path / 'nodata'}", "--config.model.num_layers=1",
             f"--config.data.tokenizer={embedded.tokenizer_path}", f"--config.data.sources.code.path={tmp_path / 'nope'}",
             f"--config.data.sources.textbooks.path={tmp_path / 'nope2'}",
             "--config.grad_accum_steps=1", "--config.batch_size=2")
    assert r.returncode == 2 and f"source 'code': {tmp_path / 'nope'}: shard directory not found" in r.stderr
    assert not (tmp_path / "nodata" / "checkpoints").exists()


# --- the MFU formula ---------------------------------------------------------------------------------------------------


def _dot_flops(jaxpr) -> int:
    """2 * M * N * K summed over every dot_general in a jaxpr and the jaxprs inside it."""
    import math

    from jax.extend import core as jcore

    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[d] for d in contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * k
        for sub in jcore.jaxprs_in_params(eqn.params):
            total += _dot_flops(sub)
    return total


def test_flops_per_token_counts_the_models_matrix_multiplies():
    """The formula of docs/flops.md against the matrix multiplies the model's forward pass really makes (read off its
    jaxpr): 3x forward (forward + backward), with the full T x T attention products halved for causality."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi1_jax.model import Phi, PhiConfig
    from phi1_jax.flops import flops_per_token

    cfg = PhiConfig(vocab_size=96, num_layers=3, d_model=64, num_heads=4, head_dim=16, mlp_dim=160, rotary_dim=8,
                    max_seq_len=32)
    b, t = 2, 32
    graphdef, state = nnx.split(Phi(cfg, rngs=nnx.Rngs(0)))
    jaxpr = jax.make_jaxpr(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, jnp.zeros((b, t), jnp.int32))
    forward = _dot_flops(jaxpr.jaxpr)
    full_attention = 2 * (2 * b * cfg.num_heads * t * t * cfg.head_dim) * cfg.num_layers  # QK^T and AV, T x T each
    assert flops_per_token(cfg, t) * b * t == 3 * (forward - full_attention // 2)


def test_peak_flops_by_device_kind():
    from types import SimpleNamespace

    from phi1_jax.flops import peak_flops

    kinds = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
             "TPU v6 lite": 918e12, "TPU v4 lite": None, "cpu": None}
    for kind, want in kinds.items():
        assert peak_flops(SimpleNamespace(device_kind=kind)) == want, kind
