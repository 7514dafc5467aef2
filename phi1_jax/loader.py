"""One way in for a model and its tokenizer, from wherever a user names it: a trainer workdir (its newest readable
checkpoint), a phi1_jax model checkpoint (`convert import`), a Hugging Face Phi directory, or a hub id ORG/NAME.

The trainer's `init_from`, `python -m phi1_jax.inspect`, `python -m phi1_jax.evals`, `python -m phi1_jax.serve` and data_gen's
model embedder all load through here, so "which kind of model directory is this" is decided in one place (`kind`).
"""

from __future__ import annotations

import os
from pathlib import Path

from phi1_jax import checkpoint, hub
from phi1_jax.errors import UserError
from phi1_jax.model import Phi
from phi1_jax.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # SentencePiece (ours), Hugging Face (phi-1's, CodeGen's)


class LoadError(UserError, ValueError):
    """A model source that cannot be loaded; the message names it and says why."""


def kind(directory: Path) -> str:
    """'huggingface' (config.json + safetensors) or 'phi1_jax' (a trainer workdir or a model checkpoint)."""
    return "huggingface" if (directory / "config.json").exists() else "phi1_jax"


def find_tokenizer(directory: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer beside a model (the trainer copies its own into the workdir), if there is one."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).exists():
            return Tokenizer.load(Path(directory) / name)
    return None


def load_model(source: str | os.PathLike, *, revision: str | None = None, param_dtype: str = "float32") -> Phi:
    from phi1_jax import convert

    directory = _resolve(source, revision)
    try:
        if kind(directory) == "huggingface":
            return convert.from_hf(directory, param_dtype=param_dtype)
        return checkpoint.load_model(directory, param_dtype=param_dtype)
    except (convert.ConversionError, checkpoint.CheckpointError) as e:
        raise LoadError(str(e)) from None


def load_model_and_tokenizer(source: str | os.PathLike, *, revision: str | None = None) -> tuple[Phi, Tokenizer | None]:
    """(model, tokenizer or None) from any source this module knows."""
    from phi1_jax.tokenizer import TokenizerError

    directory = _resolve(source, revision)
    model = load_model(directory)
    try:
        return model, find_tokenizer(directory)
    except TokenizerError as e:
        raise LoadError(str(e)) from None


def resolve(source: str | os.PathLike, revision: str | None = None) -> Path:
    """The local directory of a source (a hub id is fetched into the Hugging Face cache first)."""
    return _resolve(source, revision)


def _resolve(source, revision) -> Path:
    try:
        return hub.resolve(source, revision)
    except hub.HubError as e:
        raise LoadError(str(e)) from None
