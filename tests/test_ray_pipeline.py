"""The data pipeline on Ray (phi1_jax.data_gen.engine): dedup across a real two-node cluster equals a plain
single-process implementation of the same rule, finds planted near-copies, and survives a worker killed mid-run.

One cluster serves the whole session (the `ray_cluster` fixture in conftest.py: `ray start --head` plus a second
`ray start --address=...` with its own resources, ended by process group afterwards, checked to leave no process).
"""

import json
import subprocess
import sys

import pytest
from datasketch import MinHashLSH

from phi1_jax.bench import dedup_speed
from phi1_jax.data_gen import dedup, minhash

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def planted_corpus(n_docs: int, n_copies: int):
    """The bench's corpus generator, each copy at a random place after its own original (not after all of them)."""
    return dedup_speed.planted_corpus(n_docs, n_copies, interleave=True)


def reference_dedup(texts, threshold=0.8, num_perm=128) -> dict[int, int]:
    """The rule, plainly, in one process with datasketch's own LSH index: candidates are records sharing an LSH band
    (MinHashLSH.query) or the same normalised text; clusters are the connected components; each keeps its first."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    exact: dict[str, int] = {}
    parent = list(range(len(texts)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for d, t in enumerate(texts):
        m = minhash.minhash(t, num_perm)
        norm = " ".join(minhash.TOKEN.findall(t.lower()))
        for other in list(lsh.query(m)) + ([exact[norm]] if norm in exact else []):
            a, b = find(d), find(other)
            parent[max(a, b)] = min(a, b)
        lsh.insert(d, m)
        exact.setdefault(norm, d)
    return {d: find(d) for d in range(len(texts)) if find(d) != d}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    records, planted = planted_corpus(600, 120)
    folder = tmp_path_factory.mktemp("corpus")
    half = len(records) // 2
    for name, part in (("a.jsonl", records[:half]), ("b.jsonl", records[half:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    expected = reference_dedup([r["text"] for r in records])
    return folder, records, planted, expected


def _run(folder, out, address, **popen):
    cmd = [sys.executable, "-m", "phi1_jax.data_gen.dedup", str(folder / "a.jsonl"), str(folder / "b.jsonl"),
           f"--out={out}", f"--ray-address={address}", "--chunk-kb=8", "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _kept_and_removed(out, records):
    index = {r["id"]: i for i, r in enumerate(records)}
    kept = [index[json.loads(x)["id"]] for name in ("a.jsonl", "b.jsonl") for x in (out / name).read_text().splitlines()]
    report = json.loads((out / "dedup_report.json").read_text())
    removed = {index[r["id"]]: index[r["duplicate_of"].split("#")[1]] for r in report["removed"]}
    return kept, removed


def test_dedup_across_two_nodes_equals_the_single_process_reference(ray_cluster, corpus, tmp_path):
    folder, records, planted, expected = corpus
    import ray

    assert sum(n["Alive"] for n in ray.nodes()) == 2 and ray.cluster_resources().get("node2") == 1
    proc = _run(folder, tmp_path / "out", ray_cluster.address)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    kept, removed = _kept_and_removed(tmp_path / "out", records)
    assert removed == expected  # the same records removed, each as a duplicate of the same first record
    assert kept == [i for i in range(len(records)) if i not in expected]  # the rest, in input order
    # the survivors as the single-process tool wrote them (each kept record as json.dumps, in input order), and the
    # diversity report, merged from per-chunk partial counts, equal to one Diversity pass over all and over the kept
    half = len(records) // 2
    assert (tmp_path / "out" / "a.jsonl").read_text() + (tmp_path / "out" / "b.jsonl").read_text() == "".join(
        json.dumps(records[i]) + "\n" for i in kept)
    assert (tmp_path / "out" / "a.jsonl").read_text().count("\n") == sum(i < half for i in kept)
    report = json.loads((tmp_path / "out" / "dedup_report.json").read_text())
    everything, survivors = dedup.Diversity(), dedup.Diversity()
    for i, r in enumerate(records):
        everything.add(r["text"])
        if i not in expected:
            survivors.add(r["text"])
    assert report["diversity_before"] == everything.report()
    assert report["diversity_after"] == survivors.report()
    found = sum(i in removed for i in planted)
    others = len(set(removed) - set(planted))
    assert found / len(planted) >= 0.95, (found, len(planted))
    assert others < 0.01 * (len(records) - len(planted)), others


def test_a_worker_killed_mid_dedup_costs_a_retry_not_the_run(ray_cluster, corpus, tmp_path):
    folder, records, planted, expected = corpus
    proc = _run(folder, tmp_path / "out", ray_cluster.address)
    killed = ray_cluster.kill_worker_running("MapBatches(_signature_rows)", proc, poll=0.05)  # computing signatures
    log, _ = proc.communicate(timeout=600)
    assert killed, f"no signature task was caught running to kill: {log}"
    assert proc.returncode == 0, log
    kept, removed = _kept_and_removed(tmp_path / "out", records)
    assert removed == expected and kept == [i for i in range(len(records)) if i not in expected]
    assert not list((tmp_path / "out").glob(".*tmp*"))  # nothing half-written is left


def test_signatures_are_datasketchs_minhash_bit_for_bit(monkeypatch):
    """The vectorised MinHash (all shingles of many records hashed in numpy passes over their bytes, many records per
    permutation step) gives each record datasketch's own MinHash values with the plain-Python `shingle_hash32` as its
    hash function, also for texts shorter than a shingle, empty ones, non-ASCII ones, and records cut across steps."""
    import numpy as np

    records, planted = planted_corpus(40, 10)
    texts = ["", " "] + [r["text"] for r in records] + ["", "   ", "a", "one two three four", "one two three four five",
                                            "Ünïcode 的 words, and: punctuation!! " * 3, "x\ny\tz " * 30]
    monkeypatch.setattr(minhash, "_SHINGLES_PER_STEP", 300)  # several steps, records never split between them
    for num_perm in (128, 64):
        sig, norms = minhash.signatures(texts, num_perm)
        assert sig.dtype == np.uint32
        assert (sig == np.stack([minhash.minhash(t, num_perm).hashvalues for t in texts])).all()
    # band keys: equal exactly where the bands' hash values are (near-copies share some bands, not all)
    b, r = minhash.bands(0.8, 128)
    sig, _ = minhash.signatures(texts)
    keys = minhash.band_keys(sig, b, r)
    same_band = (sig[:, None, :b * r] == sig[None, :, :b * r]).reshape(len(texts), len(texts), b, r).all(-1)
    assert ((keys[:, None] == keys[None, :]) == same_band).all()
    shared = same_band[[i + 2 for i in planted], [i + 2 for i in planted.values()]]
    assert shared.any() and not shared.all()  # the check saw both equal and unequal bands of near-copies
    assert minhash.bucket_keys(texts[2], b, r) == [*keys[2].tolist(), minhash.text_key(" ".join(texts[2].lower().split()).encode())]


def test_chunk_gram_counts_merge_to_the_exact_distinct_counts():
    """The diversity report's per-chunk partial counts (hashed n-grams cut into partitions), merged, give the distinct
    n-gram counts of one exact pass, for all records and for the kept ones."""
    import numpy as np

    texts = ["the cat sat on the mat", "the cat sat on the hat", "", "a", "a b", "the cat sat on the mat again",
             "Dogs: dogs, DOGS and more dogs"]
    kept = [True, False, True, True, False, True, True]
    words = [dedup._WORD.findall(t.lower()) for t in texts]
    for chunks in ([range(7)], [range(3), range(3, 7)], [[0], [1], [2, 3, 4], [5, 6]]):
        per_chunk = [dedup.gram_hashes([words[i] for i in c], [kept[i] for i in c], parts=4) for c in chunks]
        for n in (1, 2, 3, 4):
            exact_all = {tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)}
            exact_kept = {tuple(w[i:i + n]) for w, k in zip(words, kept) if k for i in range(len(w) - n + 1)}
            got_all = got_kept = 0
            for p in range(4):
                runs = [g[n - 1]["grams"][p] for g in per_chunk]
                assert all((np.diff(run.astype(np.float64)) >= 0).all() for run in runs)  # each run sorted
                d_all, d_kept = dedup.merge_gram_counts(runs)
                got_all, got_kept = got_all + d_all, got_kept + d_kept
            assert (got_all, got_kept) == (len(exact_all), len(exact_kept)), (chunks, n)
            assert sum(g[n - 1]["total_all"] for g in per_chunk) == sum(max(0, len(w) - n + 1) for w in words)


def test_workers_never_import_datasketch():
    """A Ray job starts its own worker processes; each imports the dedup module and runs `signatures` with the driver's
    permutations: neither may import datasketch (it imports scipy, ~0.5 s per worker process)."""
    code = ("import sys\nfrom phi1_jax.data_gen import dedup, minhash\n"
            "assert 'datasketch' not in sys.modules and 'scipy' not in sys.modules, 'at import'\n"
            "perms = tuple(map(__import__('numpy').asarray, sys.argv[1:3]))\n"
            "sig, _ = minhash.signatures(['a text of more than five tokens here'], permutations=perms)\n"
            "assert 'datasketch' not in sys.modules and 'scipy' not in sys.modules, 'in signatures'\n"
            "print(sig[0, :3].tolist())\n")
    a, b = minhash.datasketch_permutations(128)
    r = subprocess.run([sys.executable, "-c", code.replace("sys.argv[1:3]", f"[{a.tolist()}, {b.tolist()}]")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() and r.stdout.strip() == str(
        minhash.signatures(["a text of more than five tokens here"])[0][0, :3].tolist())
