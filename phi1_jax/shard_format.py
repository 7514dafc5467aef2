"""The shard format: pre-tokenized ArrayRecord shards plus a manifest; written here and read here.

`python -m phi1_jax.data_gen.shards` is the command that turns a corpus into shards; the loader (phi1_jax.data), the embedded
corpus and the benchmarks use this module directly, so the library never imports the tools above it.

Layout of a shard directory:
  shard-00000.arrayrecord ...  one record per document: a little-endian uint32 (prompt tokens) then the token ids in
                               the smallest unsigned type that fits the vocab (manifest `dtype`); no EOS (the loader
                               puts EOS between documents)
  shard-00000.json ...         that shard's document and token counts
  run.json                     what this directory is being built from (source, tokenizer fingerprint, sharding)
  manifest.json                written last: the totals and the shard list; its presence means complete

Writing is atomic and resumable: a shard is written under a temporary name, its stats file is renamed into place,
then the shard. A killed run leaves no shard that looks complete, and a rerun skips the shards already finished (it
reads their documents again but does not tokenize them) and produces byte-identical shards.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phi1_jax import files
from phi1_jax.errors import UserError

FORMAT_VERSION = 1
HEADER = struct.Struct("<I")  # prompt tokens
MANIFEST, RUN_FILE = "manifest.json", "run.json"


class ShardError(UserError, ValueError):
    """Bad input or a shard directory that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Document:
    text: str
    prompt: str = ""  # leading part of `text` that is context, not target (exercises)
    where: str = ""  # file or file:line, for error messages


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def encode_record(prompt_len: int, ids, dtype) -> bytes:
    return HEADER.pack(prompt_len) + np.asarray(ids, dtype=dtype).tobytes()


def decode_record(record: bytes, dtype) -> tuple[int, np.ndarray]:
    (prompt_len,) = HEADER.unpack_from(record)
    return prompt_len, np.frombuffer(record, dtype=dtype, offset=HEADER.size)


# ---------------------------------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, obj) -> None:
    files.write_text(path, json.dumps(obj, indent=2) + "\n")


def _encode_documents(tokenizer, docs: list[Document], num_threads: int):
    prompts = tokenizer.encode_batch([d.prompt for d in docs], num_threads) if any(d.prompt for d in docs) else None
    bodies = tokenizer.encode_batch([d.text[len(d.prompt):] for d in docs], num_threads)
    if prompts is None:
        return [(0, b) for b in bodies]
    return [(len(p), p + b) for p, b in zip(prompts, bodies)]


def _write_shard(path: Path, records: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    with files.replacing(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1")  # group_size 1: cheap random access for global shuffles
        for r in records:
            writer.write(r)
        writer.close()


def run_spec(tokenizer, *, source_name: str, input_desc: str, docs_per_shard: int) -> dict:
    """What a shard directory is built from (its run.json): two runs into one directory must agree on it."""
    return {"format_version": FORMAT_VERSION, "source": source_name, "input": input_desc,
            "tokenizer": str(tokenizer.path), "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "dtype": token_dtype(tokenizer.vocab_size).name, "docs_per_shard": docs_per_shard}


def start_run(out_dir: str | os.PathLike, run: dict) -> dict | None:
    """Checks `out_dir` against `run` (a directory of another run is refused, untouched) and records `run` there;
    returns the manifest if the directory is already complete, else None."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        diff = {k: (previous.get(k), v) for k, v in run.items() if k != "tokenizer" and previous.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise ShardError(f"{out} holds shards of another run ({detail}); use a new --out directory")
        if (out / MANIFEST).exists():
            return json.loads((out / MANIFEST).read_text())
    else:
        if any(out.glob("shard-*")):
            raise ShardError(f"{out} holds shard files but no {RUN_FILE}; use a new --out directory")
        _write_json_atomic(run_file, run)
    return None


def write_shard(out_dir: str | os.PathLike, index: int, documents: list[Document], tokenizer,
                num_threads: int = -1) -> tuple[dict, int]:
    """Shard `index` of `out_dir` from `documents` (its stats, and the tokens newly written: 0 when the shard was
    already finished and is kept as it is). The one shard writer: `write_shards` calls it in a loop, the shards
    command in Ray tasks (phi1_jax.data_gen.shards)."""
    out = Path(out_dir)
    name = f"shard-{index:05d}.arrayrecord"
    stats_path, shard_path = out / f"shard-{index:05d}.json", out / name
    if shard_path.exists() and stats_path.exists():
        return json.loads(stats_path.read_text()), 0
    dtype = token_dtype(tokenizer.vocab_size)
    encoded = _encode_documents(tokenizer, documents, num_threads)
    records = [encode_record(p, ids, dtype) for p, ids in encoded]
    stats = {"file": name, "documents": len(records), "tokens": int(sum(len(ids) for _, ids in encoded))}
    _write_json_atomic(stats_path, stats)  # stats first: a shard file that exists always has its stats
    _write_shard(shard_path, records)
    return stats, stats["tokens"]


def finish_run(out_dir: str | os.PathLike, run: dict, shards: list[dict], *, seconds: float, new_tokens: int) -> dict:
    """The manifest of a directory whose shards are all written (`shards`: their stats in order), written last."""
    if not shards:
        raise ShardError(f"{run['input']}: the corpus is empty (no documents)")
    manifest = {**run, "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                "shards": shards, "write_seconds": round(seconds, 3), "new_tokens": new_tokens}
    _write_json_atomic(Path(out_dir) / MANIFEST, manifest)
    return manifest


def write_shards(documents: Iterable[Document], tokenizer, out_dir: str | os.PathLike, *, source_name: str,
                 input_desc: str, docs_per_shard: int = 10_000, num_threads: int = -1, progress: bool = True,
                 on_shard: Callable[[dict], None] | None = None) -> dict:
    """Tokenizes `documents` into `out_dir` in this process; returns the manifest. Resumes a run that was
    interrupted. `on_shard(stats)`, if given, is called after each new shard is written. (The shards command runs
    the same `write_shard` per shard as Ray tasks.)"""
    run = run_spec(tokenizer, source_name=source_name, input_desc=input_desc, docs_per_shard=docs_per_shard)
    if (done := start_run(out_dir, run)) is not None:
        return done

    from tqdm import tqdm

    shards, t0, new_tokens = [], time.perf_counter(), 0
    docs = iter(documents)
    bar = tqdm(desc=f"shards {source_name}", unit="doc", disable=not progress, mininterval=1.0)
    for index in itertools.count():
        batch = list(itertools.islice(docs, docs_per_shard))
        if not batch:
            break
        stats, new = write_shard(out_dir, index, batch, tokenizer, num_threads)
        new_tokens += new
        if new and on_shard is not None:
            on_shard(stats)
        shards.append(stats)
        bar.update(len(batch))
        bar.set_postfix(tokens=sum(s["tokens"] for s in shards))
    bar.close()
    return finish_run(out_dir, run, shards, seconds=time.perf_counter() - t0, new_tokens=new_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a shard directory back
# ---------------------------------------------------------------------------------------------------------------------


def read_manifest(shard_dir: str | os.PathLike, *, tokenizer_fingerprint: str | None = None) -> dict:
    """The manifest of a complete shard directory, checked against the files and (optionally) the tokenizer."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not shard_dir.is_dir():
        raise ShardError(f"{shard_dir}: shard directory not found")
    if not path.exists():
        hint = " (an unfinished run: rerun phi1_jax.data_gen.shards to finish it)" if (shard_dir / RUN_FILE).exists() else ""
        raise ShardError(f"{path}: not found{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    if tokenizer_fingerprint is not None and manifest["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise ShardError(
            f"{path}: shards were tokenized with another tokenizer ({manifest['tokenizer']}, fingerprint "
            f"{manifest['tokenizer_fingerprint']}) than the one in use (fingerprint {tokenizer_fingerprint})"
        )
    for s in manifest["shards"]:
        if not (shard_dir / s["file"]).exists():
            raise ShardError(f"{shard_dir / s['file']}: listed in {path} but missing")
    return manifest
