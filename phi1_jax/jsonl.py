"""Reading JSONL with errors that name the line: shared by the shard writer, the eval tasks and the sample reader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, object]]:
    """Yields ("path:line", record) for every non-blank line; a malformed line raises `error` naming it."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: malformed JSON line ({e.msg} at column {e.colno})") from None
