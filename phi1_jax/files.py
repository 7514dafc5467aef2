"""Files that are whole or absent: every result the project writes under a name a reader may open at any moment.

A run can be killed mid-write (SIGKILL, a preempted host), and a notebook or `python -m phi1_jax.evals` may read while a trainer
writes. So a file is written to a temporary name beside its own (same folder, so the rename cannot cross filesystems;
same suffix, so writers that go by it, such as matplotlib, pick the format) and renamed over the real name in one
step: a reader sees the old file or the new one, never half of one, and a failure leaves the old one and no
temporary file (`replacing`, `write_text`, `write_jsonl`).

Files that grow as results come (generated samples, records) are appended to instead (`appending`): each batch of
lines is one write, flushed and fsynced, so a kill loses at most the batch in flight, and a rerun first drops a last
line the kill cut off (`drop_cut_last_line`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, durable: bool = False, concurrent: bool = False) -> Iterator[Path]:
    """`with replacing(path) as tmp: <write tmp>`: on a clean exit tmp replaces `path`; on an error it is removed.

    durable: fsync the file and its folder too, for files a crash must not roll back (metrics rows a resumed run
    trusts); results that are simply remade on a rerun skip the cost.
    concurrent: processes may write `path` at the same time (each writes a temp name of its own, with its process
    id; the last rename wins). Without it the temp name is fixed, so one a SIGKILL left is replaced by the next
    write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}" if concurrent else
                         f".{path.stem}.tmp{path.suffix}")
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


@contextlib.contextmanager
def new_directory(path: str | os.PathLike) -> Iterator[Path]:
    """`with new_directory(path) as tmp: <fill tmp>`: on a clean exit the folder tmp becomes `path` in one rename, so
    `path` exists only whole; on an error tmp is removed. If `path` appeared meanwhile (another process built the same
    thing first), that one is kept and tmp is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_jsonl(path: str | os.PathLike, records: Iterable, *, durable: bool = False) -> Path:
    """One JSON line per record as the whole content of `path`, replaced in one step (see `replacing`)."""
    with replacing(path, durable=durable) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return Path(path)


class Appender:
    """Whole lines appended to a file (made if missing): each `write_lines` / `write_jsonl` call is one write,
    flushed and (durable) fsynced before it returns. Use as a context manager, or `close()` it."""

    def __init__(self, path: str | os.PathLike, *, durable: bool = True):
        self.path, self.durable = Path(path), durable
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write_lines(self, lines: Iterable[str]) -> None:
        """Each line gets a newline if it has none; all of them go in one write."""
        text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
        if text:
            self._file.write(text)
            self._file.flush()
            if self.durable:
                os.fsync(self._file.fileno())

    def write_jsonl(self, records: Iterable) -> None:
        self.write_lines(json.dumps(record) for record in records)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def appending(path: str | os.PathLike, *, durable: bool = True) -> Appender:
    """`with appending(path) as out: out.write_jsonl(batch)`: see `Appender`."""
    return Appender(path, durable=durable)


def drop_cut_last_line(path: str | os.PathLike) -> bool:
    """Truncates a last line that has no newline (a write a kill cut off) so that appending goes on from whole lines;
    True if one was dropped. A missing file is left missing."""
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        # the last newline: read back in blocks (a samples file can be large)
        end, block = size, 1 << 16
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return True
            end = start
        f.truncate(0)
        return True


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
