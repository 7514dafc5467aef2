"""Flash attention in Pallas: forward and backward, causal, packed documents (segment ids).

    o = flash_attention(q, k, v, segment_ids=seg, causal=True)      # q, k, v: [batch, seq, heads, head_dim]

Forward: one program per (batch, head, query block) walks the key blocks with an online softmax (Dao et al. 2022),
keeping the running max m, sum l and accumulator in fp32, and writes the output and the log-sum-exp
lse = m + log(l). Causal attention stops at the diagonal block: key blocks wholly above it are never loaded or
computed. Segment ids mask attention across document boundaries, anywhere inside a block.
Backward (FlashAttention-2's split): delta = rowsum(dO * O); one kernel per key block accumulates dK and dV over the
query blocks that can see it; another per query block accumulates dQ over the key blocks it sees. Both rebuild the
probabilities from the saved lse instead of storing them.

Attention dropout (`dropout_rate`, `dropout_seed`) drops probabilities after the softmax, as Hugging Face Phi does;
the normaliser still sums all of them. Which ones are dropped is a counter-based hash of (seed, batch * heads + head,
query position, key position) (`dropout_keep`), so the backward kernels rebuild the same mask instead of storing it,
and the reference uses the same function.

Every row attends at least to itself (causal or not, a token shares its own segment id), so no softmax row is empty.
Sequence lengths that the blocks do not divide are padded up, the padding masked by a segment id no real token has.
The same kernels lower through Triton on GPUs (named explicitly: JAX's default there is Mosaic GPU, which cannot take
them; the Triton backend is deprecated since JAX 0.11, which the kernel says once) and through Mosaic on TPUs (q, k, v transposed heads-major first, since Mosaic wants each block's last two dims
to be (rows, head_dim)); every value inside a kernel is 2-D for Mosaic's sake. `interpret=True` runs them on any
backend (the tests do, on CPU, in both layouts), and the tests lower both compiled paths from a CPU host with
jax.export. Block sizes default per backend (`BlockSizes.default`). Imports nothing from phi1_jax.

Order of this file: block sizes, forward kernel, backward kernels, public wrapper (validation, custom VJP),
reference implementation.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: exp(MASK - m) underflows to 0 without NaNs
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
PAD_SEGMENT = -1  # segment id of padding added by the wrapper; never equal to a real one
# The candidates `python -m phi1_jax.bench.tune_attention` measures on a GPU (and phi1_jax.gpu_plan compiles for one):
TUNE_TILES = [(64, 64), (128, 64), (64, 128), (128, 128)]  # (block_q, block_k), forward; the backward's too
TUNE_FWD_LAUNCH = list(itertools.product([4, 8], [2, 3, 4]))  # (num_warps, num_stages) of the forward kernel
TUNE_BWD_LAUNCH = list(itertools.product([4, 8], [2, 3]))  # (num_warps_bwd, num_stages_bwd)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels, and Triton's launch settings (warps per program, software-pipelining stages)
    for the forward and the two backward kernels; the Triton settings are ignored elsewhere. `python -m phi1_jax.bench.tune_attention`
    measures the TUNE_* candidates on a GPU."""

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int = 4  # Triton, forward
    num_stages: int = 2
    num_warps_bwd: int = 4  # Triton, dK/dV and dQ
    num_stages_bwd: int = 2

    BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")

    @classmethod
    def default(cls, head_dim: int, backend: str | None = None) -> "BlockSizes":
        backend = backend or jax.default_backend()
        if backend == "tpu":
            return cls(128, 128, 128, 128, 128, 128)
        if backend == "gpu":  # Triton: 64 x 64 tiles keep head_dim 128 within shared memory on A100 and H100
            return cls(64, 64, 64, 64, 64, 64) if head_dim > 64 else cls(128, 64, 64, 128, 128, 64)
        return cls(128, 128, 128, 128, 128, 128)  # interpret mode: fewer, larger blocks run faster

    def max_block(self) -> int:
        return max(getattr(self, f) for f in self.BLOCK_FIELDS)


def _mask(q_idx, k_idx, q_seg, k_seg, causal: bool):
    """[bq, bk] bool from q_idx, q_seg [bq, 1] and k_idx, k_seg [1, bk]: which keys each query may see (None: all)."""
    mask = None
    if causal:
        mask = q_idx >= k_idx
    if q_seg is not None:
        same = q_seg == k_seg
        mask = same if mask is None else mask & same
    return mask


def _mix32(x):
    """A uint32 bijection with good avalanche ("lowbias32", Wellons)."""
    x = x ^ jax.lax.shift_right_logical(x, jnp.uint32(16))
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ jax.lax.shift_right_logical(x, jnp.uint32(15))
    x = x * jnp.uint32(0x846CA68B)
    return x ^ jax.lax.shift_right_logical(x, jnp.uint32(16))


def dropout_keep(seed, bh, q_idx, k_idx, rate: float):
    """bool, broadcast over the shapes of seed, bh, q_idx, k_idx: whether attention from query q_idx to key k_idx
    survives dropout in head bh (= batch index * heads + head). Positions enter as q * 2^16 + k (mod 2^32)."""
    base = _mix32(jnp.asarray(seed).astype(jnp.uint32) ^ _mix32(jnp.asarray(bh).astype(jnp.uint32)
                                                                + jnp.uint32(0x9E3779B9)))
    pos = q_idx.astype(jnp.uint32) * jnp.uint32(65536) + k_idx.astype(jnp.uint32)
    return _mix32(pos ^ base) >= jnp.uint32(min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1))


def _dot(a, b, trans_a=False, trans_b=False):
    """a @ b in fp32, either operand transposed by the contraction itself (no transpose op: Mosaic TPU prefers it).
    fp32 operands multiply in full fp32 (Triton would otherwise use TF32, ~1e-3 relative): fp32 is the accuracy path;
    speed comes from bf16/fp16 inputs, which the precision does not touch."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _rows(n, offset):
    return offset + jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0)  # [n, 1] positions, a column


def _cols(n, offset):
    return offset + jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)  # [1, n] positions, a row


# Layouts. Every value inside the kernels is 2-D, so the same code lowers through Triton and Mosaic TPU:
#   q, k, v, o: [B, S, H, D] on GPUs (Triton takes the strided head slice); [B, H, S, D] on TPU (Mosaic wants the last
#               two block dims to be (rows, D)); the wrapper transposes for TPU.
#   segment ids: queries [B, S, 1] (a column per block), keys [B, 1, S] (a row per block).
#   lse, delta: [B, H, S, 1].   dropout seed: int32 [1, 1].
# ---------------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, seed_ref, o_ref, lse_ref, *, sm_scale, causal, block_q,
                block_k, seq_len, heads, dropout_rate):
    i = pl.program_id(2)
    bh = pl.program_id(0) * heads + pl.program_id(1)
    q = q_ref[...]  # [bq, D]
    q_idx = _rows(block_q, i * block_q)
    q_seg = None if qseg_ref is None else qseg_ref[...]  # [bq, 1]
    n_kv = pl.cdiv((i + 1) * block_q, block_k) if causal else seq_len // block_k  # skip blocks above the diagonal

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = _dot(q, k, trans_b=True) * sm_scale  # [bq, bk] fp32
        k_idx = _cols(block_k, start)
        k_seg = None if kseg_ref is None else kseg_ref[:, pl.ds(start, block_k)]  # [1, bk]
        mask = _mask(q_idx, k_idx, q_seg, k_seg, causal)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=1, keepdims=True)  # the normaliser counts dropped probabilities too
        if dropout_rate > 0.0:
            keep = dropout_keep(seed_ref[...], bh, q_idx, k_idx, dropout_rate)
            p = jnp.where(keep, p, 0.0) * (1.0 / (1.0 - dropout_rate))
        acc = acc * correction + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    init = (jnp.full((block_q, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_kv, body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _specs(seq_len, head_dim, block, heads_major):
    """BlockSpecs for a grid (batch, head, block index): blocked and whole q/k/v, query and key segment ids, rows."""
    if heads_major:
        blocked = pl.BlockSpec((None, None, block, head_dim), lambda b, h, i: (b, h, i, 0))
        whole = pl.BlockSpec((None, None, seq_len, head_dim), lambda b, h, i: (b, h, 0, 0))
    else:
        blocked = pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, i, h, 0))
        whole = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h, 0))
    qseg_blocked = pl.BlockSpec((None, block, 1), lambda b, h, i: (b, i, 0))
    qseg_whole = pl.BlockSpec((None, seq_len, 1), lambda b, h, i: (b, 0, 0))
    kseg_blocked = pl.BlockSpec((None, 1, block), lambda b, h, i: (b, 0, i))
    kseg_whole = pl.BlockSpec((None, 1, seq_len), lambda b, h, i: (b, 0, 0))
    rows = pl.BlockSpec((None, None, block, 1), lambda b, h, i: (b, h, i, 0))  # [B, H, S, 1] lse / delta
    rows_whole = pl.BlockSpec((None, None, seq_len, 1), lambda b, h, i: (b, h, 0, 0))
    return blocked, whole, (qseg_blocked, qseg_whole, kseg_blocked, kseg_whole), rows, rows_whole


SEED_SPEC = pl.BlockSpec((1, 1), lambda b, h, i: (0, 0))  # the dropout seed, int32 [1, 1], read by every program


def _compiler_params(backend: str, interpret: bool, num_warps: int, num_stages: int):
    """On GPUs, Triton, named explicitly: JAX's default for `pallas_call` there is Mosaic GPU, which takes kernels
    written for its own model (warpgroups, TMA) and rejects this one."""
    if backend != "gpu" or interpret:
        return None
    # JAX 0.11 deprecated Pallas's Triton backend and warns at every lowering; this kernel still needs it (Mosaic GPU
    # cannot lower it): the choice is stated once, in a log line, and JAX's repeated warning is filtered (again at
    # every call, since a caller's warnings.catch_warnings, pytest's for one, restores the filters it found).
    warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning)
    _note_triton_once()
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.cache
def _note_triton_once() -> None:
    logging.getLogger(__name__).warning(
        "flash_attention uses Pallas's Triton backend on GPUs (deprecated since JAX 0.11; Mosaic GPU cannot lower this "
        "kernel). attention_impl='cudnn' or 'xla' avoids it.")


def _forward(q, k, v, seg, seed, *, causal, sm_scale, blocks: BlockSizes, interpret, dropout_rate, backend):
    b, s, h, d = _bshd(q, backend)
    bq, bk = blocks.block_q, blocks.block_k
    blocked, whole, (qseg_blocked, _, _, kseg_whole), rows, _ = _specs(s, d, bq, backend == "tpu")
    qseg, kseg = _seg_layouts(seg)
    kernel = functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal, block_q=bq, block_k=bk, seq_len=s,
                               heads=h, dropout_rate=dropout_rate)
    o, lse = _call_by_name(
        kernel, grid=(b, h, s // bq), name="flash_attention_fwd", interpret=interpret,
        compiler_params=_compiler_params(backend, interpret, blocks.num_warps, blocks.num_stages),
        inputs=dict(q_ref=(blocked, q), k_ref=(whole, k), v_ref=(whole, v), qseg_ref=(qseg_blocked, qseg),
                    kseg_ref=(kseg_whole, kseg), seed_ref=(SEED_SPEC, seed)),
        outputs=dict(o_ref=(blocked, jax.ShapeDtypeStruct(q.shape, q.dtype)),
                     lse_ref=(rows, jax.ShapeDtypeStruct((b, h, s, 1), jnp.float32))))
    return o, lse


def _bshd(q, backend):
    """(batch, seq, heads, head_dim) of q in the kernels' layout for this backend."""
    if backend == "tpu":
        b, h, s, d = q.shape
        return b, s, h, d
    return q.shape


def _seg_layouts(seg):
    """Query ids [B, S, 1] and key ids [B, 1, S]; (None, None) without segment ids."""
    return (None, None) if seg is None else (seg[:, :, None], seg[:, None, :])


def _call_by_name(kernel, *, inputs: dict, outputs: dict, grid, name, interpret, compiler_params):
    """`pallas_call` with refs by name. inputs / outputs: {kernel parameter: (BlockSpec, array or ShapeDtypeStruct)};
    an input whose array is None is not passed to Pallas and reaches the kernel as a None ref (how the kernels are
    told there are no segment ids), so nothing counts argument positions."""
    present = [n for n, (_, x) in inputs.items() if x is not None]
    absent = {n: None for n, (_, x) in inputs.items() if x is None}
    names = present + list(outputs)

    def body(*refs):
        return kernel(**dict(zip(names, refs)), **absent)

    result = pl.pallas_call(
        body, grid=grid, in_specs=[inputs[n][0] for n in present], out_specs=[spec for spec, _ in outputs.values()],
        out_shape=[shape for _, shape in outputs.values()], interpret=interpret, name=name,
        compiler_params=compiler_params,
    )(*[inputs[n][1] for n in present])
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------------


def _rebuild_probs(q, k, lse, q_idx, k_idx, q_seg, k_seg, *, sm_scale, causal):
    """[bq, bk] softmax probabilities from the saved lse, masked: the backward kernels rebuild them, never store them."""
    p = jnp.exp(_dot(q, k, trans_b=True) * sm_scale - lse)
    mask = _mask(q_idx, k_idx, q_seg, k_seg, causal)
    return p if mask is None else jnp.where(mask, p, 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, seed_ref, dk_ref, dv_ref, *,
                 sm_scale, causal, block_q, block_k, seq_len, heads, dropout_rate):
    j = pl.program_id(2)
    bh = pl.program_id(0) * heads + pl.program_id(1)
    k, v = k_ref[...], v_ref[...]  # [bk, D]
    k_idx = _cols(block_k, j * block_k)
    k_seg = None if kseg_ref is None else kseg_ref[...]  # [1, bk]
    first = jax.lax.div(j * block_k, block_q) if causal else 0  # query blocks below the diagonal only (lax.div:
    # non-negative, so no floor-division sign fix-up, which Mosaic TPU cannot lower off a TPU host)

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), :]
        do = do_ref[pl.ds(start, block_q), :]
        lse = lse_ref[pl.ds(start, block_q), :]  # [bq, 1]
        delta = delta_ref[pl.ds(start, block_q), :]
        q_idx = _rows(block_q, start)
        q_seg = None if qseg_ref is None else qseg_ref[pl.ds(start, block_q), :]
        p = _rebuild_probs(q, k, lse, q_idx, k_idx, q_seg, k_seg, sm_scale=sm_scale, causal=causal)  # [bq, bk]
        dp = _dot(do, v, trans_b=True)
        if dropout_rate > 0.0:
            keep = dropout_keep(seed_ref[...], bh, q_idx, k_idx, dropout_rate)
            scale = 1.0 / (1.0 - dropout_rate)
            dv = dv + _dot((jnp.where(keep, p, 0.0) * scale).astype(do.dtype), do, trans_a=True)
            dp = jnp.where(keep, dp, 0.0) * scale
        else:
            dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (dp - delta)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True) * sm_scale
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(first, seq_len // block_q, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, seed_ref, dq_ref, *, sm_scale,
               causal, block_q, block_k, seq_len, heads, dropout_rate):
    i = pl.program_id(2)
    bh = pl.program_id(0) * heads + pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    q_idx = _rows(block_q, i * block_q)
    q_seg = None if qseg_ref is None else qseg_ref[...]
    n_kv = pl.cdiv((i + 1) * block_q, block_k) if causal else seq_len // block_k

    def body(j, dq):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        k_idx = _cols(block_k, start)
        k_seg = None if kseg_ref is None else kseg_ref[:, pl.ds(start, block_k)]
        p = _rebuild_probs(q, k, lse, q_idx, k_idx, q_seg, k_seg, sm_scale=sm_scale, causal=causal)
        dp = _dot(do, v, trans_b=True)
        if dropout_rate > 0.0:
            keep = dropout_keep(seed_ref[...], bh, q_idx, k_idx, dropout_rate)
            dp = jnp.where(keep, dp, 0.0) * (1.0 / (1.0 - dropout_rate))
        ds = p * (dp - delta)
        return dq + _dot(ds.astype(k.dtype), k) * sm_scale

    dq = jax.lax.fori_loop(0, n_kv, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(q, k, v, seg, seed, o, lse, do, *, causal, sm_scale, blocks: BlockSizes, interpret, dropout_rate,
              backend):
    b, s, h, d = _bshd(q, backend)
    heads_major = backend == "tpu"
    spec = "bhsd,bhsd->bhs" if heads_major else "bshd,bshd->bhs"
    delta = jnp.einsum(spec, o.astype(jnp.float32), do.astype(jnp.float32))[..., None]  # [B, H, S, 1]
    qseg, kseg = _seg_layouts(seg)
    common = dict(sm_scale=sm_scale, causal=causal, seq_len=s, heads=h, dropout_rate=dropout_rate)
    launch = dict(interpret=interpret,
                  compiler_params=_compiler_params(backend, interpret, blocks.num_warps_bwd, blocks.num_stages_bwd))

    # dK, dV: one program per key block.
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    blocked, whole, (_, qseg_whole, kseg_blocked, _), _, rows_whole = _specs(s, d, bk, heads_major)
    dk, dv = _call_by_name(
        functools.partial(_dkdv_kernel, block_q=bq, block_k=bk, **common), grid=(b, h, s // bk),
        name="flash_attention_dkdv", **launch,
        inputs=dict(q_ref=(whole, q), k_ref=(blocked, k), v_ref=(blocked, v), do_ref=(whole, do),
                    lse_ref=(rows_whole, lse), delta_ref=(rows_whole, delta), qseg_ref=(qseg_whole, qseg),
                    kseg_ref=(kseg_blocked, kseg), seed_ref=(SEED_SPEC, seed)),
        outputs=dict(dk_ref=(blocked, jax.ShapeDtypeStruct(k.shape, k.dtype)),
                     dv_ref=(blocked, jax.ShapeDtypeStruct(v.shape, v.dtype))))

    # dQ: one program per query block.
    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    blocked, whole, (qseg_blocked, _, _, kseg_whole), rows, _ = _specs(s, d, bq, heads_major)
    (dq,) = _call_by_name(
        functools.partial(_dq_kernel, block_q=bq, block_k=bk, **common), grid=(b, h, s // bq),
        name="flash_attention_dq", **launch,
        inputs=dict(q_ref=(blocked, q), k_ref=(whole, k), v_ref=(whole, v), do_ref=(blocked, do),
                    lse_ref=(rows, lse), delta_ref=(rows, delta), qseg_ref=(qseg_blocked, qseg),
                    kseg_ref=(kseg_whole, kseg), seed_ref=(SEED_SPEC, seed)),
        outputs=dict(dq_ref=(blocked, jax.ShapeDtypeStruct(q.shape, q.dtype))))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------------------
# Public wrapper
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is not an array (hashable: custom_vjp keeps it out of differentiation)."""

    causal: bool
    sm_scale: float
    blocks: BlockSizes
    interpret: bool
    dropout_rate: float
    backend: str

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, seg, seed, static: _Static):
    return _forward(q, k, v, seg, seed, **static.kwargs())


def _flash_fwd(q, k, v, seg, seed, static: _Static):
    o, lse = _forward(q, k, v, seg, seed, **static.kwargs())
    return (o, lse), (q, k, v, seg, seed, o, lse)


def _flash_bwd(static: _Static, residuals, cotangents):
    q, k, v, seg, seed, o, lse = residuals
    do, _ = cotangents  # the lse output is for inspection; its cotangent is not propagated
    dq, dk, dv = _backward(q, k, v, seg, seed, o, lse, do, **static.kwargs())
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                    block_sizes: BlockSizes | None = None, interpret: bool = False, return_lse: bool = False,
                    dropout_rate: float = 0.0, dropout_seed=None, backend: str | None = None):
    """Attention of q [B, S, H, D] over k, v [B, S, H, D] -> [B, S, H, D] (and lse [B, H, S] with return_lse).

    segment_ids [B, S] int: a query sees only keys with its own segment id. sm_scale defaults to 1/sqrt(D).
    dropout_rate in [0, 1) with dropout_seed (an int or a scalar int32/uint32 array; a traced value is fine): attention
    dropout after the softmax, the mask given by `dropout_keep`. backend ("gpu", "tpu", "cpu"; default: JAX's) picks
    the default block sizes and, on "gpu", the Triton compiler (set it to lower for a GPU from another host).
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"flash_attention: q, k, v must share one shape [batch, seq, heads, head_dim]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    b, s, h, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim {d} is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if segment_ids is not None and segment_ids.shape != (b, s):
        raise ValueError(f"flash_attention: segment_ids must be [batch, seq] = {(b, s)}, got {segment_ids.shape}")
    backend = backend or jax.default_backend()
    blocks = block_sizes or BlockSizes.default(d, backend)
    for name in BlockSizes.BLOCK_FIELDS:
        size = getattr(blocks, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"flash_attention: block size {name}={size} must be a power of two >= 16")
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    dropout_rate = float(dropout_rate)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"flash_attention: dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0.0 and dropout_seed is None:
        raise ValueError("flash_attention: dropout_rate > 0 needs a dropout_seed")
    seed = _seed_array(0 if dropout_seed is None else dropout_seed)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    padded = -(-s // blocks.max_block()) * blocks.max_block()
    if padded != s:  # pad, and keep the padding apart with a segment id no real token has
        pad = padded - s
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        real = jnp.ones((b, s), jnp.int32) if seg is None else seg
        seg = jnp.pad(real, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    static = _Static(causal, sm_scale, blocks, interpret, dropout_rate, backend)
    if static.backend == "tpu":  # heads-major for Mosaic; autodiff carries the transposes
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        o, lse = _flash(q, k, v, seg, seed, static)
        o = o.transpose(0, 2, 1, 3)
    else:
        o, lse = _flash(q, k, v, seg, seed, static)
    o, lse = o[:, :s], lse[:, :, :s, 0]
    return (o, lse) if return_lse else o


def _seed_array(seed):
    """int32 [1, 1]: the kernels take the seed as a tiny input (its bits are reinterpreted as uint32 inside)."""
    seed = jnp.asarray(seed)
    if seed.dtype == jnp.uint32:
        seed = jax.lax.bitcast_convert_type(seed, jnp.int32)
    return seed.astype(jnp.int32).reshape(1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Reference (plain jnp, same signature): what the tests compare against
# ---------------------------------------------------------------------------------------------------------------------


def reference_attention(q, k, v, *, segment_ids=None, causal: bool = True, sm_scale: float | None = None,
                        return_lse: bool = False, dropout_rate: float = 0.0, dropout_seed=None, **unused):
    """Materializes the [B, H, S, S] scores in fp32; outputs in q's dtype, lse [B, H, S] in fp32."""
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
    n = q.shape[1]
    mask = jnp.ones((n, n), bool) if not causal else jnp.tril(jnp.ones((n, n), bool))
    mask = mask[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    s = jnp.where(mask, s, MASK_VALUE)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    if dropout_rate > 0.0:
        b, _, h, _ = q.shape
        bh = (jnp.arange(b)[:, None] * h + jnp.arange(h)[None, :])[:, :, None, None]
        idx = jnp.arange(n)
        keep = dropout_keep(_seed_array(dropout_seed)[0, 0], bh, idx[:, None], idx[None, :], dropout_rate)
        p = jnp.where(keep, p, 0.0) / (1.0 - dropout_rate)
    o = jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)
    return (o, lse) if return_lse else o
