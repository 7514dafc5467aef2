"""Pre-tokenized ArrayRecord shards from a corpus, plus a manifest.

Command:
  python -m phi1_jax.data_gen.shards --input=DIR_OR_JSONL_OR_hf://NAME --tokenizer=TOK --out=SHARD_DIR [--source-name=code]
         [--text-field=text] [--prompt-field=prompt] [--glob='**/*.py'] [--docs-per-shard=10000] [--limit=N]
         [--ray-address=ADDR] [--num-cpus=N] [--no-progress]

Inputs: a folder (files matching --glob, in sorted order), a JSONL file (or a folder of *.jsonl with --glob) with a
text field, or `hf://owner/name` for a Hugging Face dataset streamed through `datasets` (--hf-split, --hf-config).
With --prompt-field, each record's text must start with that field's value (an exercise's signature and docstring);
the number of prompt tokens is stored so the loader can restrict the loss to the solution.

Output: a shard directory in the format of phi1_jax.shard_format (ArrayRecord shards, per-shard stats, run.json, and
manifest.json written last). Writing is atomic and resumable: a killed run leaves no shard that looks complete, and a
rerun skips the shards already finished and produces byte-identical shards.

It runs on Ray (phi1_jax.data_gen.engine: a local Ray by default, `--ray-address` for a cluster): the driver plans the
corpus in blocks of --docs-per-shard documents and one Ray task per block reads, tokenizes and writes its shard (a
killed worker's block is run again); the driver writes the manifest.

The format itself (records, manifest, writer, reader) lives in phi1_jax.shard_format; this module reads corpora into
documents (in blocks) and is the command line. Its names are re-exported here for the tools that used them from this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from phi1_jax import cli
from phi1_jax.data_gen import engine
from phi1_jax.shard_format import (  # noqa: F401  (re-exported: the format's names, for the tools that use this module)
    FORMAT_VERSION, HEADER, MANIFEST, RUN_FILE, Document, ShardError, decode_record, encode_record, read_manifest,
    token_dtype, write_shards)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a corpus, in blocks
# ---------------------------------------------------------------------------------------------------------------------
#
# A corpus is planned as blocks of a fixed number of documents (a shard's, a filter part's): the driver makes one
# streaming pass over the bytes (counting JSONL lines, checking that a folder's files are UTF-8) and holds offsets;
# a worker reads its block's documents itself (`read_block`). A hf:// dataset is streamed by the driver, so its blocks
# carry their documents. `iter_documents` is the same two steps in one process.


def _blank(raw: bytes) -> bool:
    """A JSONL line `jsonl.parse_line` skips as blank (Unicode whitespace only), without decoding ASCII lines."""
    return not raw.strip() or (not raw.isascii() and not raw.decode("utf-8", "replace").strip())


def _open_bytes(path: Path):
    import gzip

    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _document(rec, text_field, prompt_field, where) -> Document:
    if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
        raise ShardError(f"{where}: record has no string field {text_field!r}")
    text, prompt = rec[text_field], ""
    if prompt_field:
        prompt = rec.get(prompt_field)
        if not isinstance(prompt, str) or not text.startswith(prompt):
            raise ShardError(f"{where}: field {prompt_field!r} must be a string that {text_field!r} starts with")
    return Document(text, prompt, where)


def plan_blocks(source: str, block_docs: int, *, text_field: str = "text", prompt_field: str | None = None,
                glob: str | None = None, hf_split: str = "train", hf_config: str | None = None,
                limit: int | None = None) -> Iterator[dict]:
    """The corpus as blocks of `block_docs` documents (the last may be shorter), in the order `iter_documents`
    yields them: {"docs": n, "pieces": [...]}, each piece a run of JSONL lines {"jsonl": path, "start", "end",
    "first_line"} (byte offsets; into the decompressed stream for .gz), a whole file {"file": path}, or documents
    streamed from a hf:// dataset {"inline": [[text, prompt, where], ...]}. `limit` stops after that many documents."""
    if block_docs < 1:
        raise ShardError(f"blocks of {block_docs} documents: need at least 1")
    pieces: list[dict] = []
    count = total = 0

    def full() -> bool:
        return count == block_docs or (limit is not None and total >= limit)

    def cut() -> dict:
        nonlocal pieces, count
        block, pieces, count = {"docs": count, "pieces": pieces}, [], 0
        return block

    if source.startswith("hf://"):
        import datasets

        name = source[len("hf://"):]
        try:
            ds = datasets.load_dataset(name, hf_config, split=hf_split, streaming=True)
        except Exception as e:  # datasets raises many types (hub, connection, missing config)
            raise ShardError(f"{source}: cannot open Hugging Face dataset ({type(e).__name__}: {e})") from None
        inline: list = []
        for i, rec in enumerate(ds):
            if limit is not None and total >= limit:
                break
            d = _document(rec, text_field, prompt_field, f"{source}[{i}]")
            inline.append([d.text, d.prompt, d.where])
            count, total = count + 1, total + 1
            if full():
                pieces.append({"inline": inline})
                inline = []
                yield cut()
        if inline:
            pieces.append({"inline": inline})
        if count:
            yield cut()
        return
    path = Path(source)
    if not path.exists():
        raise ShardError(f"{path}: input not found (a folder, a .jsonl file, or hf://NAME for a Hugging Face dataset)")
    files = [path] if path.is_file() else sorted(p for p in path.glob(glob or "**/*") if p.is_file())
    for f in files:
        if limit is not None and total >= limit:
            break
        if path.is_file() or f.suffix == ".jsonl":
            start = pos = lineno = first_line = 0
            with _open_bytes(f) as stream:
                for raw in stream:
                    pos += len(raw)
                    lineno += 1
                    if _blank(raw):
                        continue
                    count, total = count + 1, total + 1
                    if full():
                        pieces.append({"jsonl": str(f), "start": start, "end": pos, "first_line": first_line})
                        start, first_line = pos, lineno
                        yield cut()
                        if limit is not None and total >= limit:
                            break
            if pos > start and (limit is None or total < limit or count):
                pieces.append({"jsonl": str(f), "start": start, "end": pos, "first_line": first_line})
            continue
        try:
            f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            print(f"warning: skipping {f}: not UTF-8", file=sys.stderr)
            continue
        pieces.append({"file": str(f)})
        count, total = count + 1, total + 1
        if full():
            yield cut()
    if count:
        yield cut()


def read_block(block: dict, *, text_field: str = "text", prompt_field: str | None = None) -> list[Document]:
    """The documents of one block of `plan_blocks` (errors name the file and line, as `read_jsonl`'s do)."""
    from phi1_jax import jsonl

    docs: list[Document] = []
    for piece in block["pieces"]:
        if "inline" in piece:
            docs += [Document(t, p, w) for t, p, w in piece["inline"]]
        elif "file" in piece:
            docs.append(Document(Path(piece["file"]).read_text(encoding="utf-8"), "", piece["file"]))
        else:
            path = Path(piece["jsonl"])
            with _open_bytes(path) as f:
                f.seek(piece["start"])
                data = f.read(piece["end"] - piece["start"])
            lines = data.split(b"\n")  # as a file iterates: on \n only
            if lines and not lines[-1]:
                lines.pop()
            for lineno, raw in enumerate(lines, piece["first_line"] + 1):
                where = f"{path}:{lineno}"
                rec = jsonl.parse_line(raw, where, ShardError)
                if rec is not jsonl.BLANK:
                    docs.append(_document(rec, text_field, prompt_field, where))
    if len(docs) != block["docs"]:  # the file changed since it was planned
        raise ShardError(f"{block['pieces'][0]}: {len(docs)} documents where the plan counted {block['docs']} "
                         "(was an input changed during the run?)")
    return docs


def iter_documents(source: str, *, text_field: str = "text", prompt_field: str | None = None, glob: str | None = None,
                   hf_split: str = "train", hf_config: str | None = None) -> Iterator[Document]:
    """Documents of a folder, a JSONL file or `hf://NAME`, in a deterministic order (its blocks, read in turn)."""
    for block in plan_blocks(source, 1024, text_field=text_field, prompt_field=prompt_field, glob=glob,
                             hf_split=hf_split, hf_config=hf_config):
        yield from read_block(block, text_field=text_field, prompt_field=prompt_field)


# ---------------------------------------------------------------------------------------------------------------------
# Shards on Ray
# ---------------------------------------------------------------------------------------------------------------------

_TOKENIZERS: dict = {}  # per worker process: path -> Tokenizer, loaded once


def _tokenizer(path: str, fingerprint: str):
    from phi1_jax.tokenizer import Tokenizer

    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer.load(path)
    tok = _TOKENIZERS[path]
    if tok.fingerprint != fingerprint:
        raise ShardError(f"{path}: the tokenizer changed during the run (fingerprint {tok.fingerprint}, the run's "
                         f"{fingerprint})")
    return tok


def _shard_task(batch: dict, *, out: str, tokenizer: str, fingerprint: str, text_field: str,
                prompt_field: str | None, num_threads: int) -> dict:
    """Ray stage (one block per call): read the block's documents, tokenize them and write its shard."""
    import json

    import numpy as np

    from phi1_jax import shard_format

    index, stats_out, new_out = [], [], []
    for k, plan in zip(batch["index"].tolist(), batch["plan"]):
        docs = read_block(json.loads(plan), text_field=text_field, prompt_field=prompt_field)
        stats, new = shard_format.write_shard(out, k, docs, _tokenizer(tokenizer, fingerprint), num_threads)
        index.append(k)
        stats_out.append(json.dumps(stats))
        new_out.append(new)
    return {"index": np.asarray(index, np.int64), "stats": np.asarray(stats_out, dtype=object),
            "new_tokens": np.asarray(new_out, np.int64)}


def shards_on_ray(source: str, tokenizer, out_dir: str | os.PathLike, *, source_name: str, input_desc: str,
                  docs_per_shard: int = 10_000, num_threads: int = 1, limit: int | None = None,
                  text_field: str = "text", prompt_field: str | None = None, glob: str | None = None, hf_split: str = "train",
                  hf_config: str | None = None, progress: bool = True, ray_address: str | None = None,
                  num_cpus: int | None = None, concurrency: int | None = None) -> dict:
    """The shards command's work, as a Ray Data pipeline (in an `engine.session`: a local Ray, `ray_address`'s
    cluster, or the one this process is already connected to): the corpus planned in blocks
    of `docs_per_shard` documents, one Ray task per block reading, tokenizing and writing its shard
    (`shard_format.write_shard`, whole or absent; a killed worker's block is simply run again), then the manifest in
    the driver. The shards equal `shard_format.write_shards`' byte for byte; a rerun skips the finished ones.
    `concurrency`: at most this many tasks at once (default: as many as the cluster has cores)."""
    import json
    import time

    import ray
    import ray.data
    from tqdm import tqdm

    from phi1_jax import shard_format
    from phi1_jax.data_gen import engine

    out = Path(out_dir)
    run = shard_format.run_spec(tokenizer, source_name=source_name, input_desc=input_desc,
                                docs_per_shard=docs_per_shard)
    if (done := shard_format.start_run(out, run)) is not None:
        return done
    blocks = list(plan_blocks(source, docs_per_shard, text_field=text_field, prompt_field=prompt_field, glob=glob,
                              hf_split=hf_split, hf_config=hf_config, limit=limit))
    if not blocks:
        raise ShardError(f"{input_desc}: the corpus is empty (no documents)")
    items = [{"index": k, "plan": json.dumps(b)} for k, b in enumerate(blocks)]
    stats: dict[int, dict] = {}
    new_tokens = 0
    with engine.session(ray_address, num_cpus, progress=False), engine.user_errors(), \
            tqdm(total=sum(b["docs"] for b in blocks), desc=f"shards {source_name}", unit="doc", disable=not progress,
                 mininterval=1.0) as bar:  # the stage's bar (Ray Data's are off)
        kwargs = {"out": str(out.resolve()), "tokenizer": str(Path(tokenizer.path).resolve()),
                  "fingerprint": tokenizer.fingerprint, "text_field": text_field, "prompt_field": prompt_field,
                  "num_threads": num_threads}
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _shard_task, batch_size=1, fn_kwargs=kwargs, compute=ray.data.TaskPoolStrategy(size=concurrency))
        t0 = time.perf_counter()  # write_seconds: the Ray stage, from a running Ray to its last shard
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for k, s, n in zip(batch["index"].tolist(), batch["stats"], batch["new_tokens"].tolist()):
                stats[k] = json.loads(s)
                new_tokens += n
                bar.update(stats[k]["documents"])
        seconds = time.perf_counter() - t0
    for stray in out.glob(".shard-*tmp*"):  # a temporary file a killed worker left (its block was written again)
        stray.unlink(missing_ok=True)
    return shard_format.finish_run(out, run, [stats[k] for k in range(len(blocks))],
                                   seconds=seconds, new_tokens=new_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.data_gen.shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a folder, a .jsonl file, or hf://owner/name")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer.json")
    p.add_argument("--out", required=True, help="shard directory to create or finish")
    p.add_argument("--source-name", default=None, help="name recorded in the manifest (default: the input's name)")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the document")
    p.add_argument("--prompt-field", default=None, help="field holding the leading prompt of each text (exercises)")
    p.add_argument("--glob", default=None, help="files to read from a folder (default: every file)")
    p.add_argument("--docs-per-shard", type=int, default=10_000)
    p.add_argument("--limit", type=int, default=None, help="stop after this many documents")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--hf-config", default=None)
    p.add_argument("--num-threads", type=int, default=-1,
                   help="tokenizer threads per Ray task (-1: one, the core each task holds)")
    engine.add_ray_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from phi1_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    if args.docs_per_shard < 1:
        raise ShardError(f"--docs-per-shard={args.docs_per_shard}: need at least 1")
    name = args.source_name or Path(args.input.rstrip("/")).name
    m = shards_on_ray(args.input, tokenizer, args.out, source_name=name, input_desc=args.input,
                      docs_per_shard=args.docs_per_shard, num_threads=max(args.num_threads, 1), limit=args.limit,
                      text_field=args.text_field, prompt_field=args.prompt_field, glob=args.glob,
                      hf_split=args.hf_split, hf_config=args.hf_config, progress=not args.no_progress,
                      ray_address=args.ray_address, num_cpus=args.num_cpus)
    print(f"{args.out}: {m['documents']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
