"""phi-1 in Flax NNX: the network only (no data, no optimizer, no mesh).

Architecture (arXiv 2306.11644 §2.3; Hugging Face `models/phi`): token embedding, then N parallel blocks
`h = LN(x); x + Attention(h) + MLP(h)`, then a final LayerNorm and an untied `lm_head` with bias. Attention applies
rotary embeddings to the first `rotary_dim` dims of each head (NeoX `rotate_half` layout), scales by 1/sqrt(head_dim)
and takes the softmax in fp32. The MLP is fc1 -> tanh-approximate GELU -> fc2.

Shape letters used in every einsum and comment:
  B batch, T query time, S key time (T, or the cache length), D d_model, N heads, H head_dim,
  R rotary dims, F MLP hidden, V vocab, L layers.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `head_dim`, `mlp`) in its `out_sharding`
metadata; `phi1_jax.sharding` maps them to mesh axes. They are created with `eager_sharding=False`, so a model can be
built (or `nnx.eval_shape`d) without a mesh. Activations between blocks are constrained to the logical axes
ACTIVATION_AXES; the constraint is a no-op unless the caller sets `flax.linen.logical_axis_rules` (the trainer does),
and it is what keeps XLA from replicating the batch when parameters are sharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from phi1_jax import attention
from phi1_jax.errors import UserError

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Activations [B, T, D] between blocks. Activations have their own logical names (act_*), so the rules that shard
# weights (e.g. embed -> fsdp) do not apply to them; projections' outputs use act_heads, act_head_dim, act_mlp, act_vocab.
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed")

# What the backward pass keeps of each block (jax.checkpoint policies); "none" keeps everything.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


class ConfigError(UserError, ValueError):
    """A model config that describes no valid Phi model; the message names the field."""


@dataclasses.dataclass(frozen=True)
class PhiConfig:
    """Shape and numerics of one Phi model. `configs/*.py` hold these fields under `config.model`."""

    vocab_size: int = 51200
    num_layers: int = 24
    d_model: int = 2048
    num_heads: int = 32
    head_dim: int = 64
    mlp_dim: int = 8192
    rotary_dim: int = 32
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    layer_norm_eps: float = 1e-5
    embed_dropout: float = 0.0
    resid_dropout: float = 0.0
    attn_dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # storage dtype of the weights (fp32 master weights by default)
    attention_impl: str = "xla"  # see phi1_jax.attention.IMPLEMENTATIONS
    init_std: float = 0.02
    remat: str = "none"  # training memory: none | full (recompute each block) | dots (keep matmul outputs)

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ConfigError(f"PhiConfig: {msg}")

        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "mlp_dim", "max_seq_len"):
            need(int(getattr(self, name)) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        need(
            self.num_heads * self.head_dim == self.d_model,
            f"num_heads * head_dim must equal d_model (Hugging Face Phi's layout), got "
            f"{self.num_heads} * {self.head_dim} != {self.d_model}",
        )
        need(
            0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
            f"rotary_dim must be even and in [0, head_dim={self.head_dim}], got {self.rotary_dim}",
        )
        need(self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        need(self.param_dtype in DTYPES, f"param_dtype must be one of {sorted(DTYPES)}, got {self.param_dtype!r}")
        need(
            self.attention_impl in attention.IMPLEMENTATIONS,
            f"attention_impl must be one of {attention.IMPLEMENTATIONS}, got {self.attention_impl!r}",
        )
        need(self.remat in REMAT_POLICIES, f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        for name in ("embed_dropout", "resid_dropout", "attn_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: Any) -> "PhiConfig":
        """From a mapping (e.g. a ConfigDict's `model` field); unknown keys are an error that names them."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"PhiConfig: unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]


def _param(rngs: nnx.Rngs, init, shape, axes, cfg: PhiConfig) -> nnx.Param:
    """A parameter with logical axis names, not sharded at creation (the trainer shards by rules)."""
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, cfg.weight_dtype), out_sharding=tuple(axes), eager_sharding=False)


class Projection(nnx.Module):
    """`y = einsum(spec, x, kernel) + bias`, computed in the config's compute dtype.

    `out_axes` are the logical axes of y; constraining them keeps the batch sharded when the weights are sharded too
    (XLA then gathers weights, FSDP-style, instead of gathering activations). The kernel's leading dims are the
    contracted ones (the trailing dims of x), its trailing dims the output's. (Generation on CPU swaps in
    `phi1_jax.decoding.DecodeProjection`, the same map with another weight layout.)
    """

    def __init__(self, spec: str, kernel_shape, kernel_axes, bias_shape, bias_axes, out_axes, cfg: PhiConfig, *,
                 rngs: nnx.Rngs):
        self.spec, self.out_axes = spec, tuple(out_axes)
        x_spec, k_spec = spec.split("->")[0].split(",")
        self.n_in = sum(c in x_spec for c in k_spec)  # contracted kernel dims
        assert k_spec[:self.n_in] == x_spec[-self.n_in:], spec
        self.dtype = cfg.compute_dtype
        self.kernel = _param(rngs, nnx.initializers.normal(cfg.init_std), kernel_shape, kernel_axes, cfg)
        self.bias = _param(rngs, nnx.initializers.zeros, bias_shape, bias_axes, cfg)

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return nn.with_logical_constraint(y + self.bias[...].astype(self.dtype), self.out_axes)


def _layer_norm(cfg: PhiConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Flax computes the mean and variance in fp32 whatever the compute dtype, as torch's LayerNorm does.
    meta = dict(out_sharding=("embed",), eager_sharding=False)
    return nnx.LayerNorm(
        cfg.d_model, epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        scale_metadata=meta, bias_metadata=meta, rngs=rngs,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoFormer; NeoX layout as in Hugging Face Phi), always in fp32
# ---------------------------------------------------------------------------------------------------------------------


def rotary_cos_sin(positions: Array, rotary_dim: int, theta: float) -> tuple[Array, Array]:
    """positions [B, T] int -> cos, sin [B, T, R] fp32, with the R/2 frequencies repeated (`cat(freqs, freqs)`)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))  # [R/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates the first R dims of each head of x [B, T, N, H]; the other H - R dims pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # rotate_half
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, R]
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


def positions_from_segments(segment_ids: Array) -> Array:
    """[B, T] segment ids -> positions that restart at 0 wherever the segment id changes."""
    _, t = segment_ids.shape
    idx = jnp.arange(t, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


# ---------------------------------------------------------------------------------------------------------------------
# KV cache (functional: the model returns an updated cache, so decode loops can run inside jit / lax.while_loop)
# ---------------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` slots, plus the segment id of each slot.

    Slots are filled left to right; `index` counts the filled ones. A slot's segment id is 0 while it is empty or
    holds padding, so attention never reads it (queries carry segment ids >= 1).

    `window` (static): attend over slots [:window] only (None: all S). The model's input may also have fewer rows
    than the cache (rows [:B] are read and written, the others left as they are). Together they let a caller keep one
    large cache and run a step on a corner of it without slicing the corner out and writing it back (the serving
    engine's decode chunks: the slice and write-back of every layer cost about a decode step per chunk); the slots
    written must lie below `window`.
    """

    k: tuple[Array, ...]  # L x [B, N, S, H]: heads-major, so decoding attends without transposing the cache
    v: tuple[Array, ...]  # L x [B, N, S, H]
    segment_ids: Array  # [B, S] int32
    index: Array  # [] int32
    window: int | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def init(cls, cfg: PhiConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dtype = dtype or cfg.compute_dtype
        shape = (batch, cfg.num_heads, max_len, cfg.head_dim)
        layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))  # noqa: E731
        return cls(
            k=layers(), v=layers(), segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32)
        )

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


@flax.struct.dataclass
class LayerCache:
    """One layer's part of a `KVCache` as its attention reads and writes it."""

    k: Array  # [B, N, S, H]
    v: Array  # [B, N, S, H]
    segment_ids: Array  # [B, S] int32, the new tokens' ids already written at [index, index + T)
    index: Array  # [] int32: the slot of the first new token
    window: int | None = flax.struct.field(pytree_node=False, default=None)  # see KVCache


# ---------------------------------------------------------------------------------------------------------------------
# Attention, MLP, parallel block
# ---------------------------------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
        qkv = lambda: Projection(  # noqa: E731
            "BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), (n, h), ("heads", "head_dim"),
            ("act_batch", "act_length", "act_heads", "act_head_dim"), cfg, rngs=rngs,
        )
        self.q_proj, self.k_proj, self.v_proj = qkv(), qkv(), qkv()
        self.dense = Projection("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), (d,), ("embed",),
                                ACTIVATION_AXES, cfg, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids, cache: LayerCache | None, *, deterministic, rngs):
        """x [B, T, D] -> ([B, T, D], the layer's cache with the T new keys and values written, or None)."""
        q = apply_rotary(self.q_proj(x), cos, sin)  # [B, T, N, H]
        k = apply_rotary(self.k_proj(x), cos, sin)  # [B, T, N, H]
        v = self.v_proj(x)  # [B, T, N, H]
        if cache is not None:  # decoding: the cache is [B, N, S, H], and attention stays heads-major
            k = jax.lax.dynamic_update_slice(cache.k, k.transpose(0, 2, 1, 3).astype(cache.k.dtype),
                                             (0, 0, cache.index, 0))  # [B, N, S, H]
            v = jax.lax.dynamic_update_slice(cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype),
                                             (0, 0, cache.index, 0))
            # The barrier makes the updated cache a value of its own. Without it XLA:CPU fuses the update into the
            # attention's bf16-to-fp32 convert as well, so the cache had two readers and was copied (twice, inside
            # a decode loop) at every step: 2 x L x 2 copies of the whole cache per token. Now it is updated in place.
            k, v = jax.lax.optimization_barrier((k, v))
            b, w = x.shape[0], cache.window or k.shape[2]
            corner = lambda a: a if a.shape[0] == b and a.shape[2] == w else a[:b, :, :w]  # noqa: E731
            mask = attention.make_mask(segment_ids, cache.segment_ids[:b, :w], cache.index)
            out = attention.cached_attention(q, corner(k), corner(v), mask)  # [B, N, T, H]
            return self.dense(out.transpose(0, 2, 1, 3)), cache.replace(k=k, v=v)
        dropout_rng = None
        if not deterministic and self.cfg.attn_dropout > 0.0:
            dropout_rng = _require_rngs(rngs).dropout()
        out = attention.attend(
            q, k, v, segment_ids=segment_ids, impl=self.cfg.attention_impl, dropout_rate=self.cfg.attn_dropout, dropout_rng=dropout_rng,
        )  # [B, T, N, H]
        return self.dense(out), None


class MLP(nnx.Module):
    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        self.fc1 = Projection("BTD,DF->BTF", (d, f), ("embed", "mlp"), (f,), ("mlp",),
                              ("act_batch", "act_length", "act_mlp"), cfg, rngs=rngs)
        self.fc2 = Projection("BTF,FD->BTD", (f, d), ("mlp", "embed"), (d,), ("embed",), ACTIVATION_AXES, cfg, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))  # gelu_new = tanh approximation


class ParallelBlock(nnx.Module):
    """`h = LN(x); x + dropout(Attention(h)) + dropout(MLP(h))` (GPT-J style, one LayerNorm)."""

    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        self.ln = _layer_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.resid_dropout = nnx.Dropout(cfg.resid_dropout)

    def __call__(self, x, cos, sin, segment_ids, cache: LayerCache | None, *, deterministic, rngs):
        h = self.ln(x)
        a, cache = self.attn(h, cos, sin, segment_ids, cache, deterministic=deterministic, rngs=rngs)
        m = self.mlp(h)
        a = self.resid_dropout(a, deterministic=deterministic, rngs=rngs)
        m = self.resid_dropout(m, deterministic=deterministic, rngs=rngs)
        return x + a + m, cache


def _block_without_cache(remat: str, deterministic: bool):
    """`f(layer, x, cos, sin, segment_ids, rngs) -> x`: one block without a cache (training, evaluation, and the
    forward of every caller without a cache), wrapped in `nnx.remat` with the config's policy unless it is "none".
    nnx.remat traces positional arguments only, so `deterministic`, a Python bool, is closed over here."""

    def run(layer, x, cos, sin, segment_ids, rngs):
        return layer(x, cos, sin, segment_ids, None, deterministic=deterministic, rngs=rngs)[0]

    return run if remat == "none" else nnx.remat(run, policy=REMAT_POLICIES[remat])


def _require_rngs(rngs):
    if rngs is None:
        raise ValueError("dropout is on (deterministic=False) but no rngs were given: pass rngs=nnx.Rngs(dropout=key)")
    return rngs


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Output:
    """What `Phi` returns, read by name. Under jit, XLA drops what a caller leaves unread: generation's prefill and
    data_gen's embeddings read `hidden` only, so the [B, T, V] logits are never computed there."""

    logits: Array  # [B, T, V] fp32
    hidden: Array  # [B, T, D] fp32: the final LayerNorm's output, `lm_head`'s input
    cache: KVCache | None  # the cache with the new tokens written (`index` advanced by T); None without a cache


class Phi(nnx.Module):
    """The phi-1 decoder. Parameter layout mirrors Hugging Face Phi (see phi1_jax.convert)."""

    def __init__(self, cfg: PhiConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        self.embed_dropout = nnx.Dropout(cfg.embed_dropout)
        self.layers = nnx.List([ParallelBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_ln = _layer_norm(cfg, rngs)
        self.lm_head = Projection(
            "BTD,DV->BTV", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), (cfg.vocab_size,), ("vocab",),
            ("act_batch", "act_length", "act_vocab"), cfg, rngs=rngs,
        )

    def __call__(
        self,
        input_ids: Array,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Output:
        """input_ids [B, T] int -> `Output`: logits [B, T, V] and the final hidden states [B, T, D], both fp32, and
        the updated cache when `cache` is given.

        segment_ids [B, T]: >= 1 for tokens, 0 for padding; attention stays within one segment id (packed documents
        never see each other). Default: all ones. positions [B, T]: rotary positions; default: restart at 0 with
        each new segment id, offset by the number of cached tokens when decoding. With a cache, the T new tokens are
        written at slots [index, index + T) and attend to every filled slot of the same segment up to their own.
        """
        cfg = self.cfg
        b, t = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
            if cache is not None:
                positions = positions + cache.index
        cos, sin = rotary_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta)  # [B, T, R]

        x = jnp.take(self.embed[...], input_ids, axis=0).astype(cfg.compute_dtype)  # [B, T, D]
        x = self.embed_dropout(x, deterministic=deterministic, rngs=rngs)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        if cache is None:
            run_block = _block_without_cache(cfg.remat, deterministic)
            for layer in self.layers:
                x = nn.with_logical_constraint(run_block(layer, x, cos, sin, segment_ids, rngs), ACTIVATION_AXES)
        else:
            kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache.index))  # [B, S]
            written = []
            for i, layer in enumerate(self.layers):
                layer_cache = LayerCache(k=cache.k[i], v=cache.v[i], segment_ids=kv_segment_ids, index=cache.index,
                                         window=cache.window)
                x, layer_cache = layer(x, cos, sin, segment_ids, layer_cache, deterministic=deterministic, rngs=rngs)
                x = nn.with_logical_constraint(x, ACTIVATION_AXES)
                written.append(layer_cache)
            cache = KVCache(k=tuple(c.k for c in written), v=tuple(c.v for c in written), segment_ids=kv_segment_ids,
                            index=cache.index + t, window=cache.window)

        hidden = self.final_ln(x)  # [B, T, D]
        logits = self.lm_head(hidden).astype(jnp.float32)  # [B, T, V]
        return Output(logits=logits, hidden=hidden.astype(jnp.float32), cache=cache)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers that need no weights
# ---------------------------------------------------------------------------------------------------------------------


def abstract_model(cfg: PhiConfig) -> Phi:
    """The model with `jax.ShapeDtypeStruct`s instead of arrays: nothing is allocated."""
    return nnx.eval_shape(lambda: Phi(cfg, rngs=nnx.Rngs(0)))


def count_params(model: Phi) -> int:
    """Number of parameters (works on an abstract model)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def logical_axes(model: Phi) -> dict:
    """Flat {param path: logical axis names} for every parameter."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[path] = var.get_metadata().get("out_sharding")
    return out
