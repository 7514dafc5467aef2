"""What a training config compiles to: the mesh, the train state's abstract form, and the jitted steps (no flags, no I/O).

Used by phi1_jax.train (the loop) and phi1_jax.bench.train_speed (throughput). `build(config)` allocates nothing: the state
is abstract (`Built.state`, ShapeDtypeStructs that carry their shardings) until `init_params` + `Built.start`, or a
restore into that abstract form, creates it on the devices. Parameter shardings come from the model's logical axes and
`config.sharding_rules`; the optimizer state's are derived from them with optax's own `tree_map_params`, so no
sharding is guessed from a leaf's path or shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import jmp
import optax
from flax import linen as nn
from flax import nnx

from phi1_jax import attention, data, optim, sharding
from phi1_jax.errors import UserError
from phi1_jax.model import Phi, PhiConfig, abstract_model, count_params, logical_axes


class BuildError(UserError, ValueError):
    """A mesh, batch or sharding that does not fit; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------------------
# The state and the step
# ---------------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything one optimizer step reads and writes. A checkpoint holds `params` and `opt_state` as two items and the
    step in its directory name (phi1_jax.checkpoint), so this type changes no file format."""

    step: jax.Array  # [] int32, replicated: updates done so far; the dropout key of the next update is folded from it
    params: dict  # the model's parameters as a pure dict (nnx.to_pure_dict), in the config's param_dtype
    opt_state: Any  # the optax state, plus {"loss_scale": ...} beside it under fp16 compute (make_opt_init)


def loss_sums(graphdef, params, batch, dropout_key):
    """(sum of masked token cross-entropies, number of learned tokens) of one microbatch."""
    model = nnx.merge(graphdef, params)
    deterministic = dropout_key is None
    rngs = None if deterministic else nnx.Rngs(dropout=dropout_key)
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                   deterministic=deterministic, rngs=rngs).logits
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    return jnp.sum(ce * mask), jnp.sum(mask)


def make_opt_init(tx, loss_scale=None):
    """Optimizer state: the optax state, plus the dynamic loss scale's state when `loss_scale` (fp16) is given."""
    if loss_scale is None:
        return tx.init
    return lambda params: {"tx": tx.init(params), "loss_scale": {"scale": jnp.float32(loss_scale.initial),
                                                                 "counter": jnp.int32(0)}}


def make_train_step(graphdef, tx, *, grad_accum: int, seed: int, dropout: bool, loss_scale=None):
    """One optimizer update on a global batch, split into `grad_accum` microbatches whose gradients are summed.

    With `loss_scale` (fp16 compute), the loss is multiplied by a dynamic scale before differentiation so small
    gradients survive fp16; a step whose gradients overflow is skipped and the scale halved, and after
    `loss_scale.period` good steps it doubles (jmp.DynamicLossScale, as in mixed-precision practice).
    """

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        params, opt_state, step = state.params, state.opt_state, state.step
        if loss_scale is not None:
            scaler = jmp.DynamicLossScale(opt_state["loss_scale"]["scale"], opt_state["loss_scale"]["counter"],
                                          period=loss_scale.period)
            scale = scaler.loss_scale
        else:
            scale = jnp.float32(1.0)
        key = jax.random.fold_in(jax.random.key(seed), step) if dropout else None
        # [B, ...] -> [A, B/A, ...] taking every A-th row, so each device keeps its rows in every microbatch.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
                             batch)

        def accumulate(carry, xs):
            grads, total, count = carry
            i, mb = xs
            k = None if key is None else jax.random.fold_in(key, i)
            scaled = lambda p: (lambda s, n: (s * multiplier, (s, n)))(*loss_sums(graphdef, p, mb, k))  # noqa: E731
            (_, (s, n)), g = jax.value_and_grad(scaled, has_aux=True)(params)
            return (jax.tree.map(jnp.add, grads, g), total + s, count + n), None

        # fp16: differentiate (summed loss / tokens per microbatch) x scale, i.e. a mean-sized loss times the scale, so
        # the scale means what it says whatever the batch shape; 1 otherwise (fp32 range needs no scaling).
        multiplier = scale / micro["inputs"][0].size if loss_scale is not None else jnp.float32(1.0)
        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, total, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (jnp.arange(grad_accum), micro))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / (count * multiplier), grads)  # gradient of the mean over every learned token
        metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads), "tokens": count}
        if loss_scale is None:
            updates, opt_state = tx.update(grads, opt_state, params)
            return TrainState(step + 1, optax.apply_updates(params, updates), opt_state), metrics
        finite = jmp.all_finite(grads)
        updates, tx_state = tx.update(grads, opt_state["tx"], params)
        # An overflowed step changes nothing but the scale.
        params, tx_state = jmp.select_tree(finite, (optax.apply_updates(params, updates), tx_state),
                                           (params, opt_state["tx"]))
        scaler = scaler.adjust(finite)
        metrics.update(loss_scale=scaler.loss_scale, skipped=1 - finite.astype(jnp.int32))
        opt_state = {"tx": tx_state, "loss_scale": {"scale": scaler.loss_scale, "counter": scaler.counter}}
        return TrainState(step + 1, params, opt_state), metrics

    return train_step



def _check_batch(config, mesh):
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % config.grad_accum_steps:
        raise BuildError(f"config.batch_size={config.batch_size} is not divisible by "
                         f"config.grad_accum_steps={config.grad_accum_steps}")
    micro = config.batch_size // config.grad_accum_steps
    if micro % batch_devices:
        raise BuildError(f"the microbatch of {micro} sequences (batch_size / grad_accum_steps) does not divide over "
                         f"the {batch_devices} data-parallel devices (mesh data x fsdp); change config.batch_size, "
                         "config.grad_accum_steps or config.mesh")


@dataclasses.dataclass(frozen=True)
class Built:
    """What a config compiles to. `state` and `batch` are abstract (ShapeDtypeStruct leaves with `.sharding`): the one
    place shardings are declared, read by the jitted steps, the restore, the dry run and the benchmarks alike."""

    mesh: jax.sharding.Mesh
    cfg: PhiConfig
    graphdef: Any  # the model's structure; nnx.merge(graphdef, params) is the model
    n_params: int
    state: TrainState  # abstract
    batch: dict  # abstract: one [batch_size, seq_len] entry per data.DEVICE_BATCH key
    opt_init: Any  # params -> optimizer state (unjitted; `start` runs it in the state's shardings)
    step_fn: Any  # (state, batch) -> (state, metrics); the state is donated
    eval_fn: Any  # (params, batch) -> (sum of token losses, number of tokens)

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def shardings(self, abstract):
        """The shardings of an abstract tree (e.g. `self.state`, `self.batch`)."""
        return shardings_of(abstract)

    def start(self, params) -> TrainState:
        """The state at step 0 for `params` (already in their shardings; donated, so parameter memory is not doubled
        at start): the optimizer state created in its own shardings."""
        s = self.shardings(self.state)
        return jax.jit(lambda p: TrainState(jnp.int32(0), p, self.opt_init(p)), in_shardings=(s.params,),
                       out_shardings=s, donate_argnums=(0,))(params)


def shardings_of(abstract):
    """The `.sharding` of every leaf of an abstract tree (ShapeDtypeStructs that carry one)."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def build(config, devices=None) -> Built:
    """Mesh, abstract train state with its shardings, and the jitted train and eval steps; nothing is allocated.

    `devices`: the mesh's devices (default: all of JAX's); phi1_jax.gpu_plan passes a GPU topology's devices to compile
    for a GPU on a host without one."""
    # --- Mesh -------------------------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_dict(config.sharding_rules)
    _check_batch(config, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    # --- Model and optimizer: abstract shapes first, then shardings from the logical axes ------------------------------
    cfg = PhiConfig.from_dict(config.model)
    problem = attention.training_problem(cfg.attention_impl, cfg.head_dim, cfg.attn_dropout)
    if problem:
        raise BuildError(f"config.model: {problem}")
    abstract = abstract_model(cfg)
    graphdef, abs_state = nnx.split(abstract)
    abs_params = nnx.to_pure_dict(abs_state)
    p_shard = sharding.param_shardings(logical_axes(abstract), abs_params, rules, mesh)
    tx = optim.make_optimizer(config.optimizer, config.steps)
    loss_scale = config.loss_scale if cfg.dtype == "float16" else None
    opt_init = make_opt_init(tx, loss_scale)
    abs_opt = jax.eval_shape(opt_init, abs_params)
    # Every copy of the parameter tree inside the optimizer state (Adam's mu, nu) is sharded like the parameters;
    # the rest (counts, the loss scale) is replicated.
    o_shard = optax.tree_map_params(opt_init, lambda _, s: s, abs_opt, p_shard,
                                    transform_non_params=lambda _: replicated)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), _with_shardings(abs_params, p_shard),
                       _with_shardings(abs_opt, o_shard))
    batch_sharding = sharding.batch_sharding(rules, mesh, 2)
    batch = {k: jax.ShapeDtypeStruct((config.batch_size, config.seq_len), dtype, sharding=batch_sharding)
             for k, dtype in data.DEVICE_BATCH.items()}

    # --- The jitted steps ---------------------------------------------------------------------------------------------
    dropout = max(cfg.embed_dropout, cfg.resid_dropout, cfg.attn_dropout) > 0
    train_step = make_train_step(graphdef, tx, grad_accum=config.grad_accum_steps, seed=config.seed, dropout=dropout,
                                 loss_scale=loss_scale)

    def with_rules(fn):  # the model's activation constraints read the mesh and rules at trace time
        def traced(*args):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(config.sharding_rules):
                return fn(*args)

        return traced

    s_shard, b_shard = shardings_of(state), shardings_of(batch)
    step_fn = jax.jit(with_rules(train_step), in_shardings=(s_shard, b_shard), out_shardings=(s_shard, replicated),
                      donate_argnums=(0,))
    eval_fn = jax.jit(with_rules(lambda params, batch: loss_sums(graphdef, params, batch, None)),
                      in_shardings=(p_shard, b_shard), out_shardings=(replicated, replicated))
    return Built(mesh, cfg, graphdef, count_params(abstract), state, batch, opt_init, step_fn, eval_fn)


def init_params(b: Built, seed: int) -> dict:
    """Random initial parameters, created directly in their shardings."""
    return jax.jit(lambda: nnx.to_pure_dict(nnx.split(Phi(b.cfg, rngs=nnx.Rngs(seed)))[1]),
                   out_shardings=b.shardings(b.state.params))()


