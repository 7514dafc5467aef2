"""Dedup side by side: `phi1_jax.data_gen.dedup` (Ray Data) and datatrove's MinHash pipeline on one corpus with planted
near-duplicates, at 1 and 2 worker processes: wall time, docs/s, peak memory (summed PSS of all processes of the run),
recall on the planted copies and other documents removed.

    python -m phi1_jax.bench.dedup_speed --docs=30000 --copies=3000 --workers=1,2 \\
        [--datatrove-python=/path/to/venv/bin/python] [--json=dedup_speed.json]

Ours runs two ways (`--ray=local,cluster`, both by default): as a user's first command runs it, starting its own local
Ray (`--num-cpus=W`; Ray's start and stop, ~5 s on this machine, are inside the time), and as a cluster
user runs it, joining a running one-node Ray of W CPUs with `--ray-address` (started before the clock and warmed by
one untimed run on 20 records, as a cluster that has run a Ray Data job before: Ray Data's detached actors are up;
stopped after).

A third way, `warm`, times the pipeline alone at its steady state: one driver on a running one-node Ray runs it
on the 20 warm-up records (a record or two per task, so every worker runs every stage) and then on the corpus, timed,
in the same job, so the job's worker processes are up and have imported what the stages need (a command's first tasks
wait ~2 s for them here). It is the rate a long job goes at, the throughput the issue's scaling bar is about; the
command's own wall time (the other two ways) is what one command costs, its fixed start included.

It ends with a one-screen summary: a row per run (with the load average before and after it) and the ratios: 2 workers
over 1 for each way (the bar, >= 1.6x, on the warm way's), and ours over datatrove (>= 1x) for each command way.

datatrove is not a dependency: give `--datatrove-python`, a Python with datatrove (it runs there, as a subprocess):
`python3.12 -m venv /tmp/dt-venv && /tmp/dt-venv/bin/pip install "datatrove[processing]"`. Both use 5-shingles and
9 bands x 13 rows (datatrove: num_buckets=9, hashes_per_bucket=13), so they find the same kind of pairs; their
tokenisers and hash functions differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from phi1_jax import cli


def planted_corpus(n_docs: int, n_copies: int, seed: int = 0, words: int = 200, interleave: bool = False):
    """Random-word documents (pairwise Jaccard ~0) and near-copies of some of them: one word changed (Jaccard of
    5-shingles ~0.95), a line appended, or re-cased (the exact-text band). Returns (records, {copy index: original
    index}); each copy comes after its original, so the original is the one a keep-the-first rule keeps: after every
    original in a shuffled order, or (`interleave`, the tests') at a random place anywhere after its own."""
    rng = random.Random(seed)
    vocab = [f"w{i}{rng.choice('abcdefgh')}" for i in range(5000)]
    docs = [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n_docs)]
    items = [(float(i), None, t) for i, t in enumerate(docs)]  # (place, original of a copy, text)
    for k in range(n_copies):
        src = rng.randrange(n_docs)
        text = docs[src].split()
        if k % 3 == 0:
            text[rng.randrange(len(text))] = rng.choice(vocab)
            copy = " ".join(text)
        elif k % 3 == 1:
            copy = docs[src] + "\nSee also the next section."
        else:
            copy = docs[src].upper()
        items.append((max(rng.uniform(src, n_docs), src + 1e-9) if interleave else None, src, copy))
    if not interleave:  # after every original, in a shuffled order
        order = list(range(n_copies))
        rng.shuffle(order)
        for rank, k in enumerate(order):
            items[n_docs + k] = (n_docs + rank, *items[n_docs + k][1:])
    items.sort(key=lambda item: item[0])
    new_index = {int(place): i for i, (place, src, _) in enumerate(items) if src is None}
    records = [{"id": f"d{i}", "text": text} for i, (_, _, text) in enumerate(items)]
    planted = {i: new_index[src] for i, (_, src, _) in enumerate(items) if src is not None}
    return records, planted


def _peak_memory(proc: subprocess.Popen, box: dict, also=lambda: ()) -> None:
    """Peak of the summed PSS of PROC, its descendants and the processes `also()` names (a running cluster's). PSS
    splits each shared page among the processes that map it, so Ray's shared-memory object store and the shared
    libraries count once; summed RSS (kept as peak_rss_mb) counts them once per process."""
    import psutil

    peak = peak_rss = 0
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = total_rss = 0
            procs = [root, *root.children(recursive=True)]
            for pid in also():
                try:
                    procs.append(psutil.Process(pid))
                except psutil.Error:
                    pass
            for p in procs:
                try:
                    m = p.memory_full_info()
                except psutil.Error:
                    continue
                total += m.pss
                total_rss += m.rss
            peak, peak_rss = max(peak, total), max(peak_rss, total_rss)
            time.sleep(0.2)
    except psutil.Error:
        pass
    box["peak_mb"], box["peak_rss_mb"] = round(peak / 2**20), round(peak_rss / 2**20)


def _timed(cmd: list[str], also=lambda: ()) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    box: dict = {}
    th = threading.Thread(target=_peak_memory, args=(proc, box, also))
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
        # sha1: datatrove's default xxhash call fails with xxhash >= 3.6 (it passes str)
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
    p.add_argument("--docs", type=int, default=30000, help="records in all, planted copies included")
    p.add_argument("--copies", type=int, default=3000)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--datatrove-python", default=None)
    p.add_argument("--tools", default="ours,datatrove", help="which to run (datatrove needs --datatrove-python)")
    p.add_argument("--ray", default="local,cluster,warm",
                   help="how ours gets its Ray: local (the command starts one, timed), cluster (a running one), warm "
                        "(a running one and a job whose workers are up: the pipeline's steady-state rate)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if bad := [x for x in a.ray.split(",") if x not in ("local", "cluster", "warm")]:
        p.error(f"--ray={a.ray}: {bad[0]!r} is not local, cluster or warm")
    work = Path(tempfile.mkdtemp(prefix="dedup_speed."))
    try:
        return _run(a, work, argv)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the corpus and both tools' outputs: ~0.5 GB at 30k records


def _run(a, work: Path, argv) -> int:
    records, planted = planted_corpus(a.docs - a.copies, a.copies)
    src = work / "corpus"
    src.mkdir()
    (src / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    n, others = len(records), len(records) - len(planted)
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for w in [int(x) for x in a.workers.split(",")]:  # interleaved: each worker count runs both tools back to back
        for how in a.ray.split(",") if "ours" in a.tools else []:
            rows.append(_with_load(_ours, src, work, w, n, planted, how))
            print(rows[-1], flush=True)
        if a.datatrove_python and "datatrove" in a.tools:
            rows.append(_with_load(_datatrove, a.datatrove_python, src, work, w, n, planted))
            print(rows[-1], flush=True)
    result = {"docs": n, "planted": len(planted), "others": others, "started": started, "cores": os.cpu_count(),
              "rows": rows, "ratios": _ratios(rows)}
    print(summary(result, argv if argv is not None else sys.argv[1:]))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _with_load(fn, *args) -> dict:
    before = os.getloadavg()[0]
    row = fn(*args)
    return {**row, "load_before": round(before, 1), "load_after": round(os.getloadavg()[0], 1)}


def _ratios(rows: list[dict]) -> dict:
    """The issue's two bars: ours at 2 workers over ours at 1 (>= 1.6), and ours over datatrove at each worker
    count (>= 1), as throughput ratios (docs/s of the whole command). Ours at 2 over 1 also as the pipeline's own
    throughput (`pipeline_docs_per_s`): the command's fixed start (Python, imports, joining or starting Ray) left out."""
    by = {(_name(r), r["workers"]): r["docs_per_s"] for r in rows}
    out = {}
    ws = sorted({w for _, w in by})
    for ours in ("ours_local", "ours_cluster", "ours_warm"):
        if (ours, 1) in by and (ours, 2) in by:
            out[f"{ours}_2_over_1"] = round(by[ours, 2] / by[ours, 1], 2)
        for w in ws if ours != "ours_warm" else ():  # datatrove's figure is a whole command's: the start in it
            if (ours, w) in by and ("datatrove", w) in by:
                out[f"{ours}_over_datatrove_at_{w}"] = round(by[ours, w] / by["datatrove", w], 2)
        pipe = {r["workers"]: r["pipeline_docs_per_s"] for r in rows if _name(r) == ours and "pipeline_docs_per_s" in r}
        if 1 in pipe and 2 in pipe:
            out[f"{ours}_pipeline_2_over_1"] = round(pipe[2] / pipe[1], 2)
    if ("datatrove", 1) in by and ("datatrove", 2) in by:
        out["datatrove_2_over_1"] = round(by["datatrove", 2] / by["datatrove", 1], 2)
    return out


def _name(row: dict) -> str:
    return f"ours_{row['ray']}" if row["tool"].startswith("phi1_jax") else row["tool"].split()[0]


def summary(result: dict, argv: list[str]) -> str:
    """One screen: the command, the machine and load, a row per run, the two ratios against the issue's bars."""
    lines = ["", f"dedup side by side: {result['docs']} records ({result['planted']} planted near-copies), "
             f"{result['cores']} cores, started {result['started']}",
             "command: python -m phi1_jax.bench.dedup_speed " + " ".join(argv), "",
             f"{'tool':<14}{'workers':>8}{'wall s':>9}{'docs/s':>9}{'peak MB':>9}{'recall':>8}{'others':>8}"
             f"{'load avg':>13}"]
    for r in result["rows"]:
        lines.append(f"{_name(r):<14}{r['workers']:>8}{r['seconds']:>9.1f}{r['docs_per_s']:>9.1f}"
                     f"{r.get('peak_mb', '-'):>9}{r['recall']:>8.4f}{r['others_removed']:>8}"
                     f"{r['load_before']:>7.1f}->{r['load_after']:<4.1f}")
    for r in result["rows"]:
        if "pipeline_seconds" in r:
            lines.append(f"  {_name(r)} at {r['workers']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                                      r["pipeline_seconds"].items()))
    for r in result["rows"]:
        if r.get("cluster_processes_left"):
            lines.append(f"  warning: processes of the cluster at {r['workers']} outlived it: {r['cluster_processes_left']}")
    ra = result["ratios"]
    lines.append("")
    for k, v in ra.items():
        if k.endswith("_pipeline_2_over_1"):
            lines.append(f"{k[:-18]}, 2 workers over 1, the pipeline's own docs/s (dedup + write, the command's start "
                         f"and Ray's left out): {v:.2f}x")
        elif k.endswith("_2_over_1"):
            if k.startswith("ours_warm"):  # the rate a running job goes at: what the scaling bar is about
                note = f"  (the pipeline's throughput; bar >= 1.6: {'MET' if v >= 1.6 else 'not met'})"
            elif k.startswith("ours"):
                note = "  (a whole command: its imports, Ray's start and the job's start included)"
            else:
                note = ""
            lines.append(f"{k[:-9]}, 2 workers over 1: {v:.2f}x{note}")
    for k, v in ra.items():
        if "_over_datatrove_at_" in k:
            ours, w = k.split("_over_datatrove_at_")
            lines.append(f"{ours} over datatrove at {w} worker(s): {v:.2f}x  (bar >= 1: {'MET' if v >= 1 else 'not met'})")
    lines.append("(load average above ~0.5 per core means other jobs shared the cores: the ratios are then not the "
                 "tools' own)")
    return "\n".join(lines)


def warm_driver(address: str, src: str, out: str, warm: str) -> None:
    """The `warm` way: one driver (one Ray job) runs the pipeline on the warm-up records, then on the corpus, timed, and
    prints {"seconds": ...}: a job whose worker processes are started and have imported the pipeline's modules, as
    in the steady state of a long job (a command's first tasks wait ~2 s for them on a running 2-CPU Ray here)."""
    from phi1_jax.data_gen import dedup, engine

    with engine.session(address, progress=False):
        # the warm-up in chunks of a record or two: ~20 tasks a stage, so that every worker process runs each stage
        for path, target, size in ((Path(warm), Path(out) / "warm", 64), (Path(src), Path(out), dedup.CHUNK_BYTES)):
            t = time.perf_counter()
            chunks = engine.line_chunks([path], size)
            dup = dedup.find_duplicates([path], threshold=0.8, chunks=chunks)
            removed, _, _ = dedup.write_and_report([path], target, chunks, dup, text_field="text")
            seconds = time.perf_counter() - t
    print(json.dumps({"seconds": round(seconds, 3), "removed": [r["id"] for r in removed]}), flush=True)


def _ours(src, work, w, n, planted, how="local"):
    out = work / f"ours{w}{how}"
    cmd = [sys.executable, "-m", "phi1_jax.data_gen.dedup", str(src / "corpus.jsonl"), f"--out={out}", "--no-progress"]
    if how == "warm":
        return _ours_warm(src, work, w, n, planted, out)
    if how == "local":
        m = _timed([*cmd, f"--num-cpus={w}"])
    else:  # a running one-node Ray of w CPUs, started before the clock and stopped after it
        with _running_ray(work, w) as (cluster, warm, box):
            # A running cluster has run Ray Data jobs before: Ray Data's detached actors (its stats and autoscaling
            # coordinator, ~4-8 s of process start here) are up, as after this untimed run on 20 records
            subprocess.run([sys.executable, "-m", "phi1_jax.data_gen.dedup", str(warm), f"--out={work / 'warm'}",
                            "--no-progress", f"--ray-address={cluster.address}"], check=True, capture_output=True)
            m = _timed([*cmd, f"--ray-address={cluster.address}"],
                       also=lambda: [p.pid for p in cluster.procs] + sorted(cluster.descendants()))
        m["cluster_processes_left"] = box["left"]  # none, or the summary says so
    report = json.loads((out / "dedup_report.json").read_text())
    removed = {int(r["id"][1:]) for r in report["removed"]}
    sec = report["seconds"]  # dedup: from the command's start (Ray's included) to the duplicates; then the writing
    pipeline = sec["dedup"] - sec["ray_start"] + sec["write_and_report"]
    return {"tool": "phi1_jax dedup (Ray Data)", "ray": how, "workers": w, **m, "pipeline_seconds": sec,
            "docs_per_s": round(n / m["seconds"], 1), "pipeline_docs_per_s": round(n / pipeline, 1),
            **_found(removed, planted)}


@contextlib.contextmanager
def _running_ray(work: Path, w: int):
    """A running one-node Ray of w CPUs for the `cluster` and `warm` ways, and 20 warm-up records: yields (the cluster,
    the records' file, a box that holds the cluster's processes left after it stopped, under "left")."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # as the cluster's own processes run (read by Ray at import)
    import ray

    from phi1_jax.data_gen.ray_nodes import LocalCluster

    warm = work / "warm.jsonl"
    warm.write_text("".join(json.dumps({"id": f"w{i}", "text": f"warm up {i}"}) + "\n" for i in range(20)))
    cluster, box = LocalCluster(head_cpus=w), {}
    try:
        cluster.connect()
        ray.shutdown()  # this process only waited for the head: the benchmark's driver is the cluster's one driver
        yield cluster, warm, box
    finally:
        ray.shutdown()
        box["left"] = cluster.stop()


def _found(removed: set[int], planted: dict) -> dict:
    return {"recall": round(len(removed & set(planted)) / len(planted), 4),
            "others_removed": len(removed - set(planted))}


def _ours_warm(src, work, w, n, planted, out):
    with _running_ray(work, w) as (cluster, warm, box):
        code = (f"from phi1_jax.bench.dedup_speed import warm_driver; "
                f"warm_driver({cluster.address!r}, {str(src / 'corpus.jsonl')!r}, {str(out)!r}, {str(warm)!r})")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"the warm driver failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
    return {"tool": "phi1_jax dedup (Ray Data)", "ray": "warm", "workers": w, "seconds": got["seconds"],
            "docs_per_s": round(n / got["seconds"], 1), **_found({int(i[1:]) for i in got["removed"]}, planted),
            "cluster_processes_left": box["left"]}


def _datatrove(python, src, work, w, n, planted):
    dt = work / f"datatrove{w}"
    script = work / "datatrove_dedup.py"
    script.write_text(DATATROVE)
    m = _timed([python, str(script), str(src), str(dt), str(w)])
    removed = set()
    for f in (dt / "removed").glob("*.jsonl*"):
        removed |= {int(json.loads(x)["id"][1:]) for x in f.read_text().splitlines()}
    return {"tool": "datatrove MinHash (LocalPipelineExecutor)", "workers": w, **m,
            "docs_per_s": round(n / m["seconds"], 1), **_found(removed, planted)}


if __name__ == "__main__":
    sys.exit(main())
