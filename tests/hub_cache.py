"""A Hugging Face hub cache laid out on disk, as huggingface_hub writes it, so tests load hub ids without a network:
HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/<commit>/<files>} (files copied, not the blob symlinks)."""

import hashlib
import shutil
from pathlib import Path


def add_to_cache(hf_home: Path, repo_id: str, files_from: Path, revision: str = "main") -> Path:
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in Path(files_from).iterdir():
        if f.is_file():
            shutil.copyfile(f, snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def offline_env(hf_home: Path) -> dict:
    return {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(Path(hf_home) / "hub"), "HF_HUB_OFFLINE": "1"}
