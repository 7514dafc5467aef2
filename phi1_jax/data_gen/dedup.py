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
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from phi1_jax.data_gen.records import check_outputs, read_records, write_records
from phi1_jax import cli

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
    report: dict = {"records": len(texts)}
    words = [_WORD.findall(t.lower()) for t in texts]
    for n in (1, 2, 3, 4):
        grams = collections.Counter(tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1))
        total = sum(grams.values())
        report[f"distinct_{n}"] = round(len(grams) / total, 4) if total else 0.0
    openings = collections.Counter(" ".join(w[:opening_words]) for w in words if w)
    report["openings"] = [{"opening": o, "count": c} for o, c in openings.most_common(top)]
    return report


def dedup_records(inputs: Iterable[tuple[str, list[dict]]], *, threshold: float, num_perm: int = 128,
                  text_field: str = "text") -> tuple[dict[str, list[dict]], list[dict]]:
    """({input: kept records}, [removed: {input, id, duplicate_of}]) over inputs in order."""
    index = NearDuplicateIndex(threshold, num_perm)
    kept, removed = {}, []
    for name, records in inputs:
        kept[name] = []
        for i, rec in enumerate(records):
            key = f"{name}#{rec.get('id', i)}"
            dup = index.add(key, rec[text_field])
            if dup is None:
                kept[name].append(rec)
            else:
                removed.append({"input": name, "id": rec.get("id", i), "duplicate_of": dup})
    return kept, removed


def report_markdown(report: dict) -> str:
    d = report["diversity_after"]
    lines = [f"# Dedup report (Jaccard threshold {report['threshold']})", "",
             f"- records in: {report['records_in']}, kept: {report['records_kept']}, "
             f"unique fraction: {report['unique_fraction']:.4f}",
             f"- distinct-1..4 after: {d['distinct_1']}, {d['distinct_2']}, {d['distinct_3']}, {d['distinct_4']}", "",
             "| most common openings | count |", "|---|---|"]
    lines += [f"| {o['opening']} | {o['count']} |" for o in d["openings"]]
    return "\n".join(lines) + "\n"


@cli.reports_user_errors  # a bad --out (check_outputs): exit 2
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.data_gen.dedup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSONL files (one record per line with a text field)")
    p.add_argument("--out", required=True, help="folder for the kept records and dedup_report.{json,md}")
    p.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity above which records are duplicates")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: more exact, slower)")
    p.add_argument("--text-field", default="text")
    a = p.parse_args(argv)
    out = Path(a.out)
    inputs = [Path(i) for i in a.inputs]
    check_outputs(inputs, out)
    try:
        loaded = [(i.name, read_records(i, a.text_field)) for i in inputs]
        kept, removed = dedup_records(loaded, threshold=a.threshold, num_perm=a.num_perm, text_field=a.text_field)
    except (OSError, ValueError) as e:  # bad inputs (RecordsError) and datasketch's checks of the flags: exit 1
        print(f"error: {e}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in kept.items():
        write_records(out / name, recs)
    n_in, n_kept = sum(len(r) for _, r in loaded), sum(len(r) for r in kept.values())
    report = {"threshold": a.threshold, "num_perm": a.num_perm, "records_in": n_in, "records_kept": n_kept,
              "unique_fraction": n_kept / n_in if n_in else 1.0, "removed": removed,
              "diversity_before": diversity([r[a.text_field] for _, recs in loaded for r in recs]),
              "diversity_after": diversity([r[a.text_field] for recs in kept.values() for r in recs])}
    (out / "dedup_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "dedup_report.md").write_text(report_markdown(report))
    print(f"{n_in} records in, {n_kept} kept ({n_in - n_kept} near-duplicates removed); report: {out}/dedup_report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
