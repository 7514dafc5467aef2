"""Optax AdamW with the paper's schedule (arXiv 2306.11644 §2.3): linear warmup, then linear decay.

Weight decay applies to matmul kernels and the token embedding only; biases and LayerNorm parameters are not decayed.
Gradients are clipped by global norm first.
"""

from __future__ import annotations

import jax
import optax

from phi1_jax.errors import UserError


class OptimizerError(UserError, ValueError):
    """An optimizer or schedule the config names that does not exist."""


def learning_rate_schedule(opt, steps: int) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then linearly to end_learning_rate at `steps`."""
    if opt.schedule != "warmup_linear_decay":
        raise OptimizerError(f"config.optimizer.schedule={opt.schedule!r}; only 'warmup_linear_decay' exists")
    warmup = min(int(opt.warmup_steps), steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, max(warmup, 1)),
         optax.linear_schedule(opt.learning_rate, opt.end_learning_rate, max(steps - warmup, 1))],
        [warmup],
    )


def decay_mask(params):
    """True for parameters that get weight decay: kernels and the embedding (not biases, not LayerNorm)."""

    def one(path, _):
        last = path[-1].key if hasattr(path[-1], "key") else path[-1]
        return last in ("kernel", "embed")

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(opt, steps: int) -> optax.GradientTransformation:
    if opt.name != "adamw":
        raise OptimizerError(f"config.optimizer.name={opt.name!r}; only 'adamw' exists")
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(learning_rate_schedule(opt, steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=decay_mask),
    )
