"""The model on its own: parameter counts, logical axes, rotary by hand, KV cache, packing, dropout, configs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import phi1, phi1_finetune, phi1_small, tiny
from phi1_jax import attention
from phi1_jax.decoding import decode_layout, is_decode_layout, last_logits
from phi1_jax.model import (
    ConfigError, KVCache, Output, Phi, PhiConfig, abstract_model, apply_rotary, count_params, logical_axes,
    positions_from_segments, rotary_cos_sin,
)

SMALL = PhiConfig(vocab_size=97, num_layers=2, d_model=48, num_heads=3, head_dim=16, mlp_dim=96, rotary_dim=8,
                  max_seq_len=64)


@pytest.fixture(scope="module")
def model():
    return Phi(SMALL, rngs=nnx.Rngs(0))


def _ids(shape, seed=0, vocab=SMALL.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


# --- sizes and axes --------------------------------------------------------------------------------------------------


def _hand_count(vocab, layers, d, f):
    per_layer = 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)  # LN, q/k/v/dense, fc1, fc2
    return vocab * d + layers * per_layer + 2 * d + (d * vocab + vocab)  # embed, blocks, final LN, lm_head


def test_phi1_param_count_is_hugging_faces_without_allocating():
    m = abstract_model(PhiConfig.from_dict(phi1.get_config().model))
    leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert count_params(m) == 1_418_270_720  # microsoft/phi-1 on Hugging Face
    assert count_params(m) == _hand_count(51200, 24, 2048, 8192)


def test_phi1_small_param_count_without_allocating():
    m = abstract_model(PhiConfig.from_dict(phi1_small.get_config().model))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count_params(m) == 356_794_368 == _hand_count(51200, 20, 1024, 4096)


def test_every_parameter_has_logical_axes(model):
    allowed = {"vocab", "embed", "heads", "head_dim", "mlp"}
    axes = logical_axes(model)
    shapes = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # embed; per layer LN 2 + q/k/v/dense 8 + fc1/fc2 4; final LN 2; lm_head 2
    assert len(axes) == 1 + 14 * SMALL.num_layers + 2 + 2
    for path, names in axes.items():
        assert names is not None and len(names) == len(shapes[path]), path
        assert set(names) <= allowed, (path, names)
    assert axes[("layers", 0, "attn", "q_proj", "kernel")] == ("embed", "heads", "head_dim")
    assert axes[("lm_head", "kernel")] == ("embed", "vocab")


# --- rotary ------------------------------------------------------------------------------------------------------


def test_rotary_by_hand():
    # head_dim 6, rotary 4: frequencies 1 and 10000^(-2/4) = 0.01; the last 2 dims pass through.
    x = jnp.array([1.0, 0.0, 0.0, 2.0, 5.0, -7.0]).reshape(1, 1, 1, 6)
    for p in (0, 1, 3):
        cos, sin = rotary_cos_sin(jnp.array([[p]]), 4, 10000.0)
        out = np.asarray(apply_rotary(x, cos, sin)).ravel()
        # pairs (x0, x2) rotate by angle p*1, (x1, x3) by angle p*0.01: [x0 c0 - x2 s0, x1 c1 - x3 s1, x2 c0 + x0 s0, ...]
        c0, s0, c1, s1 = math.cos(p), math.sin(p), math.cos(0.01 * p), math.sin(0.01 * p)
        want = [1 * c0 - 0 * s0, 0 * c1 - 2 * s1, 0 * c0 + 1 * s0, 2 * c1 + 0 * s1, 5.0, -7.0]
        np.testing.assert_allclose(out, want, atol=1e-6)


def test_positions_restart_per_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


# --- KV cache, packing, padding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 5, 11])
def test_kv_cache_decoding_equals_full_forward(model, prefill):
    ids = _ids((2, 12))
    full = model(ids).logits
    out = model(ids[:, :prefill], cache=KVCache.init(SMALL, batch=2, max_len=16))
    pieces = [out.logits]
    for i in range(prefill, 12):
        out = model(ids[:, i:i + 1], cache=out.cache)
        pieces.append(out.logits)
    assert int(out.cache.index) == 12
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


def test_decode_layout_computes_the_same_function(model):
    """[out, in] kernels (generation on CPU): the same logits with and without a cache; the original is untouched."""
    fast = decode_layout(model)
    assert is_decode_layout(fast) and not is_decode_layout(model) and decode_layout(fast) is fast
    assert model.layers[0].attn.dense.kernel.shape == (3, 16, 48)  # [N, H, D], as stored
    assert fast.layers[0].attn.dense.kernel_t.shape == (48, 48) and fast.layers[0].attn.q_proj.kernel_t.shape == (48, 48)
    assert fast.lm_head.bias is model.lm_head.bias  # the other weights are shared, not copied
    ids = _ids((2, 12), seed=9)
    full = model(ids).logits
    np.testing.assert_allclose(fast(ids).logits, full, atol=1e-5, rtol=1e-5)
    prefill = fast(ids[:, :7], cache=KVCache.init(SMALL, batch=2, max_len=12))  # generation's prefill
    np.testing.assert_allclose(last_logits(fast, prefill), model(ids[:, :7]).logits[:, -1], atol=1e-5, rtol=1e-5)
    out = fast(ids[:, 7:], cache=prefill.cache)
    np.testing.assert_allclose(out.logits, full[:, 7:], atol=1e-5, rtol=1e-5)


def test_output_is_one_type_read_by_name(model):
    """Logits and hidden states by name, with or without a cache; `cache` is None without one."""
    ids = _ids((2, 6), seed=8)
    out = model(ids)
    assert isinstance(out, Output) and out.cache is None
    assert out.logits.shape == (2, 6, SMALL.vocab_size) and out.hidden.shape == (2, 6, SMALL.d_model)
    assert out.logits.dtype == out.hidden.dtype == jnp.float32
    np.testing.assert_array_equal(model.lm_head(out.hidden).astype(jnp.float32), out.logits)  # hidden: lm_head's input
    cached = model(ids, cache=KVCache.init(SMALL, 2, 8))
    assert isinstance(cached, Output) and isinstance(cached.cache, KVCache) and int(cached.cache.index) == 6
    np.testing.assert_allclose(cached.hidden, out.hidden, atol=1e-5)


def test_prefill_never_computes_the_full_logits(model):
    """Generation's prefill reads `hidden` and applies lm_head to the last position: XLA drops the unread [B, T, V]
    logits from the compiled program (at phi-1's vocabulary they would be most of a long prompt's matrix multiply)."""
    graphdef, state = nnx.split(model)
    ids = _ids((2, 32))  # [B, T, V] = f32[2,32,97]; no other array of the program has that shape
    seg = jnp.ones_like(ids)

    def compiled(full_logits_too):
        def prefill(st, x):  # what generate._prefill computes, the cache not grown
            m = nnx.merge(graphdef, st)
            out = m(x, segment_ids=seg, positions=seg.cumsum(1) - 1, cache=KVCache.init(SMALL, *x.shape))
            return (last_logits(m, out), out.cache) + ((out.logits,) if full_logits_too else ())
        return jax.jit(prefill).lower(state, ids).compile().as_text()

    assert "f32[2,32,97]" in compiled(full_logits_too=True)  # the check sees the logits when they are computed
    assert "f32[2,32,97]" not in compiled(full_logits_too=False)


def test_kv_cache_under_jit(model):
    ids = _ids((1, 8), seed=3)
    step = nnx.jit(lambda m, x, c: m(x, cache=c))
    a = step(model, ids[:, :4], KVCache.init(SMALL, 1, 8))
    b = step(model, ids[:, 4:8], a.cache)
    np.testing.assert_allclose(jnp.concatenate([a.logits, b.logits], 1), model(ids).logits, atol=1e-5)


def test_a_step_on_a_corner_of_the_cache_equals_the_step_on_that_corner_sliced_out(model):
    """`KVCache.window` and fewer input rows than the cache (the serving engine's decode chunks): the step gives the
    logits and keys it gives on the corner [:B, :, :W] sliced out, writes only that corner, and leaves the other rows
    and slots as they were."""
    rows, width, b, w, t = 4, 32, 2, 16, 6
    ids = _ids((rows, t + 1), seed=3)
    full = model(ids[:, :t], cache=KVCache.init(SMALL, rows, width)).cache  # 4 rows prefilled to slot 6
    junk = lambda x: x.at[:, :, w:].set(7.0)  # noqa: E731  filled slots past the window (and the index): left alone
    full = full.replace(k=tuple(map(junk, full.k)), v=tuple(map(junk, full.v)),
                        segment_ids=full.segment_ids.at[:, w:].set(1))
    step = ids[:b, t:]
    corner = KVCache(k=tuple(x[:b, :, :w] for x in full.k), v=tuple(x[:b, :, :w] for x in full.v),
                     segment_ids=full.segment_ids[:b, :w], index=full.index)
    want = model(step, cache=corner)
    got = model(step, cache=full.replace(window=w))
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-6, rtol=0)
    for new, ref, old in zip(got.cache.k + got.cache.v, want.cache.k + want.cache.v, full.k + full.v):
        assert new.shape == old.shape  # the whole cache comes back, not the corner
        np.testing.assert_allclose(new[:b, :, :w], ref, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(new[b:], old[b:])  # the other rows: untouched
        np.testing.assert_array_equal(new[:, :, w:], old[:, :, w:])  # slots past the window: untouched
        assert not np.array_equal(new[:b, :, t], old[:b, :, t])  # the step's keys and values were written
    assert int(got.cache.index) == t + 1 and got.cache.window == w


def test_packed_documents_equal_separate_documents(model):
    doc1, doc2 = _ids((1, 7), seed=1), _ids((1, 5), seed=2)
    packed = jnp.concatenate([doc1, doc2, jnp.zeros((1, 3), jnp.int32)], axis=1)  # plus 3 tokens of padding
    seg = jnp.array([[1] * 7 + [2] * 5 + [0] * 3])
    logits = model(packed, segment_ids=seg).logits
    np.testing.assert_allclose(logits[:, 7:12], model(doc2).logits, atol=1e-5)
    np.testing.assert_allclose(logits[:, :7], model(doc1).logits, atol=1e-5)
    assert np.isfinite(np.asarray(logits)).all()  # padding rows stay finite


def test_explicit_positions_match_derived_positions(model):
    ids, seg = _ids((1, 9), seed=4), jnp.array([[1] * 4 + [2] * 5])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(model(ids, segment_ids=seg, positions=pos).logits, model(ids, segment_ids=seg).logits)


def test_left_padded_batch_decodes_like_each_row_alone(model):
    """Prompts of different lengths in one cached batch: left padding (segment 0) is never attended to."""
    long, short = _ids((1, 6), seed=5), _ids((1, 3), seed=6)
    pad = 3
    ids = jnp.concatenate([long, jnp.concatenate([jnp.zeros((1, pad), jnp.int32), short], 1)], 0)
    seg = jnp.array([[1] * 6, [0] * pad + [1] * 3])
    pos = jnp.array([list(range(6)), [0] * pad + [0, 1, 2]])
    out = model(ids, segment_ids=seg, positions=pos, cache=KVCache.init(SMALL, 2, 8))
    np.testing.assert_allclose(out.logits[0], model(long).logits[0], atol=1e-5)
    np.testing.assert_allclose(out.logits[1, pad:], model(short).logits[0], atol=1e-5)
    nxt = _ids((2, 1), seed=7)
    step = model(nxt, segment_ids=jnp.ones((2, 1), jnp.int32), positions=jnp.array([[6], [3]]), cache=out.cache).logits
    np.testing.assert_allclose(step[1, 0], model(jnp.concatenate([short, nxt[1:]], 1)).logits[0, -1], atol=1e-5)
    np.testing.assert_allclose(step[0, 0], model(jnp.concatenate([long, nxt[:1]], 1)).logits[0, -1], atol=1e-5)


# --- dtypes and dropout ---------------------------------------------------------------------------------------------


def test_bf16_compute_keeps_fp32_weights_and_is_close():
    cfg16 = PhiConfig(**{**SMALL.to_dict(), "dtype": "bfloat16"})
    m32, m16 = Phi(SMALL, rngs=nnx.Rngs(0)), Phi(cfg16, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    ids = _ids((2, 10))
    out16 = m16(ids).logits
    assert out16.dtype == jnp.float32
    # bf16 keeps 8 bits of mantissa: logits of std ~0.2 through 2 layers agree to a few 1e-3.
    np.testing.assert_allclose(out16, m32(ids).logits, atol=3e-2)


def test_dropout_uses_call_time_rngs():
    cfg = PhiConfig(**{**SMALL.to_dict(), "embed_dropout": 0.1, "resid_dropout": 0.1, "attn_dropout": 0.1})
    m = Phi(cfg, rngs=nnx.Rngs(0))
    ids = _ids((2, 10))
    a = m(ids, deterministic=False, rngs=nnx.Rngs(dropout=1)).logits
    b = m(ids, deterministic=False, rngs=nnx.Rngs(dropout=1)).logits
    c = m(ids, deterministic=False, rngs=nnx.Rngs(dropout=2)).logits
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, m(ids).logits)
    np.testing.assert_array_equal(m(ids).logits, m(ids, deterministic=True, rngs=nnx.Rngs(dropout=5)).logits)
    with pytest.raises(Exception, match="rngs"):
        m(ids, deterministic=False)


# --- the attention switch ----------------------------------------------------------------------------------------------


def test_cudnn_path_builds_the_same_mask_as_xla():
    """The cudnn branch passes segments as a dense mask; run that code with XLA's implementation on CPU."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (2, 9, 3, 16)) for kk in (k1, k2, k3))
    seg = jnp.array([[1] * 4 + [2] * 5, [1] * 9])
    mask = attention.make_mask(seg, seg)
    np.testing.assert_allclose(
        attention.cudnn_attention(q, k, v, mask, implementation="xla"), attention.xla_attention(q, k, v, mask), atol=1e-5
    )


def test_cudnn_refuses_attention_dropout():
    q = jnp.ones((1, 4, 1, 8))
    seg = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="dropout"):
        attention.attend(q, q, q, segment_ids=seg, impl="cudnn", dropout_rate=0.1,
                         dropout_rng=jax.random.key(0))


@pytest.mark.gpu
def test_cudnn_on_gpu_equals_xla():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA GPU")
    cfg = PhiConfig(**{**SMALL.to_dict(), "dtype": "bfloat16", "num_heads": 3})
    ids, seg = _ids((2, 16)), jnp.array([[1] * 9 + [2] * 7, [1] * 16])
    ref = Phi(cfg, rngs=nnx.Rngs(0))(ids, segment_ids=seg).logits
    fast = Phi(PhiConfig(**{**cfg.to_dict(), "attention_impl": "cudnn"}), rngs=nnx.Rngs(0))(ids, segment_ids=seg).logits
    np.testing.assert_allclose(fast, ref, atol=5e-2)


# --- configs -------------------------------------------------------------------------------------------------------------


def test_configs_load_and_are_locked():
    c = phi1.get_config()
    assert (c.batch_size, c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.weight_decay, c.steps) == (
        1024, 1e-3, 750, 0.1, 36_000)
    assert (c.model.resid_dropout, c.model.attn_dropout, c.seq_len) == (0.1, 0.1, 2048)
    f = phi1_finetune.get_config()
    assert (f.batch_size, f.optimizer.learning_rate, f.optimizer.warmup_steps, f.optimizer.weight_decay, f.steps) == (
        256, 1e-4, 50, 0.01, 6000)
    for module in (phi1, phi1_small, phi1_finetune, tiny):
        cfg = module.get_config()
        PhiConfig.from_dict(cfg.model)  # every model section is a valid PhiConfig
        with pytest.raises(AttributeError, match="d_model"):
            cfg.model.dmodel = 3  # locked: a typo is an error that suggests the real key


def test_bad_model_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="num_heads \\* head_dim"):
        PhiConfig(d_model=100, num_heads=3, head_dim=32)
    with pytest.raises(ConfigError, match="rotary_dim"):
        PhiConfig(rotary_dim=7)
    with pytest.raises(ConfigError, match="unknown model config keys \\['nlayers'\\]"):
        PhiConfig.from_dict({"nlayers": 3})
    with pytest.raises(ConfigError, match="attention_impl"):
        PhiConfig(attention_impl="flash")


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_memory_not_values(policy):
    """Recomputing blocks in the backward pass gives the same loss and gradients, dropout included."""
    base = {**SMALL.to_dict(), "resid_dropout": 0.1, "attn_dropout": 0.1}
    ids = _ids((2, 10))

    def value_and_grads(remat):
        graphdef, state = nnx.split(Phi(PhiConfig(**{**base, "remat": remat}), rngs=nnx.Rngs(0)))
        loss = lambda st: nnx.merge(graphdef, st)(ids, deterministic=False, rngs=nnx.Rngs(dropout=3)).logits.sum()  # noqa: E731
        v, g = jax.jit(jax.value_and_grad(loss))(state)
        return v, jax.tree.leaves(g)

    (v0, g0), (v1, g1) = value_and_grads("none"), value_and_grads(policy)
    assert v0 == v1
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(a, b, atol=1e-6)
