"""Near-duplicate removal (MinHash LSH, `datasketch`) within and across JSONL outputs, and a diversity report.

    python -m phi1_jax.data_gen.dedup gen/textbooks/textbooks.jsonl more/textbooks.jsonl --out=dedup/ [--threshold=0.8]

Inputs are read in the order given; within and across them the first record of a near-duplicate group is kept. Each
input's survivors go to `OUT/<input name>` (an output may not overwrite an input), and `OUT/dedup_report.{json,md}`
holds what was removed (each with the id it duplicates) and the diversity of what is left: unique fraction, distinct
n-gram ratios, and the most common openings (a generator stuck in a rut starts everything the same way).

Similarity is the Jaccard similarity of token 5-gram shingles (tokens: words and single punctuation marks, lower-cased),
estimated with 128 permutations; `--threshold` is the Jaccard level above which two records are duplicates.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import time
import sys
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from phi1_jax import cli, files
from phi1_jax.data_gen import engine
from phi1_jax.data_gen.records import RecordsError, check_outputs, write_records

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 5) -> set[bytes]:
    toks = _TOKEN.findall(text.lower())
    if len(toks) < n:
        return {" ".join(toks).encode()}
    return {" ".join(toks[i:i + n]).encode() for i in range(len(toks) - n + 1)}


def minhash(text: str, num_perm: int = 128, n: int = 5) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch(list(shingles(text, n)))
    return m


class NearDuplicateIndex:
    """Records seen so far; `add` says which earlier record a new one near-duplicates (and keeps only new ones)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.num_perm, self.shingle = num_perm, shingle
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._exact: dict[str, str] = {}

    def duplicate_of(self, key: str, text: str) -> tuple[str | None, MinHash]:
        norm = " ".join(_TOKEN.findall(text.lower()))
        m = minhash(text, self.num_perm, self.shingle)
        if norm in self._exact:
            return self._exact[norm], m
        hits = self._lsh.query(m)
        return (sorted(hits)[0] if hits else None), m

    def insert(self, key: str, text: str, m: MinHash | None = None) -> None:
        self._exact[" ".join(_TOKEN.findall(text.lower()))] = key
        self._lsh.insert(key, m if m is not None else minhash(text, self.num_perm, self.shingle))

    def add(self, key: str, text: str) -> str | None:
        """None (and the record is indexed) when new; else the key of the record it near-duplicates."""
        dup, m = self.duplicate_of(key, text)
        if dup is None:
            self.insert(key, text, m)
        return dup


def diversity(texts: list[str], top: int = 10, opening_words: int = 5) -> dict:
    """Distinct-n (distinct word n-grams / all word n-grams) for n = 1..4, and the most common openings."""
    d = Diversity(opening_words)
    for t in texts:
        d.add(t)
    return d.report(top)


class Diversity:
    """`diversity` over texts seen one at a time (the dedup command streams its inputs)."""

    def __init__(self, opening_words: int = 5):
        self.records, self.opening_words = 0, opening_words
        self.grams = {n: collections.Counter() for n in (1, 2, 3, 4)}
        self.openings = collections.Counter()

    def add(self, text: str) -> None:
        w = _WORD.findall(text.lower())
        self.records += 1
        for n, grams in self.grams.items():
            grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
        if w:
            self.openings[" ".join(w[:self.opening_words])] += 1

    def subtract(self, other: Diversity) -> None:
        """Takes `other`'s texts out again (the dedup command counts every record once, then takes out the removed
        ones, instead of counting the kept ones a second time)."""
        self.records -= other.records
        for n, grams in self.grams.items():
            grams.subtract(other.grams[n])
        self.openings.subtract(other.openings)

    def report(self, top: int = 10) -> dict:
        out: dict = {"records": self.records}
        for n, grams in self.grams.items():
            counts = [c for c in grams.values() if c > 0]
            total = sum(counts)
            out[f"distinct_{n}"] = round(len(counts) / total, 4) if total else 0.0
        out["openings"] = [{"opening": o, "count": c} for o, c in self.openings.most_common() if c > 0][:top]
        return out


# --- the rule, and its Ray pipeline ----------------------------------------------------------------------------------
#
# Two records are candidates when their MinHash signatures agree on a whole LSH band (`bands`: datasketch's choice of
# b bands x r rows for the threshold, 9 x 13 at 0.8 with 128 permutations) or their normalised texts are equal (an
# extra "band" keyed by that text). Clusters are the connected components of the candidate pairs; each cluster keeps
# its first record in input order and every other member is removed as a duplicate of it. This is datatrove's
# (FineWeb's) recipe; it differs from a first-come index (which is what `NearDuplicateIndex` is, for the generator's
# online rejection) only on chains: with A~B and B~C but not A~C, first-come keeps A and C, clusters keep A alone.


def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(b, r): datasketch's MinHashLSH parameters for `threshold` (equal weights on false positives and negatives)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def bucket_keys(text: str, b: int, r: int, num_perm: int = 128) -> list[int]:
    """The record's b band buckets then its exact-text bucket (b + 1 signed 64-bit keys; key k belongs to band k)."""
    hv = minhash(text, num_perm).hashvalues
    keys = [_h64(hv[i * r:(i + 1) * r].tobytes()) for i in range(b)]
    return keys + [_h64(" ".join(_TOKEN.findall(text.lower())).encode())]


def _signature_rows(batch: dict, *, text_field: str, b: int, r: int, num_perm: int) -> dict:
    """Ray stage 1 (one chunk of lines per call): a row (band, bucket, doc) per record and band."""
    import numpy as np

    band, bucket, doc = [], [], []
    for chunk in _rows(batch):
        for d, _, rec in engine.read_chunk(chunk, text_field, RecordsError):
            keys = bucket_keys(rec[text_field], b, r, num_perm)
            band += range(len(keys))
            bucket += keys
            doc += [d] * len(keys)
    return {"band": np.asarray(band, np.int16), "bucket": np.asarray(bucket, np.int64),
            "doc": np.asarray(doc, np.int64)}


def _bucket_edges(group: dict) -> dict:
    """Ray stage 2 (one bucket of one band per call): an edge from every member to the bucket's first record."""
    import numpy as np

    docs = np.unique(group["doc"])
    return {"doc": docs[1:], "first": np.full(len(docs) - 1, docs[0] if len(docs) else 0, np.int64)}


def _rows(batch: dict):
    keys = list(batch)
    return [{k: batch[k][i] for k in keys} for i in range(len(batch[keys[0]]))] if keys else []


def duplicate_of(edges_doc, edges_first) -> dict[int, int]:
    """Connected components of the candidate edges: {removed doc: first doc of its cluster} (union-find, the
    smaller number as root, so each root is its cluster's first record)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, c in zip(edges_doc.tolist(), edges_first.tolist()):
        ra, rc = find(a), find(c)
        if ra != rc:
            parent[max(ra, rc)] = min(ra, rc)
    return {d: find(d) for d in parent if find(d) != d}


def find_duplicates(paths: list[Path], *, threshold: float, num_perm: int = 128, text_field: str = "text",
                    chunk_bytes: int = engine.CHUNK_BYTES) -> dict[int, int]:
    """{removed doc number: the doc it duplicates} over the inputs in order, as a Ray Data pipeline (inside an
    `engine.session`): signatures per chunk -> group by (band, bucket) -> edges -> connected components."""
    import numpy as np
    import ray
    import ray.data

    b, r = bands(threshold, num_perm)
    chunks = engine.line_chunks(paths, chunk_bytes)
    if not chunks:
        return {}
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    sigs = ds.map_batches(_signature_rows, batch_size=1, fn_kwargs={"text_field": text_field, "b": b, "r": r,
                                                                     "num_perm": num_perm})
    # a few shuffle partitions per core: the rows are small, and each partition is a task with its own start-up
    parts = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    edges = sigs.groupby(["band", "bucket"], num_partitions=parts).map_groups(_bucket_edges, batch_format="numpy")
    got = {"doc": [], "first": []}
    with engine.user_errors():
        for batch in edges.iter_batches(batch_format="numpy", batch_size=None):
            got["doc"].append(batch["doc"])
            got["first"].append(batch["first"])
    if not got["doc"]:
        return {}
    return duplicate_of(np.concatenate(got["doc"]), np.concatenate(got["first"]))


def report_markdown(report: dict) -> str:
    d = report["diversity_after"]
    lines = [f"# Dedup report (Jaccard threshold {report['threshold']})", "",
             f"- records in: {report['records_in']}, kept: {report['records_kept']}, "
             f"unique fraction: {report['unique_fraction']:.4f}",
             f"- distinct-1..4 after: {d['distinct_1']}, {d['distinct_2']}, {d['distinct_3']}, {d['distinct_4']}", "",
             "| most common openings | count |", "|---|---|"]
    lines += [f"| {o['opening']} | {o['count']} |" for o in d["openings"]]
    return "\n".join(lines) + "\n"


@cli.reports_user_errors  # a bad --out (check_outputs), a bad input (RecordsError), Ray unreachable: exit 2
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.data_gen.dedup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSONL files (one record per line with a text field)")
    p.add_argument("--out", required=True, help="folder for the kept records and dedup_report.{json,md}")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity above which records are duplicates")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: more exact, slower)")
    p.add_argument("--text-field", default="text")
    engine.add_flags(p)
    a = p.parse_args(argv)
    out = Path(a.out)
    inputs = [Path(i) for i in a.inputs]
    check_outputs(inputs, out)
    if missing := [str(i) for i in inputs if not i.is_file()]:
        raise RecordsError(f"{missing[0]}: input not found")
    try:
        bands(a.threshold, a.num_perm)
    except ValueError as e:  # datasketch's checks of the flags
        raise RecordsError(f"--threshold={a.threshold} --num-perm={a.num_perm}: {e}") from None
    t0 = time.perf_counter()
    with engine.session(a.ray_address, a.num_cpus, progress=not a.no_progress):
        dup = find_duplicates(inputs, threshold=a.threshold, num_perm=a.num_perm, text_field=a.text_field,
                              chunk_bytes=a.chunk_kb << 10)
    t1 = time.perf_counter()
    # Writing: one streaming pass per input in the driver (outputs are in input order, whole or absent).
    seen, removed_texts = Diversity(), Diversity()
    keys: dict[int, str] = {}  # doc -> "input#id", for the records others duplicate
    firsts = set(dup.values())
    removed = []

    def survivors(path: Path):
        base = seen.records
        for chunk in engine.line_chunks([path]):
            for d, i, rec in engine.read_chunk(chunk, a.text_field, RecordsError):
                d += base
                seen.add(rec[a.text_field])
                if d in firsts:
                    keys[d] = f"{path.name}#{rec.get('id', i)}"
                if d in dup:
                    removed.append({"input": path.name, "id": rec.get("id", i), "duplicate_of": keys[dup[d]]})
                    removed_texts.add(rec[a.text_field])
                else:
                    yield rec

    for path in inputs:  # each input's survivors, streamed in order, whole or absent
        write_records(out / path.name, survivors(path))
    diversity_before = seen.report()
    seen.subtract(removed_texts)
    n_in, n_kept = diversity_before["records"], seen.records
    report = {"threshold": a.threshold, "num_perm": a.num_perm, "records_in": n_in, "records_kept": n_kept,
              "unique_fraction": n_kept / n_in if n_in else 1.0, "removed": removed,
              "diversity_before": diversity_before, "diversity_after": seen.report(),
              "seconds": {"dedup": round(t1 - t0, 3), "write_and_report": round(time.perf_counter() - t1, 3)}}
    files.write_text(out / "dedup_report.json", json.dumps(report, indent=2) + "\n")
    files.write_text(out / "dedup_report.md", report_markdown(report))
    print(f"{n_in} records in, {n_kept} kept ({n_in - n_kept} near-duplicates removed); report: {out}/dedup_report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
