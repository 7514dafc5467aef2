"""Optax AdamW with the paper's schedule (arXiv 2306.11644 §2.3): linear warmup, then linear decay.

Weight decay applies to matmul kernels and the token embedding only; biases and LayerNorm parameters are not decayed.
Gradients are clipped by global norm first.
"""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt, steps: int) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then linearly to end_learning_rate at `steps`."""
    if opt.schedule != "warmup_linear_decay":
        raise ValueError(f"config.optimizer.schedule={opt.schedule!r}; only 'warmup_linear_decay' exists")
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
        raise ValueError(f"config.optimizer.name={opt.name!r}; only 'adamw' exists")
    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(learning_rate_schedule(opt, steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=decay_mask),
    )


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the convention of docs/flops.md.

    6 x matmul parameters (q, k, v, dense, fc1, fc2 per layer, and lm_head; embeddings are lookups) plus causal
    attention: QK^T and AV are 2 x 2 x T x D FLOPs per token per layer forward, halved by causality, times 3 for
    forward + backward = 6 x L x T x D.
    """
    d, f, v, n_layers = model_cfg.d_model, model_cfg.mlp_dim, model_cfg.vocab_size, model_cfg.num_layers
    matmul_params = n_layers * (4 * d * d + 2 * d * f) + d * v
    return 6.0 * matmul_params + 6.0 * n_layers * seq_len * d


# Dense bf16/fp16 peak FLOP/s per device (vendor datasheets, no sparsity), by JAX's `device_kind` with spaces removed,
# upper case. The first name found in the kind wins, so variants come before their family: "NVIDIA H100 PCIe" is a
# 756 TFLOP/s part, the SXM H100 ("NVIDIA H100 80GB HBM3") 989; TPU v5e is "TPU v5 lite", v5p "TPU v5".
PEAK_FLOPS = {
    "H100PCIE": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "TPUV5LITE": 197e12, "TPUV5E": 197e12, "TPUV6LITE": 918e12, "TPUV6E": 918e12, "TPUV5": 459e12,
    "TPUV4LITE": None, "TPUV4": 275e12,
}


def peak_flops(device) -> float | None:
    kind = device.device_kind.upper().replace(" ", "")
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops  # None: a known kind with no figure here
    return None
