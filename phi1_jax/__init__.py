"""phi1_jax: phi-1 ("Textbooks Are All You Need") in JAX/Flax."""

from phi1_jax.model import KVCache, Phi, PhiConfig

__all__ = ["KVCache", "Phi", "PhiConfig"]
