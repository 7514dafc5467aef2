"""The one attention switch: every layer calls `attend`, which picks the implementation.

Implementations:
  xla    plain einsums, softmax in fp32 (Hugging Face Phi's numerics); the reference, and the decode path always.
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16). It takes no segment ids, so packed
         documents go in as a dense [B, 1, T, S] mask; it has no dropout, so attention dropout > 0 is refused.
  pallas the project's flash-attention kernel (phi1_jax/kernels/flash_attention.py): training and prefill without a cache,
         attention dropout included (its mask is a hash of a seed drawn from the dropout RNG, so it differs from the
         xla path's mask but has the same distribution). Interpreted (`interpret=True`) when compiling for a CPU,
         compiled through Triton / Mosaic when compiling for a GPU / TPU: the platform is the devices' of the mesh
         being traced for (`compile_platform`), so a step compiled on a CPU host for a GPU target
         (phi1_jax.gpu_plan) gets the Triton kernel, not the interpreter.
Decoding with a KV cache always takes the xla path (`cached_attention`: one query row per step, nothing for a flash
kernel to tile).

Shapes: q, k, v [B, T, N, H] and segment_ids [B, T] for `attend`; the KV cache is [B, N, S, H] (`cached_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")


def make_mask(q_segment_ids, kv_segment_ids, q_offset=0):
    """[B, 1, T, S] bool: key s is visible to query t iff s <= q_offset + t (causal) and both share a segment id.

    `q_offset` is the slot of the first query in the key sequence (the cache index when decoding). Padding (segment
    id 0) only sees padding, which keeps every softmax row finite; the loss masks those rows out.
    """
    t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    q_idx = q_offset + jnp.arange(t, dtype=jnp.int32)[:, None]  # [T, 1]
    k_idx = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S]
    causal = k_idx <= q_idx  # [T, S]
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
    return (causal[None] & same_segment)[:, None]  # [B, 1, T, S]


def _probs(q, k, mask, k_layout: str):
    """[B, N, T, S] softmax probabilities, logits and softmax in fp32; k_layout "BSNH" or "BNSH" (the KV cache)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum(f"BTNH,{k_layout}->BNTS", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)


def xla_attention(q, k, v, mask, *, dropout_rate=0.0, dropout_rng=None):
    """Reference attention: fp32 logits and softmax, probabilities cast back to v's dtype as Hugging Face does."""
    probs = _probs(q, k, mask, "BSNH")
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)


def cached_attention(q, k, v, mask):
    """Decoding on the KV cache: q [B, T, N, H], k/v [B, N, S, H] (heads-major) -> [B, N, T, H] in v's dtype.

    The same numerics as `xla_attention`; the layout lets the batched dots run over (B, N) without copying the cache
    into another layout at every step (which XLA:CPU otherwise does: most of a decode step's time).
    """
    return jnp.einsum("BNTS,BNSH->BNTH", _probs(q, k, mask, "BNSH").astype(v.dtype), v)


def cudnn_attention(q, k, v, mask, *, implementation="cudnn"):
    """`jax.nn.dot_product_attention` with the segment/causal mask; `implementation` is a parameter for tests."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, implementation=implementation)


def training_problem(impl: str, head_dim: int, attn_dropout: float) -> str | None:
    """Why `impl` cannot train a model of this head_dim and attention dropout (None: it can). Checked when a training
    config is built, so the run is refused in one line before anything compiles, not in a traceback from the kernel."""
    if impl == "pallas":
        from phi1_jax.kernels.flash_attention import SUPPORTED_HEAD_DIMS

        if head_dim not in SUPPORTED_HEAD_DIMS:
            return (f"attention_impl='pallas' runs head_dim {', '.join(map(str, SUPPORTED_HEAD_DIMS))}; this model's "
                    f"is {head_dim}: use attention_impl='xla' or 'cudnn'")
    if impl == "cudnn" and attn_dropout > 0:
        return ("attention_impl='cudnn' has no attention dropout; set model.attn_dropout=0 or use attention_impl="
                "'pallas' or 'xla'")
    return None


def compile_platform() -> str:
    """"cpu", "gpu" or "tpu": what the code being traced will run on. That is the platform of the mesh it is traced
    under when there is one (jax.sharding.use_abstract_mesh, as step.build's jitted steps do), which differs from
    JAX's default backend when a CPU host compiles for a GPU it lacks; otherwise JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def attend(q, k, v, *, segment_ids, impl="xla", dropout_rate=0.0, dropout_rng=None):
    """Causal, segment-masked self-attention without a cache (training, prefill, evaluation).

    q, k, v [B, T, N, H], segment_ids [B, T] -> [B, T, N, H] in v's dtype. (Decoding uses `cached_attention`.)"""
    no_dropout = dropout_rng is None or dropout_rate == 0.0
    if impl == "cudnn" and not no_dropout:  # step.build refuses such a config first; a direct caller gets this
        raise ValueError(training_problem(impl, q.shape[-1], dropout_rate))
    if impl == "pallas":
        from phi1_jax.kernels.flash_attention import flash_attention

        seed = None if no_dropout else jax.random.bits(dropout_rng, (), jnp.uint32)  # the kernel hashes its mask
        platform = compile_platform()
        return flash_attention(q, k, v, segment_ids=segment_ids, causal=True, interpret=platform == "cpu",
                               backend=platform,
                               dropout_rate=0.0 if no_dropout else dropout_rate, dropout_seed=seed)
    mask = make_mask(segment_ids, segment_ids)
    if impl == "xla":
        return xla_attention(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, mask)
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
