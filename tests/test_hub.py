"""Models by hub id (ORG/NAME) from a Hugging Face cache laid out on disk, with the hub off: never the network."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hub_cache import add_to_cache, offline_env

ROOT = Path(__file__).parents[1]
REPO_ID = "test-org/tiny-phi"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, embedded):
    """HF_HOME with REPO_ID cached: configs/tiny.py's model exported by to_hf, with the embedded corpus tokenizer."""
    from configs import tiny
    from phi1_jax.convert import to_hf
    from phi1_jax.model import Phi, PhiConfig

    root = tmp_path_factory.mktemp("hub")
    model = Phi(PhiConfig.from_dict(tiny.get_config().model), rngs=nnx.Rngs(3))
    to_hf(model, root / "export")
    shutil.copyfile(embedded.tokenizer_path, root / "export" / "tokenizer.model")
    add_to_cache(root / "hf", REPO_ID, root / "export")
    return root, model


def _run(hub_root, *args, cwd=ROOT):
    env = {**os.environ, **offline_env(hub_root / "hf")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_open_by_id_and_a_local_path_wins(hub, tmp_path, monkeypatch):
    from phi1_jax import loader
    from phi1_jax.convert import ConversionError, from_hf
    from phi1_jax.model import Phi

    root, model = hub
    for k, v in offline_env(root / "hf").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    ids = jnp.array([[5, 6, 7, 8, 9]])
    loaded = loader.open(REPO_ID)
    np.testing.assert_array_equal(np.asarray(loaded.model(ids).logits), np.asarray(model(ids).logits))
    assert loaded.format == loader.HUGGINGFACE and loaded.source == REPO_ID and loaded.step is None
    assert loaded.path.is_relative_to(root / "hf") and loaded.tokenizer is not None
    with pytest.raises(loader.LoadError, match="no checkpoint steps"):
        loader.open(REPO_ID, step=3)
    with pytest.raises(ConversionError, match="not a directory"):  # from_hf reads directories; ids go through open
        from_hf(REPO_ID)
    # another revision of the id: the model committed there
    from phi1_jax.convert import to_hf

    other = Phi(model.cfg, rngs=nnx.Rngs(4))
    to_hf(other, tmp_path / REPO_ID)
    add_to_cache(root / "hf", REPO_ID, tmp_path / REPO_ID, revision="v2")
    loaded = loader.open(REPO_ID, revision="v2")
    assert loaded.revision == "v2"
    np.testing.assert_array_equal(np.asarray(loaded.model(ids).logits), np.asarray(other(ids).logits))
    with pytest.raises(loader.LoadError, match="not in the cache"):
        loader.open(REPO_ID, revision="v9")
    # a directory at the same relative path is what loads: a local path always wins over an id
    monkeypatch.chdir(tmp_path)
    loaded = loader.open(REPO_ID)
    np.testing.assert_array_equal(np.asarray(loaded.model(ids).logits), np.asarray(other(ids).logits))
    assert loaded.path == Path(REPO_ID)
    with pytest.raises(loader.LoadError, match="a local path; a revision"):
        loader.open(REPO_ID, revision="main")
    with pytest.raises(loader.LoadError, match="not in the cache .* the hub is off"):
        loader.open("test-org/not-cached")


def test_evals_inspect_and_init_from_take_a_hub_id(hub, tmp_path):
    root, _ = hub
    out = tmp_path / "he.json"
    r = _run(root, "-m", "phi1_jax.evals", "--task=humaneval", f"--checkpoint={REPO_ID}", "--limit=2", "--max-new-tokens=8",
             f"--out={out}", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["checkpoint"] == REPO_ID and summary["n_samples"] == 2

    r = _run(root, "-m", "phi1_jax.inspect", REPO_ID, "--tokens=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Hugging Face model" in r.stdout and "embed" in r.stdout

    r = _run(root, "-m", "phi1_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'ft'}",
             f"--config.init_from={REPO_ID}", "--config.steps=2", "--config.log_every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialized parameters from {REPO_ID}" in r.stdout

    r = _run(root, "-m", "phi1_jax.evals", "--task=humaneval", "--checkpoint=test-org/not-cached", f"--out={out}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "not in the cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_serve_takes_a_hub_id(hub, monkeypatch):
    pytest.importorskip("starlette", reason="phi1_jax.serve needs starlette (pip install starlette uvicorn)")
    from tests.test_serve import Served

    root, _ = hub
    for k, v in offline_env(root / "hf").items():
        monkeypatch.setenv(k, v)  # the server process inherits them
    server = Served(REPO_ID)
    try:
        client = server.wait_ready().client()
        assert [m.id for m in client.models.list().data] == [REPO_ID]  # the served name is the --checkpoint value
        r = client.completions.create(model=REPO_ID, prompt="def add(a, b):", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.prompt_tokens > 0
    finally:
        server.stop()
