"""Generation: the one sampler, batched decoding on the model's KV cache with the loop on the device, and the CPU
decode layout.

    from phi1_jax.decoding import generate
    outs = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0, eos_id=1)

Prompts of different lengths share a batch: they are left-padded (padding has segment id 0, so no query attends to
it) and each row's positions start at 0 at its first real token. The batch is padded to a power of two and the prompt
length to a multiple of 64, so the prefill and the decode loop compile once per shape bucket. Decoding runs in a
`lax.while_loop` on the device for up to `chunk_tokens` tokens at a time (it exits early once every row is done);
between chunks the host applies stop conditions that need the text (`stop` as a callable), so there is one host
round-trip per chunk, not per token. Rows stop on their own: at `eos_id`, at a stop sequence, or at max_new_tokens.

Sampling (`sample`, which `generate` and the serving engine both call): greedy when temperature == 0; otherwise
softmax(logits / temperature) restricted to the top_k tokens (0 = all) and to the smallest set whose probability
reaches top_p (1 = all). Ids from `vocab` up (a model's padding rows beyond its tokenizer: phi-1 has 51200 rows for
50295 tokens) are never sampled nor chosen greedily. The same seed, prompts and settings give the same samples.

On CPU, `for_decoding` gives the model with its projections' kernels stored as [out, in] matrices
(`DecodeProjection`, `decode_layout`): the same function, faster at decoding's small batches.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from phi1_jax.model import KVCache, Output, Phi, Projection

PROMPT_BUCKET = 64


def _bucket_batch(n: int) -> int:
    return 1 << (n - 1).bit_length()


def sample(logits, key, temperature=0.0, top_k: int = 0, top_p=1.0, vocab=None) -> jax.Array:
    """Next token ids [B] (int32) from logits [B, V]: the one sampler of `generate` and the serving engine.

    key: one key for the whole batch (`jax.random.categorical` over [B, V]) or one key per row [B] (each row drawn
      with its own key; a row's draw then equals a batch of one's with that key).
    temperature, top_p: Python numbers (settings fixed at trace time: temperature 0 compiles to argmax alone), or
      arrays, scalar or per row [B] (a row with temperature 0 is greedy; top_p 1 keeps every token).
    top_k: a Python int, 0 for all tokens.
    vocab: ids >= vocab (a model's padding rows beyond its tokenizer) are never chosen, greedy or sampled; None: all
      V ids are real. A Python int or a traced scalar.
    """
    logits = logits.astype(jnp.float32)
    if vocab is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
    greedy = argmax(logits)
    fixed = isinstance(temperature, (int, float))
    if fixed and temperature == 0:
        return greedy
    if fixed:
        logits = logits / temperature
    else:
        temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), logits.shape[:1])
        logits = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if not isinstance(top_p, (int, float)):
        top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), logits.shape[:1])
        logits = jax.lax.cond(jnp.any(top_p < 1.0), _nucleus, lambda x, _: x, logits, top_p)
    elif top_p < 1.0:
        logits = _nucleus(logits, jnp.full(logits.shape[:1], top_p, jnp.float32))
    if key.ndim == 0:
        sampled = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    else:
        sampled = jax.vmap(jax.random.categorical)(key, logits).astype(jnp.int32)
    return sampled if fixed else jnp.where(temperature == 0, greedy, sampled)


def argmax(logits) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` as int32, the same index for every input (the first of the largest values; the
    first NaN where a row has one), computed as a max and a min over [B, V] instead of argmax's (value, index) pair
    reduction, which XLA:CPU runs one element at a time: ~170 us a step for 16 rows of 2048 ids on this 2-core CPU
    against ~20 us, most of what a 16-row decode step of the tiny model cost beside its matrix multiplies."""
    nan = jnp.isnan(logits)
    best = jnp.max(jnp.where(nan, -jnp.inf, logits), axis=-1, keepdims=True)
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == best)
    idx = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, idx, logits.shape[-1] - 1), axis=-1)


def _nucleus(logits, top_p):
    """logits [B, V] restricted per row to the smallest set whose probability reaches top_p [B]."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the better tokens
    sorted_logits = jnp.where(before < top_p[:, None], sorted_logits, -jnp.inf)  # always keeps the best token
    return jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)


def for_decoding(model: Phi) -> Phi:
    """The model as `generate` runs it: on CPU a copy with [out, in] projection kernels (`decode_layout`;
    XLA:CPU multiplies small batches ~40% faster by them), elsewhere the model itself (GPUs and TPUs need no second
    copy). Callers that generate many times convert once with it; `generate` then uses their copy as it is."""
    return decode_layout(model) if jax.default_backend() == "cpu" else model


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(graphdef, state, ids, segment_ids, positions, max_len):
    """Logits at the last prompt position [B, V] and the cache, `max_len` slots with the prompt in the first ones.

    The prompt attends within itself (a cache of exactly its length), and the cache is padded to `max_len` after:
    attending over the empty decode slots too nearly doubled the prefill's time at 512 new tokens on CPU."""
    model = nnx.merge(graphdef, state)
    out = model(ids, segment_ids=segment_ids, positions=positions, cache=KVCache.init(model.cfg, *ids.shape))
    grow = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, max_len - x.shape[2]), (0, 0)])  # noqa: E731  [B, N, S, H]
    cache = out.cache.replace(k=tuple(map(grow, out.cache.k)), v=tuple(map(grow, out.cache.v)),
                              segment_ids=jnp.pad(out.cache.segment_ids, [(0, 0), (0, max_len - ids.shape[1])]))
    return last_logits(model, out), cache


def last_logits(model: Phi, out: Output) -> jax.Array:
    """Logits [B, V] of the last position from the model's `Output`, `lm_head` applied to that position alone: under
    jit the full `out.logits` is then unread and XLA never computes it ([B, T, V], most of a long prompt's matrix
    multiply at phi-1's vocabulary)."""
    return model.lm_head(out.hidden[:, -1:])[:, 0].astype(jnp.float32)  # [B, 1, D] -> [B, V]


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3, 5))
def _decode_chunk(graphdef, sampling, state, cache, logits, tokens, next_pos, done, step, limit, key, eos_id):
    """Samples and feeds tokens until `limit` tokens exist or every row is done. tokens [B, max_new]."""
    temperature, top_k, top_p, vocab = sampling
    model = nnx.merge(graphdef, state)

    def cond(carry):
        _, _, _, _, done, step = carry
        return (step < limit) & ~jnp.all(done)

    def body(carry):
        cache, logits, tokens, next_pos, done, step = carry
        tok = sample(logits, jax.random.fold_in(key, step), temperature, top_k, top_p, vocab)
        tok = jnp.where(done, 0, tok)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
        done = done | (tok == eos_id)
        out = model(tok[:, None], segment_ids=jnp.ones_like(tok)[:, None], positions=next_pos[:, None], cache=cache)
        return out.cache, out.logits[:, -1], tokens, next_pos + 1, done, step + 1

    return jax.lax.while_loop(cond, body, (cache, logits, tokens, next_pos, done, step))


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def generate(
    model: Phi,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[Sequence[int]] | Callable[[list[int]], bool] | None = None,
    seed: int = 0,
    *,
    eos_id: int | None = None,
    vocab: int | None = None,
    chunk_tokens: int = 64,
) -> list[list[int]]:
    """Generated token ids for each prompt (without the prompt).

    `stop`: token-id sequences (a row ends before the first one it generates), or a function of a row's generated ids
    that returns True once the row should end (checked between chunks; e.g. stop strings on decoded text, which the
    caller then truncates). `eos_id`: ends a row (not included in the output). `vocab`: the tokenizer's size; ids
    from it up (the model's padding rows) are never generated (None: every id of the model's vocabulary).
    """
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    n = len(prompts)
    batch = _bucket_batch(n)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_seq_len {cfg.max_seq_len}; shorten the prompts or generate fewer tokens")
    plen = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, cfg.max_seq_len - max_new_tokens)
    ids = np.zeros((batch, plen), np.int32)
    seg = np.zeros((batch, plen), np.int32)
    pos = np.zeros((batch, plen), np.int32)
    lengths = np.ones(batch, np.int32)
    for i in range(batch):
        p = list(prompts[i]) if i < n else [0]  # rows past n are padding of the batch bucket
        ids[i, plen - len(p):], seg[i, plen - len(p):], pos[i, plen - len(p):] = p, 1, np.arange(len(p))
        lengths[i] = len(p)

    graphdef, state = nnx.split(for_decoding(model))
    logits, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos),
                             plen + max_new_tokens)
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32)
    next_pos = jnp.asarray(lengths)
    done = jnp.asarray(np.arange(batch) >= n)
    step = jnp.int32(0)
    key = jax.random.key(seed)
    sampling = (float(temperature), int(top_k), float(top_p), None if vocab is None else int(vocab))
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    host_done = np.arange(batch) >= n
    while True:
        limit = jnp.int32(min(int(step) + chunk_tokens, max_new_tokens))
        cache, logits, tokens, next_pos, done, step = _decode_chunk(
            graphdef, sampling, state, cache, logits, tokens, next_pos, jnp.asarray(host_done | np.asarray(done)),
            step, limit, key, eos)
        host_tokens, host_done = np.asarray(tokens), np.asarray(done).copy()
        if callable(stop):
            for i in range(n):
                if not host_done[i] and stop(_row(host_tokens[i, :int(step)], eos_id)):
                    host_done[i] = True
        if host_done.all() or int(step) >= max_new_tokens:
            break
    outs = []
    for i in range(n):
        row = _row(host_tokens[i, :int(step)], eos_id)
        if stop is not None and not callable(stop):
            cuts = [c for c in (_find(row, list(s)) for s in stop if len(s)) if c >= 0]
            row = row[: min(cuts)] if cuts else row
        outs.append(row)
    return outs


def _row(tokens: np.ndarray, eos_id: int | None) -> list[int]:
    row = tokens.tolist()
    if eos_id is not None and eos_id in row:
        row = row[: row.index(eos_id)]
    return row


# ---------------------------------------------------------------------------------------------------------------------
# The CPU decode layout: the projections' kernels as [out, in] matrices
# ---------------------------------------------------------------------------------------------------------------------


class DecodeProjection(nnx.Module):
    """A `Projection`'s map with its kernel stored as one [out, in] matrix: x [..., in...] is flattened to [..., K]
    and multiplied by kernel_t [O, K], then y [..., O] is unflattened to the projection's output dims.

    At decoding's small batches XLA:CPU's matrix multiply runs ~40% faster with the weight in this layout (measured in
    docs/benchmarks.md), and one plain product also spares it transposing a kernel with two contracted dims (the
    attention output's [N, H, D]) at every step. Only `decode_layout` makes these, for generation on CPU; training
    and the parameter layout (checkpoints, `phi1_jax.convert`) know only `Projection`.
    """

    def __init__(self, proj: Projection):
        self.n_in, self.dtype, self.out_axes = proj.n_in, proj.dtype, proj.out_axes
        kernel = proj.kernel[...]  # [in..., out...]
        k = math.prod(kernel.shape[:self.n_in])
        self.kernel_t = nnx.Variable(jnp.transpose(kernel.reshape(k, -1)))  # [O, K]
        self.bias = proj.bias  # [out...], shared with the model it came from

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(*x.shape[:x.ndim - self.n_in], -1)  # [..., K]
        y = jnp.einsum("...K,OK->...O", x.astype(self.dtype), self.kernel_t[...].astype(self.dtype))
        bias = self.bias[...].astype(self.dtype)
        return nn.with_logical_constraint(y.reshape(*y.shape[:-1], *bias.shape) + bias, self.out_axes)


def decode_layout(model: Phi) -> Phi:
    """A model with the same weights whose projections are `DecodeProjection`s; `model` is untouched and the other
    weights are shared, not copied. For inference only (the trainer's sharding rules know nothing of the [out, in]
    kernels). Converting phi-1-small takes ~1 s on CPU, so a caller that generates many times converts once
    (`phi1_jax.evals.generation.completions`)."""
    if is_decode_layout(model):
        return model
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state, copy=False)
    for _, module in list(nnx.iter_modules(copy)):
        for name, value in list(vars(module).items()):
            if isinstance(value, Projection):
                setattr(module, name, DecodeProjection(value))
    return copy


def is_decode_layout(model: Phi) -> bool:
    return isinstance(model.lm_head, DecodeProjection)
