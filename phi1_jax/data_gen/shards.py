"""Pre-tokenized ArrayRecord shards from a corpus, plus a manifest.

Command:
  python -m phi1_jax.data_gen.shards --input=DIR_OR_JSONL_OR_hf://NAME --tokenizer=TOK --out=SHARD_DIR [--source-name=code]
         [--text-field=text] [--prompt-field=prompt] [--glob='**/*.py'] [--docs-per-shard=10000] [--limit=N]

Inputs: a folder (files matching --glob, in sorted order), a JSONL file (or a folder of *.jsonl with --glob) with a
text field, or `hf://owner/name` for a Hugging Face dataset streamed through `datasets` (--hf-split, --hf-config).
With --prompt-field, each record's text must start with that field's value (an exercise's signature and docstring);
the number of prompt tokens is stored so the loader can restrict the loss to the solution.

Output: a shard directory in the format of phi1_jax.shard_format (ArrayRecord shards, per-shard stats, run.json, and
manifest.json written last). Writing is atomic and resumable: a killed run leaves no shard that looks complete, and a
rerun skips the shards already finished and produces byte-identical shards.

The format itself (records, manifest, writer, reader) lives in phi1_jax.shard_format; this module reads corpora into
documents and is the command line. Its names are re-exported here for the tools that used them from this module.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

from phi1_jax import cli
from phi1_jax.jsonl import read_jsonl
from phi1_jax.shard_format import (  # noqa: F401  (re-exported: the format's names, for the tools that use this module)
    FORMAT_VERSION, HEADER, MANIFEST, RUN_FILE, Document, ShardError, decode_record, encode_record, read_manifest,
    token_dtype, write_shards)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a corpus
# ---------------------------------------------------------------------------------------------------------------------


def _json_documents(path: Path, text_field: str, prompt_field: str | None) -> Iterator[Document]:
    for where, rec in read_jsonl(path, ShardError):
        yield _document(rec, text_field, prompt_field, where)


def _document(rec, text_field, prompt_field, where) -> Document:
    if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
        raise ShardError(f"{where}: record has no string field {text_field!r}")
    text, prompt = rec[text_field], ""
    if prompt_field:
        prompt = rec.get(prompt_field)
        if not isinstance(prompt, str) or not text.startswith(prompt):
            raise ShardError(f"{where}: field {prompt_field!r} must be a string that {text_field!r} starts with")
    return Document(text, prompt, where)


def iter_documents(source: str, *, text_field: str = "text", prompt_field: str | None = None, glob: str | None = None,
                   hf_split: str = "train", hf_config: str | None = None) -> Iterator[Document]:
    """Documents of a folder, a JSONL file or `hf://NAME`, in a deterministic order."""
    if source.startswith("hf://"):
        import datasets

        name = source[len("hf://"):]
        try:
            ds = datasets.load_dataset(name, hf_config, split=hf_split, streaming=True)
        except Exception as e:  # datasets raises many types (hub, connection, missing config)
            raise ShardError(f"{source}: cannot open Hugging Face dataset ({type(e).__name__}: {e})") from None
        for i, rec in enumerate(ds):
            yield _document(rec, text_field, prompt_field, f"{source}[{i}]")
        return
    path = Path(source)
    if not path.exists():
        raise ShardError(f"{path}: input not found (a folder, a .jsonl file, or hf://NAME for a Hugging Face dataset)")
    if path.is_file():
        yield from _json_documents(path, text_field, prompt_field)
        return
    files = sorted(p for p in path.glob(glob or "**/*") if p.is_file())
    for f in files:
        if f.suffix == ".jsonl":
            yield from _json_documents(f, text_field, prompt_field)
            continue
        try:
            yield Document(f.read_text(encoding="utf-8"), "", str(f))
        except UnicodeDecodeError:
            print(f"warning: skipping {f}: not UTF-8", file=sys.stderr)


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
    p.add_argument("--num-threads", type=int, default=-1, help="tokenizer threads (-1: all cores)")
    args = p.parse_args(argv)

    from phi1_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)
    docs = iter_documents(args.input, text_field=args.text_field, prompt_field=args.prompt_field, glob=args.glob,
                          hf_split=args.hf_split, hf_config=args.hf_config)
    if args.limit is not None:
        docs = itertools.islice(docs, args.limit)
    name = args.source_name or Path(args.input.rstrip("/")).name
    m = write_shards(docs, tokenizer, args.out, source_name=name, input_desc=args.input,
                     docs_per_shard=args.docs_per_shard, num_threads=args.num_threads)
    print(f"{args.out}: {m['documents']:,} documents, {m['tokens']:,} tokens in {len(m['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
