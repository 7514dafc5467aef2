"""phi1_jax: phi-1 ("Textbooks Are All You Need") in JAX/Flax.

The model classes are imported lazily, so light submodules (`phi1_jax.jsonl`, used by the data_gen tools) do not pay
for importing JAX.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__all__ = ["KVCache", "Output", "Phi", "PhiConfig"]

# Commands whose documented name is not their module's: `python -m phi1_jax.inspect` runs phi1_jax/inspect_model.py
# (no module is named like a standard-library one; a phi1_jax/inspect.py shadowed the stdlib's `inspect` for any
# Python started inside phi1_jax/).
COMMANDS = {"phi1_jax.inspect": "inspect_model"}


class _CommandFinder(importlib.abc.MetaPathFinder):
    """Finds a COMMANDS name as its module's file, for `python -m`; consulted after every ordinary finder."""

    def find_spec(self, name, path=None, target=None):
        if name not in COMMANDS:
            return None
        return importlib.util.spec_from_file_location(name, Path(__file__).with_name(COMMANDS[name] + ".py"))


if not any(isinstance(f, _CommandFinder) for f in sys.meta_path):
    sys.meta_path.append(_CommandFinder())


def __getattr__(name):
    if name in __all__:
        from phi1_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'phi1_jax' has no attribute {name!r}")
