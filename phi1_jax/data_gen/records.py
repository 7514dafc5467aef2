"""The JSONL-in, JSONL-out conventions that phi1_jax.data_gen.dedup and phi1_jax.data_gen.decontaminate share.

Each input file's surviving records go to OUT/<its file name>, written atomically (a temporary file, then a rename),
so the inputs must have distinct names and no output may overwrite an input. Every record must hold a string field
(`text` by default); a malformed line or a missing field is an error naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi1_jax.errors import UserError
from phi1_jax.jsonl import read_jsonl


class RecordsError(UserError, ValueError):
    """Bad input or output paths, or a bad record; the message names it."""


def check_outputs(inputs: list[Path], out: Path) -> None:
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise RecordsError(f"inputs must have distinct file names (outputs are OUT/<name>): {names}")
    if clash := [str(i) for i in inputs if (out / i.name).resolve() == i.resolve()]:
        raise RecordsError(f"--out={out} would overwrite the input(s) {clash}; choose another folder")


def read_records(path: Path, text_field: str) -> list[dict]:
    if not path.exists():
        raise RecordsError(f"{path}: input not found")
    records = []
    for where, rec in read_jsonl(path, RecordsError):
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise RecordsError(f"{where}: record has no string field {text_field!r}")
        records.append(rec)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
