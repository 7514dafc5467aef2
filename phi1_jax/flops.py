"""FLOP and MFU accounting, beside the metrics that report it: training FLOPs per token (docs/flops.md) and the
dense peak of the device the run is on."""

from __future__ import annotations


def mfu(tokens_per_second: float, flops_per_token_: float, peak_per_device: float | None, n_devices: int):
    """Model-FLOPs utilisation: achieved training FLOP/s over the devices' dense peak (None when the peak is unknown)."""
    if not peak_per_device:
        return None
    return tokens_per_second * flops_per_token_ / (peak_per_device * n_devices)


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
