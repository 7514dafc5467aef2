"""Attention throughput: the Pallas kernel, cuDNN and XLA side by side, forward and forward+backward.

Command:  python -m phi1_jax.bench.attention_speed [--batch=8] [--heads=32] [--head-dim=64] [--seqs=512,1024,2048,4096]
          [--dtypes=bfloat16,float16] [--segments=none,packed] [--impls=pallas,cudnn,cudnn_mask,xla] [--iters=20]
          [--dropout=0.1] [--json=PATH]
Expect:   a GPU (the kernel compiles through Triton); on a CPU the kernel only runs interpreted, so the figures there
          say nothing and the script says so. phi-1's shape alone (what scripts/gpu_checks.sh runs): `--seqs=2048
          --dtypes=bfloat16`, about a minute on an H100/H200.

Implementations, all causal:
  pallas      phi1_jax/kernels/flash_attention.py (attention_impl="pallas"), segment ids passed as such.
  cudnn       `jax.nn.dot_product_attention(is_causal=True, implementation=cudnn_impl)`, packed documents as a
              [B, 1, T, S] same-segment mask: the best cuDNN does through JAX's public API, and the kernel's bar.
  cudnn_mask  what attention_impl="cudnn" runs today (as phi1_jax.attention.cudnn_attention does it): the causal and
              segment mask as one dense [B, 1, T, S] mask, no is_causal, so cuDNN cannot skip the blocks above the
              diagonal.
  xla         what attention_impl="xla" runs (as phi1_jax.attention.xla_attention does it): fp32 logits and softmax, the
              [B, N, T, S] scores materialized.
cudnn and cudnn_mask run on GPUs only, and not with attention dropout (cuDNN through JAX has none); elsewhere
`--cudnn-stand-in` runs their very calls (masks, shapes) through jax.nn's XLA implementation, a plumbing check.
Segments: `none` (no segment ids) or `packed` (4 documents per row, boundaries at seeded random places, different per
row). The FLOP count is the same for both: no kernel here skips work across document boundaries.

FLOP convention (the FlashAttention benchmarks'): forward = 4 * B * S^2 * H * D (QK^T and PV), halved when causal;
forward + backward = 3.5 x forward (the backward counted as 2.5 x forward). TFLOP/s = FLOPs / median time.
phi-1's shape: head_dim 64, 32 heads, seq 2048, batch 8, causal.
`--json=PATH` also writes every figure as one JSON object (device, versions, shape, one row per measurement).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from phi1_jax import cli, files
from phi1_jax.kernels.flash_attention import flash_attention

IMPLS = ("pallas", "cudnn", "cudnn_mask", "xla")
SEGMENTS = ("none", "packed")
DOCS_PER_ROW = 4


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


def packed_segment_ids(batch, seq, docs=DOCS_PER_ROW, seed=0):
    """[batch, seq] int32 ids 1..docs, document boundaries at seeded random places (different per row)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, seq), size=(batch, docs - 1), replace=False), axis=1)
    return jnp.asarray(1 + (np.arange(seq)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)


def implementations(interpret, dropout=0.0, names=IMPLS, cudnn_stand_in=False):
    """{name: fn(q, k, v, segment_ids or None)}; the cuDNN ones only on a GPU and without dropout (with
    `cudnn_stand_in` off a GPU: the same calls through jax.nn's "xla" implementation)."""
    on_gpu = jax.default_backend() == "gpu"
    cudnn_impl = "cudnn" if on_gpu or not cudnn_stand_in else "xla"

    def pallas(q, k, v, seg):
        return flash_attention(q, k, v, segment_ids=seg, causal=True, interpret=interpret, dropout_rate=dropout,
                               dropout_seed=0 if dropout else None)

    def cudnn(q, k, v, seg):
        mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]  # [B, 1, T, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=cudnn_impl)

    # What phi1_jax.attention runs for attention_impl "cudnn" and "xla", restated here (this package imports nothing
    # of the project): one dense [B, 1, T, S] causal-and-segment mask; fp32 logits and softmax, probabilities cast to
    # v's dtype for the second product.
    def _model_mask(q, seg):
        seg = jnp.ones(q.shape[:2], jnp.int32) if seg is None else seg
        t = q.shape[1]
        return (jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]

    def cudnn_mask(q, k, v, seg):
        return jax.nn.dot_product_attention(q, k, v, mask=_model_mask(q, seg), scale=q.shape[-1] ** -0.5,
                                            implementation=cudnn_impl)

    def xla(q, k, v, seg):
        logits = jnp.einsum("BTNH,BSNH->BNTS", q.astype(jnp.float32), k.astype(jnp.float32)) * q.shape[-1] ** -0.5
        probs = jax.nn.softmax(jnp.where(_model_mask(q, seg), logits, jnp.finfo(jnp.float32).min), axis=-1)
        if dropout:
            keep = jax.random.bernoulli(jax.random.key(0), 1.0 - dropout, probs.shape)
            probs = jnp.where(keep, probs / (1.0 - dropout), 0.0)
        return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)

    impls = dict(pallas=pallas, cudnn=cudnn, cudnn_mask=cudnn_mask, xla=xla)
    if dropout or not (on_gpu or cudnn_stand_in):  # cuDNN through jax has no attention dropout
        impls = {k: v for k, v in impls.items() if not k.startswith("cudnn")}
    return {name: impls[name] for name in names if name in impls}


def measure(fn, q, k, v, seg, iters):
    """(forward seconds, forward+backward seconds): medians of `iters` runs after one compiling run each."""
    fwd = jax.jit(fn)
    loss = lambda q, k, v, seg: fn(q, k, v, seg).astype(jnp.float32).sum()  # noqa: E731
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return median_time(fwd, q, k, v, seg, iters=iters), median_time(fwd_bwd, q, k, v, seg, iters=iters)


def run(batch, heads, head_dim, seqs, dtypes, segments, impls, iters, dropout=0.0, cudnn_stand_in=False,
        report=print, on_row=lambda rows: None) -> list[dict]:
    """One row per (dtype, seq, segments, impl): TFLOP/s and ms forward and forward+backward, or the error.
    `on_row(rows so far)` after each one (the JSON file is rewritten then: a run cut short keeps what it measured)."""
    interpret = jax.default_backend() == "cpu"
    fns = implementations(interpret, dropout, impls, cudnn_stand_in)
    stand_in = cudnn_stand_in and jax.default_backend() != "gpu"
    rows = []
    report(f"{'dtype':>9} {'seq':>6} {'segments':>8} {'impl':>10} {'fwd TFLOP/s':>12} {'fwd+bwd TFLOP/s':>16}")
    for dtype in dtypes:
        for seq in seqs:
            shape = (batch, seq, heads, head_dim)
            ks = jax.random.split(jax.random.key(0), 3)
            q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks)
            f, fb = flops(batch, seq, heads, head_dim), flops(batch, seq, heads, head_dim, backward=True)
            for seg_kind in segments:
                seg = None if seg_kind == "none" else packed_segment_ids(batch, seq)
                for name, fn in fns.items():
                    row = dict(dtype=dtype, seq=seq, segments=seg_kind, impl=name, dropout=dropout)
                    if stand_in and name.startswith("cudnn"):
                        row["stand_in"] = "jax.nn xla implementation"
                    try:
                        t_f, t_fb = measure(fn, q, k, v, seg, iters)
                    except Exception as e:  # noqa: BLE001  e.g. cuDNN refusing a shape, or out of memory for XLA
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        report(f"{dtype:>9} {seq:>6} {seg_kind:>8} {name:>10}   failed: {row['error'][:80]}")
                    else:
                        # jax.grad runs the forward and the backward: t_fb is the whole training-step cost of attention
                        row.update(fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3, fwd_tflops=f / t_f / 1e12,
                                   fwd_bwd_tflops=fb / t_fb / 1e12)
                        report(f"{dtype:>9} {seq:>6} {seg_kind:>8} {name:>10} {row['fwd_tflops']:12.1f} "
                               f"{row['fwd_bwd_tflops']:16.1f}")
                    rows.append(row)
                    on_row(rows)
    return rows


def _csv(choices):
    def parse(text):
        items = [s for s in text.split(",") if s]
        bad = sorted(set(items) - set(choices))
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seqs", default="512,1024,2048,4096")
    p.add_argument("--dtypes", type=_csv(("bfloat16", "float16", "float32")), default="bfloat16,float16")
    p.add_argument("--segments", type=_csv(SEGMENTS), default="none,packed",
                   help="none: no segment ids; packed: 4 documents per row")
    p.add_argument("--impls", type=_csv(IMPLS), default=",".join(IMPLS))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout (the paper's 0.1; cuDNN is left out)")
    p.add_argument("--cudnn-stand-in", action="store_true",
                   help="off a GPU: run the cudnn rows' calls through jax.nn's xla implementation (plumbing check)")
    p.add_argument("--json", default=None, help="also write the figures here, as one JSON object")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    interpret = jax.default_backend() == "cpu"
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if interpret:
        print("note: no GPU/TPU here: the Pallas kernel runs interpreted and its figures mean nothing")
    def write_json(rows):
        if args.json:
            result = dict(device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                          interpreted=interpret, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                          causal=True, iters=args.iters,
                          flop_convention="fwd 4*B*S^2*H*D/2 (causal), fwd+bwd 3.5x fwd", rows=rows)
            files.write_text(args.json, json.dumps(result, indent=1) + "\n")

    run(args.batch, args.heads, args.head_dim, [int(s) for s in args.seqs.split(",")], args.dtypes, args.segments,
        args.impls, args.iters, args.dropout, args.cudnn_stand_in, on_row=write_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
