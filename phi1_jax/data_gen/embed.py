"""Embeddings of code for the educational-value classifier and for decontamination (arXiv 2306.11644 §2.1, §5).

The paper embeds code with a pretrained CodeGen model. Two embedders share one interface (`embed(texts) -> [N, E]`
float32, and a `spec` string saved beside whatever is trained on them, so scoring uses the embedder training used):

- `model:PATH`: mean-pooled final hidden states (after the last LayerNorm) of a phi1_jax model: a trainer workdir
  (newest checkpoint, tokenizer copied beside it) or a Hugging Face Phi directory (`config.json`, weights and
  `tokenizer.json`; e.g. microsoft/phi-1 downloaded once). Texts are cut to `max_tokens` tokens and run in padded
  batches of a few fixed lengths (one compile each).
- `hashing` (or `hashing:DIM`): the lighter fallback for machines without a model. scikit-learn's HashingVectorizer
  over code tokens (identifiers, keywords and single punctuation marks; unigrams and bigrams, sublinear counts, L2
  normalised) plus eight style features that a grader of "educational value" looks at: comment and docstring density,
  blank lines, line length, definitions per line, identifier length, and how many lines are data literals.
  Nothing is fitted: the same text always maps to the same vector.
"""

from __future__ import annotations

import ast
import io
import math
import re
import tokenize

import numpy as np

from phi1_jax.data_gen import ast_match
from phi1_jax.errors import UserError

_CODE_TOKEN = r"[A-Za-z_]\w*|\d+|[^\w\s]"


class EmbedError(UserError, ValueError):
    """An embedder that cannot be built; the message names the path or spec."""


def style_features(text: str) -> np.ndarray:
    lines = text.splitlines() or [""]
    n = len(lines)
    code_lines = [ln for ln in lines if ln.strip()]
    comments = sum(ln.strip().startswith("#") for ln in lines)
    docstrings = defs = 0
    try:
        tree = ast_match.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
                defs += not isinstance(node, ast.Module)
                docstrings += ast.get_docstring(node) is not None
        parses = 1.0
    except (SyntaxError, ValueError):
        parses = 0.0
    idents = re.findall(r"[A-Za-z_]\w*", text)
    literal_lines = sum(bool(re.fullmatch(r"\s*[\[\(\{]?\s*(['\"\d\-].*)[,\]\)\}]?\s*", ln)) for ln in code_lines)
    return np.array([
        comments / n, docstrings / max(defs, 1), 1 - len(code_lines) / n,
        min(np.mean([len(ln) for ln in code_lines]) / 80 if code_lines else 0.0, 2.0),
        min(defs / n * 10, 2.0), min(np.mean([len(i) for i in idents]) / 10 if idents else 0.0, 2.0),
        literal_lines / max(len(code_lines), 1), parses], np.float32)


class HashingEmbedder:
    def __init__(self, dim: int = 1024):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.dim = dim
        self.spec = f"hashing:{dim}"
        self._vec = HashingVectorizer(n_features=dim, token_pattern=_CODE_TOKEN, lowercase=False, ngram_range=(1, 2),
                                      alternate_sign=False, norm=None)

    def embed(self, texts: list[str]) -> np.ndarray:
        counts = self._vec.transform([_strip_comments_safe(t) for t in texts]).toarray()
        counts = np.log1p(counts)
        counts /= np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1e-12)
        return np.concatenate([counts, np.stack([style_features(t) for t in texts])], axis=1).astype(np.float32)


def _strip_comments_safe(text: str) -> str:
    """Code tokens only (comments and strings still count through the style features); text that does not tokenize
    is used as is."""
    try:
        toks = tokenize.generate_tokens(io.StringIO(text).readline)
        return " ".join(t.string for t in toks if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                                                   tokenize.INDENT, tokenize.DEDENT))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return text


class ModelEmbedder:
    def __init__(self, path: str, max_tokens: int = 512, batch_size: int = 8):
        import jax
        from flax import nnx

        from phi1_jax import loader

        self.spec = f"model:{path}"
        try:
            loaded = loader.open(path)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
        except loader.LoadError as e:
            raise EmbedError(f"model:{path}: {e}") from None
        if self.tokenizer is None:
            raise EmbedError(f"{path}: no tokenizer (tokenizer.model or tokenizer.json) beside the model")
        self.max_tokens = min(max_tokens, self.model.cfg.max_seq_len)
        self.batch_size = batch_size
        graphdef, state = nnx.split(self.model)

        @jax.jit
        def pooled(state, ids, mask):
            model = nnx.merge(graphdef, state)
            h = model(ids, segment_ids=mask).hidden  # [B, T, D]; the unread logits are never computed
            w = mask[..., None].astype(h.dtype)
            return (h * w).sum(1) / jax.numpy.maximum(w.sum(1), 1.0)

        self._state, self._pooled = state, pooled

    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids = [self.tokenizer.encode(t)[: self.max_tokens] or [self.tokenizer.eos_id]
                   for t in texts[i:i + self.batch_size]]
            length = min(self.max_tokens, 64 * 2 ** math.ceil(math.log2(max(1, max(map(len, ids)) / 64))))
            tok = np.zeros((self.batch_size, length), np.int32)
            mask = np.zeros((self.batch_size, length), np.int32)
            for r, row in enumerate(ids):
                tok[r, :len(row)], mask[r, :len(row)] = row, 1
            out.append(np.asarray(self._pooled(self._state, tok, mask))[: len(ids)])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.model.cfg.d_model), np.float32)


def make_embedder(spec: str):
    """`hashing`, `hashing:DIM`, or `model:PATH` (see the module docstring)."""
    if spec == "hashing" or spec.startswith("hashing:"):
        dim = spec.partition(":")[2] or "1024"
        if not dim.isdigit() or int(dim) < 16:
            raise EmbedError(f"embedder {spec!r}: hashing:DIM needs an integer DIM >= 16")
        return HashingEmbedder(int(dim))
    if spec.startswith("model:"):
        return ModelEmbedder(spec.partition(":")[2])
    raise EmbedError(f"unknown embedder {spec!r}: use 'hashing', 'hashing:DIM' or 'model:PATH'")
