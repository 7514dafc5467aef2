"""Test-wide setup: a private cache for the embedded corpus (subprocesses inherit it), built once per session."""

import os
import tempfile

os.environ.setdefault("PHI1_JAX_CACHE", tempfile.mkdtemp(prefix="phi1_jax_test_cache."))
# Tests never load weights or data sets from a hub: a name that is not local fails at once instead of reaching out.
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
# The Ray clusters tests start listen on this machine only and run without token authentication; Ray reads this once
# per process, at import, so it is set before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded():
    from phi1_jax import embedded_corpus

    return embedded_corpus.build(2048, progress=False)


@pytest.fixture(scope="session")
def tok(embedded):
    return embedded.tokenizer()


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on this machine (tests/ray_cluster.py), this process connected to it as a driver; the
    data tools run inside it use it rather than starting their own. Every process of it ends with the session."""
    from tests.ray_cluster import TwoNodeCluster

    cluster = TwoNodeCluster()
    try:
        cluster.connect()
        yield cluster
    finally:
        import ray

        ray.shutdown()
        left = cluster.stop()
        assert not left, f"Ray processes of the test cluster outlived it: {left}"
