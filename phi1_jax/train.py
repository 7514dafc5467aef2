"""Trains Phi: `python -m phi1_jax.train --config=configs/<name>.py --workdir=DIR [--config.a.b=value ...]`.

Rerunning the same command on the same DIR resumes from the newest complete checkpoint. Sections: mesh, model and
optimizer (abstract first, then sharded), data, restore or init, step, loop. Writes DIR/metrics.jsonl (one JSON line
per `log_every` steps), DIR/model_config.json and DIR/checkpoints/<step>/{params, opt_state, data_iter, meta}.

Multi-host: pass --coordinator_address, --num_processes and --process_id (or set JAX's cluster environment and
--distributed) and run the same command on every host; JAX's runtime connects them and each process feeds its share
of the batch.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import flags
from flax import nnx
from ml_collections import config_flags

from phi1_jax import checkpoint, cli, data, metrics, optim, sharding
from phi1_jax.model import PhiConfig, count_params
from phi1_jax.step import BuildError, build, init_params
from phi1_jax.tokenizer import TokenizerError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config (configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go; rerunning on it resumes")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() from the cluster environment")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")

SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim", "rotary_dim")


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _check_workdir_model(workdir: Path, cfg: PhiConfig):
    """A workdir that holds another model's checkpoints is refused before anything is written."""
    path = workdir / checkpoint.CONFIG_FILE
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: cannot be read ({e})") from None
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in SHAPE_FIELDS if saved.get(k) != getattr(cfg, k)}
    if diff:
        detail = ", ".join(f"{k} {a} there, {b} now" for k, (a, b) in diff.items())
        raise TrainError(f"{workdir} holds checkpoints of another model ({detail}). Use another --workdir, or the "
                         "config that wrote it.")


def _pretrained_params(path: str, cfg: PhiConfig) -> dict:
    """Parameters of a trainer workdir, a phi1_jax model checkpoint or a Hugging Face directory, checked against cfg."""
    from phi1_jax import convert

    source = Path(path)
    try:
        if (source / "config.json").exists():  # Hugging Face layout
            model = convert.from_hf(source, param_dtype=cfg.param_dtype)
            theirs = model.cfg
        else:
            theirs = checkpoint.read_model_config(source)
            model = None
    except (convert.ConversionError, checkpoint.CheckpointError) as e:
        raise TrainError(f"config.init_from: {e}") from None
    diff = {k: (getattr(theirs, k), getattr(cfg, k)) for k in SHAPE_FIELDS if getattr(theirs, k) != getattr(cfg, k)}
    if diff:
        detail = ", ".join(f"{k} {a} there, {b} in the config" for k, (a, b) in diff.items())
        raise TrainError(f"config.init_from={path} is another model shape ({detail})")
    if model is not None:
        return nnx.state(model, nnx.Param).to_pure_dict()
    try:
        return checkpoint.load_params(source, cfg)
    except checkpoint.CheckpointError as e:
        raise TrainError(f"config.init_from: {e}") from None


def _abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _device_batch(batch, shardings, whole: bool):
    """Global arrays from host batches: this process's share, or (`whole`) the global batch each device slices."""
    if whole:
        return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx]) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def _print_memory(compiled, n_params):
    mem = compiled.memory_analysis()
    gib = 1024 ** 3
    print(f"dry run: train step compiled for {jax.device_count()} devices; {n_params:,} parameters")
    if mem is None:
        print("  (this backend reports no memory analysis)")
        return {}
    fig = {k: getattr(mem, f"{k}_size_in_bytes", 0) for k in ("argument", "output", "temp", "generated_code")}
    for k, v in fig.items():
        print(f"  {k:>15}: {v / gib:8.2f} GiB per device")
    print(f"  {'peak (approx)':>15}: {(fig['argument'] + fig['temp']) / gib:8.2f} GiB per device")
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str):
    workdir = Path(workdir).absolute()
    primary = jax.process_index() == 0
    b = build(config)
    mesh, cfg, abstract, abs_params, p_shard = b.mesh, b.cfg, b.abstract, b.abs_params, b.p_shard
    abs_opt, o_shard, b_shard, replicated = b.abs_opt, b.o_shard, b.b_shard, b.replicated
    step_fn, eval_fn = b.step_fn, b.eval_fn

    if config.dry_run:
        bs, t = config.batch_size, config.seq_len
        abs_batch = {k: jax.ShapeDtypeStruct((bs,) if k == "source_id" else (bs, t),
                                             jnp.float32 if k == "loss_mask" else jnp.int32, sharding=b_shard[k])
                     for k in b_shard}
        compiled = step_fn.lower(_abstract_with_shardings(abs_params, p_shard), _abstract_with_shardings(abs_opt, o_shard),
                                 jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), abs_batch).compile()
        return _print_memory(compiled, count_params(abstract))

    # --- Data ----------------------------------------------------------------------------------------------------------
    ds, tokenizer = data.from_config(config)
    it = iter(ds)
    whole_batches = config.data.shard_by == "row"
    eval_ds = data.from_config(config, split="eval")[0] if config.eval_every and config.data.holdout_every else None

    def evaluate():
        """Mean held-out loss over the same `eval_batches` batches every time."""
        eval_it, total, count = iter(eval_ds), 0.0, 0.0
        for _ in range(config.eval_batches):
            t, c = eval_fn(params, _device_batch(next(eval_it), b_shard, whole_batches))
            total, count = total + float(t), count + float(c)
        return total / max(count, 1.0)

    # --- Restore or init -----------------------------------------------------------------------------------------------
    _check_workdir_model(workdir, cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    if primary and not (workdir / checkpoint.CONFIG_FILE).exists():
        (workdir / checkpoint.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tok_copy = workdir / ("tokenizer.json" if tokenizer.kind == "huggingface" else "tokenizer.model")
    if primary and not tok_copy.exists():  # the workdir describes itself: inspect and evals find the tokenizer here
        shutil.copyfile(tokenizer.path, tok_copy)
    import grain

    manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                             enable_async_checkpointing=True),
        item_handlers={"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    start = manager.latest_step() or 0
    if start:
        restored = manager.restore(start, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract_with_shardings(abs_params, p_shard)),
            opt_state=ocp.args.StandardRestore(_abstract_with_shardings(abs_opt, o_shard)),
            data_iter=grain.checkpoint.CheckpointRestore(it),
        ))
        params, opt_state = restored.params, restored.opt_state
        print(f"resumed from {workdir / 'checkpoints' / str(start)}")
    else:
        if config.init_from:  # finetuning: parameters from a pretrained model; optimizer, schedule and step start fresh
            params = jax.device_put(_pretrained_params(config.init_from, cfg), p_shard)
            print(f"initialized parameters from {config.init_from}")
        else:
            params = init_params(b, config.seed)
        opt_state = jax.jit(b.opt_init, in_shardings=(p_shard,), out_shardings=o_shard)(params)

    def save(step):
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data_iter=grain.checkpoint.CheckpointSave(it), meta=ocp.args.JsonSave({"step": step})), force=True)

    # --- Loop ----------------------------------------------------------------------------------------------------------
    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    flops = optim.flops_per_token(cfg, config.seq_len)
    peak = optim.peak_flops(jax.devices()[0])
    schedule = optim.learning_rate_schedule(config.optimizer, config.steps)
    writer = metrics.MetricsWriter(workdir, enabled=primary)
    print(f"training {count_params(abstract):,} parameters on {jax.device_count()} devices, mesh "
          f"{dict(mesh.shape)}, steps {start + 1}..{config.steps}, workdir {workdir}")
    t_last, tokens_since = time.perf_counter(), 0
    step = start
    try:
        while step < config.steps:
            batch = _device_batch(next(it), b_shard, whole_batches)
            params, opt_state, m = step_fn(params, opt_state, jnp.int32(step), batch)
            step += 1
            tokens_since += config.batch_size * config.seq_len
            if step % config.log_every == 0 or step == config.steps:
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise TrainError(f"loss is {loss} at step {step}: stopping without saving this state. The last "
                                     f"checkpoint is step {manager.latest_step()}; lower the learning rate or check "
                                     "the data, then rerun to resume from it.")
                now = time.perf_counter()
                tps = tokens_since / (now - t_last)
                t_last, tokens_since = now, 0
                row = {"step": step, "loss": loss, "lr": float(schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
                       "tokens_per_sec": tps, "mfu": (tps * flops / (jax.device_count() * peak)) if peak else None}
                if "loss_scale" in m:  # fp16: the dynamic loss scale, and whether this step overflowed and was skipped
                    row.update(loss_scale=float(m["loss_scale"]), skipped=int(m["skipped"]))
                writer.write(row)
                if primary:
                    print(f"step {step:>7}/{config.steps}  loss {loss:.4f}  lr {row['lr']:.2e}  "
                          f"grad_norm {row['grad_norm']:.3f}  {tps:,.0f} tok/s", flush=True)
            if eval_ds is not None and (step % config.eval_every == 0 or step == config.steps):
                eval_loss = evaluate()
                writer.write({"step": step, "eval_loss": eval_loss})
                if primary:
                    print(f"step {step:>7}/{config.steps}  held-out loss {eval_loss:.4f}", flush=True)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if step % config.checkpoint_every == 0 or step == config.steps or stop["signal"]:
                save(step)
                if primary:
                    metrics.plot_loss(workdir)
            if stop["signal"]:
                print(f"received signal {stop['signal']}: saved step {step}, exiting", flush=True)
                break
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    if primary:
        print(f"done at step {step}. In {workdir}:\n  checkpoints/     Orbax checkpoints (newest {manager.latest_step()})"
              f"\n  metrics.jsonl    one JSON line per logged step\n  loss.png         the loss curve"
              f"\n  tensorboard/     tensorboard --logdir {workdir / 'tensorboard'}", flush=True)
    return {"step": step}


def main(argv):
    del argv
    config = _CONFIG.value
    if _WORKDIR.value is None:
        raise cli.UsageError("--workdir is required (rerunning on the same workdir resumes)")
    if _DISTRIBUTED.value or _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    try:
        train_and_evaluate(config, _WORKDIR.value)
    except (TrainError, BuildError, data.DataError, TokenizerError, sharding.ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli.run(main)
