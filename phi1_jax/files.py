"""Files that are whole or absent: every result the project writes under a name a reader may open at any moment.

A run can be killed mid-write (SIGKILL, a preempted host), and a notebook or `python -m phi1_jax.evals` may read while a trainer
writes. So a file is written to a temporary name beside its own (same folder, so the rename cannot cross filesystems;
same suffix, so writers that go by it, such as matplotlib, pick the format) and renamed over the real name in one
step: a reader sees the old file or the new one, never half of one, and a failure leaves the old one and no
temporary file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """`with replacing(path) as tmp: <write tmp>`: on a clean exit tmp replaces `path`; on an error it is removed.

    durable: fsync the file and its folder too, for files a crash must not roll back (metrics rows a resumed run
    trusts); results that are simply remade on a rerun skip the cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """`text` (UTF-8) as the whole content of `path`, replaced in one step (see `replacing`)."""
    with replacing(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Makes a rename in `directory` durable, where the platform allows opening a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
