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
import importlib
import json
import re
import time
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from phi1_jax import cli, files
from phi1_jax.data_gen import engine
from phi1_jax.data_gen.minhash import (GRAM_MIX, TOKEN, band_keys, bands, datasketch_permutations, fmix64, minhash,
                                       signatures, text_key, token_hashes)
from phi1_jax.data_gen.records import RecordsError, check_outputs

if TYPE_CHECKING:
    from datasketch import MinHash

_WORD = re.compile(r"\w+")


class NearDuplicateIndex:
    """Records seen so far; `add` says which earlier record a new one near-duplicates (and keeps only new ones)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: int = 5):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        from datasketch import MinHashLSH

        self.num_perm, self.shingle = num_perm, shingle
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._exact: dict[str, str] = {}

    def duplicate_of(self, key: str, text: str) -> tuple[str | None, MinHash]:
        norm = " ".join(TOKEN.findall(text.lower()))
        m = minhash(text, self.num_perm, self.shingle)
        if norm in self._exact:
            return self._exact[norm], m
        hits = self._lsh.query(m)
        return (sorted(hits)[0] if hits else None), m

    def insert(self, key: str, text: str, m: MinHash | None = None) -> None:
        self._exact[" ".join(TOKEN.findall(text.lower()))] = key
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


# Chunks of ~4 MB of lines per task: each task (and each block of the two shuffles behind it) costs ~20-30 ms of Ray's
# own CPU (arguments, outputs, scheduling) in the workers and the driver. At 1 MB (the engine's default), a 30k-record
# corpus was 40 tasks per stage and the job spent ~20% more CPU (driver 1.4 s against 0.6 s, workers +15%); 4 MB still
# gives 10 tasks to spread over 2 cores, and a killed worker's retry redoes 4 MB.
CHUNK_BYTES = 4 << 20



def _signature_rows(batch: dict, *, text_field: str, b: int, r: int, num_perm: int, parts: int,
                    permutations) -> dict:
    """Ray stage 1 (one chunk of lines per call): a row (part, band, bucket, doc) per record and band; `part`, a hash
    of (band, bucket) below `parts`, is what the shuffle groups by."""
    import numpy as np

    keys, docs = [], []
    for chunk in _rows(batch):
        recs = list(engine.read_chunk(chunk, text_field, RecordsError))
        if not recs:
            continue
        sig, norms = signatures([rec[text_field] for _, _, rec in recs], num_perm, permutations=permutations)
        exact = np.asarray([text_key(x) for x in norms], np.int64)
        keys.append(np.concatenate([band_keys(sig, b, r), exact[:, None]], axis=1))  # [records, b + 1]
        docs.append(np.asarray([d for d, _, _ in recs], np.int64))
    if not keys:
        keys, docs = [np.zeros((0, b + 1), np.int64)], [np.zeros(0, np.int64)]
    keys, docs = np.concatenate(keys), np.concatenate(docs)
    band = np.tile(np.arange(b + 1, dtype=np.int16), len(docs))
    bucket = keys.ravel()
    return {"part": ((bucket.view(np.uint64) ^ band.astype(np.uint64)) % np.uint64(parts)).astype(np.int32),
            "band": band, "bucket": bucket, "doc": np.repeat(docs, b + 1)}


def _bucket_edges(group: dict) -> dict:
    """Ray stage 2 (all the rows of one shuffle partition per call, so every bucket whole): an edge from every member
    of a bucket to its first record, for all buckets at once (one sort)."""
    import numpy as np

    band, bucket, doc = group["band"], group["bucket"], group["doc"]
    order = np.lexsort((doc, bucket, band))
    band, bucket, doc = band[order], bucket[order], doc[order]
    new = np.ones(len(doc), bool)  # the first row of each (band, bucket): its smallest doc
    new[1:] = (band[1:] != band[:-1]) | (bucket[1:] != bucket[:-1])
    first = doc[np.flatnonzero(new)[np.cumsum(new) - 1]]
    member = ~new & (doc != first)  # a record repeated in one bucket (it cannot be) is no edge
    return {"doc": doc[member], "first": first[member]}


def _rows(batch: dict):
    """A batch's rows as plain Python values (Ray Data hands numpy scalars; an id made from a record number must be
    an int)."""
    keys = list(batch)
    return [{k: getattr(v, "item", lambda v=v: v)() for k in keys for v in (batch[k][i],)}
            for i in range(len(batch[keys[0]]))] if keys else []


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


def _partitions() -> int:
    """Shuffle partitions (and the shuffle's settings): two per core of the cluster (each is a task with its own
    start-up; Ray Data's default of 200 costs more in start-ups than the rows do)."""
    import ray
    import ray.data

    # the shuffled rows are hashes and record numbers, which zstd (Ray Data's default for shuffle shards) cannot
    # shrink: compressing them is CPU spent for nothing
    ray.data.DataContext.get_current().shuffle_compression = "none"
    return 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))


def find_duplicates(paths: list[Path], *, threshold: float, num_perm: int = 128, text_field: str = "text",
                    chunk_bytes: int = CHUNK_BYTES, chunks: list[dict] | None = None) -> dict[int, int]:
    """{removed doc number: the doc it duplicates} over the inputs in order, as a Ray Data pipeline (inside an
    `engine.session`): signatures per chunk -> group by (band, bucket) -> edges -> connected components."""
    import numpy as np
    import ray.data

    b, r = bands(threshold, num_perm)
    if chunks is None:
        chunks = engine.line_chunks(paths, chunk_bytes)
    if not chunks:
        return {}
    parts = _partitions()
    this = importlib.import_module(__spec__.name if __spec__ else __name__)  # not __main__: workers import by name
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    sigs = ds.map_batches(this._signature_rows, batch_size=1, fn_kwargs={"text_field": text_field, "b": b, "r": r,
                                                                     "num_perm": num_perm, "parts": parts,
                                                                     "permutations": datasketch_permutations(num_perm)})
    # grouped by partition, not by bucket: one call per partition sorts its rows once, where a call per bucket (one
    # per record and band) spent its time in Python
    edges = sigs.groupby("part", num_partitions=parts).map_groups(this._bucket_edges, batch_format="numpy")
    got = {"doc": [], "first": []}
    with engine.user_errors():
        for batch in edges.iter_batches(batch_format="numpy", batch_size=None):
            got["doc"].append(batch["doc"])
            got["first"].append(batch["first"])
    if not got["doc"]:
        return {}
    return duplicate_of(np.concatenate(got["doc"]), np.concatenate(got["first"]))


# --- writing, in the workers: survivors per chunk, the diversity report as per-chunk partial counts ------------------
#
# Each chunk's task writes its survivors as one part file (whole or absent; a retried task writes it again) and
# counts its records' word n-grams, as 63-bit hashes (word hashes chained; a collision among the ~10^7 distinct
# n-grams of a 30k-record corpus has a chance of ~10^-5): per n, the distinct hashes of the chunk, each with a bit
# saying whether a kept record has it, sorted and cut by hash range into the shuffle's partitions. Grouped by partition, each call
# counts its distinct hashes across all chunks; the driver adds the partitions' counts and merges the chunks'
# openings and removed lists in chunk order, then concatenates each input's part files into `OUT/<input name>`.



def gram_hashes(word_lists: list[list[str]], kept: list[bool], parts: int) -> list[dict]:
    """Per n = 1..4: {"total_all", "total_kept", "grams": [the chunk's distinct n-grams in partition p, p < parts]}.
    Each distinct n-gram is one uint64, its 63-bit hash shifted left with the low bit set when a kept record has it;
    each partition's values are sorted (so merging chunks is a merge of sorted runs, `merge_gram_counts`)."""
    import numpy as np

    hw = token_hashes(np.frombuffer(" ".join(map(" ".join, word_lists)).encode(), np.uint8))  # words hold no spaces
    lens = np.asarray([len(ws) for ws in word_lists], np.int64)
    left = np.repeat(np.cumsum(lens), lens) - np.arange(len(hw))  # words from each position to the end of its record
    kept_pos = np.repeat(np.asarray(kept, bool), lens).astype(np.uint64)
    # even cuts: a hash's two values (2h, 2h + 1) always fall in the same partition
    cuts = np.arange(1, parts, dtype=np.uint64) * (np.uint64(2**64 - 1) // np.uint64(parts)) & ~np.uint64(1)
    out, g = [], hw
    for n in (1, 2, 3, 4):
        if n > 1:
            g = fmix64(g[:-1] * np.uint64(GRAM_MIX) + hw[n - 1:])
        valid = left[:len(g)] >= n
        k = kept_pos[:len(g)][valid]
        v = np.sort(g[valid] << np.uint64(1) | k)
        last = np.ones(len(v), bool)  # the last value of each hash: it has the kept bit if any record of it is kept
        last[:-1] = (v[1:] >> np.uint64(1)) != (v[:-1] >> np.uint64(1))
        v = v[last]
        out.append({"total_all": int(valid.sum()), "total_kept": int(k.sum()),
                    "grams": np.split(v, np.searchsorted(v, cuts))})
    return out


def merge_gram_counts(runs: list) -> tuple[int, int]:
    """(distinct n-grams, distinct n-grams of kept records) of one partition, from its chunks' sorted `gram_hashes`."""
    import numpy as np

    v = np.sort(np.concatenate(runs), kind="stable")  # timsort: a merge of the sorted runs, ~4x a plain sort's speed

    def distinct(h) -> int:
        return int(len(h) and 1 + np.count_nonzero(h[1:] != h[:-1]))

    return distinct(v >> np.uint64(1)), distinct(v[(v & np.uint64(1)) == 1] >> np.uint64(1))


def _write_chunk(batch: dict, *, text_field: str, dup_ref, scratch: str, parts: int, opening_words: int = 5) -> dict:
    """Ray stage 3 (one chunk per call): its survivors to `scratch/<chunk>.jsonl` (whole or absent), and one row per
    shuffle partition: the chunk's distinct n-gram hashes in that partition; the chunk's own counts ride on row 0."""
    import pickle

    import numpy as np
    import ray

    dup, firsts = ray.get(dup_ref)
    rows = {"part": [], "chunk": [], "grams": [], "meta": []}
    for chunk in _rows(batch):
        recs = list(engine.read_chunk(chunk, text_field, RecordsError))
        name = Path(chunk["path"]).name
        removed, keys, words = [], {}, []
        openings, removed_openings = collections.Counter(), collections.Counter()
        with files.replacing(Path(scratch) / f"{int(chunk['index']):08d}.jsonl", concurrent=True) as tmp, \
                open(tmp, "w", encoding="utf-8") as f:
            for d, i, rec in recs:
                w = _WORD.findall(rec[text_field].lower())
                words.append(w)
                opening = " ".join(w[:opening_words]) if w else None
                if opening is not None:
                    openings[opening] += 1
                if d in firsts:
                    keys[d] = f"{name}#{rec.get('id', i)}"
                if d in dup:
                    removed.append({"input": name, "id": rec.get("id", i), "duplicate_of": dup[d]})
                    if opening is not None:
                        removed_openings[opening] += 1
                else:
                    f.write(json.dumps(rec) + "\n")
        kept = [d not in dup for d, _, _ in recs]
        grams = gram_hashes(words, kept, parts)
        meta = {"chunk": int(chunk["index"]), "records": len(recs), "kept": sum(kept), "removed": removed,
                "keys": keys, "openings": openings, "removed_openings": removed_openings,
                "totals": [(g["total_all"], g["total_kept"]) for g in grams]}
        for p in range(parts):
            rows["part"].append(p)
            rows["chunk"].append(int(chunk["index"]))
            rows["grams"].append(pickle.dumps([g["grams"][p] for g in grams], protocol=5))
            rows["meta"].append(pickle.dumps(meta, protocol=5) if p == 0 else b"")
    return {"part": np.asarray(rows["part"], np.int32), "chunk": np.asarray(rows["chunk"], np.int64),
            "grams": np.asarray(rows["grams"], dtype=object), "meta": np.asarray(rows["meta"], dtype=object)}


def _count_partition(group: dict) -> dict:
    """Ray stage 4 (one partition of the n-gram hashes, from every chunk): distinct n-grams of all records and of the
    kept ones, per n; partition 0 also passes the chunks' own counts on."""
    import pickle

    import numpy as np

    per_n = [[] for _ in range(4)]
    for blob in group["grams"]:
        for n, run in enumerate(pickle.loads(blob)):
            per_n[n].append(run)
    counts = [merge_gram_counts(runs) for runs in per_n]
    metas = [m for m in group["meta"] if len(m)]
    return {"counts": np.asarray([pickle.dumps(counts)], dtype=object),
            "metas": np.asarray([pickle.dumps(metas)], dtype=object)}


def _diversity_report(records: int, distinct: list[tuple[int, int]], openings: collections.Counter,
                      top: int = 10) -> dict:
    """`Diversity.report` from merged counts: distinct[n-1] = (distinct n-grams, all n-grams)."""
    out: dict = {"records": records}
    for n, (d, total) in enumerate(distinct, 1):
        out[f"distinct_{n}"] = round(d / total, 4) if total else 0.0
    out["openings"] = [{"opening": o, "count": c} for o, c in openings.most_common() if c > 0][:top]
    return out


def write_and_report(inputs: list[Path], out: Path, chunks: list[dict], dup: dict[int, int], *,
                     text_field: str) -> tuple[list[dict], dict, dict]:
    """Ray stages 3-4 (inside an `engine.session`): each input's survivors to `OUT/<input name>` (whole or absent),
    and (removed records, diversity before, diversity after)."""
    import pickle
    import shutil
    import tempfile

    import ray
    import ray.data

    parts = _partitions()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".dedup-parts.", suffix=".tmp", dir=out))  # beside OUT: workers see it
    try:
        # the duplicates go to the workers once, through the object store (a small dict: one entry per duplicate)
        dup_ref = ray.put((dup, set(dup.values())))
        metas, distinct = [], [[0, 0] for _ in range(4)]
        if chunks:
            ds = ray.data.from_items([{**c, "index": i} for i, c in enumerate(chunks)],
                                     override_num_blocks=len(chunks))
            this = importlib.import_module(__spec__.name if __spec__ else __name__)
            rows = ds.map_batches(this._write_chunk, batch_size=1, fn_kwargs={
                "text_field": text_field, "dup_ref": dup_ref, "scratch": str(scratch), "parts": parts})
            counted = rows.groupby("part", num_partitions=parts).map_groups(this._count_partition, batch_format="numpy")
            with engine.user_errors():
                for batch in counted.iter_batches(batch_format="numpy", batch_size=None):
                    for c, m in zip(batch["counts"], batch["metas"]):
                        for n, (d_all, d_kept) in enumerate(pickle.loads(c)):
                            distinct[n][0] += d_all
                            distinct[n][1] += d_kept
                        metas += [pickle.loads(x) for x in pickle.loads(m)]
        metas.sort(key=lambda m: m["chunk"])
        keys: dict[int, str] = {}
        openings, removed_openings = collections.Counter(), collections.Counter()
        totals = [[0, 0] for _ in range(4)]
        records = kept = 0
        for m in metas:  # chunk order: the openings' ties stay in input order, as one pass over the inputs has them
            keys.update(m["keys"])
            openings.update(m["openings"])
            removed_openings.update(m["removed_openings"])
            records, kept = records + m["records"], kept + m["kept"]
            for n, (t_all, t_kept) in enumerate(m["totals"]):
                totals[n][0] += t_all
                totals[n][1] += t_kept
        removed = [{**r, "duplicate_of": keys[r["duplicate_of"]]} for m in metas for r in m["removed"]]
        before = _diversity_report(records, [(d[0], t[0]) for d, t in zip(distinct, totals)], openings)
        openings.subtract(removed_openings)
        after = _diversity_report(kept, [(d[1], t[1]) for d, t in zip(distinct, totals)], openings)
        for k, path in enumerate(inputs):  # each input: its chunks' parts in order, whole or absent
            with files.replacing(out / path.name) as tmp, open(tmp, "wb") as f:
                for i, c in enumerate(chunks):
                    if c["input"] == k:
                        with open(scratch / f"{i:08d}.jsonl", "rb") as part:
                            shutil.copyfileobj(part, f, 1 << 20)
        return removed, before, after
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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
    engine.add_flags(p, CHUNK_BYTES)
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
    seconds = {}
    with engine.session(a.ray_address, a.num_cpus, progress=not a.no_progress):
        seconds["ray_start"] = time.perf_counter() - t0
        chunks = engine.line_chunks(inputs, a.chunk_kb << 10)
        dup = find_duplicates(inputs, threshold=a.threshold, num_perm=a.num_perm, text_field=a.text_field,
                              chunks=chunks)
        t1 = time.perf_counter()
        # Writing, in the workers too: survivors per chunk, assembled per input in order; the report from per-chunk
        # partial counts
        removed, diversity_before, diversity_after = write_and_report(inputs, out, chunks, dup,
                                                                      text_field=a.text_field)
        t2 = time.perf_counter()
    n_in, n_kept = diversity_before["records"], diversity_after["records"]
    seconds = {"dedup": t1 - t0, "write_and_report": t2 - t1, "ray_start": seconds["ray_start"],
               "ray_stop": time.perf_counter() - t2}
    report = {"threshold": a.threshold, "num_perm": a.num_perm, "records_in": n_in, "records_kept": n_kept,
              "unique_fraction": n_kept / n_in if n_in else 1.0, "removed": removed,
              "diversity_before": diversity_before, "diversity_after": diversity_after,
              "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    files.write_text(out / "dedup_report.json", json.dumps(report, indent=2) + "\n")
    files.write_text(out / "dedup_report.md", report_markdown(report))
    print(f"{n_in} records in, {n_kept} kept ({n_in - n_kept} near-duplicates removed); report: {out}/dedup_report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
