"""AST match rate (arXiv 2306.11644 §5): how alike two pieces of code are once names, literals, comments and docstrings
are ignored.

A function is normalised to the pre-order sequence of its AST node types, with docstrings removed, every identifier,
attribute and argument name dropped (only the node type stays), every literal reduced to `Constant`, and expression
contexts (Load/Store) left out; comments never reach the AST. The match rate of two sequences is
1 - Levenshtein(a, b) / max(|a|, |b|): 1.0 for the same code under any renaming, falling with each edit.

Comparing every training function with every benchmark function is quadratic, so `candidates` first bounds each pair
from above with the node-type histograms (the edit distance is at least max(|a|, |b|) - shared node count) and the
exact distance is computed only for pairs whose bound reaches the threshold. The distance itself runs one row of the
dynamic programme at a time in numpy.
"""

from __future__ import annotations

import ast
import warnings

import numpy as np

_SKIP = (ast.Load, ast.Store, ast.Del, ast.expr_context)
MIN_NODES = 12  # functions smaller than this (a one-line return) match too easily to say anything


def strip_docstrings(tree: ast.AST) -> None:
    """Removes the docstring of the module and of every function and class, in place."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]


def _preorder(node: ast.AST, out: list[str]) -> None:
    if isinstance(node, _SKIP):
        return
    out.append(type(node).__name__)
    for child in ast.iter_child_nodes(node):
        _preorder(child, out)


def parse(code: str) -> ast.Module:
    """ast.parse without Python 3.12's SyntaxWarnings ('invalid escape sequence', common in MBPP's and models' code):
    the data is what it is, and a warning per parsed item says nothing to the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        return ast.parse(code)


def node_sequence(node: ast.AST) -> list[str]:
    out: list[str] = []
    _preorder(node, out)
    return out


def functions(code: str) -> list[tuple[str, list[str]]]:
    """(name, normalised node sequence) of every function in `code` (nested ones too); code that does not parse gives
    nothing, code with no function gives the whole module as one unit."""
    try:
        tree = parse(code)
    except (SyntaxError, ValueError):
        return []
    strip_docstrings(tree)
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    units = [(f.name, node_sequence(f)) for f in funcs] or [("<module>", node_sequence(tree))]
    return [(name, seq) for name, seq in units if len(seq) >= MIN_NODES]


def match_rate(a: list[int] | np.ndarray, b: list[int] | np.ndarray) -> float:
    """1 - Levenshtein distance / max length, for sequences of integer codes."""
    a, b = np.asarray(a), np.asarray(b)
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return float(n == m)
    ar = np.arange(m + 1)
    prev = ar.copy()
    for i in range(1, n + 1):
        sub = prev[:-1] + (b != a[i - 1])  # substitute (or keep)
        best = np.minimum(prev[1:] + 1, sub)  # delete or substitute
        row = np.empty(m + 1, dtype=prev.dtype)
        row[0] = i
        row[1:] = best
        # insertions chain left to right: row[j] = min_k<=j (row[k] + j - k)
        row = np.minimum.accumulate(row - ar) + ar
        prev = row
    return 1.0 - float(prev[m]) / max(n, m)


class Vocabulary:
    """Node type names -> small integers, so sequences compare as int arrays and histograms stack."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, seq: list[str]) -> np.ndarray:
        return np.array([self.ids.setdefault(s, len(self.ids)) for s in seq], np.int32)


def histograms(seqs: list[np.ndarray], size: int) -> np.ndarray:
    h = np.zeros((len(seqs), size), np.int32)
    for i, s in enumerate(seqs):
        np.add.at(h[i], s, 1)
    return h


def candidates(train: list[np.ndarray], refs: list[np.ndarray], threshold: float, vocab_size: int):
    """(i, j) pairs whose match rate can reach `threshold`: shared node count / max length >= threshold."""
    ht, hr = histograms(train, vocab_size), histograms(refs, vocab_size)
    lt = np.array([len(s) for s in train])[:, None]
    lr = np.array([len(s) for s in refs])[None, :]
    for start in range(0, len(train), 512):
        shared = np.minimum(ht[start:start + 512, None, :], hr[None, :, :]).sum(-1)  # [t, r]
        bound = shared / np.maximum(lt[start:start + 512], lr)
        for i, j in zip(*np.nonzero(bound >= threshold)):
            yield start + int(i), int(j)
