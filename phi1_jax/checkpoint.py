"""Model checkpoints on Orbax, self-describing: the model config is saved beside the weights.

Layout of a model checkpoint directory:
  DIR/model_config.json   PhiConfig fields (phi1_jax.model.PhiConfig.to_dict)
  DIR/params/             Orbax PyTree checkpoint of the parameters (a pure dict, as `nnx.State.to_pure_dict`)

The trainer's step checkpoints (params + opt_state + step + data_iter) use the same `params` item and config file, so
`load_model` is how inspect, convert and evals read any of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from phi1_jax.model import Phi, PhiConfig, abstract_model

CONFIG_FILE = "model_config.json"
PARAMS_ITEM = "params"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or written; the message names the path."""


def save_model(directory: str | os.PathLike, model: Phi) -> None:
    """Writes `model` to a new directory. Orbax finalizes `params/` atomically; the config is written last."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: already exists and is not empty; refusing to overwrite a checkpoint")
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_ITEM, params)
        ckptr.wait_until_finished()
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    os.replace(tmp, directory / CONFIG_FILE)


def read_model_config(directory: str | os.PathLike) -> PhiConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return PhiConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; {directory} is not a phi1_jax model checkpoint") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as a model config ({e})") from None


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of a trainer workdir's checkpoints (WORKDIR/checkpoints/<step>), in order."""
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def params_dir(directory: str | os.PathLike, step: int | None = None) -> Path:
    """The `params` item of a model checkpoint, or of a trainer workdir's newest (or given) step checkpoint."""
    directory = Path(directory).absolute()
    if (directory / PARAMS_ITEM).is_dir() and step is None:
        return directory / PARAMS_ITEM
    steps = checkpoint_steps(directory)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{directory}: no checkpoint for step {step} (have {steps})")
        return directory / "checkpoints" / str(step) / PARAMS_ITEM
    if not steps:
        raise CheckpointError(f"{directory}: no {PARAMS_ITEM}/ and no checkpoints/<step>/; not a phi1_jax checkpoint")
    return directory / "checkpoints" / str(steps[-1]) / PARAMS_ITEM


def load_params(directory: str | os.PathLike, cfg: PhiConfig | None = None, step: int | None = None) -> dict:
    """The parameters (a pure dict) of a model checkpoint or trainer workdir, checked against its config."""
    directory = Path(directory).absolute()
    cfg = cfg or read_model_config(directory)
    path = params_dir(directory, step)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(abstract_model(cfg)).to_pure_dict())
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: does not match {directory / CONFIG_FILE} ({e})") from None


def load_model(directory: str | os.PathLike, step: int | None = None, **overrides) -> Phi:
    """Rebuilds the model from the directory alone (a model checkpoint, or a trainer workdir: its newest step unless
    `step` is given). `overrides` replace config fields (e.g. dtype, attention_impl)."""
    cfg = read_model_config(directory)
    if overrides:
        cfg = PhiConfig(**{**cfg.to_dict(), **overrides})
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    abstract_state.replace_by_pure_dict(load_params(directory, cfg, step))
    return nnx.merge(graphdef, abstract_state)
