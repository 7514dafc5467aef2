"""Trains Phi: `python -m phi1_jax.train --config=configs/<name>.py --workdir=DIR [--config.a.b=value ...]`.

Rerunning the same command on the same DIR resumes from the newest complete checkpoint. Sections: workdir checks,
mesh, model and optimizer (abstract first, then sharded), data, restore or init, step, loop. Writes DIR/metrics.jsonl
(one JSON line per `log_every` steps, its loss the mean over those steps; held-out loss and code-eval rows at their
own steps), DIR/code_eval/step_<N>.* (what the model wrote at each code eval, and the verdicts), DIR/model_config.json
and DIR/checkpoints/<step>/{params, opt_state, data_iter, meta}: that layout is phi1_jax.checkpoint's
(TrainCheckpoints, check_workdir, describe_workdir); this file is wiring.

Code evals (config.code_eval): at every `every` steps and the last, before that step's save, the module named by
`config.code_eval.evaluator` (phi1_jax.evals.in_training: phi1_jax imports nothing of phi1_jax/evals/, so the config names it) gets the
model being trained, on its mesh, and returns pass@k; its time is kept out of tokens/s. A failure there is one
warning line (its traceback in DIR/code_eval/step_<N>.error.txt) and training goes on.

A workdir that cannot be this run's (a file, not writable, another model's) is refused before any data is read or
anything compiled. A newest checkpoint that cannot be read is moved aside to checkpoints/<step>.corrupt with one
warning line, and the run resumes from the newest one that reads. Resuming with another --config.steps moves only the
stopping point: the learning-rate schedule stays the one the run started with (saved in each checkpoint's meta), so
the rate never jumps; one line says so. To train longer under a new schedule, start a new workdir with
--config.init_from=DIR. A loss or gradient that is not finite stops the run before the next log or save; no
checkpoint holds non-finite weights. Library INFO logs (Orbax, JAX) are off; --verbosity=0 (or -v 0) shows them.

Multi-host: pass --coordinator_address, --num_processes and --process_id (or set JAX's cluster environment and
--distributed) and run the same command on every host; JAX's runtime connects them and each process feeds its share
of the batch.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging as absl_logging
from flax import nnx
from ml_collections import config_flags

from phi1_jax import checkpoint, cli, data, files, metrics, optim
from phi1_jax import flops as flops_lib
from phi1_jax.model import PhiConfig
from phi1_jax.errors import UserError
from phi1_jax.step import TrainState, build, init_params

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "experiment config (configs/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go; rerunning on it resumes")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() from the cluster environment")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-host)")


class TrainError(UserError, RuntimeError):
    """A run that cannot start or go on; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _schedule_note(config, schedule_steps: int) -> str:
    """The one line a resumed run with another --config.steps prints: what happens to the learning rate."""
    opt, now = config.optimizer, config.steps
    head = (f"note: --config.steps changed {schedule_steps} -> {now}; the learning-rate schedule stays the one this "
            "run started with")
    if now > schedule_steps:
        return (f"{head} (decay ends at step {schedule_steps}; lr {opt.end_learning_rate:g} after it). For a new "
                f"schedule, start a new --workdir with --config.init_from.")
    lr = float(optim.learning_rate_schedule(opt, schedule_steps)(now - 1))
    return f"{head} (decay to step {schedule_steps}), so it stops at step {now} with lr {lr:.2e}"


def _pretrained_params(path: str, cfg: PhiConfig) -> dict:
    """Parameters of a trainer workdir, a phi1_jax model checkpoint, a Hugging Face directory or hub id (ORG/NAME),
    read by `phi1_jax.loader.open`, checked against cfg and stored in cfg.param_dtype."""
    from phi1_jax import loader

    try:
        model = loader.open(path).model
    except UserError as e:
        raise TrainError(f"config.init_from: {e}") from None
    diff = checkpoint.shape_difference(model.cfg, cfg)
    if diff:
        detail = ", ".join(f"{k} {a} there, {b} in the config" for k, (a, b) in diff.items())
        raise TrainError(f"config.init_from={path} is another model shape ({detail})")
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(lambda x: x.astype(dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _code_evaluator(section, tokenizer, workdir: Path, max_seq_len: int):
    """`section.evaluator`'s make_evaluator(section, tokenizer, workdir, max_seq_len=...): a callable (model, step)
    -> metric fields. Its own checks of the section (task, sampling, lengths) run here, before any compile."""
    if section.every < 0:
        raise TrainError(f"config.code_eval.every={section.every}: steps between evals, 0 for never")
    try:
        module = importlib.import_module(section.evaluator)
    except ImportError as e:
        raise TrainError(f"config.code_eval.evaluator={section.evaluator!r} cannot be imported ({e})") from None
    if not hasattr(module, "make_evaluator"):
        raise TrainError(f"config.code_eval.evaluator={section.evaluator!r} has no make_evaluator(section, "
                         "tokenizer, workdir, max_seq_len)")
    return module.make_evaluator(section, tokenizer, workdir, max_seq_len=max_seq_len)


def _settled(state) -> float:
    """The clock once every dispatched step has finished (steps run asynchronously; an eval would wait for them)."""
    jax.block_until_ready(state)
    return time.perf_counter()


def _save_traceback(path: Path) -> Path | None:
    """The current exception's traceback in `path` (the warning line stays one line); None if it cannot be written."""
    try:
        return files.write_text(path, traceback.format_exc())
    except OSError:
        return None


def _device_batch(batch, shardings, whole: bool):
    """Global arrays from host batches: this process's share, or (`whole`) the global batch each device slices. Only
    the keys the step takes go to the devices."""
    batch = data.device_part(batch)
    if whole:
        return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx]) for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def _nonfinite_error(window: dict, latest) -> TrainError:
    step, loss, gnorm = window["first_bad"], window["bad_loss"], window["bad_grad_norm"]
    what = f"loss is {loss}" if not np.isfinite(loss) else f"gradient norm is {gnorm} (loss {loss:.4f})"
    return TrainError(f"{what} at step {step}: stopping without saving this state. {_last_checkpoint(latest)}")


def _last_checkpoint(latest) -> str:
    if latest is None:
        return "No checkpoint was saved; lower the learning rate or check the data, then rerun."
    return (f"The last checkpoint is step {latest}; lower the learning rate or check the data, then rerun to resume "
            "from it.")


def _all_finite(tree) -> jax.Array:
    """True when every floating-point leaf is finite: checked on the state about to be saved."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


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


def train_and_evaluate(config, workdir: str, *, on_checkpoint=None):
    """Trains `config` in `workdir` (resuming from its newest checkpoint). `on_checkpoint(step)`, if given, is called
    after each checkpoint is saved (e.g. to copy it elsewhere)."""
    workdir = Path(workdir).absolute()
    if config.dry_run_target:  # a dry run compiled for a GPU this host lacks; before JAX picks its devices
        from phi1_jax import gpu_plan

        return gpu_plan.dry_run(config)
    primary = jax.process_index() == 0

    # --- Workdir: refused before any long work; a resumed run keeps the schedule it started with ----------------------
    schedule_steps = config.steps
    if not config.dry_run:
        checkpoint.check_workdir(workdir, PhiConfig.from_dict(config.model))
        schedule_steps = checkpoint.schedule_steps(workdir, config.steps)
    schedule_config = config
    if schedule_steps != config.steps:  # the optimizer's schedule is built for the run's first `steps`
        schedule_config = config.copy_and_resolve_references()
        schedule_config.steps = schedule_steps
    b = build(schedule_config)
    mesh, cfg, b_shard = b.mesh, b.cfg, b.shardings(b.batch)

    if config.dry_run:
        return _print_memory(b.step_fn.lower(b.state, b.batch).compile(), b.n_params)

    # --- Data ----------------------------------------------------------------------------------------------------------
    ds, tokenizer = data.from_config(config)
    it = iter(ds)
    whole_batches = config.data.shard_by == "row"
    eval_ds = data.from_config(config, split="eval")[0] if config.eval_every and config.data.holdout_every else None

    def evaluate():
        """Mean held-out loss over the same `eval_batches` batches every time."""
        eval_it, total, count = iter(eval_ds), 0.0, 0.0
        for _ in range(config.eval_batches):
            t, c = b.eval_fn(state.params, _device_batch(next(eval_it), b_shard, whole_batches))
            total, count = total + float(t), count + float(c)
        return total / max(count, 1.0)

    # --- Code evals during training: the evaluator module the config names (phi1_jax imports nothing of phi1_jax/evals/) -------
    code_evaluator = None
    if config.code_eval.every:
        code_evaluator = _code_evaluator(config.code_eval, tokenizer, workdir, cfg.max_seq_len)

    # --- Restore or init -----------------------------------------------------------------------------------------------
    if primary:
        checkpoint.describe_workdir(workdir, cfg, tokenizer)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
    ckpts = checkpoint.TrainCheckpoints(workdir, config.keep_checkpoints)
    start, params, opt_state = ckpts.restore_newest(b.state.params, b.state.opt_state, it, primary)
    if start:
        state = TrainState(jax.device_put(jnp.int32(start), b.replicated), params, opt_state)
        print(f"resumed from {workdir / 'checkpoints' / str(start)}")
        if schedule_steps != config.steps and primary:
            print(_schedule_note(config, schedule_steps), file=sys.stderr, flush=True)
    else:
        if config.init_from:  # finetuning: parameters from a pretrained model; optimizer, schedule and step start fresh
            # Host arrays first: every process then places its own shards, whatever devices the source was read to.
            params = jax.device_put(jax.device_get(_pretrained_params(config.init_from, cfg)),
                                    b.shardings(b.state.params))
            print(f"initialized parameters from {config.init_from}")
        else:
            params = init_params(b, config.seed)
        state = b.start(params)
    del params, opt_state  # the state holds them; the step donates the state's buffers

    # --- Loop ----------------------------------------------------------------------------------------------------------
    window = metrics.TrainWindow(b.replicated)  # the steps since the last log: their mean loss, any non-finite step
    state_finite = jax.jit(_all_finite, out_shardings=b.replicated)

    def check_finite():
        """The window's numbers; raises, before a log or save, if any step since the last log was not finite."""
        w = window.read()
        if w["first_bad"] is not None:
            raise _nonfinite_error(w, ckpts.latest_step())
        return w

    def save(step):
        check_finite()
        if not bool(state_finite((state.params, state.opt_state))):
            raise TrainError(f"the parameters or optimizer state hold non-finite values after step {step}: stopping "
                             f"without saving this state. {_last_checkpoint(ckpts.latest_step())}")
        ckpts.save(step, state.params, state.opt_state, it, schedule_steps)

    def code_eval(step):
        """pass@k of the model being trained, on its own mesh; a failure is one warning line, not the run's end."""
        t0 = time.perf_counter()
        try:
            fields = code_evaluator(nnx.merge(b.graphdef, state.params), step)
        except Exception as e:  # noqa: BLE001  a sandbox or generation failure must not cost the training run
            where = _save_traceback(workdir / "code_eval" / f"step_{step}.error.txt") if primary else None
            print(f"warning: code eval at step {step} failed, training goes on: {type(e).__name__}: {e}"
                  + (f" (traceback: {where})" if where else ""), file=sys.stderr, flush=True)
            return
        seconds = time.perf_counter() - t0
        writer.write({"step": step, "tokens_seen": step * config.batch_size * config.seq_len, **fields,
                      "code_eval_seconds": seconds})
        if primary:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in fields.items() if "pass@" in k)
            print(f"step {step:>7}/{config.steps}  {shown}  ({seconds:.1f} s)", flush=True)

    stop = {"signal": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    flops = flops_lib.flops_per_token(cfg, config.seq_len)
    peak = flops_lib.peak_flops(jax.devices()[0])
    schedule = optim.learning_rate_schedule(config.optimizer, schedule_steps)
    writer = metrics.MetricsWriter(workdir, enabled=primary, resume_step=start)
    print(f"training {b.n_params:,} parameters on {jax.device_count()} devices, mesh "
          f"{dict(mesh.shape)}, steps {start + 1}..{config.steps}, workdir {workdir}")
    t_last, tokens_since = time.perf_counter(), 0
    step = start
    try:
        while step < config.steps:
            batch = _device_batch(next(it), b_shard, whole_batches)
            state, m = b.step_fn(state, batch)
            step += 1
            window.add(m, step)
            tokens_since += config.batch_size * config.seq_len
            if step % config.log_every == 0 or step == config.steps:
                loss = check_finite()["loss"]  # the mean over the steps since the last log
                window.reset()
                now = time.perf_counter()
                tps = tokens_since / (now - t_last)
                t_last, tokens_since = now, 0
                row = {"step": step, "loss": loss, "lr": float(schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
                       "tokens_per_sec": tps, "mfu": flops_lib.mfu(tps, flops, peak, jax.device_count())}
                if "loss_scale" in m:  # fp16: the dynamic loss scale, and whether this step overflowed and was skipped
                    row.update(loss_scale=float(m["loss_scale"]), skipped=int(m["skipped"]))
                writer.write(row)
                if primary:
                    print(f"step {step:>7}/{config.steps}  loss {loss:.4f}  lr {row['lr']:.2e}  "
                          f"grad_norm {row['grad_norm']:.3f}  {tps:,.0f} tok/s", flush=True)
            # Evaluation time is not training throughput: the window's clock is moved on by what the evals took,
            # measured from when the steps already dispatched have finished.
            if eval_ds is not None and (step % config.eval_every == 0 or step == config.steps):
                t_eval = _settled(state)
                eval_loss = evaluate()
                writer.write({"step": step, "eval_loss": eval_loss})
                if primary:
                    print(f"step {step:>7}/{config.steps}  held-out loss {eval_loss:.4f}", flush=True)
                t_last += time.perf_counter() - t_eval
            if code_evaluator is not None and (step % config.code_eval.every == 0 or step == config.steps):
                t_eval = _settled(state)
                code_eval(step)  # before the save: a run killed in between evaluates this step again on resume
                t_last += time.perf_counter() - t_eval
            if step % config.checkpoint_every == 0 or step == config.steps or stop["signal"]:
                save(step)
                if on_checkpoint is not None:
                    on_checkpoint(step)
                if primary:
                    metrics.plot_loss(workdir)
            if stop["signal"]:
                print(f"received signal {stop['signal']}: saved step {step}, exiting", flush=True)
                break
    finally:
        ckpts.close()
        writer.close()
    if primary:
        evals = "\n  code_eval/       each code eval's samples and verdicts" if code_evaluator else ""
        print(f"done at step {step}. In {workdir}:\n  checkpoints/     Orbax checkpoints (newest {ckpts.latest_step()})"
              f"\n  metrics.jsonl    one JSON line per logged step\n  loss.png         the loss curve{evals}"
              f"\n  tensorboard/     tensorboard --logdir {workdir / 'tensorboard'}", flush=True)
    return {"step": step}


def _quiet_library_logs():
    """Library INFO logs are off unless --verbosity/-v was given: Orbax alone writes ~270 absl lines per 2,000 tiny
    steps, burying the progress lines. absl's verbosity sets the root Python logger too (JAX, grain log there)."""
    if flags.FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("orbax", "jax", "grain", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv, *, on_checkpoint=None):
    del argv
    _quiet_library_logs()
    config = _CONFIG.value
    if _WORKDIR.value is None:
        raise cli.UsageError("--workdir is required (rerunning on the same workdir resumes)")
    if _DISTRIBUTED.value or _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    # a UserError is one `error:` line and exit 2 (cli.run)
    train_and_evaluate(config, _WORKDIR.value, on_checkpoint=on_checkpoint)


if __name__ == "__main__":
    cli.run(main)
