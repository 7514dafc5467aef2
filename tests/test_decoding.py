"""phi1_jax.decoding's one sampler: padding ids are never chosen, draws are fixed by the seed, and `generate` uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi1_jax.decoding import generate, sample
from phi1_jax.model import Phi, PhiConfig

VOCAB, PADDED = 50, 64  # a tokenizer of 50 ids, a model of 64 rows (phi-1: 50295 and 51200)


def _logits(rows=8, seed=0):
    """Logits [rows, PADDED] whose padding ids are the most likely of all."""
    logits = jax.random.normal(jax.random.key(seed), (rows, PADDED))
    return logits.at[:, VOCAB:].set(10.0)


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=2.0, top_k=20),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=jnp.array([0.0, 1.0, 2.0, 0.5, 1.0, 0.0, 1.0, 3.0]),
         top_p=jnp.array([1.0, 0.9, 1.0, 0.5, 1.0, 1.0, 0.99, 1.0])),
])
def test_padding_ids_are_never_chosen(settings):
    logits = _logits()
    draws = np.stack([np.asarray(sample(logits, jax.random.key(s), vocab=VOCAB, **settings)) for s in range(50)])
    assert draws.max() < VOCAB
    assert (np.asarray(sample(logits, jax.random.key(0), **settings)) >= VOCAB).any()  # without vocab they win
    keys = jax.random.split(jax.random.key(1), logits.shape[0])  # per-row keys, and a traced vocab
    assert np.asarray(jax.jit(sample, static_argnums=(3,))(logits, keys, settings.get("temperature", 0.0),
                                                            settings.get("top_k", 0), settings.get("top_p", 1.0),
                                                            jnp.int32(VOCAB))).max() < VOCAB


def test_greedy_is_the_best_real_id():
    logits = _logits()
    want = np.argmax(np.asarray(logits)[:, :VOCAB], axis=-1)
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), 0.0, vocab=VOCAB), want)
    temps = jnp.zeros(logits.shape[0])  # per-row temperatures, all greedy
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), temps, vocab=VOCAB), want)


def test_draws_are_fixed_by_the_seed():
    logits = jax.random.normal(jax.random.key(3), (16, PADDED))
    a, b = (np.asarray(sample(logits, jax.random.key(7), 1.0, 0, 0.95, VOCAB)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert any((np.asarray(sample(logits, jax.random.key(s), 1.0, 0, 0.95, VOCAB)) != a).any() for s in range(8, 12))
    # a row drawn with its own key gives what a batch of one gives with that key (the serving engine's rows)
    keys = jax.random.split(jax.random.key(5), 16)
    rows = np.asarray(sample(logits, keys, 1.0, 0, 0.95, VOCAB))
    alone = [int(sample(logits[i:i + 1], keys[i], 1.0, 0, 0.95, VOCAB)[0]) for i in range(16)]
    assert rows.tolist() == alone


def test_generate_never_emits_padding_ids():
    cfg = PhiConfig(vocab_size=PADDED, num_layers=1, d_model=32, num_heads=2, head_dim=16, mlp_dim=64, rotary_dim=8,
                    max_seq_len=64)
    model = Phi(cfg, rngs=nnx.Rngs(0))
    model.lm_head.bias.value = jnp.zeros(PADDED).at[VOCAB:].set(100.0)  # the padding rows would win every step
    prompts = [[1, 2, 3], [4, 5]]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.95, seed=3), dict(temperature=1.0, top_k=5)):
        outs = generate(model, prompts, max_new_tokens=6, vocab=VOCAB, **kw)
        assert all(0 <= t < VOCAB for row in outs for t in row) and all(len(row) == 6 for row in outs)
        assert any(t >= VOCAB for row in generate(model, prompts, max_new_tokens=6, **kw) for t in row)


def test_argmax_is_jnp_argmax_without_a_pair_reduction():
    """decoding.argmax (the greedy sampler's) gives jnp.argmax's index on ties, NaN, -inf and all -inf rows, and
    compiles to plain reductions: XLA:CPU runs argmax's (value, index) pair reduction one element at a time (~170 us
    a step for 16 rows of 2048 ids here, against ~20 us)."""
    from phi1_jax.decoding import argmax

    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, size=(64, 37)).astype(np.float32)  # many ties
    x[1, 5] = x[2, 0] = x[2, 30] = np.nan
    x[3] = -np.inf
    x[4, :] = np.nan
    x[5, 7] = np.inf
    x[6, 7], x[6, 9] = np.inf, np.nan
    for rows in (x, x.astype(jnp.bfloat16)):
        np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(rows)), np.argmax(rows.astype(np.float32), axis=-1))
    assert jax.jit(argmax)(x).dtype == jnp.int32
    for fn in (argmax, lambda lg: sample(lg, None, 0.0, 0, 1.0, VOCAB)):
        text = jax.jit(fn).lower(jnp.zeros((16, 2048))).as_text()
        pairs = [line for line in text.splitlines()  # reduce((values, indices), ...): argmax's pair reduction
                 if "stablehlo.reduce" in line and "tensor<16x2048xf32>, tensor<16x2048xi32>" in line]
        assert not pairs, pairs
