"""The JSONL-in, JSONL-out conventions that phi1_jax.data_gen.dedup and phi1_jax.data_gen.decontaminate share.

Each input file's surviving records go to OUT/<its file name>, whole or absent (phi1_jax.files: a temporary file, then
a rename), so the inputs must have distinct names and no output may overwrite an input. Every record must hold a string
field (`text` by default); a malformed line or a missing field is an error naming the file and line (the readers are
phi1_jax.data_gen.engine's: each Ray task reads its own chunk of lines).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from phi1_jax import files
from phi1_jax.errors import UserError


class RecordsError(UserError, ValueError):
    """Bad input or output paths, or a bad record; the message names it."""


def check_outputs(inputs: list[Path], out: Path) -> None:
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise RecordsError(f"inputs must have distinct file names (outputs are OUT/<name>): {names}")
    if clash := [str(i) for i in inputs if (out / i.name).resolve() == i.resolve()]:
        raise RecordsError(f"--out={out} would overwrite the input(s) {clash}; choose another folder")


def write_records(path: Path, records: Iterable[dict]) -> None:
    """`records` (any iterable: the tools stream theirs) as the JSONL file `path`, whole or absent."""
    with files.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:  # streamed: no second copy in memory
        for r in records:
            f.write(json.dumps(r) + "\n")
