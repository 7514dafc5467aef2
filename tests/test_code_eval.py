"""HumanEval during training (phi1_jax/evals/in_training.py through phi1_jax.train): rows at exactly the configured steps,
the same completions and verdicts as `python -m phi1_jax.evals` on the same step's checkpoint, consistent rows across a kill
and resume, and failures that are either refused at start (a bad section) or a warning the run survives.

At tiny scale pass@1 is 0, so the completions and the per-sample verdicts are what is compared, not only pass@1; the
runs use a model still close to its initialization, whose completions differ from problem to problem and from step
to step (asserted), so a wrong prompt, seed, batch or step would show.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parents[1]
PROBLEMS, NEW_TOKENS, BATCH = 4, 16, 3  # 4 prompts in batches of 3: two generate calls, seeds 0 and 3
SETTINGS = (f"--config.code_eval.problems={PROBLEMS}", f"--config.code_eval.max_new_tokens={NEW_TOKENS}",
            f"--config.code_eval.batch_size={BATCH}")


def _cmd(workdir, steps, *overrides):
    return [sys.executable, "-m", "phi1_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.steps={steps}", "--config.optimizer.warmup_steps=4", f"--config.log_every={steps}",
            *SETTINGS, *overrides]


def _env(devices=1, **extra):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            **extra}


def _train(workdir, steps, *overrides, devices=1):
    return subprocess.run(_cmd(workdir, steps, *overrides), env=_env(devices), capture_output=True, text=True, cwd=ROOT)


def _code_eval_rows(workdir) -> list[dict]:
    """Every code-eval row of metrics.jsonl, in file order (duplicates kept: the tests look for them)."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "humaneval/pass@1" in r]


def _samples(path) -> list[str]:
    return Path(path).read_text().splitlines()


def _verdicts(path) -> list[dict]:
    """Per-sample verdicts without their timings (the one field two runs of the same programs need not share)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in _samples(path)]


def _one_line(stderr, prefix):
    found = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    assert len(found) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return found[0]


# --- (a) rows at the configured steps; the completions of `python -m phi1_jax.evals` ---------------------------------------


STEPS, EVERY = 5, 2  # evals at 2, 4 and 5 (the last step is evaluated too)


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded):
    workdir = tmp_path_factory.mktemp("code_eval")
    r = _train(workdir, STEPS, f"--config.code_eval.every={EVERY}")
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r


def test_rows_at_exactly_the_configured_steps(run):
    workdir, r = run
    rows = _code_eval_rows(workdir)
    assert [row["step"] for row in rows] == [2, 4, 5]
    for row in rows:
        assert set(row) == {"step", "tokens_seen", "humaneval/pass@1", "humaneval/n_problems", "code_eval_seconds"}
        assert row["tokens_seen"] == row["step"] * 8 * 128  # tiny: batch 8 x 128 tokens
        assert row["humaneval/n_problems"] == PROBLEMS and 0.0 <= row["humaneval/pass@1"] <= 1.0
        assert row["code_eval_seconds"] > 0
        summary = json.loads((workdir / "code_eval" / f"step_{row['step']}.json").read_text())
        assert summary["pass@1"] == row["humaneval/pass@1"] and summary["step"] == row["step"]
    assert sorted(p.name for p in (workdir / "code_eval").iterdir()) == sorted(
        f"step_{s}{ext}" for s in (2, 4, 5)
        for ext in (".json", ".samples.jsonl", ".samples.meta.json", ".results.jsonl"))
    assert "step       5/5  humaneval/pass@1 0.0000" in r.stdout


def test_completions_and_verdicts_equal_python_m_evals_on_the_checkpoint(run, tmp_path):
    workdir, _ = run
    evals_dir = workdir / "code_eval"
    last = _samples(evals_dir / f"step_{STEPS}.samples.jsonl")
    # The model differs from step to step and its completions from problem to problem: the comparison below would
    # see a wrong step, prompt, batch or seed.
    assert last != _samples(evals_dir / "step_4.samples.jsonl")
    assert len({json.loads(line)["completion"] for line in last}) > 1
    out = tmp_path / "cli.json"
    r = subprocess.run([sys.executable, "-m", "phi1_jax.evals", "--no-progress", "--task=humaneval", f"--checkpoint={workdir}",
                        f"--limit={PROBLEMS}", f"--max-new-tokens={NEW_TOKENS}", f"--batch-size={BATCH}",
                        f"--out={out}"], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert _samples(tmp_path / "cli.samples.jsonl") == last  # same completions, same order
    assert _verdicts(tmp_path / "cli.results.jsonl") == _verdicts(evals_dir / f"step_{STEPS}.results.jsonl")
    assert json.loads(out.read_text())["pass@1"] == _code_eval_rows(workdir)[-1]["humaneval/pass@1"]
    # The same header as the trainer's (its workdir, step 5, these settings), recorded in both summaries.
    head = json.loads((tmp_path / "cli.samples.meta.json").read_text())
    assert head == json.loads((evals_dir / f"step_{STEPS}.samples.meta.json").read_text())
    assert head["step"] == STEPS and head["path"] == str(workdir.resolve()) and head["limit"] == PROBLEMS
    assert json.loads(out.read_text())["generated_by"] == head
    assert json.loads((evals_dir / f"step_{STEPS}.json").read_text())["generated_by"] == head
    # Another checkpoint step of the same workdir, into the same --out: refused, naming the step.
    # Another checkpoint step of the same workdir, into the same --out: refused, naming the step and nothing else. (The
    # run keeps only its last checkpoint: a copy of the workdir gains a step 3, a copy of step 5's files.)
    copy = tmp_path / "workdir"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("code_eval", "tensorboard"))
    shutil.copytree(copy / "checkpoints" / str(STEPS), copy / "checkpoints" / "3")

    def evals(*extra):
        return subprocess.run([sys.executable, "-m", "phi1_jax.evals", "--no-progress", "--task=humaneval",
                               f"--checkpoint={copy}", f"--limit={PROBLEMS}", f"--max-new-tokens={NEW_TOKENS}",
                               f"--batch-size={BATCH}", f"--out={tmp_path / 'copy.json'}", *extra],
                              capture_output=True, text=True, cwd=ROOT, env=_env())

    assert evals().returncode == 0  # the newest, step 5
    r = evals("--step=3")
    line = _one_line(r.stderr, "error:")
    assert r.returncode == 2 and f"(step {STEPS} -> 3;" not in line and f"(step {STEPS} -> 3)" in line, line
    assert json.loads((tmp_path / "copy.json").read_text())["generated_by"]["step"] == STEPS  # the summary stands


# --- (b) kill and resume -------------------------------------------------------------------------------------------


def test_kill_and_resume_keep_one_row_per_eval_step(tmp_path, embedded):
    """Killed right after the checkpoint of an eval step (its row written just before the save): the resumed run does
    not evaluate that step again, and evaluates the later ones once. Then a run that lost its last checkpoint after
    that step's eval row was written (killed mid-save): the row is dropped and remade, from the same weights."""
    workdir, steps = tmp_path / "killed", 8
    overrides = ("--config.code_eval.every=2", "--config.checkpoint_every=4")
    paused = [sys.executable, "-m", "tests.paused_train", "120", *_cmd(workdir, steps, *overrides)[3:]]
    proc = subprocess.Popen(paused, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [4], proc.stderr.read().decode()[-3000:]
    assert [row["step"] for row in _code_eval_rows(workdir)] == [2, 4]

    r = _train(workdir, steps, *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["step"] for row in _code_eval_rows(workdir)] == [2, 4, 6, 8]

    before = _samples(workdir / "code_eval" / "step_8.samples.jsonl"), _verdicts(
        workdir / "code_eval" / "step_8.results.jsonl")
    shutil.rmtree(workdir / "checkpoints" / "8")  # as if killed while saving step 8, after its eval row
    r = _train(workdir, steps, *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints' / '4'}" in r.stdout
    assert [row["step"] for row in _code_eval_rows(workdir)] == [2, 4, 6, 8]
    after = _samples(workdir / "code_eval" / "step_8.samples.jsonl"), _verdicts(
        workdir / "code_eval" / "step_8.results.jsonl")
    assert after == before


# --- (c) a bad section is refused at start; a failure mid-run is a warning -----------------------------------------


def _section(**changes):
    fields = dict(every=1, evaluator="phi1_jax.evals.in_training", task="humaneval", data="", problems=2, n_samples=1,
                  temperature=0.0, top_p=0.95, max_new_tokens=16, batch_size=2, seed=0, timeout=3.0)
    return SimpleNamespace(**{**fields, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(task="humanevil"), "config.code_eval.task='humanevil': unknown task; choose humaneval or mbpp"),
    (dict(task="humaneval_plus"), "choose humaneval or mbpp (EvalPlus's tasks score a checkpoint after training: "
                                  "python -m phi1_jax.evals --task=humaneval_plus"),
    (dict(n_samples=4), "config.code_eval.n_samples=4 with config.code_eval.temperature=0 (greedy)"),
    (dict(max_new_tokens=65), "config.code_eval.max_new_tokens=65 is more than half the model's context (128"),
    (dict(max_new_tokens=0), "config.code_eval.max_new_tokens=0: must be at least 1"),
    (dict(problems=165), "config.code_eval.problems=165: humaneval has 164 problems"),
    (dict(problems=-1), "config.code_eval.problems=-1"),
    (dict(top_p=0.0), "config.code_eval.top_p=0.0: must be in (0, 1]"),
    (dict(temperature=-1.0), "config.code_eval.temperature=-1.0: must be >= 0"),
    (dict(timeout=0.0), "config.code_eval.timeout=0.0"),
    (dict(task="mbpp", data="/nope/mbpp.jsonl"),
     "config.code_eval.data='/nope/mbpp.jsonl': /nope/mbpp.jsonl: MBPP data file not found"),
])
def test_a_bad_section_names_its_field(changes, message, tok, tmp_path):
    from phi1_jax.evals.in_training import CodeEvalError, make_evaluator

    with pytest.raises(CodeEvalError) as e:
        make_evaluator(_section(**changes), tok, tmp_path, max_seq_len=128)
    assert message in str(e.value)
    assert not (tmp_path / "code_eval").exists()


def test_a_bad_section_is_refused_before_training(tmp_path, embedded):
    for override, message in (("--config.code_eval.task=humanevil", "config.code_eval.task='humanevil'"),
                              ("--config.code_eval.max_new_tokens=384", "config.code_eval.max_new_tokens=384")):
        workdir = tmp_path / override.split(".")[-1].split("=")[0]
        r = _train(workdir, 2, "--config.code_eval.every=1", override)
        assert r.returncode == 2 and message in _one_line(r.stderr, "error:"), r.stderr[-3000:]
        assert not (workdir / "checkpoints").exists() and "training" not in r.stdout


def test_an_eval_that_fails_mid_run_is_a_warning_and_training_goes_on(tmp_path, embedded):
    """Each eval fails when it writes its files (a file stands where WORKDIR/code_eval should be): one warning line
    per eval step, no code-eval rows, and the run trains to the end and saves."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "code_eval").write_text("in the way\n")
    r = _train(workdir, 3, "--config.code_eval.every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all("code_eval" in w and "FileExistsError" in w for w in warnings), warnings
    assert "step 2" in warnings[0] and "step 3" in warnings[1]
    assert _code_eval_rows(workdir) == []
    assert "done at step 3" in r.stdout and (workdir / "checkpoints" / "3").is_dir()


def test_fig2_1_and_the_loss_plot_from_the_run(run, tmp_path):
    """The figure and the loss plot's pass@1 panel drawn from the rows a real run wrote (test_figures.py covers their
    layout on rows it writes itself)."""
    from phi1_jax import figures, metrics

    workdir, _ = run
    out = tmp_path / "fig2_1.png"
    assert figures.main(["fig2_1", f"--runs=tiny={workdir}", f"--out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [t for t, _ in figures.pass_curve(workdir, "humaneval")] == [s * 8 * 128 for s in (2, 4, 5)]
    assert len(metrics.loss_figure(workdir).axes) == 2  # the loss, and pass@1 under it
