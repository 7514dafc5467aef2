"""The Grain input pipeline: shards -> shuffled documents -> packed windows -> mixed -> batches.

Per source (a shard directory written by `phi1_jax.data_gen.shards`):
  ArrayRecord records -> global shuffle, reseeded each epoch (Grain's index shuffle: no buffer, any size)
  -> this process's share (every process_count-th document of the global order, from process_index)
  -> document + EOS, with a per-token loss weight (0 on an exercise's prompt when the source says loss_on="solution")
  -> Grain's ConcatThenSplit packing into windows of seq_len + 1 tokens (documents run across windows; segment ids
     and positions restart at each document piece).
Sources are then mixed window by window with the configured weights (each sequence comes from one source, so the
proportions of sequences equal the weights), and batched.

The batch contract with the trainer (all [B, seq_len] int32 but loss_mask float32):
  inputs, targets (= inputs shifted by one), segment_ids (>= 1 for tokens, 0 for padding), positions (restart at 0 per
  document), loss_mask (1 where the target is learned: same document as the input, not padding, not an exercise's
  prompt), and source_id [B] (index into the sources, for per-source metrics).
The EOS that ends a document belongs to it, so the model learns to stop; the one target per boundary that would
cross into the next document (EOS -> its first token) is masked.

The iterator's state (`it.get_state()` / `it.set_state(state)`) is Grain's: restoring it yields exactly the batches
the uninterrupted iterator would have.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import grain
import numpy as np

from phi1_jax.errors import UserError
from phi1_jax.shard_format import ShardError, decode_record, read_manifest


# The batch contract with the trainer, declared once: what goes to the devices ([B, seq_len] each), by dtype. The
# step's shardings, the dry run's abstract batch and the benchmarks' synthetic batches are all built from it. The
# loader's batches also carry source_id ([B]), which stays on the host.
DEVICE_BATCH = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
                "loss_mask": np.float32}


def device_part(batch: dict) -> dict:
    """The keys of `batch` that the train step takes."""
    return {k: batch[k] for k in DEVICE_BATCH}


class DataError(UserError, ValueError):
    """A data configuration or shard set that cannot be read; the message names the file or field."""


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    path: str  # a shard directory
    weight: float
    loss_on: str = "all"  # "all", or "solution": no loss on the prompt part of each document

    def __post_init__(self):
        if self.loss_on not in ("all", "solution"):
            raise DataError(f"source {self.name!r}: loss_on must be 'all' or 'solution', got {self.loss_on!r}")
        if not self.weight > 0:
            raise DataError(f"source {self.name!r}: weight must be positive, got {self.weight!r}")
        if not self.path:
            raise DataError(f"source {self.name!r}: no shard directory given (config.data.sources.{self.name}.path)")


def _open_source(source: Source, tokenizer_fingerprint: str | None):
    try:
        manifest = read_manifest(source.path, tokenizer_fingerprint=tokenizer_fingerprint)
    except ShardError as e:
        raise DataError(f"source {source.name!r}: {e}") from None
    files = [str(Path(source.path) / s["file"]) for s in manifest["shards"]]
    try:
        records = grain.sources.ArrayRecordDataSource(files)
        n = len(records)
    except Exception as e:  # array_record raises bare RuntimeErrors from C++ for corrupt files
        raise DataError(f"source {source.name!r}: cannot open shards in {source.path} ({e})") from None
    if n != manifest["documents"]:
        raise DataError(f"source {source.name!r}: shards in {source.path} hold {n} records, manifest says "
                        f"{manifest['documents']}: a shard is truncated or was replaced")
    return records, manifest


def _example(record: bytes, *, dtype, eos_id: int, loss_on: str, where: str) -> dict:
    try:
        prompt_len, ids = decode_record(record, dtype)
    except Exception as e:
        raise DataError(f"{where}: corrupt record ({e})") from None
    tokens = np.empty(len(ids) + 1, np.int32)
    tokens[:-1], tokens[-1] = ids, eos_id
    loss = np.ones_like(tokens)
    if loss_on == "solution":
        loss[:prompt_len] = 0  # weight of token j as a target
    return {"tokens": tokens, "loss": loss}


def _training_example(window: dict, *, source_id: int) -> dict:
    tokens, seg, pos, loss = window["tokens"], window["tokens_segment_ids"], window["tokens_positions"], window["loss"]
    same_doc = (seg[1:] == seg[:-1]) & (seg[1:] != 0)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": seg[:-1],
        "positions": pos[:-1],
        "loss_mask": (loss[1:] * same_doc).astype(np.float32),
        "source_id": np.int32(source_id),
    }


class _Subset:
    """A random-access view of some records: every `every`-th (held out) or all the others (training)."""

    def __init__(self, records, every: int, held_out: bool):
        n = len(records)
        self._records = records
        self._index = np.arange(0, n, every) if held_out else np.setdiff1d(np.arange(n), np.arange(0, n, every))

    def __len__(self):
        return len(self._index)

    def __getitem__(self, i):
        return self._records[int(self._index[i])]


def document_dataset(source: Source, *, eos_id: int, seed: int, process_index: int = 0, process_count: int = 1,
                     tokenizer_fingerprint: str | None = None, epochs: int | None = None,
                     holdout_every: int = 0, split: str = "train") -> grain.MapDataset:
    """This process's documents of one source, shuffled globally and reshuffled each epoch (infinite by default).

    With `holdout_every = n > 0`, every n-th document is held out: split "eval" reads those, "train" the rest.
    """
    records, manifest = _open_source(source, tokenizer_fingerprint)
    dtype = np.dtype(manifest["dtype"])
    if holdout_every:
        records = _Subset(records, holdout_every, held_out=(split == "eval"))
        if len(records) == 0:
            raise DataError(f"source {source.name!r}: no documents left for split {split!r} "
                            f"(holdout_every={holdout_every}, {manifest['documents']} documents)")
    ds = grain.MapDataset.source(records).seed(seed).shuffle().repeat(epochs)
    ds = ds[process_index::process_count]
    return ds.map(functools.partial(_example, dtype=dtype, eos_id=eos_id, loss_on=source.loss_on, where=source.path))


def make_dataset(sources: list[Source], *, seq_len: int, batch_size: int, eos_id: int, seed: int,
                 process_index: int = 0, process_count: int = 1, tokenizer_fingerprint: str | None = None,
                 epochs: int | None = None, holdout_every: int = 0, split: str = "train") -> grain.IterDataset:
    """Batches of this process's share: `batch_size` is the global batch, divided among the processes."""
    if not sources:
        raise DataError("no data sources configured")
    if batch_size % process_count:
        raise DataError(f"global batch_size {batch_size} does not divide among {process_count} processes")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataError(f"duplicate source names {names}")
    windows = {}
    for i, source in enumerate(sources):
        docs = document_dataset(source, eos_id=eos_id, seed=(seed + 1_000_003 * i) % 2**32, process_index=process_index,
                                process_count=process_count, tokenizer_fingerprint=tokenizer_fingerprint, epochs=epochs,
                                holdout_every=holdout_every, split=split)
        packed = grain.experimental.ConcatThenSplitIterDataset(
            docs.to_iter_dataset(), length_struct={"tokens": seq_len + 1, "loss": seq_len + 1}
        )
        windows[source.name] = packed.map(functools.partial(_training_example, source_id=i))
    total = sum(s.weight for s in sources)
    mixed = grain.IterDataset.mix(windows, {s.name: s.weight / total for s in sources}) if len(sources) > 1 \
        else windows[sources[0].name]
    return mixed.batch(batch_size // process_count, drop_remainder=True)


def sources_from_config(data_config, with_path_only: bool = False) -> list[Source]:
    """`config.data.sources` (a mapping name -> {path, weight, loss_on}) as Source objects; `with_path_only` leaves
    out the sources whose path is empty (not in use) instead of refusing them."""
    return [Source(name=name, path=s.path, weight=s.weight, loss_on=s.loss_on) for name, s in data_config.sources.items()
            if s.path or not with_path_only]


def from_config(config, *, process_index: int | None = None, process_count: int | None = None,
                epochs: int | None = None, split: str = "train"):
    """(dataset, tokenizer) for a trainer config: its sources, or the embedded corpus; checked against the model.

    split "eval" reads the documents held out by `config.data.holdout_every` (none are when it is 0).
    """
    from phi1_jax import embedded_corpus
    from phi1_jax.tokenizer import Tokenizer, check_vocab_fits

    if config.data.shard_by not in ("document", "row"):
        raise DataError(f"config.data.shard_by must be 'document' or 'row', got {config.data.shard_by!r}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if config.data.shard_by == "row":  # every process reads the whole stream; the trainer keeps each device's rows
        process_index, process_count = 0, 1
    if config.data.use_embedded_corpus:
        corpus = embedded_corpus.build(config.data.embedded_vocab_size)
        tokenizer = corpus.tokenizer()
        # Configured sources that name a path (shards made with the embedded tokenizer) are mixed in beside it, e.g.
        # configs/tiny_fig2_1.py's stdlib + exercises; those without one (configs/phi1.py's defaults) are not in use.
        sources = [Source("stdlib", str(corpus.shard_dir), float(config.data.embedded_weight))]
        sources += sources_from_config(config.data, with_path_only=True)
    else:
        if not config.data.tokenizer:
            raise DataError("config.data.tokenizer is empty: name a SentencePiece .model or a tokenizer.json")
        tokenizer = Tokenizer.load(config.data.tokenizer)
        sources = sources_from_config(config.data)
    check_vocab_fits(tokenizer, config.model.vocab_size)
    ds = make_dataset(sources, seq_len=config.seq_len, batch_size=config.batch_size, eos_id=tokenizer.eos_id,
                      seed=config.seed, process_index=process_index, process_count=process_count,
                      tokenizer_fingerprint=tokenizer.fingerprint, epochs=epochs,
                      holdout_every=config.data.holdout_every, split=split)
    return ds, tokenizer
