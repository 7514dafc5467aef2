"""Model sources by name: a local path, or a Hugging Face hub id (ORG/NAME) through `huggingface_hub`.

A path that exists always wins over an id. An id is fetched with `huggingface_hub.snapshot_download` into its cache
(`HF_HOME` / `HF_HUB_CACHE`), at `revision` (a branch, tag or commit; default main), taking only what a Phi model
needs (config, safetensors weights and their index, tokenizer files), with its progress bars. With the hub off
(`HF_HUB_OFFLINE=1`) a cached snapshot is used as it is, and an id that is not cached is one clear error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from phi1_jax.errors import UserError

# What from_hf and the tokenizer read; nothing else of a repository is downloaded (no PyTorch .bin, no README assets).
FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
         "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(UserError, ValueError):
    """A model source that is neither a local path nor a hub id that can be had; the message says why."""


def is_hub_id(source: str) -> bool:
    """ORG/NAME as the hub accepts it, and no local path of that name."""
    if not _HUB_ID.match(str(source)) or Path(source).exists():
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(source))
    except HFValidationError:  # 'a/b--c', 'a/b.', ...: a mistyped path, not an id
        return False
    return True


def resolve(source: str | os.PathLike, revision: str | None = None) -> Path:
    """The local directory for `source`: the path itself if it exists, else the hub id's snapshot (downloaded once)."""
    path = Path(source)
    if path.exists():
        return path
    if not is_hub_id(str(source)):
        raise HubError(f"{source}: does not exist (give a trainer workdir, a checkpoint or Hugging Face directory, or a "
                       "hub id ORG/NAME)")
    from huggingface_hub import constants, errors, snapshot_download

    head = f"{source}: no such local path; as a Hugging Face hub id,"
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=FILES))
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        why = "the hub is off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise HubError(f"{head} it is not in the cache ({constants.HF_HUB_CACHE}) and {why}") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{head} no such model (or a private one: log in with `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{head} no revision {revision!r}") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{head} the hub answered {e}") from None
