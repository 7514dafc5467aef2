"""Attention throughput: the Pallas kernel, the XLA reference and cuDNN side by side, forward and forward+backward.

Command:  python -m kernels.bench [--batch=8] [--heads=32] [--head-dim=64] [--seqs=512,1024,2048,4096]
          [--dtypes=bfloat16,float16] [--iters=20] [--dropout=0.1]
Expect:   a GPU (the kernel compiles through Triton); on a CPU the kernel only runs interpreted, so the figures there
          say nothing and the script says so.

FLOP convention (the FlashAttention benchmarks'): forward = 4 * B * S^2 * H * D (QK^T and PV), halved when causal;
forward + backward = 3.5 x forward (the backward counted as 2.5 x forward). TFLOP/s = FLOPs / median time.
phi-1's shape: head_dim 64, 32 heads, seq 2048, batch 8, causal.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.flash_attention import flash_attention, reference_attention


def flops(batch, seq, heads, head_dim, causal=True, backward=False):
    f = 4.0 * batch * seq * seq * heads * head_dim * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def median_time(fn, *args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def implementations(interpret, dropout=0.0):
    drop = dict(dropout_rate=dropout, dropout_seed=0 if dropout else None)

    def pallas(q, k, v):
        return flash_attention(q, k, v, causal=True, interpret=interpret, **drop)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    impls = {"pallas": pallas, "xla": lambda q, k, v: reference_attention(q, k, v, causal=True, **drop)}
    if jax.default_backend() == "gpu" and not dropout:  # cuDNN through jax has no attention dropout
        impls["cudnn"] = cudnn
    return impls


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seqs", default="512,1024,2048,4096")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout (the paper's 0.1; cuDNN is left out)")
    args = p.parse_args()
    device = jax.devices()[0]
    interpret = jax.default_backend() == "cpu"
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if interpret:
        print("note: no GPU/TPU here: the Pallas kernel runs interpreted and its figures mean nothing")
    impls = implementations(interpret, args.dropout)
    print(f"{'dtype':>9} {'seq':>6} {'impl':>7} {'fwd TFLOP/s':>12} {'fwd+bwd TFLOP/s':>16}")
    for dtype in args.dtypes.split(","):
        for seq in map(int, args.seqs.split(",")):
            shape = (args.batch, seq, args.heads, args.head_dim)
            ks = jax.random.split(jax.random.key(0), 3)
            q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks)
            for name, fn in impls.items():
                fwd = jax.jit(fn)
                fwd_bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                try:
                    t_f = median_time(fwd, q, k, v, iters=args.iters)
                    t_fb = median_time(fwd_bwd, q, k, v, iters=args.iters)
                except Exception as e:  # e.g. cuDNN refusing a shape, or out of memory for the XLA reference
                    print(f"{dtype:>9} {seq:>6} {name:>7}   failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                f = flops(args.batch, seq, args.heads, args.head_dim)
                fb = flops(args.batch, seq, args.heads, args.head_dim, backward=True)
                # jax.grad runs the forward and the backward: t_fb is the whole training-step cost of attention
                print(f"{dtype:>9} {seq:>6} {name:>7} {f / t_f / 1e12:12.1f} {fb / t_fb / 1e12:16.1f}")


if __name__ == "__main__":
    main()
