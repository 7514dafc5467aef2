"""Word n-grams, the paper's first contamination test (arXiv 2306.11644 §5): a 13-gram of lower-cased words shared with
a benchmark problem. Here, in the library, because the embedded default corpus (phi1_jax.embedded_corpus) applies it
when it is built; phi1_jax.data_gen.decontaminate builds its three tests on it."""

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


def reference_ngrams(texts: Iterable[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for t in texts:
        out |= ngrams(t, n)
    return out


def overlapping_ngrams(text: str, reference: set, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The n-grams of `text` that also occur in the reference set (empty: no overlap)."""
    w = words(text)
    return {g for g in (tuple(w[i:i + n]) for i in range(len(w) - n + 1)) if g in reference}
