"""One top-level import name (`phi1_jax`), Hugging Face's `kernels` never shadowed, and environments equal to the lock.

A top-level `kernels/` in this repository once shadowed Hugging Face's `kernels` package (which transformers imports)
whenever the repository root was on sys.path, and broke every fresh install; `evals` and `configs` are PyPI names too.
"""

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_the_wheel_installs_one_top_level_name(tmp_path):
    """Builds the wheel from a copy of what setuptools packages and reads its file list: one top-level name."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "phi1_jax", src / "phi1_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("configs", "tests", "scripts"):  # present beside the package, as in a checkout, and not to be packaged
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("phi1_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"phi1_jax"}, f"the wheel installs top-level names {sorted(tops)}"
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["phi1_jax"]
    for sub in ("kernels/flash_attention.py", "evals/__main__.py", "data_gen/dedup.py"):
        assert f"phi1_jax/{sub}" in names


def test_no_top_level_package_beside_phi1_jax_shadows_an_installed_one():
    """The repository root holds no importable package but phi1_jax and configs (a folder of config files, loaded by
    path; `from configs import tiny` is how tests and notebooks started at the root reach them)."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("*.py")}
    assert packages <= {"phi1_jax", "configs", "tests"}, f"top-level packages beside phi1_jax: {sorted(packages)}"


@pytest.mark.parametrize("name", ["tiny", "tiny_finetune", "tiny_fig2_1", "phi1_small", "phi1_finetune"])
def test_a_config_that_builds_on_another_loads_by_path_from_any_directory(tmp_path, name):
    """`--config=/abs/path/configs/tiny.py` from outside the repository: ml_collections loads the file by path, so a
    config that starts from another must find it beside itself (phi1_jax.config_files.sibling), not as `configs`."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('cfg', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); c = m.get_config(); "
            "print(c.model.vocab_size, c.batch_size)")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / f"{name}.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.split()) == 2


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is installed in the Python 3.11 lane only (the parity extra)")
def test_hugging_face_kernels_is_found_from_the_repository_root():
    """From the repository root (as pytest and every `python -m` run), `kernels` is Hugging Face's, in site-packages,
    and transformers' Phi imports; the project's kernel is phi1_jax.kernels."""
    assert importlib.util.find_spec("kernels") is not None, "transformers' `kernels` dependency is not installed here"
    code = ("import transformers, kernels; from transformers import PhiForCausalLM; print(kernels.__file__); "
            "import phi1_jax.kernels.flash_attention as fa; print(fa.flash_attention.__module__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kernels_file, module = r.stdout.split()
    assert "site-packages" in kernels_file and not Path(kernels_file).is_relative_to(ROOT / "phi1_jax"), kernels_file
    assert module == "phi1_jax.kernels.flash_attention"


def _lock_used() -> Path | None:
    stamp = Path(sys.prefix) / ".phi1_jax_installed"
    name = stamp.read_text().strip() if stamp.exists() else ""
    return ROOT / name if name.startswith("requirements/") else None


@pytest.mark.skipif(_lock_used() is None, reason="this environment was not installed from a lock (LOCK=none, or by hand)")
def test_the_environment_is_exactly_its_lock():
    """scripts/setup.sh installed exactly the versions the lock names: what CI passed with is what a fresh machine gets."""
    lock = _lock_used()
    pins = dict(re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line).groups()
                for line in lock.read_text().splitlines() if line and not line.startswith("#"))
    assert "transformers" in pins or sys.version_info >= (3, 12), "the 3.11 lock pins transformers (the parity extra)"
    wrong = {}
    for name, version in pins.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "not installed"
        if have.split("+")[0] != version:
            wrong[name] = (version, have)
    assert not wrong, f"installed versions differ from {lock.name} (pinned, installed): {wrong}"


def test_ray_processes_do_not_build_a_grammar_on_import():
    """`import ray` (every Ray process: the driver, each worker, Ray's agents) does not import rfc3987-syntax, whose
    import builds a lark grammar: 1.2 s of CPU per process. jsonschema's format-nongpl extra, which jupyter-server asks
    for, brings it from jsonschema 4.25 on; pyproject.toml holds jsonschema below that."""
    code = "import sys, ray; print(sorted(m for m in ('rfc3987_syntax', 'lark') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == "[]", (
        f"`import ray` imported {r.stdout.strip()} (jsonschema {importlib.metadata.version('jsonschema')}): reinstall "
        "with scripts/setup.sh in a fresh venv, or `pip uninstall rfc3987-syntax`")
