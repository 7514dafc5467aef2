"""phi1_jax: phi-1 ("Textbooks Are All You Need") in JAX/Flax.

The model classes are imported lazily, so light submodules (`phi1_jax.jsonl`, used by the data_gen tools) do not pay
for importing JAX.
"""

__all__ = ["KVCache", "Output", "Phi", "PhiConfig"]


def __getattr__(name):
    if name in __all__:
        from phi1_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'phi1_jax' has no attribute {name!r}")
