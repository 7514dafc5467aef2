"""Model checkpoints on Orbax, self-describing: the model config is saved beside the weights.

Layout of a model checkpoint directory:
  DIR/model_config.json   PhiConfig fields (phi1_jax.model.PhiConfig.to_dict)
  DIR/params/             Orbax PyTree checkpoint of the parameters (a pure dict, as `nnx.to_pure_dict` gives)

The trainer's step checkpoints (params + opt_state + step + data_iter) use the same `params` item and config file, so
`load_model` is how inspect, convert and evals read any of them.

A step checkpoint that cannot be read (a file truncated or lost after Orbax committed it: a full disk, a copy cut
short) should cost one line, not the run: readers of a workdir's newest checkpoint fall back to the newest one that
reads (`newest_readable`), and say so. The trainer also moves the broken one aside (`set_aside`), out of Orbax's
sight but not deleted.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, TypeVar

import jax
import orbax.checkpoint as ocp
from flax import nnx

from phi1_jax import files
from phi1_jax.errors import UserError
from phi1_jax.model import Phi, PhiConfig, abstract_model

CONFIG_FILE = "model_config.json"
PARAMS_ITEM = "params"
CORRUPT_SUFFIX = ".corrupt"  # checkpoints/<step>.corrupt: not a step name, so Orbax and checkpoint_steps skip it

T = TypeVar("T")


class CheckpointError(UserError, ValueError):
    """A checkpoint directory that cannot be read or written; the message names the path."""


def save_model(directory: str | os.PathLike, model: Phi) -> None:
    """Writes `model` to a new directory. Orbax finalizes `params/` atomically; the config is written last."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: already exists and is not empty; refusing to overwrite a checkpoint")
    directory.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_ITEM, params)
        ckptr.wait_until_finished()
    files.write_text(directory / CONFIG_FILE, json.dumps(model.cfg.to_dict(), indent=2) + "\n")


def read_model_config(directory: str | os.PathLike) -> PhiConfig:
    if not Path(directory).exists():
        raise CheckpointError(f"{directory}: does not exist")
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: is a file, not a model checkpoint or trainer workdir (a directory)")
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


def unreadable_reason(e: BaseException) -> str:
    """One line on why a checkpoint did not read: the innermost cause (Orbax wraps TensorStore's useful message in a
    bare Exception that points at a multi-line spec), first line, shortened."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def newest_readable(steps: list[int], read: Callable[[int], T]) -> tuple[int, T, list[tuple[int, str]]]:
    """(step, read(step), [(newer step, why it did not read)]) for the newest of `steps` that `read` can read.

    Any exception counts as unreadable (Orbax raises bare Exceptions for a truncated file), but only because an older
    checkpoint then reads with the same code: if none does, the problem is not the files, and CheckpointError names
    the newest one's failure instead.
    """
    failed = []
    _quiet_orphaned_reads()
    for step in sorted(steps, reverse=True):
        try:
            return step, read(step), failed
        except Exception as e:  # noqa: BLE001 -- see the docstring
            failed.append((step, unreadable_reason(e)))
            gc.collect()  # the failed restore's other reads, now
    if not failed:
        raise CheckpointError("no checkpoints to read")
    raise CheckpointError(f"no checkpoint can be read (steps {sorted(steps)}); the newest, step {failed[0][0]}: "
                          f"{failed[0][1]}")


def _quiet_orphaned_reads() -> None:
    """When one array of a restore fails, Orbax's reads of the others fail too, as coroutines nobody awaits: Python
    prints each one's traceback ("Exception ignored in <coroutine _read_array_index_and_device_put>") whenever it is
    collected, and TensorStore's late callbacks to the closed event loop print "Event loop is closed", dozens of lines
    around the one that says what happened. Once a process reads checkpoints, those two (and only those) are not
    printed."""
    previous = sys.unraisablehook
    if getattr(previous, "_phi1_orphaned_reads", False):
        return

    def hook(unraisable):
        orphan = "_read_array_index_and_device_put" in getattr(unraisable.object, "__qualname__", "")
        late = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        if not (orphan or late):
            previous(unraisable)

    class _OrphanedTasks(logging.Filter):  # asyncio's "Task/Future exception was never retrieved" for the same reads
        def filter(self, record):
            text = record.getMessage()
            ours = ("async_deserialize", "_read_array", "OCDBT", "Error reading", "reading array index")
            return not ("never retrieved" in text and any(s in text for s in ours))

    hook._phi1_orphaned_reads = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_OrphanedTasks())


def describe_failures(failed: list[tuple[int, str]]) -> str:
    """'checkpoint step 16 cannot be read (why)' for one or more (step, why), on one line."""
    return "; ".join(f"checkpoint step {s} cannot be read ({why})" for s, why in failed)


def set_aside(step_dir: Path) -> Path:
    """Renames a broken checkpoints/<step> to checkpoints/<step>.corrupt (.corrupt.1, ... if taken) and returns the
    new path: kept for a post-mortem, but no longer a step that Orbax lists, restores or counts for max_to_keep."""
    target = step_dir.with_name(step_dir.name + CORRUPT_SUFFIX)
    n = 0
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{CORRUPT_SUFFIX}.{n}")
    os.replace(step_dir, target)
    return target


def _restore_params(path: Path, cfg: PhiConfig) -> dict:
    abstract_params = nnx.to_pure_dict(nnx.state(abstract_model(cfg)))
    # Whole arrays on this process's first device, whatever mesh saved them: a run trained on 8 devices is read by
    # `python -m phi1_jax.evals` or a notebook on one (without a sharding, Orbax asks for the devices that wrote it).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), abstract_params)
    _quiet_orphaned_reads()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, target)
    except Exception:
        gc.collect()  # the failed restore's other reads, now, while the filter is in place
        raise


def load_params_and_step(directory: str | os.PathLike, cfg: PhiConfig | None = None,
                         step: int | None = None) -> tuple[int | None, dict]:
    """(step, parameters as a pure dict) of a model checkpoint (step None) or a trainer workdir, checked against its
    config. A workdir's newest checkpoint that cannot be read is skipped for the newest that can, with one note on
    stderr naming both; a `step` asked for by name has no fallback."""
    directory = Path(directory).absolute()
    cfg = cfg or read_model_config(directory)
    path = params_dir(directory, step)
    if step is None and path != directory / PARAMS_ITEM:  # a workdir's newest: fall back if it is broken
        try:
            used, params, failed = newest_readable(
                checkpoint_steps(directory), lambda s: _restore_params(params_dir(directory, s), cfg))
        except CheckpointError as e:
            raise CheckpointError(f"{directory}: {e}") from None
        if failed:
            print(f"note: {directory}: {describe_failures(failed)}; using step {used}", file=sys.stderr, flush=True)
        return used, params
    try:
        return step, _restore_params(path, cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: cannot be read, or does not match {directory / CONFIG_FILE} "
                              f"({unreadable_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 -- Orbax raises bare Exceptions for unreadable files
        raise CheckpointError(f"{path}: cannot be read ({unreadable_reason(e)})") from None


def load_params(directory: str | os.PathLike, cfg: PhiConfig | None = None, step: int | None = None) -> dict:
    """The parameters (a pure dict) of a model checkpoint or trainer workdir, checked against its config."""
    return load_params_and_step(directory, cfg, step)[1]


def load_model_and_step(directory: str | os.PathLike, step: int | None = None, **overrides) -> tuple[Phi, int | None]:
    """(model, the step it is from: None for a model checkpoint), rebuilt from the directory alone (a model checkpoint,
    or a trainer workdir: its newest readable step unless `step` is given). `overrides` replace config fields (e.g.
    dtype, attention_impl)."""
    cfg = read_model_config(directory)
    if overrides:
        cfg = PhiConfig(**{**cfg.to_dict(), **overrides})
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    used, params = load_params_and_step(directory, cfg, step)
    nnx.replace_by_pure_dict(abstract_state, params)
    return nnx.merge(graphdef, abstract_state), used


def load_model(directory: str | os.PathLike, step: int | None = None, **overrides) -> Phi:
    """The model of a model checkpoint or trainer workdir (see load_model_and_step)."""
    return load_model_and_step(directory, step, **overrides)[0]


# ---------------------------------------------------------------------------------------------------------------------
# The trainer's workdir: WORKDIR/{model_config.json, tokenizer.*, checkpoints/<step>/{params, opt_state, data_iter,
# meta}}. Written and read here only; train.py wires it.
# ---------------------------------------------------------------------------------------------------------------------

SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim", "rotary_dim")
META_FILE = "metadata"  # checkpoints/<step>/meta/<this>: the JSON item, read before the trainer builds anything


def shape_difference(theirs: PhiConfig | dict, ours: PhiConfig) -> dict:
    """{field: (theirs, ours)} for every shape field that differs: another model's parameters would not fit."""
    get = theirs.get if isinstance(theirs, dict) else lambda k: getattr(theirs, k)
    return {k: (get(k), getattr(ours, k)) for k in SHAPE_FIELDS if get(k) != getattr(ours, k)}


def check_workdir(workdir: Path, cfg: PhiConfig) -> None:
    """Refuses, before any long work and writing nothing, a workdir this run cannot use: a file, a place this user
    cannot write, or another model's checkpoints."""
    try:
        existing = workdir
        while not existing.exists():
            existing = existing.parent
        is_dir = existing.is_dir()
    except OSError as e:  # a parent this user may not look into
        raise CheckpointError(f"--workdir={workdir}: {e.filename or workdir}: {e.strerror}") from None
    if existing == workdir and not is_dir:
        raise CheckpointError(f"--workdir={workdir} is a file, not a directory; it was left as it is. Pass a "
                              "directory (it is created if missing).")
    if not is_dir:
        raise CheckpointError(f"--workdir={workdir} cannot be created: {existing} is a file")
    for d in (existing, workdir / "checkpoints"):
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            raise CheckpointError(f"--workdir={workdir}: {d} is not writable by this user; pass a workdir you can "
                                  "write")
    path = workdir / CONFIG_FILE
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a model config (a JSON object); is {workdir} a phi1_jax workdir?")
    diff = shape_difference(saved, cfg)
    if diff:
        detail = ", ".join(f"{k} {a} there, {b} now" for k, (a, b) in diff.items())
        raise CheckpointError(f"{workdir} holds checkpoints of another model ({detail}). Use another --workdir, or "
                              "the config that wrote it.")


def schedule_steps(workdir: Path, steps: int) -> int:
    """The `steps` the learning-rate schedule was built for: the run's first `config.steps`, which every checkpoint's
    meta carries (`steps` for a new run, or for checkpoints from before the meta carried it)."""
    for step in reversed(checkpoint_steps(workdir)):
        try:
            meta = json.loads((workdir / "checkpoints" / str(step) / "meta" / META_FILE).read_text())
            return int(meta.get("schedule_steps", steps))
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # an unreadable checkpoint; the restore deals with it
    return steps


def describe_workdir(workdir: Path, cfg: PhiConfig, tokenizer) -> None:
    """The workdir describes itself: the model config and a copy of the tokenizer beside the checkpoints, so inspect,
    evals and serve rebuild everything from the directory alone. Written once (by process 0), each file whole or
    absent (`phi1_jax.files`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / CONFIG_FILE).exists():
        files.write_text(workdir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    copy = workdir / ("tokenizer.json" if tokenizer.kind == "huggingface" else "tokenizer.model")
    if not copy.exists():
        with files.replacing(copy) as tmp:
            shutil.copyfile(tokenizer.path, tmp)


class TrainCheckpoints:
    """The trainer's step checkpoints: params, opt_state, the data iterator's state and meta (step, schedule_steps),
    saved together (asynchronously) and restored together, so a rerun resumes bit for bit."""

    def __init__(self, workdir: Path, keep: int):
        import grain

        self._grain = grain
        self.dir = workdir / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
            item_handlers={"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                           "data_iter": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler(filename=META_FILE)},
        )

    def restore_newest(self, abstract_params, abstract_opt_state, data_iter, primary: bool):
        """(step, params, opt_state) of the newest checkpoint that reads, or (0, None, None) with none; restores the
        data iterator in place. Newer ones that do not read are moved aside (checkpoints/<step>.corrupt) with one
        warning line; if none reads, a CheckpointError that moves nothing. The abstract trees carry shardings."""
        steps = list(self.manager.all_steps())
        if not steps:
            return 0, None, None

        def read(step):
            return self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                data_iter=self._grain.checkpoint.CheckpointRestore(data_iter)))

        try:
            step, restored, failed = newest_readable(steps, read)
        except CheckpointError as e:
            raise CheckpointError(f"{self.dir}: {e}. Nothing was moved; remove or repair the checkpoints, or use "
                                  "another --workdir.") from None
        if failed:
            moved = []
            for bad, _ in failed:
                # One process renames (a shared filesystem); long before the next save could reuse the name.
                moved.append(set_aside(self.dir / str(bad)).name if primary else f"{bad}{CORRUPT_SUFFIX}")
            self.manager.reload()
            print(f"warning: {describe_failures(failed)}; moved aside to checkpoints/{', '.join(moved)}; resuming "
                  f"from step {step}", file=sys.stderr, flush=True)
        return step, restored.params, restored.opt_state

    def save(self, step: int, params, opt_state, data_iter, schedule_steps_: int) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data_iter=self._grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave({"step": step, "schedule_steps": schedule_steps_})), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
