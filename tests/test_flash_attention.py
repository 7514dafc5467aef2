"""The Pallas flash-attention kernel against its reference, in interpret mode (CPU) or compiled (on a GPU host: the
same tests, `pytest tests/test_flash_attention.py`), and inside the model.

Tolerances: fp32 runs agree with the fp32 reference to float rounding (2e-5 absolute on unit-scale inputs). bf16 runs
are measured against the exact answer for their inputs (the reference on the same bf16 values upcast to fp32), with
the bf16 reference's own error as the bar: the kernel rounds P to bf16 before the PV and backward matmuls (as
FlashAttention does), so its relative error (|err| / |exact|, Frobenius) is 1.2-1.4x that of rounding the exact
answer to bf16 (measured: 1.8e-3 to 3.1e-3 against 1.6e-3 to 2.4e-3); the bar is 2x. A 1% error in the softmax scale
makes it 3.6-9x and fails, as does any error above 1.5% of the largest exact value anywhere. lse is fp32 from exact
bf16 products: 2e-5 (fp32) or 1e-4 (bf16) absolute, against the ~2e-2 that a 1% scale error moves it.
"""

import contextlib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi1_jax.kernels.flash_attention import BlockSizes, dropout_keep, flash_attention, reference_attention
from phi1_jax.model import Phi, PhiConfig

# Interpreted on CPU; on a GPU host the same tests run the compiled kernel (fp32 dots are IEEE there, not TF32).
INTERPRET = jax.default_backend() == "cpu"



@pytest.fixture(autouse=True)
def _fp32_matmuls_in_fp32():
    """On GPUs XLA multiplies fp32 in TF32 by default; the references here must be exact fp32 (no-op on CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


FP32_TOL = 2e-5  # absolute, outputs and gradients of unit-scale inputs
LSE_TOL = (2e-5, 1e-4)  # absolute, fp32 and bf16 inputs
BF16_BAR = 2.0  # kernel error <= BF16_BAR x the error of the bf16 reference, both against the exact answer
BF16_MAX_REL = 1.5e-2  # and no single error above this fraction of the largest exact value

CASES = [
    # (batch, seq, heads, head_dim, dtype, causal, segments, block_q, block_k)
    (2, 128, 2, 64, jnp.float32, True, False, 32, 32),
    (1, 256, 3, 64, jnp.float32, False, True, 64, 32),
    (2, 384, 2, 128, jnp.bfloat16, True, True, 128, 64),   # not a power of two
    (1, 200, 2, 64, jnp.float32, True, True, 64, 64),      # does not divide the blocks: padded
    (1, 512, 2, 64, jnp.bfloat16, False, False, 128, 128),
    (1, 1024, 2, 64, jnp.float32, True, True, 128, 128),
    (2, 256, 2, 128, jnp.float32, False, True, 32, 64),
]


def _inputs(b, s, h, d, dtype, segments, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.float32).astype(dtype) for kk in ks[:3])
    seg = None
    if segments:  # document boundaries at odd places, inside blocks, different per row
        cuts = np.sort(np.random.RandomState(seed).choice(np.arange(5, s - 5), size=(b, 3), replace=False), axis=1)
        seg = jnp.asarray(1 + (np.arange(s)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)
    return q, k, v, seg


def _outputs_and_grads(fn, q, k, v, w, **kw):
    """({o, dq, dk, dv} as float64 numpy, lse) of `fn`; the gradients of sum(o * w)."""
    o, lse = fn(q, k, v, return_lse=True, **kw)
    loss = lambda q, k, v: (fn(q, k, v, **kw).astype(jnp.float32) * w).sum()  # noqa: E731
    dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return {name: np.asarray(x, np.float64) for name, x in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv))}, lse


def _rel_err(got, exact):
    return np.linalg.norm(got - exact) / np.linalg.norm(exact)


def _assert_matches_reference(q, k, v, w, kernel_kw, **kw):
    """The kernel's outputs, lse and gradients against the reference's (see the module docstring for the bars)."""
    got, lse = _outputs_and_grads(flash_attention, q, k, v, w, **kernel_kw, **kw)
    want, rlse = _outputs_and_grads(reference_attention, q, k, v, w, **kw)
    fp32 = q.dtype == jnp.float32
    np.testing.assert_allclose(lse, rlse, atol=LSE_TOL[0] if fp32 else LSE_TOL[1], err_msg="lse")
    if fp32:
        for name in got:
            np.testing.assert_allclose(got[name], want[name], atol=FP32_TOL, err_msg=name)
        return
    exact, _ = _outputs_and_grads(reference_attention, *(x.astype(jnp.float32) for x in (q, k, v)), w, **kw)
    for name in got:
        err, bar = _rel_err(got[name], exact[name]), BF16_BAR * _rel_err(want[name], exact[name])
        assert err <= bar, f"{name}: relative error {err:.2e} > {BF16_BAR} x the bf16 reference's ({bar:.2e})"
        worst, scale = np.abs(got[name] - exact[name]).max(), np.abs(exact[name]).max()
        assert worst <= BF16_MAX_REL * scale, f"{name}: max error {worst:.3g} > {BF16_MAX_REL} x max|exact| {scale:.3g}"


@pytest.mark.parametrize("b,s,h,d,dtype,causal,segments,bq,bk", CASES)
def test_kernel_matches_reference(b, s, h, d, dtype, causal, segments, bq, bk):
    q, k, v, seg = _inputs(b, s, h, d, dtype, segments)
    blocks = BlockSizes(bq, bk, bq, bk, bq, bk)
    kw = dict(segment_ids=seg, causal=causal)
    o, lse = flash_attention(q, k, v, block_sizes=blocks, interpret=INTERPRET, return_lse=True, **kw)
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == (b, h, s)
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)  # a loss that weighs every output differently
    _assert_matches_reference(q, k, v, w, dict(block_sizes=blocks, interpret=INTERPRET), **kw)


def test_bad_shapes_are_clear_errors():
    q = jnp.zeros((1, 128, 2, 64))
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        flash_attention(jnp.zeros((1, 128, 2, 48)), jnp.zeros((1, 128, 2, 48)), jnp.zeros((1, 128, 2, 48)))
    with pytest.raises(ValueError, match="must share one shape"):
        flash_attention(q, q[:, :64], q)
    with pytest.raises(ValueError, match="segment_ids must be"):
        flash_attention(q, q, q, segment_ids=jnp.ones((1, 64), jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, q, q, block_sizes=BlockSizes(48, 64, 64, 64, 64, 64), interpret=INTERPRET)


def test_model_with_pallas_equals_xla_on_a_packed_batch():
    base = dict(vocab_size=97, num_layers=2, d_model=64, num_heads=4, head_dim=16, mlp_dim=128, rotary_dim=8,
                max_seq_len=256)
    ids = jax.random.randint(jax.random.key(0), (2, 160), 0, 97)
    seg = jnp.asarray([[1] * 70 + [2] * 60 + [3] * 30, [1] * 100 + [2] * 60])
    out = {}
    for impl in ("xla", "pallas"):
        graphdef, state = nnx.split(Phi(PhiConfig(**base, attention_impl=impl), rngs=nnx.Rngs(0)))
        loss = lambda st: nnx.merge(graphdef, st)(ids, segment_ids=seg).logits.mean()  # noqa: E731
        logits = nnx.merge(graphdef, state)(ids, segment_ids=seg).logits
        out[impl] = (logits, jax.tree.leaves(jax.grad(loss)(state)))
    np.testing.assert_allclose(out["pallas"][0], out["xla"][0], atol=1e-5)
    for a, b in zip(out["pallas"][1], out["xla"][1]):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("rate,causal,segments", [(0.1, True, True), (0.3, False, False)])
def test_dropout_matches_reference_with_the_same_mask(rate, causal, segments):
    q, k, v, seg = _inputs(2, 200, 3, 64, jnp.float32, segments)  # 200: padded to the blocks
    blocks = BlockSizes(64, 32, 32, 64, 64, 32)
    kw = dict(segment_ids=seg, causal=causal, dropout_rate=rate, dropout_seed=1234)
    o = flash_attention(q, k, v, block_sizes=blocks, interpret=INTERPRET, **kw)
    np.testing.assert_allclose(o, reference_attention(q, k, v, **kw), atol=2e-5)
    assert np.abs(np.asarray(o - reference_attention(q, k, v, segment_ids=seg, causal=causal))).max() > 0.01
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    grads = [jax.grad(lambda q, k, v: (fn(q, k, v, **kw, **extra) * w).sum(), argnums=(0, 1, 2))(q, k, v)  # noqa: B023
             for fn, extra in ((flash_attention, dict(block_sizes=blocks, interpret=INTERPRET)), (reference_attention, {}))]
    for name, got, want in zip("qkv", *grads):
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"d{name}")


def test_dropout_mask_rate_and_seeds():
    idx = jnp.arange(512)
    bh = jnp.arange(4)[:, None, None]
    keep = np.asarray(dropout_keep(jnp.int32(5), bh, idx[:, None], idx[None, :], 0.1))  # [4, 512, 512]
    assert abs(keep.mean() - 0.9) < 0.003
    assert (keep[0] != keep[1]).mean() > 0.15  # heads differ
    other = np.asarray(dropout_keep(jnp.int32(6), bh, idx[:, None], idx[None, :], 0.1))
    assert (keep != other).mean() > 0.15  # seeds differ
    np.testing.assert_array_equal(keep, np.asarray(dropout_keep(jnp.int32(5), bh, idx[:, None], idx[None, :], 0.1)))
    with pytest.raises(ValueError, match="needs a dropout_seed"):
        q = jnp.zeros((1, 128, 2, 64))
        flash_attention(q, q, q, dropout_rate=0.1, interpret=INTERPRET)


def test_model_trains_with_pallas_attention_dropout():
    cfg = PhiConfig(vocab_size=97, num_layers=1, d_model=64, num_heads=4, head_dim=16, mlp_dim=128, rotary_dim=8,
                    attn_dropout=0.1, attention_impl="pallas")
    graphdef, state = nnx.split(Phi(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.ones((2, 64), jnp.int32)

    def loss(st, seed):
        return nnx.merge(graphdef, st)(ids, deterministic=False, rngs=nnx.Rngs(dropout=seed)).logits.mean()

    g0, g0_again, g1 = (jax.grad(loss)(state, s) for s in (0, 0, 1))
    leaves = [np.asarray(x) for x in jax.tree.leaves(g0)]
    assert all(np.isfinite(x).all() for x in leaves)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g0_again)):
        np.testing.assert_array_equal(a, b)  # the same dropout RNG, the same masks
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    # rematerialization recomputes the forward with the same seed, so the same masks
    graphdef, state = nnx.split(Phi(PhiConfig(**{**cfg.to_dict(), "remat": "full"}), rngs=nnx.Rngs(0)))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(jax.grad(loss)(state, 0))):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="'cudnn' has no attention dropout"):
        bad = PhiConfig(**{**cfg.to_dict(), "attention_impl": "cudnn"})
        Phi(bad, rngs=nnx.Rngs(0))(ids, deterministic=False, rngs=nnx.Rngs(dropout=0))


@pytest.mark.gpu
def test_compiled_on_gpu_matches_reference():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    for b, s, h, d, dtype, causal, segments, _, _ in CASES:  # the default (tuned) block sizes, compiled
        q, k, v, seg = _inputs(b, s, h, d, dtype, segments)
        w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
        _assert_matches_reference(q, k, v, w, {}, segment_ids=seg, causal=causal)


@pytest.mark.parametrize("dtype,rate,segments", [(jnp.bfloat16, 0.0, False), (jnp.float16, 0.1, True)])
def test_lowers_to_triton_for_a_gpu_from_this_host(dtype, rate, segments):
    """The GPU compile path up to Triton IR, without a GPU: cross-platform lowering for CUDA (jax.export).

    It catches what interpret mode cannot: an op with no Triton lowering rule, or JAX handing the kernel to Mosaic GPU
    (its default for `pallas_call` on GPUs, which rejects kernels written for Triton's model). PTX compilation and the
    numbers still need a GPU (test_compiled_on_gpu_matches_reference)."""
    from jax import export

    q = jax.ShapeDtypeStruct((2, 2048, 4, 64), dtype)
    seg = jax.ShapeDtypeStruct((2, 2048), jnp.int32)

    def attn(q, k, v, s):
        return flash_attention(q, k, v, segment_ids=s if segments else None, dropout_rate=rate,
                               dropout_seed=7 if rate else None, backend="gpu")

    train = jax.grad(lambda q, k, v, s: attn(q, k, v, s).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with _abstract_gpu():
        module = export.export(jax.jit(train), platforms=["cuda"], disabled_checks=allow)(q, q, q, seg).mlir_module()
    assert module.count("xla.gpu.triton") == 3  # forward, dK/dV and dQ kernels, each a Triton call


def _abstract_gpu():
    """The GPU to lower for, from a host without one: JAX 0.11+ asks the Triton lowering for the target's compute
    capability and takes it from an abstract device (an H100 here); 0.10 needed none."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize("rate,causal,segments", [(0.0, True, True), (0.1, False, True)])
def test_tpu_layout_matches_reference_in_interpret_mode(rate, causal, segments):
    """backend="tpu" runs the same kernels on heads-major [B, H, S, D] blocks (what Mosaic TPU needs)."""
    q, k, v, seg = _inputs(2, 256, 2, 128, jnp.float32, segments)
    kw = dict(segment_ids=seg, causal=causal, dropout_rate=rate, dropout_seed=5 if rate else None)
    blocks = BlockSizes(128, 128, 128, 128, 128, 128)
    o, lse = flash_attention(q, k, v, block_sizes=blocks, interpret=True, backend="tpu", return_lse=True, **kw)
    ro, rlse = reference_attention(q, k, v, return_lse=True, **kw)
    np.testing.assert_allclose(o, ro, atol=2e-5)
    np.testing.assert_allclose(lse, rlse, atol=2e-5)
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    grads = [jax.grad(lambda q, k, v: (fn(q, k, v, **kw, **extra) * w).sum(), argnums=(0, 1, 2))(q, k, v)  # noqa: B023
             for fn, extra in ((flash_attention, dict(block_sizes=blocks, interpret=True, backend="tpu")),
                               (reference_attention, {}))]
    for name, got, want in zip("qkv", *grads):
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("dtype,head_dim,rate", [(jnp.bfloat16, 128, 0.0), (jnp.bfloat16, 64, 0.1)])
def test_lowers_to_mosaic_for_a_tpu_from_this_host(dtype, head_dim, rate):
    """The TPU path up to the Mosaic kernel (block-shape rules, op lowering rules), without a TPU."""
    from jax import export

    q = jax.ShapeDtypeStruct((2, 1024, 4, head_dim), dtype)
    seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

    def attn(q, k, v, s):
        return flash_attention(q, k, v, segment_ids=s, dropout_rate=rate, dropout_seed=7 if rate else None,
                               backend="tpu")

    train = jax.grad(lambda q, k, v, s: attn(q, k, v, s).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    allow = [export.DisabledSafetyCheck.custom_call("tpu_custom_call")]
    module = export.export(jax.jit(train), platforms=["tpu"], disabled_checks=allow)(q, q, q, seg).mlir_module()
    assert module.count("tpu_custom_call") == 3


def test_tuner_returns_a_measured_candidate_that_agrees_with_the_reference():
    """phi1_jax.bench.tune_attention's plumbing (interpreted here; its timings only mean something on a GPU)."""
    from phi1_jax.bench.tune_attention import tune

    lines = []
    best = tune(1, 256, 2, 64, "bfloat16", iters=1, interpret=True, tiles=[(64, 64), (128, 64)],
                fwd_launch=[(4, 2)], bwd_launch=[(8, 3)], report=lines.append)
    assert (best.block_q, best.block_k) in {(64, 64), (128, 64)} and (best.num_warps_bwd, best.num_stages_bwd) == (8, 3)
    assert sum("TFLOP/s" in line for line in lines) == 4 and lines[-1].startswith("fastest: BlockSizes(")
