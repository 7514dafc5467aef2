"""Dedup side by side: `phi1_jax.data_gen.dedup` (Ray Data) and datatrove's MinHash pipeline on one corpus with planted
near-duplicates, at 1 and 2 worker processes: wall time, docs/s, peak memory (all processes of the run), recall on
the planted copies and other documents removed.

    python -m phi1_jax.bench.dedup_speed --docs=30000 --copies=3000 --workers=1,2 \\
        [--datatrove-python=/path/to/venv/bin/python] [--json=dedup_speed.json]

datatrove is not a dependency: give `--datatrove-python`, a Python with `pip install datatrove` (it runs there, as a
subprocess). Both use 5-shingles and 9 bands x 13 rows (datatrove: num_buckets=9, hashes_per_bucket=13), so they
find the same kind of pairs; their tokenisers and hash functions differ.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from phi1_jax import cli


def planted_corpus(n_docs: int, n_copies: int, seed: int = 0, words: int = 200):
    """Random-word documents (pairwise Jaccard ~0) and near-copies of some of them: one word changed (Jaccard of
    5-shingles ~0.95), a line appended, or re-cased. Returns (records, {copy index: original index}); each copy comes
    after its original, so the original is the one a keep-the-first rule keeps."""
    rng = random.Random(seed)
    vocab = [f"w{i}{rng.choice('abcdefgh')}" for i in range(5000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n_docs)]
    copies = []
    for k in range(n_copies):
        src = rng.randrange(n_docs)
        text = docs[src].split()
        if k % 3 == 0:
            text[rng.randrange(len(text))] = rng.choice(vocab)
            copies.append((src, " ".join(text)))
        elif k % 3 == 1:
            copies.append((src, docs[src] + "\nSee also the next section."))
        else:
            copies.append((src, docs[src].upper()))
    # copies go after every original, in a shuffled order: original i keeps index i
    order = list(range(n_copies))
    rng.shuffle(order)
    records = [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)]
    planted = {}
    for k in order:
        src, text = copies[k]
        planted[len(records)] = src
        records.append({"id": f"d{len(records)}", "text": text})
    return records, planted


def _peak_rss(proc: subprocess.Popen, box: dict) -> None:
    import psutil

    peak = 0
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(0.2)
    except psutil.Error:
        pass
    box["peak_mb"] = round(peak / 2**20)


def _timed(cmd: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    box: dict = {}
    th = threading.Thread(target=_peak_rss, args=(proc, box))
    th.start()
    log, _ = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed:\n{log[-3000:]}")
    return {"seconds": round(time.perf_counter() - t, 2), **box}


DATATROVE = textwrap.dedent('''
    import sys
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    if __name__ == "__main__":  # datatrove's workers start by importing this file
        src, work, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
        # sha1, as datasketch (ours) uses: datatrove's default xxhash call fails with xxhash >= 3.6 (it passes str)
        cfg = MinhashConfig(n_grams=5, num_buckets=9, hashes_per_bucket=13, hash_config=HashConfig(hash_fc="sha1"))
        s1 = LocalPipelineExecutor([JsonlReader(src), MinhashDedupSignature(f"{work}/sigs", config=cfg)],
                                   tasks=workers, workers=workers, logging_dir=f"{work}/log1")
        s2 = LocalPipelineExecutor([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
                                   tasks=cfg.num_buckets, workers=workers, logging_dir=f"{work}/log2", depends=s1)
        s3 = LocalPipelineExecutor([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)],
                                   tasks=1, logging_dir=f"{work}/log3", depends=s2)
        s4 = LocalPipelineExecutor([JsonlReader(src), MinhashDedupFilter(f"{work}/remove",
                                    exclusion_writer=JsonlWriter(f"{work}/removed", compression=None)),
                                    JsonlWriter(f"{work}/kept", compression=None)],
                                   tasks=workers, workers=workers, logging_dir=f"{work}/log4", depends=s3)
        s4.run()
''')


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.bench.dedup_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=30000)
    p.add_argument("--copies", type=int, default=3000)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--datatrove-python", default=None)
    p.add_argument("--tools", default="ours,datatrove", help="which to run (datatrove needs --datatrove-python)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dedup_speed."))
    records, planted = planted_corpus(a.docs, a.copies)
    src = work / "corpus"
    src.mkdir()
    (src / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    n, others = len(records), len(records) - len(planted)
    rows = []
    for w in [int(x) for x in a.workers.split(",")]:
        if "ours" in a.tools:
            rows.append(_ours(src, work, w, n, planted))
            print(rows[-1], flush=True)
        if a.datatrove_python and "datatrove" in a.tools:
            rows.append(_datatrove(a.datatrove_python, src, work, w, n, planted))
            print(rows[-1], flush=True)
    result = {"docs": n, "planted": len(planted), "others": others, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _ours(src, work, w, n, planted):
    out = work / f"ours{w}"
    m = _timed([sys.executable, "-m", "phi1_jax.data_gen.dedup", str(src / "corpus.jsonl"), f"--out={out}",
                f"--num-cpus={w}", "--no-progress"])
    report = json.loads((out / "dedup_report.json").read_text())
    removed = {int(r["id"][1:]) for r in report["removed"]}
    return {"tool": "phi1_jax dedup (Ray Data)", "workers": w, **m, "pipeline_seconds": report["seconds"],
            "docs_per_s": round(n / m["seconds"], 1),
            "recall": round(len(removed & set(planted)) / len(planted), 4),
            "others_removed": len(removed - set(planted))}


def _datatrove(python, src, work, w, n, planted):
    dt = work / f"datatrove{w}"
    script = work / "datatrove_dedup.py"
    script.write_text(DATATROVE)
    m = _timed([python, str(script), str(src), str(dt), str(w)])
    removed = set()
    for f in (dt / "removed").glob("*.jsonl*"):
        removed |= {int(json.loads(x)["id"][1:]) for x in f.read_text().splitlines()}
    return {"tool": "datatrove MinHash (LocalPipelineExecutor)", "workers": w, **m,
            "docs_per_s": round(n / m["seconds"], 1),
            "recall": round(len(removed & set(planted)) / len(planted), 4),
            "others_removed": len(removed - set(planted))}


if __name__ == "__main__":
    sys.exit(main())
