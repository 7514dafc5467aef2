"""Measures flash-attention block sizes and Triton launch settings on this GPU and prints the fastest `BlockSizes`.

Command:  python -m phi1_jax.bench.tune_attention [--batch=8] [--seq=2048] [--heads=32] [--head-dim=64] [--dtype=bfloat16] [--iters=10]
          [--json=PATH]
Expect:   a few minutes on a GPU (each candidate compiles its kernels). On a CPU the kernel only runs interpreted and
          the timings mean nothing; `--quick` there checks the plumbing on a small shape.

Two sweeps at one shape (phi-1's by default), causal, no segment ids: the forward kernel over (block_q, block_k) x
num_warps x num_stages, timed forward only; then, with the fastest forward, the backward kernels over their block
shapes (the dK/dV and dQ kernels share one shape in this sweep) x num_warps_bwd x num_stages_bwd, timed forward +
backward. A candidate that fails to compile (shared memory, say) is listed as failed; one whose output or gradients
disagree with the reference is listed as wrong and never wins. Put the winner into `BlockSizes.default` for this
backend and head dim, and record the figures (and the device) in docs/benchmarks.md. `--json=PATH` also writes the
winner's fields and every candidate's line as one JSON object (the GPU checks' `tune` step reads it). The candidates
are phi1_jax.kernels.flash_attention's TUNE_TILES, TUNE_FWD_LAUNCH and TUNE_BWD_LAUNCH.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from phi1_jax import cli, files
from phi1_jax.bench.attention_speed import flops, median_time
from phi1_jax.kernels.flash_attention import (
    TUNE_BWD_LAUNCH, TUNE_FWD_LAUNCH, TUNE_TILES, BlockSizes, flash_attention, reference_attention,
)
# Agreement with the fp32 reference: |got - want| <= ABS + REL * max|want|, per output (forward, dq, dk, dv).
ABS = {"float32": 2e-5, "bfloat16": 3e-2, "float16": 4e-3}
REL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 4e-3}


def _inputs(batch, seq, heads, head_dim, dtype):
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, w = (jax.random.normal(kk, (batch, seq, heads, head_dim), jnp.float32) for kk in ks)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


def _fns(blocks, interpret, w):
    def fwd(q, k, v):
        return flash_attention(q, k, v, causal=True, block_sizes=blocks, interpret=interpret)

    def loss(q, k, v):
        return (fwd(q, k, v).astype(jnp.float32) * w).sum()

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _close(got, want, dtype: str) -> bool:
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        if not np.abs(g - r).max() <= ABS[dtype] + REL[dtype] * np.abs(r).max():
            return False
    return True


def tune(batch: int, seq: int, heads: int, head_dim: int, dtype: str = "bfloat16", iters: int = 10,
         interpret: bool | None = None, tiles=None, fwd_launch=None, bwd_launch=None, report=print) -> BlockSizes:
    """The fastest correct BlockSizes at this shape (see the module docstring); `report` gets one line per candidate."""
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    tiles, fwd_launch, bwd_launch = tiles or TUNE_TILES, fwd_launch or TUNE_FWD_LAUNCH, bwd_launch or TUNE_BWD_LAUNCH
    q, k, v, w = _inputs(batch, seq, heads, head_dim, dtype)
    with jax.default_matmul_precision("highest"):
        want_o = jax.jit(lambda q, k, v: reference_attention(q, k, v, causal=True))(q, k, v)
        want_g = jax.jit(jax.grad(lambda q, k, v: (reference_attention(q, k, v, causal=True).astype(jnp.float32) * w)
                                  .sum(), argnums=(0, 1, 2)))(q, k, v)
    f_fwd, f_all = flops(batch, seq, heads, head_dim), flops(batch, seq, heads, head_dim, backward=True)

    def measure(blocks, backward):
        fwd, grad = _fns(blocks, interpret, w)
        try:
            ok = _close(fwd(q, k, v), want_o, dtype) and (not backward or _close(grad(q, k, v), want_g, dtype))
            if not ok:
                return None, "wrong"
            t = median_time(grad if backward else fwd, q, k, v, iters=iters)
        except Exception as e:  # noqa: BLE001  a candidate the compiler refuses (shared memory, registers)
            return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        tflops = (f_all if backward else f_fwd) / t / 1e12
        return tflops, f"{tflops:8.1f} TFLOP/s"

    def sweep(title, candidates, backward):
        report(f"{title} ({'forward + backward' if backward else 'forward'}), {dtype}, batch {batch}, seq {seq}, "
               f"{heads} heads of {head_dim}, causal:")
        best, best_tflops = None, -1.0
        for blocks in candidates:
            tflops, line = measure(blocks, backward)
            report(f"  {_describe(blocks, backward)}: {line}")
            if tflops is not None and tflops > best_tflops:
                best, best_tflops = blocks, tflops
        if best is None:
            raise RuntimeError(f"{title}: no candidate compiled and agreed with the reference")
        return best

    base = BlockSizes.default(head_dim)
    fwd_best = sweep("forward kernel", [dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=nw, num_stages=ns)
                                       for (bq, bk), (nw, ns) in itertools.product(tiles, fwd_launch)], False)
    best = sweep("backward kernels", [dataclasses.replace(fwd_best, block_q_dkv=bq, block_k_dkv=bk, block_q_dq=bq,
                                                          block_k_dq=bk, num_warps_bwd=nw, num_stages_bwd=ns)
                                      for (bq, bk), (nw, ns) in itertools.product(tiles, bwd_launch)], True)
    report(f"fastest: {best!r}")
    return best


def _describe(b: BlockSizes, backward: bool) -> str:
    if backward:
        return f"dkv/dq tiles {b.block_q_dkv}x{b.block_k_dkv}, warps {b.num_warps_bwd}, stages {b.num_stages_bwd}"
    return f"fwd tiles {b.block_q}x{b.block_k}, warps {b.num_warps}, stages {b.num_stages}"


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(ABS))
    p.add_argument("--iters", type=int, default=10, help="timed runs per candidate (the median counts)")
    p.add_argument("--quick", action="store_true", help="two tile shapes, one launch setting: a plumbing check")
    p.add_argument("--json", default=None, help="also write the winner and every candidate's line here")
    args = p.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if jax.default_backend() == "cpu":
        print("note: no GPU here: the kernel runs interpreted and the timings mean nothing")
    quick = dict(tiles=TUNE_TILES[:2], fwd_launch=TUNE_FWD_LAUNCH[:1], bwd_launch=TUNE_BWD_LAUNCH[:1]) if args.quick else {}
    lines = []

    def report(line):
        lines.append(line)
        print(line, flush=True)

    best = tune(args.batch, args.seq, args.heads, args.head_dim, args.dtype, args.iters, report=report, **quick)
    if args.json:
        files.write_text(args.json, json.dumps(dict(
            device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__, batch=args.batch,
            seq=args.seq, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, best=dataclasses.asdict(best),
            lines=lines), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
