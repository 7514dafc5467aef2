"""One way in for a model and its tokenizer, from wherever a user names it: a trainer workdir (its newest readable
checkpoint, or a given step), a phi1_jax model checkpoint (`convert import`), a Hugging Face Phi directory, or a hub
id ORG/NAME.

    from phi1_jax import loader
    loaded = loader.open("workdirs/tiny")            # or "microsoft/phi-1", revision="main"; step=500 for a workdir
    loaded.model, loaded.tokenizer, loaded.path, loaded.step, loaded.format

`open` reads top to bottom: the source becomes a local directory (a hub id is fetched once, by phi1_jax.hub), the
directory's format is decided once (`format_of`), the model is read by the one reader of that format
(`convert.from_hf` or `checkpoint.load_model_and_step`), and the tokenizer beside it is found. The trainer's
`init_from`, `python -m phi1_jax.inspect`, `python -m phi1_jax.evals`, `python -m phi1_jax.serve` and data_gen's model
embedder all load through it. Every failure is one `LoadError` naming the source.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from phi1_jax import checkpoint, hub
from phi1_jax.errors import UserError
from phi1_jax.model import Phi
from phi1_jax.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # SentencePiece (ours), Hugging Face (phi-1's, CodeGen's)
HUGGINGFACE, PHI1_JAX = "huggingface", "phi1_jax"  # the two formats


class LoadError(UserError, ValueError):
    """A model source that cannot be loaded; the message names it and says why."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model, its tokenizer and what was loaded."""

    model: Phi
    tokenizer: Tokenizer | None  # None when no tokenizer file lies beside the model
    source: str  # what the caller named: a path or a hub id
    path: Path  # the local directory read (for a hub id, its snapshot in the Hugging Face cache)
    revision: str | None  # the hub revision asked for (None: main; always None for a local path)
    step: int | None  # the trainer step of a workdir's checkpoint; None for a model checkpoint or Hugging Face model
    format: str  # HUGGINGFACE or PHI1_JAX


def open(source: str | os.PathLike, revision: str | None = None, *, step: int | None = None) -> Loaded:  # noqa: A001
    """The model and tokenizer of `source` (see the module docstring for what it may be).

    revision: a hub id's branch, tag or commit (default main); an error for a local path.
    step: a trainer workdir's checkpoint step (default: the newest that reads; a broken newer one is skipped with one
      note on stderr); an error for a Hugging Face model, which has no steps.
    """
    from phi1_jax import convert
    from phi1_jax.tokenizer import TokenizerError

    path = _local_directory(source, revision)
    fmt = format_of(path)
    try:
        if fmt == HUGGINGFACE:
            if step is not None:
                raise LoadError(f"{source}: a Hugging Face model has no checkpoint steps; drop the step ({step})")
            model, used = convert.from_hf(path), None
        else:
            model, used = checkpoint.load_model_and_step(path, step=step)
        tokenizer = find_tokenizer(path)
    except (convert.ConversionError, checkpoint.CheckpointError, TokenizerError) as e:
        raise LoadError(str(e)) from None
    return Loaded(model, tokenizer, str(source), path, revision, used, fmt)


def format_of(directory: Path) -> str:
    """HUGGINGFACE (config.json + safetensors) or PHI1_JAX (a trainer workdir or a model checkpoint)."""
    return HUGGINGFACE if (directory / "config.json").exists() else PHI1_JAX


def find_tokenizer(directory: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer beside a model (the trainer copies its own into the workdir), if there is one."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).exists():
            return Tokenizer.load(Path(directory) / name)
    return None


def _local_directory(source, revision) -> Path:
    if revision is not None and Path(source).exists():
        raise LoadError(f"{source}: a local path; a revision ({revision}) is for hub ids only")
    try:
        return hub.resolve(source, revision)
    except hub.HubError as e:
        raise LoadError(str(e)) from None
