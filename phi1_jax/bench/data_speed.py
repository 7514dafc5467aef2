"""Data benchmarks (a script, not a test): loader throughput, and shard writing against a `datasets.map` baseline.

Command:  python -m phi1_jax.bench.data_speed [--seq-len=2048] [--batch=8] [--batches=300] [--copies=4] [--json=PATH]
Expect:   about a minute on 2 cores. Uses the embedded stdlib corpus (built and cached on first use).

1. Loader: tokens/s out of `phi1_jax.data` (ArrayRecord shards -> shuffle -> decode -> pack -> mix -> batch) for one
   source and for a three-source mixture, in this one process (no Grain worker processes).
2. Shard writing: tokens/s of `phi1_jax.shard_format.write_shards` (SentencePiece batch encoding on all cores + ArrayRecord
   writes) and of the common baseline, `datasets.Dataset.map(batched=True, num_proc=cores)` calling the same
   tokenizer (no files written by the baseline beyond datasets' own cache), on the same texts, in the same run.
`--json=PATH` also writes the figures as one JSON object ({"machine", "loader", "writing"}).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

from phi1_jax import cli, data, embedded_corpus, files
from phi1_jax.shard_format import Document, write_shards


def bench_loader(corpus, tok, seq_len, batch, batches, n_sources):
    sources = [data.Source(f"s{i}", str(corpus.shard_dir), 1.0) for i in range(n_sources)]
    ds = data.make_dataset(sources, seq_len=seq_len, batch_size=batch, eos_id=tok.eos_id, seed=0,
                           tokenizer_fingerprint=tok.fingerprint)
    it = iter(ds)
    for _ in range(10):  # warm up: open shards, fill packing buffers
        next(it)
    t0 = time.perf_counter()
    tokens = sum(next(it)["inputs"].size for _ in range(batches))
    return tokens / (time.perf_counter() - t0)


_SP = None


def _hf_map_tokenize(batch, model_path):
    global _SP
    if _SP is None:
        import sentencepiece as spm

        _SP = spm.SentencePieceProcessor(model_file=model_path)
    return {"ids": _SP.encode(batch["text"])}


def bench_writing(corpus, tok, copies):
    import datasets

    docs, _ = embedded_corpus.collect_documents()
    texts = [d.text for d in docs] * copies
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = write_shards((Document(t) for t in texts), tok, os.path.join(tmp, "shards"), source_name="bench",
                         input_desc="bench", docs_per_shard=500, progress=False)
        ours = m["tokens"] / (time.perf_counter() - t0)
        ds = datasets.Dataset.from_dict({"text": texts})
        t0 = time.perf_counter()
        out = ds.map(_hf_map_tokenize, batched=True, batch_size=100, num_proc=os.cpu_count(), remove_columns=["text"],
                     fn_kwargs={"model_path": str(tok.path)}, cache_file_name=os.path.join(tmp, "map.arrow"))
        n = sum(len(x) for x in out["ids"])
        baseline = n / (time.perf_counter() - t0)
    assert n == m["tokens"], (n, m["tokens"])  # same tokenizer, same texts: the same tokens
    return ours, baseline, m["tokens"]


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--copies", type=int, default=4, help="times the corpus is repeated for the writing benchmark")
    p.add_argument("--json", default=None, help="also write the figures here, as one JSON object")
    args = p.parse_args(argv)
    corpus = embedded_corpus.build()
    tok = corpus.tokenizer()
    machine = dict(machine=platform.machine(), cores=os.cpu_count(), python=platform.python_version())
    print(f"machine: {machine['machine']}, {machine['cores']} cores, Python {machine['python']}")
    loader = []
    for n in (1, 3):
        tps = bench_loader(corpus, tok, args.seq_len, args.batch, args.batches, n)
        loader.append(dict(sources=n, seq_len=args.seq_len, batch=args.batch, tokens_per_s=tps))
        print(f"loader, {n} source(s), seq {args.seq_len}, batch {args.batch}: {tps / 1e6:.2f}M tokens/s")
    ours, baseline, tokens = bench_writing(corpus, tok, args.copies)
    print(f"shard writing, {tokens:,} tokens: phi1_jax.data_gen.shards {ours / 1e6:.2f}M tokens/s, "
          f"datasets.map baseline {baseline / 1e6:.2f}M tokens/s, ratio {ours / baseline:.2f}x")
    if args.json:
        writing = dict(tokens=tokens, ours_tokens_per_s=ours, datasets_map_tokens_per_s=baseline, ratio=ours / baseline)
        files.write_text(args.json, json.dumps(dict(machine=machine, loader=loader, writing=writing), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
