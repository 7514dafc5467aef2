"""The trainer when things go wrong: broken checkpoints, unusable workdirs, NaN, signals, a changed step count; and
what it prints: library logs off, the logged loss a mean over the logging window."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from phi1_jax.metrics import read_metrics

ROOT = Path(__file__).parents[1]
STEPS, N = 12, 6  # a run of STEPS steps with a checkpoint every N


def _cmd(workdir, *overrides, steps=STEPS, log_every=1, checkpoint_every=N):
    return [sys.executable, "-m", "phi1_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.steps={steps}", "--config.optimizer.warmup_steps=4", f"--config.log_every={log_every}",
            f"--config.checkpoint_every={checkpoint_every}", *overrides]


def _env(**extra):
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu", **extra}


def _train(workdir, *overrides, env=None, **kw):
    return subprocess.run(_cmd(workdir, *overrides, **kw), env=env or _env(), capture_output=True, text=True, cwd=ROOT)


def _inspect(*args):
    return subprocess.run([sys.executable, "-m", "phi1_jax.inspect", *args, "--tokens=2"], env=_env(),
                          capture_output=True, text=True, cwd=ROOT)


def _steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _losses(workdir):
    return {step: row["loss"] for step, row in read_metrics(workdir)[0].items()}


def _rows_from(workdir, line):
    """The training rows metrics.jsonl gained from its `line`-th line on (what a rerun wrote)."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()[line:]
    return [r for r in map(json.loads, lines) if "loss" in r]


def _one_line(stderr, prefix):
    """The single stderr line starting with `prefix`; fails if there are none or several, or a traceback."""
    found = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    assert len(found) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return found[0]


def _break(step_dir):
    """Truncates the largest file of a checkpoint's params, as a full disk or a copy cut short would."""
    biggest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(100)


LOG_RECORD = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|(INFO|WARNING|DEBUG):)")  # absl's and Python's log formats


@pytest.fixture(scope="module")
def base(tmp_path_factory, embedded):
    """STEPS steps, every step logged, checkpoints at N and STEPS; (workdir, the finished process)."""
    workdir = tmp_path_factory.mktemp("base")
    r = _train(workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r


def _copy(base, tmp_path, name="run"):
    return Path(shutil.copytree(base[0], tmp_path / name))


# --- output -----------------------------------------------------------------------------------------------------------


def test_library_logs_are_off_by_default(base):
    """Orbax logs ~15 absl INFO lines per save; by default none reach the terminal (the verbosity flag test below
    shows they come back)."""
    _, r = base
    records = [ln for ln in (r.stdout + r.stderr).splitlines() if LOG_RECORD.match(ln)]
    assert len(records) <= 3, records[:10]
    assert not [ln for ln in records if ln.startswith("I")], records[:10]
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("step ")]) == STEPS + 1  # + the held-out loss


def test_logged_loss_is_the_mean_over_the_logging_window(base, tmp_path):
    """log_every=4 logs the mean of the 4 per-step losses of the log_every=1 run: the same training, sampled."""
    r = _train(tmp_path / "w4", log_every=4)
    assert r.returncode == 0, r.stderr[-3000:]
    every, rows = _losses(base[0]), read_metrics(tmp_path / "w4")[0]
    assert sorted(rows) == [4, 8, 12]
    for step in rows:
        window = [every[s] for s in range(step - 3, step + 1)]
        assert rows[step]["loss"] == pytest.approx(np.mean(window), rel=1e-6, abs=0), step
        assert abs(rows[step]["loss"] - every[step]) > 1e-4  # not the logged step's own loss
        assert rows[step]["grad_norm"] == read_metrics(base[0])[0][step]["grad_norm"]  # same trajectory
        assert f"step {step:>7}/{STEPS}  loss {rows[step]['loss']:.4f}" in r.stdout


# --- broken checkpoints ---------------------------------------------------------------------------------------------


def test_broken_newest_checkpoint_is_moved_aside_and_the_run_resumes(base, tmp_path):
    workdir = _copy(base, tmp_path)
    _break(workdir / "checkpoints" / str(STEPS))

    r = _inspect(str(workdir))  # inspect (and so evals) fall back, and say which step they use
    assert r.returncode == 0, r.stderr[-3000:]
    note = _one_line(r.stderr, "note:")
    assert f"checkpoint step {STEPS} cannot be read" in note and note.endswith(f"using step {N}")
    assert f"step {N} of [{N}, {STEPS}]" in r.stdout
    r = _inspect(str(workdir), f"--step={STEPS}")  # a step asked for by name: no fallback, one error line
    assert r.returncode == 2 and f"{STEPS}/params: cannot be read" in _one_line(r.stderr, "error:")

    r = _train(workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    warning = _one_line(r.stderr, "warning:")
    assert f"checkpoint step {STEPS} cannot be read" in warning
    assert f"moved aside to checkpoints/{STEPS}.corrupt" in warning
    assert f"resumed from {workdir / 'checkpoints' / str(N)}" in r.stdout
    assert (workdir / "checkpoints" / f"{STEPS}.corrupt" / "params").is_dir()  # kept, not deleted
    assert _steps(workdir) == [N, STEPS]
    rows = _rows_from(workdir, 0)
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps))  # no step twice: the first run's rows past step N were dropped on resume
    rerun = [row for row in rows if row["step"] > N]
    assert [row["step"] for row in rerun] == list(range(N + 1, STEPS + 1))
    want = _losses(base[0])
    assert all(row["loss"] == want[row["step"]] for row in rerun)  # bit for bit, from the older checkpoint


def test_evals_loader_falls_back_with_a_note(base, tmp_path, capsys):
    from phi1_jax import loader

    workdir = _copy(base, tmp_path)
    for p in (workdir / "checkpoints" / str(STEPS) / "params" / "ocdbt.process_0" / "d").iterdir():
        p.unlink()  # the newest checkpoint's array files deleted
    loaded = loader.open(workdir)
    assert loaded.tokenizer is not None and loaded.model.cfg.d_model == 64
    assert (loaded.step, loaded.format, loaded.path) == (N, loader.PHI1_JAX, workdir)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("note:") and f"using step {N}" in err


def test_no_readable_checkpoint_is_one_error_and_nothing_moves(base, tmp_path):
    workdir = _copy(base, tmp_path)
    for step in (N, STEPS):
        _break(workdir / "checkpoints" / str(step))
    r = _inspect(str(workdir))
    assert r.returncode == 2 and "no checkpoint can be read" in _one_line(r.stderr, "error:")
    r = _train(workdir)
    assert r.returncode == 2 and "no checkpoint can be read" in _one_line(r.stderr, "error:")
    assert _steps(workdir) == [N, STEPS] and not list((workdir / "checkpoints").glob("*.corrupt"))


# --- workdirs that cannot be used -----------------------------------------------------------------------------------


def _fresh_cache(tmp_path):
    """An empty corpus cache: if it is still empty after a run, the run never loaded or built the corpus."""
    cache = tmp_path / "cache"
    cache.mkdir()
    return cache


def test_workdir_that_is_a_file_or_another_models_fails_before_any_work(base, tmp_path):
    cache = _fresh_cache(tmp_path)
    env = _env(PHI1_JAX_CACHE=str(cache))
    file = tmp_path / "notes.txt"
    file.write_text("my notes\n")
    stat = file.stat()
    for workdir in (file, file / "sub"):
        t0 = time.time()
        r = _train(workdir, env=env)
        assert r.returncode == 2, r.stderr[-3000:]
        assert str(file) in _one_line(r.stderr, "error:")
        assert time.time() - t0 < 60 and r.stdout == ""
    assert file.read_text() == "my notes\n" and file.stat().st_mtime_ns == stat.st_mtime_ns

    other = tmp_path / "other"  # another model's workdir: only its model_config.json is needed to tell
    other.mkdir()
    cfg = json.loads((base[0] / "model_config.json").read_text())
    (other / "model_config.json").write_text(json.dumps({**cfg, "d_model": 32, "head_dim": 8}))
    r = _train(other, env=env)
    assert r.returncode == 2 and "holds checkpoints of another model" in _one_line(r.stderr, "error:")
    assert not list(cache.iterdir())  # refused before the corpus was touched
    assert sorted(p.name for p in other.iterdir()) == ["model_config.json"]

    r = _inspect(str(file))
    assert r.returncode == 2 and "is a file" in _one_line(r.stderr, "error:")
    r = _inspect(str(tmp_path / "missing"))
    assert r.returncode == 2 and "does not exist" in _one_line(r.stderr, "error:")
    r = _inspect(str(other))
    assert r.returncode == 2 and "not a phi1_jax checkpoint" in _one_line(r.stderr, "error:")


# Runs the trainer's command line as the unprivileged user `nobody`: the imports and the flags (the config file
# included) as root, since this venv's Python and the checkout may lie where nobody may read them (a clone under
# `mktemp -d` is 0700); then setuid; then main() as `python -m phi1_jax.train` would, inside the same cli.run.
AS_NOBODY = """
import os, sys
from phi1_jax import cli, train
sys.argv = ["phi1_jax.train", *sys.argv[1:]]

def as_nobody(argv):
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    return train.main(argv)

cli.run(as_nobody)
"""


def test_unwritable_workdir_is_refused(tmp_path):
    place = Path(tempfile.mkdtemp(prefix="phi1_ro_"))  # under /tmp, which every user may walk (pytest's tmp is 0700)
    try:
        place.chmod(0o755)
        ro = place / "ro"
        ro.mkdir(mode=0o555)
        cache = _fresh_cache(tmp_path)
        cmd = _cmd(ro / "w")
        if os.geteuid() == 0:  # root writes anywhere: the same command as nobody
            cmd = [sys.executable, "-c", AS_NOBODY, *cmd[3:]]
        r = subprocess.run(cmd, env=_env(PHI1_JAX_CACHE=str(cache)), capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and f"{ro} is not writable by this user" in _one_line(r.stderr, "error:")
        assert not list(cache.iterdir()) and not list(ro.iterdir())
    finally:
        shutil.rmtree(place)


# --- non-finite values ------------------------------------------------------------------------------------------------


def _all_finite_checkpoints(workdir):
    import jax

    from phi1_jax import checkpoint

    for step in _steps(workdir):
        params = checkpoint.load_params(workdir, step=step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step


def test_a_non_finite_state_is_never_saved(tmp_path, embedded):
    # A huge learning rate: the loss is NaN from step 3 on. Logged only at the end, saved every 2 steps: every save
    # checks every step since the last check.
    workdir = tmp_path / "big_lr"
    r = _train(workdir, "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=1", steps=8,
               log_every=100, checkpoint_every=2)
    assert r.returncode == 2
    err = _one_line(r.stderr, "error:")
    bad = int(re.match(r"error: loss is (?:nan|inf|-inf) at step (\d+): stopping without saving", err).group(1))
    assert _steps(workdir) and all(s < bad for s in _steps(workdir)), (_steps(workdir), bad)
    _all_finite_checkpoints(workdir)

    # lr=inf: the schedule's first value is inf * 0 = NaN, so step 1 writes NaN weights while its own loss and gradient
    # (taken before the update) are finite: the state itself is checked before the save.
    workdir = tmp_path / "inf_lr"
    r = _train(workdir, "--config.optimizer.learning_rate=inf", "--config.optimizer.warmup_steps=1", steps=2,
               log_every=100, checkpoint_every=1)
    assert r.returncode == 2
    assert "non-finite values after step 1" in _one_line(r.stderr, "error:")
    assert _steps(workdir) == []


# --- resuming -------------------------------------------------------------------------------------------------------


def test_more_steps_on_resume_keep_the_schedule_and_say_so(base, tmp_path):
    """The run started with STEPS steps: its schedule decays to lr 0 at STEPS, and stays there when resumed with more
    steps (one note line), instead of jumping back up to a schedule stretched over the new count. Run with -v 0: the
    verbosity flag brings the library logs back."""
    workdir = _copy(base, tmp_path)
    r = _train(workdir, "--verbosity=0", steps=STEPS + 4)
    assert r.returncode == 0, r.stderr[-3000:]
    note = _one_line(r.stderr, "note:")
    assert f"steps changed {STEPS} -> {STEPS + 4}; the learning-rate schedule stays the one this run started" in note
    rows = read_metrics(workdir)[0]
    assert [rows[s]["lr"] for s in range(STEPS + 1, STEPS + 5)] == [0.0] * 4
    assert 0 < rows[STEPS - 1]["lr"]
    meta = json.loads((workdir / "checkpoints" / str(STEPS + 4) / "meta" / "metadata").read_text())
    assert meta == {"step": STEPS + 4, "schedule_steps": STEPS}
    # The optimizer itself ran at lr 0 (not only the logged rate): the weights did not move after step STEPS.
    import jax

    from phi1_jax import checkpoint

    before, after = (checkpoint.load_params(workdir, step=s) for s in (STEPS, STEPS + 4))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert len([ln for ln in r.stderr.splitlines() if re.match(r"I\d{4} ", ln)]) > 10  # -v 0: Orbax's INFO lines


def test_resume_after_sigterm_starts_at_the_saved_step(tmp_path, embedded):
    workdir = tmp_path / "term"
    proc = subprocess.Popen(_cmd(workdir, steps=100000, checkpoint_every=100000), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and not ((workdir / "metrics.jsonl").exists()
                                          and len((workdir / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    (saved,) = _steps(workdir)
    assert f"received signal {signal.SIGTERM}: saved step {saved}, exiting" in out

    lines_before = len((workdir / "metrics.jsonl").read_text().splitlines())
    r = _train(workdir, steps=saved + 2, checkpoint_every=100000)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints' / str(saved)}" in r.stdout
    assert [row["step"] for row in _rows_from(workdir, lines_before)] == [saved + 1, saved + 2]
    assert _steps(workdir) == [saved, saved + 2]


def test_resume_after_sigkill_starts_at_the_newest_checkpoint_bit_exact(base, tmp_path):
    """A run killed after a checkpoint: the rerun resumes from that step, starts right after it, and matches the
    uninterrupted run bit for bit."""
    workdir = tmp_path / "killed"
    # The run pauses after each save (tests/paused_train.py), so the kill lands between checkpoint N and the next one.
    paused = [sys.executable, "-m", "tests.paused_train", "120", *_cmd(workdir)[3:]]
    proc = subprocess.Popen(paused, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / str(N)).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = _steps(workdir)[-1]
    assert newest == N, proc.stderr.read().decode()[-3000:]
    lines_before = len((workdir / "metrics.jsonl").read_text().splitlines())
    r = _train(workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints' / str(newest)}\n" in r.stdout
    rerun = _rows_from(workdir, lines_before)
    assert [row["step"] for row in rerun] == list(range(newest + 1, STEPS + 1))
    want = _losses(base[0])
    assert all(row["loss"] == want[row["step"]] for row in rerun)  # bit for bit
