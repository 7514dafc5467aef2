"""Test-wide setup: a private cache for the embedded corpus (subprocesses inherit it), built once per session."""

import os
import tempfile

os.environ.setdefault("PHI1_JAX_CACHE", tempfile.mkdtemp(prefix="phi1_jax_test_cache."))
# Tests never load weights or data sets from a hub: a name that is not local fails at once instead of reaching out.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded():
    from phi1_jax import embedded_corpus

    return embedded_corpus.build(2048, progress=False)


@pytest.fixture(scope="session")
def tok(embedded):
    return embedded.tokenizer()
