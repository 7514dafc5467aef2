"""One small tokenizer interface over SentencePiece (trained here, for Python code) and Hugging Face `tokenizer.json`.

    tok = Tokenizer.train(texts, vocab_size=2048, path="tok.model")   # SentencePiece BPE for code
    tok = Tokenizer.load("tok.model")                                  # ... or a tokenizer.json (e.g. phi-1's CodeGen BPE)
    ids = tok.encode(text); text == tok.decode(ids); tok.eos_id; tok.vocab_size; tok.fingerprint

The SentencePiece model is trained so that code survives exactly: no normalization (identity rule), no dummy prefix,
no collapsing of whitespace, whitespace-only pieces allowed (indentation becomes a few tokens), and byte fallback, so
no input is ever `<unk>`. `<|endoftext|>` is the EOS control symbol: it separates documents, and the literal string in
a text is encoded as ordinary characters, never as EOS.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from phi1_jax import files
from phi1_jax.errors import UserError

EOS_PIECE = "<|endoftext|>"
# SentencePiece skips training "sentences" longer than max_sentence_length bytes, so long files are cut at line
# boundaries into pieces of at most this many bytes for training (encoding is not affected).
_TRAIN_CHUNK_BYTES = 8192


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be trained or loaded; the message names the file."""


def _training_chunks(texts: Iterable[str]):
    for text in texts:
        buf, size = [], 0
        for line in text.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if buf and size + n > _TRAIN_CHUNK_BYTES:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += n
        if buf:
            yield "".join(buf)


class Tokenizer:
    """Wraps either a SentencePieceProcessor or a `tokenizers.Tokenizer` behind encode/decode/eos_id/vocab_size."""

    def __init__(self, backend, kind: str, path: Path):
        self._backend, self.kind, self.path = backend, kind, Path(path)
        self.fingerprint = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        if kind == "sentencepiece":
            self.vocab_size = backend.get_piece_size()
            self.eos_id = backend.eos_id()
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
            eos = backend.token_to_id(EOS_PIECE)
            if eos is None:
                raise TokenizerError(f"{self.path}: has no {EOS_PIECE!r} token to separate documents")
            self.eos_id = eos
        if self.eos_id is None or self.eos_id < 0:
            raise TokenizerError(f"{self.path}: has no EOS token")

    # --- construction -----------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int, path: str | os.PathLike, num_threads: int | None = None,
              max_training_chunks: int = 2_000_000, seed: int = 0) -> "Tokenizer":
        """Trains a SentencePiece BPE model for code on `texts`, writes it to `path` (atomically) and loads it."""
        import sentencepiece as spm

        if vocab_size < 300:
            raise TokenizerError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 + 2 ids")
        path = Path(path)
        chunks = _training_chunks(texts)
        first = next(chunks, None)
        if first is None:
            raise TokenizerError(f"cannot train {path}: the corpus is empty")
        model = io.BytesIO()
        spm.set_random_generator_seed(seed)  # the sampling of training chunks is reproducible

        def all_chunks():
            yield first
            yield from chunks

        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=all_chunks(), model_writer=model, model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
                split_digits=True, character_coverage=0.9995, unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
                eos_piece=EOS_PIECE, max_sentence_length=4 * _TRAIN_CHUNK_BYTES,
                input_sentence_size=max_training_chunks, shuffle_input_sentence=True,
                num_threads=num_threads or os.cpu_count() or 1, minloglevel=2,
            )
        except RuntimeError as e:
            raise TokenizerError(f"SentencePiece could not train {path}: {e}") from None
        with files.replacing(path) as tmp:
            tmp.write_bytes(model.getvalue())
        return cls.load(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """A SentencePiece `.model` file, or a Hugging Face `tokenizer.json` (the file or a directory holding it)."""
        path = Path(path)
        if path.is_dir():
            if not (path / "tokenizer.json").exists():
                raise TokenizerError(f"{path}: directory without tokenizer.json")
            path = path / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{path}: tokenizer file not found")
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                return cls(HFTokenizer.from_file(str(path)), "huggingface", path)
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
        return cls(sp, "sentencepiece", path)

    # --- use ---------------------------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return self._backend.encode(text)
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encodes many texts with the backend's own threads (SentencePiece's C++ pool, tokenizers' Rust pool)."""
        if self.kind == "sentencepiece":
            return self._backend.encode(list(texts), num_threads=num_threads)
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, path={str(self.path)!r})"


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """A tokenizer whose ids reach past the model's embedding is refused (the reverse, padding, is fine)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"{tokenizer.path}: vocab_size {tokenizer.vocab_size} does not fit the model's vocab_size "
            f"{model_vocab_size}; set config.model.vocab_size >= {tokenizer.vocab_size} or use another tokenizer"
        )
