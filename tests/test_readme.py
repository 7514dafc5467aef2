"""The README's commands and snippets, run as written on CPU: the README stays the source of what is run.

This reads README.md's ```bash and ```python blocks. Every command in them is either run here (STEPS: which test
runs it and what it must print or write) or skipped by SKIPPED with the reason (a GPU cluster, a hub download, an
LLM server, the 1.3B model, a placeholder path); a command matched by neither, or by both, fails
test_every_readme_command_is_run_or_skipped, so a new README command arrives with its check.

The commands run through bash, as a user would type them after `bash scripts/setup.sh && source .venv/bin/activate`:
in a fresh copy of the working tree (tracked files and untracked ones git does not ignore) whose .venv links to the
repository's, with that .venv/bin first on PATH and $PWD set to the copy; nothing is written in the repository. The
flows, in order: set-up and train tiny (command 1), resume (the Training section's same command), inspect (both
commands), the notebook headless (nbconvert) and the lookup of its workdir, eval on the tiny checkpoint and the
rescoring of its samples, finetuning at tiny scale, the dry run, and the "Using the model" snippet.

One liberty, for CI time (command 1 takes about 4 minutes on 2 cores): the train command runs with
`--config.steps=1000` appended (checkpoints at 500 and 1000), and so does its rerun, the Training section's line; the
rerun resumes from step 1000 and finds the run finished, as rerunning the README's command on a finished workdir does.
Everything before the appended flag is the README's text, unchanged. What the shorter run cannot show is checked
against the state the full command 1 leaves, computed from configs/tiny.py (steps, checkpoint_every,
keep_checkpoints): every `--step=N` the README names is a checkpoint both runs keep. Command 1's Python 3.12 line is
checked to be command 1 with the other environment, and its trainer run for a few steps (tests/ in the 3.12 lane run
the same trainer at length). The set-up command is run only when its stamp
is current (then it must be the no-op the README promises); run stale in a copy, it would point the editable install
at the copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
STEPS_RUN, FIRST_CHECKPOINT = 1000, 500  # --config.steps appended to command 1; tiny.py checkpoints every 500

# name -> pattern of the README command(s) it runs (re.search on the command without its comment).
STEPS = {
    "setup_and_train_tiny": r"^bash scripts/setup\.sh && \.venv/bin/python -m phi1_jax\.train --config=configs/tiny\.py",
    "setup_and_train_tiny_py312": r"^PYTHON=python3\.12 bash scripts/setup\.sh && \.venv-3\.12/bin/python -m "
                                  r"phi1_jax\.train ",
    "resume_tiny": r"^python -m phi1_jax\.train --config=configs/tiny\.py --workdir=workdirs/tiny$",
    "inspect_newest": r"^python -m phi1_jax\.inspect workdirs/tiny$",
    "inspect_step": r"^python -m phi1_jax\.inspect workdirs/tiny --step=",
    "notebook_headless": r"jupyter nbconvert .*--execute notebooks/inspect_checkpoint\.ipynb",
    "eval_tiny": r"^python -m phi1_jax.evals --task=humaneval --checkpoint=workdirs/tiny ",
    "eval_rescore": r"^python -m phi1_jax.evals --task=humaneval --samples=results/",
    "exercises": r"^python -m phi1_jax.data_gen\.stdlib_exercises ",
    "exercise_shards": r"^python -m phi1_jax.data_gen\.shards --input=workdirs/exercises\.jsonl ",
    "finetune_tiny": r"^python -m phi1_jax\.train --config=configs/tiny_finetune\.py ",
    "dry_run": r"^XLA_FLAGS=--xla_force_host_platform_device_count=8 .*--config=configs/phi1\.py .*--config\.dry_run=True",
}

SKIPPED = {
    r"^bash scripts/test\.sh$": "the whole suite, which holds this test",
    r"^bash scripts/test\.sh --latest$": "the whole suite again on fresh environments of today's newest versions "
                                         "(downloads, ~15 minutes); not CI, a report",
    r"^bash scripts/lock\.sh$": "rewrites the committed locks from today's newest versions; a maintainer's step",
    r"^EXTRAS=gpu-plan PYTHON=python3\.12 bash scripts/setup\.sh$": "~4 GB of CUDA wheels; scripts/test.sh's third "
                                                                   "lane installs it",
    r"^\.venv-gpu-plan/bin/python -m phi1_jax\.(train|gpu_plan) ": "phi-1 compiled for a GPU: 5-13 minutes a compile; "
                                                                  "tests/test_gpu_target.py runs the same for tiny",
    r"^python -m phi1_jax\.train --config=configs/phi1\.py --workdir=/ckpt/": "1.3B pretraining: GPUs and your shards "
                                                                              "(the ... are placeholders)",
    r"^PHI1_WORKDIR=\S+ jupyter notebook ": "starts a server for a browser; the nbconvert line runs the same notebook",
    r"^python -m phi1_jax.evals --task=mbpp ": "needs mbpp.jsonl and a phi-1 Hugging Face directory (placeholders)",
    r"^python -m phi1_jax.evals --task=humaneval_plus --data=PATH/": "needs EvalPlus's release file (placeholder path); "
                                                                     "tests/test_evalplus.py runs it on a written one",
    r"^python -m phi1_jax\.convert (import|export) ": "needs a phi-1 Hugging Face directory (placeholder paths)",
    r"^python -m phi1_jax.data_gen\.generate ": "needs an LLM server (--base-url, --model=NAME)",
    r"^python -m phi1_jax\.serve --checkpoint=workdirs/tiny ": "a server that runs until stopped; tests/test_serve.py "
                                                                "starts it and drives it with the openai client",
    r"^python -m phi1_jax.data_gen\.dedup ": "its inputs are phi1_jax.data_gen.generate's output",
    r"^python -m phi1_jax.data_gen\.filter (annotate|train|apply) ": "reads a hub corpus (hf://) and needs an LLM server",
    r"^python -m phi1_jax.data_gen\.decontaminate ": "its input is phi1_jax.data_gen.dedup's output",
    r"^python -m phi1_jax.data_gen\.shards --input=(my_code/|exercises\.jsonl) ": "placeholder inputs and tokenizer; the tiny "
                                                                         "finetuning runs the same command on real files",
    r"^bash scripts/fig2_1_demo\.sh$": "two tiny runs with evals, ~6 minutes; tests/test_code_eval.py runs the in-training "
                                       "eval against python -m phi1_jax.evals, tests/test_figures.py the figure",
    r"^python -m phi1_jax\.figures fig2_1 --runs=stdlib=workdirs/fig2_1/": "its inputs are the demo's two runs; "
                                                                           "tests/test_figures.py draws it from real rows",
}

PYTHON_STEPS = {"using_the_model": r"from phi1_jax\.model import Phi"}
PYTHON_SKIPPED = {r"from phi1_jax\.convert import from_hf": "needs a phi-1 Hugging Face directory (placeholder path)"}


# ---------------------------------------------------------------------------------------------------------------------
# Reading the README
# ---------------------------------------------------------------------------------------------------------------------


def strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a # at the start or after a space, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.S | re.M)


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks: continuation lines joined, comments dropped."""
    return [c for block in readme_blocks("bash") for c in block_commands(block.splitlines())]


def block_commands(lines: list[str]) -> list[str]:
    """The commands of one shell block's lines: continuation lines joined, comments dropped, spaces collapsed."""
    commands, pending = [], ""
    for line in lines:
        line = strip_comment(line)
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        command = (pending + line.strip()).strip()
        pending = ""
        if command:
            commands.append(re.sub(r"\s+", " ", command))
    return commands


def _classify(items: list[str], steps: dict, skipped: dict) -> tuple[dict[str, list[str]], list[str]]:
    """({step name: its items}, problems: items matched by no pattern or by several)."""
    found, problems = {name: [] for name in steps}, []
    for item in items:
        runs = [name for name, pattern in steps.items() if re.search(pattern, item, re.M)]
        skips = [reason for pattern, reason in skipped.items() if re.search(pattern, item, re.M)]
        if len(runs) + len(skips) != 1:
            problems.append(f"{item[:100]!r}: run by {runs}, skipped by {skips}")
        for name in runs:
            found[name].append(item)
    return found, problems


def command(name: str) -> str:
    found = _classify(readme_commands(), STEPS, SKIPPED)[0][name]
    assert len(found) == 1, f"README: {len(found)} commands for {name} ({STEPS[name]!r}): {found}"
    return found[0]


# ---------------------------------------------------------------------------------------------------------------------
# Running commands as a user would
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh copy of the working tree with the repository's .venv linked in: the README's working directory."""
    root = tmp_path_factory.mktemp("readme") / "phi1_jax"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a file deleted in the work tree but still in the index is skipped
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    (root / ".venv").symlink_to(REPO / ".venv")
    shutil.rmtree(root / "results", ignore_errors=True)  # what the README's eval writes, were it left in the repository
    return root


def sh(clone: Path, cmd: str, timeout: float = 900, **env_overrides) -> subprocess.CompletedProcess:
    """`cmd` through bash in the clone, with the venv active; fails the test (with the output's tail) unless it
    exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")}
    env.update(PATH=f"{clone / '.venv' / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(clone / ".venv"),
               PWD=str(clone), **env_overrides)
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-c", cmd], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"[{time.perf_counter() - t0:6.1f} s] {cmd.splitlines()[0]}")
    assert r.returncode == 0, f"{cmd}\nexit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r


def _setup_is_current(venv: str = ".venv", lock: str = "requirements/lock-py311.txt") -> bool:
    stamp = REPO / venv / ".phi1_jax_installed"
    return stamp.exists() and all(stamp.stat().st_mtime >= (REPO / f).stat().st_mtime
                                  for f in ("pyproject.toml", "scripts/setup.sh", lock))


def full_run_checkpoints() -> list[int]:
    """The checkpoint steps command 1 (configs/tiny.py run to its end) leaves: every checkpoint_every steps and the
    last, the newest keep_checkpoints of them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    saved = sorted(set(range(c.checkpoint_every, c.steps + 1, c.checkpoint_every)) | {c.steps})
    return saved[-c.keep_checkpoints:]


@pytest.fixture(scope="module")
def tiny(clone):
    """Command 1 (set-up, then train tiny) for STEPS_RUN steps; then the same train command again, which resumes from
    the newest checkpoint and finds nothing left to do. Returns the workdir and both runs' output."""
    setup, train = command("setup_and_train_tiny").split(" && ", 1)
    assert setup == "bash scripts/setup.sh"
    if _setup_is_current():
        t0 = time.perf_counter()
        r = sh(clone, setup)
        assert time.perf_counter() - t0 < 30 and not r.stdout, "a second set-up run should be a no-op"
    first = sh(clone, f"{train} --config.steps={STEPS_RUN}")
    resume = command("resume_tiny")
    assert resume == train.removeprefix(".venv/bin/"), "the Training section reruns command 1's train command"
    second = sh(clone, f"{resume} --config.steps={STEPS_RUN}")
    return clone / "workdirs" / "tiny", first.stdout, second.stdout


# ---------------------------------------------------------------------------------------------------------------------
# The flows
# ---------------------------------------------------------------------------------------------------------------------


def test_every_readme_command_is_run_or_skipped():
    found, problems = _classify(readme_commands(), STEPS, SKIPPED)
    assert not problems, "README commands that are neither run by STEPS nor skipped by SKIPPED:\n" + "\n".join(problems)
    assert all(len(v) == 1 for v in found.values()), {k: v for k, v in found.items() if len(v) != 1}
    found, problems = _classify(readme_blocks("python"), PYTHON_STEPS, PYTHON_SKIPPED)
    assert not problems and all(len(v) == 1 for v in found.values()), problems


def test_every_step_the_readme_names_is_kept_by_command_1():
    """`--step=N` in a README command names a checkpoint the full command 1 leaves (not only this test's shorter
    run): after 2000 steps of tiny.py, keeping 3, that is 1000, 1500 and 2000."""
    kept = full_run_checkpoints()
    assert kept == [1000, 1500, 2000]  # tiny.py today; the check below follows the config if it changes
    named = [int(n) for cmd in readme_commands() for n in re.findall(r"--step=(\d+)", cmd)]
    assert named, "the README names a checkpoint step (the inspect command)"
    assert all(n in kept for n in named), f"README names steps {named}; command 1 leaves {kept}"


def test_setup_and_train_tiny_on_python_312(clone):
    """Command 1's 3.12 line is command 1 with PYTHON=python3.12 and .venv-3.12; its set-up is the no-op the README
    promises when current, and its trainer starts and trains (a few steps: the 3.12 lane's tests run it at length)."""
    cmd = command("setup_and_train_tiny_py312")
    setup, train = cmd.split(" && ", 1)
    setup_311, train_311 = command("setup_and_train_tiny").split(" && ", 1)
    assert setup == f"PYTHON=python3.12 {setup_311}"
    assert train == train_311.replace(".venv/bin/python", ".venv-3.12/bin/python", 1)
    if not (REPO / ".venv-3.12" / "bin" / "python").exists():
        pytest.skip("no .venv-3.12 here (PYTHON=python3.12 bash scripts/setup.sh makes it)")
    link = clone / ".venv-3.12"
    if not link.exists():
        link.symlink_to(REPO / ".venv-3.12")
    if _setup_is_current(".venv-3.12", "requirements/lock-py312.txt"):
        t0 = time.perf_counter()
        r = sh(clone, setup)
        assert time.perf_counter() - t0 < 30 and not r.stdout, "a second set-up run should be a no-op"
    # absl takes a repeated flag's last value: the README's command, in a workdir of its own, for 3 steps
    r = sh(clone, f"{train} --workdir=workdirs/tiny-py312 --config.steps=3")
    assert "done at step 3" in r.stdout and (clone / "workdirs" / "tiny-py312" / "checkpoints" / "3").exists()
    assert "Python 3.12" in subprocess.run([str(link / "bin" / "python"), "--version"], capture_output=True,
                                           text=True).stdout


def test_setup_leaves_no_environment_behind_when_it_fails(tmp_path):
    """A bad PYTHON= is one error line before anything is made; a first install that fails (here: no index, so no
    build backend) removes the environment it created (#30)."""
    script = REPO / "scripts" / "setup.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "LOCK", "EXTRAS")}
    r = subprocess.run(["bash", str(script)], env={**env, "PYTHON": "python9.99", "VENV": str(tmp_path / "bad")},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: PYTHON=python9.99: no such interpreter (give a command or a path)"] and not (tmp_path / "bad").exists()
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==0.0.1\n")
    venv = tmp_path / "failed"
    r = subprocess.run(["bash", str(script)], env={**env, "PYTHON": sys.executable, "VENV": str(venv),
                                                   "LOCK": str(lock), "PIP_NO_INDEX": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and f"error: the install failed; removed {venv}" in r.stderr, r.stderr[-2000:]
    assert not venv.exists()


def test_train_tiny_then_resume(tiny):
    workdir, first, second = tiny
    assert f"done at step {STEPS_RUN}" in first and "resumed" not in first
    assert f"resumed from {workdir / 'checkpoints' / str(STEPS_RUN)}" in second
    assert f"done at step {STEPS_RUN}" in second and not re.search(r"^step +\d+/", second, re.M)  # no step again
    for name in ("metrics.jsonl", "loss.png", "model_config.json", "tokenizer.model", "tensorboard"):
        assert (workdir / name).exists(), name
    assert {FIRST_CHECKPOINT, STEPS_RUN} <= {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}


def test_inspect(tiny):
    clone = tiny[0].parents[1]
    newest = sh(clone, command("inspect_newest")).stdout
    assert f"step {STEPS_RUN}" in newest and "lm_head/kernel" in newest
    cmd = command("inspect_step")
    step = int(re.search(r"--step=(\d+)", cmd).group(1))
    assert step in (FIRST_CHECKPOINT, STEPS_RUN), "the README's --step must be a checkpoint this test's run saves"
    assert step in full_run_checkpoints(), "... and one the full command 1 keeps"
    other = sh(clone, cmd).stdout
    assert f"step {step}" in other and "def add(a, b):" in other


def test_notebook_headless(tiny):
    workdir = tiny[0]
    cmd = command("notebook_headless")
    html = workdir / "inspect_checkpoint.html"
    assert "--output-dir=workdirs/tiny" in cmd and "--to html" in cmd
    sh(tiny[0].parents[1], cmd, timeout=600)
    text = html.read_text()
    assert f"checkpoints at steps [{FIRST_CHECKPOINT}, {STEPS_RUN}]; loaded step {STEPS_RUN}" in text
    assert "layers/0/attn/q_proj/kernel" in text and "relative_change" in text and "image/png" in text
    assert re.search(r"\d\.\d{4}  (&#39;|&quot;|'|\")", text), "the next-token list, one shown token a line"


def test_the_notebooks_next_token_list_tells_whitespace_tokens_apart():
    """The notebook prints inspect_model.format_next_tokens: each token repr-escaped (no raw newline or tab), a
    whitespace-only one described in words, so '    ', '   ', '\\n' and '\\t' never look alike."""
    from phi1_jax.inspect_model import format_next_tokens

    assert "format_next_tokens(" in (REPO / "notebooks" / "inspect_checkpoint.ipynb").read_text()
    tokens = ["    ", "   ", "\n", "\n    ", "\t", " ", "def", " x"]
    lines = format_next_tokens([(t, 0.5 / (i + 1)) for i, t in enumerate(tokens)]).split("\n")
    assert len(lines) == len(tokens) and len({line.split("  ", 1)[1] for line in lines}) == len(tokens)
    assert "\t" not in "".join(lines)
    assert lines[0].endswith("'    ' (4 spaces)") and lines[3].endswith("'\\n    ' (1 newline, 4 spaces)")
    assert lines[4].endswith("'\\t' (1 tab)") and lines[6].endswith("'def'")


def _notebook_first_cell() -> str:
    nb = json.loads((REPO / "notebooks" / "inspect_checkpoint.ipynb").read_text())
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


def test_notebook_finds_its_workdir_or_says_where_it_looked(tiny, tmp_path):
    """Run as a kernel runs it (in notebooks/, with the PWD of the shell that started Jupyter): a relative
    PHI1_WORKDIR is found from the repository root when $PWD does not hold it, and a missing one is one error naming
    every place tried."""
    clone, cell = tiny[0].parents[1], _notebook_first_cell()
    elsewhere = tmp_path / "some" / "other" / "dir"
    elsewhere.mkdir(parents=True)
    # The kernel imports the installed phi1_jax, whose repository root is REPO: name the clone's workdir from there.
    from_root = os.path.relpath(tiny[0], REPO)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    r = subprocess.run([sys.executable, "-c", cell], cwd=clone / "notebooks", capture_output=True, text=True,
                       env={**env, "PWD": str(elsewhere), "PHI1_WORKDIR": from_root}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoints at steps [{FIRST_CHECKPOINT}, {STEPS_RUN}]" in r.stdout
    r = subprocess.run([sys.executable, "-c", cell], cwd=clone / "notebooks", capture_output=True, text=True,
                       env={**env, "PWD": str(elsewhere), "PHI1_WORKDIR": "workdirs/nowhere"}, timeout=300)
    assert r.returncode != 0
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("FileNotFoundError: PHI1_WORKDIR='workdirs/nowhere'"), message
    for base in (elsewhere, REPO, (clone / "notebooks").resolve()):
        assert str(base / "workdirs" / "nowhere") in message, (base, message)


def test_eval_on_the_tiny_checkpoint(tiny):
    clone = tiny[0].parents[1]
    cmd = command("eval_tiny")
    out = clone / re.search(r"--out=(\S+)", cmd).group(1)
    assert not out.parent.exists(), "the README's eval command must create its --out folder"
    sh(clone, cmd)
    summary = json.loads(out.read_text())
    assert summary["n_problems"] == 164 and summary["n_samples"] == 164
    assert summary["pass@1"] >= 0.0
    rescore = command("eval_rescore")
    assert re.search(r"--samples=(\S+)", rescore).group(1) == str(out.with_name(out.stem + ".samples.jsonl")
                                                                  .relative_to(clone))
    sh(clone, rescore)
    again = json.loads((clone / re.search(r"--out=(\S+)", rescore).group(1)).read_text())
    assert again["n_samples"] == 164 and again["pass@1"] == summary["pass@1"]
    # Both summaries name what made the samples: the workdir's newest checkpoint and the settings (the header beside
    # the samples file, which rescoring picks up).
    head = summary["generated_by"]
    assert head["path"] == str((clone / "workdirs" / "tiny").resolve()) and head["step"] == summary["step"] == STEPS_RUN
    assert head["temperature"] == 0.0 and head["n_samples"] == 1 and head["max_new_tokens"] == 64
    assert again["generated_by"] == head and again["step"] == STEPS_RUN


def test_finetune_at_tiny_scale(tiny):
    clone = tiny[0].parents[1]
    sh(clone, command("exercises"))
    records = [json.loads(line) for line in (clone / "workdirs" / "exercises.jsonl").read_text().splitlines()]
    assert len(records) > 1000 and all(r["text"].startswith(r["prompt"]) and r["text"] != r["prompt"] for r in records)
    sh(clone, command("exercise_shards"))
    assert (clone / "workdirs" / "exercises" / "manifest.json").exists()
    r = sh(clone, command("finetune_tiny"))
    assert "initialized parameters from workdirs/tiny" in r.stdout and "done at step 200" in r.stdout


def test_dry_run(clone):
    cmd = command("dry_run")
    workdir = Path(re.search(r"--workdir=(\S+)", cmd).group(1))
    existed = workdir.exists()
    r = sh(clone, cmd)
    assert "compiled for 8 devices; 1,418,270,720 parameters" in r.stdout
    arguments = float(re.search(r"argument:\s+([\d.]+) GiB per device", r.stdout).group(1))
    assert 1.9 < arguments < 2.1  # params + AdamW state (3 x 4 bytes x 1.418B) over 8 devices: what the README says
    assert existed or not workdir.exists()  # writes nothing


def test_using_the_model_snippet(clone):
    snippet = _classify(readme_blocks("python"), PYTHON_STEPS, PYTHON_SKIPPED)[0]["using_the_model"][0]
    r = sh(clone, f"python - <<'PHI1_README_SNIPPET'\n{snippet}\nprint(logits.shape)\nPHI1_README_SNIPPET")
    assert r.stdout.strip().splitlines()[-1] == "(1, 6, 2048)"
