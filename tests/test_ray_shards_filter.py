"""`shards` and `filter apply` on Ray (phi1_jax.data_gen.shards, phi1_jax.data_gen.filter) across the real two-node
test cluster (the `ray_cluster` fixture): the shards equal, byte for byte, what the single-process code wrote before
them (kept below as plain reference functions); filter apply scores as the single-process loop did, to 1e-6, with the
hashing embedder and with a phi1_jax model held by an actor; a rerun skips finished parts; a worker killed mid-run
costs a retry, not the run.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phi1_jax.shard_format import Document, encode_record, token_dtype
from tests.test_filter import FAMILIES, snippet, true_grade

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --- the single-process code these steps replaced, kept as the reference ---------------------------------------------


def reference_documents(source: Path, text_field="text", prompt_field=None, glob=None):
    """Yesterday's iter_documents for a JSONL file or a folder: read_jsonl per .jsonl file, other files whole (not
    UTF-8: skipped), in sorted order."""
    from phi1_jax.jsonl import read_jsonl

    def from_jsonl(path):
        for where, rec in read_jsonl(path):
            text = rec[text_field]
            prompt = rec[prompt_field] if prompt_field else ""
            yield Document(text, prompt, where)

    if source.is_file():
        yield from from_jsonl(source)
        return
    for f in sorted(p for p in source.glob(glob or "**/*") if p.is_file()):
        if f.suffix == ".jsonl":
            yield from from_jsonl(f)
            continue
        try:
            yield Document(f.read_text(encoding="utf-8"), "", str(f))
        except UnicodeDecodeError:
            pass


def reference_shards(docs, tok, docs_per_shard) -> dict[str, bytes]:
    """Yesterday's write_shards loop, plainly: {file name: bytes} of each shard and its stats."""
    from array_record.python.array_record_module import ArrayRecordWriter
    import itertools
    import tempfile

    dtype, out, docs = token_dtype(tok.vocab_size), {}, iter(docs)
    for index in itertools.count():
        batch = list(itertools.islice(docs, docs_per_shard))
        if not batch:
            return out
        prompts = tok.encode_batch([d.prompt for d in batch]) if any(d.prompt for d in batch) else None
        bodies = tok.encode_batch([d.text[len(d.prompt):] for d in batch])
        encoded = [(0, b) for b in bodies] if prompts is None else [(len(p), p + b) for p, b in zip(prompts, bodies)]
        with tempfile.TemporaryDirectory() as tmp:
            writer = ArrayRecordWriter(f"{tmp}/s", "group_size:1")
            for p, ids in encoded:
                writer.write(encode_record(p, ids, dtype))
            writer.close()
            out[f"shard-{index:05d}.arrayrecord"] = Path(f"{tmp}/s").read_bytes()
        stats = {"file": f"shard-{index:05d}.arrayrecord", "documents": len(batch),
                 "tokens": int(sum(len(ids) for _, ids in encoded))}
        out[f"shard-{index:05d}.json"] = (json.dumps(stats, indent=2) + "\n").encode()


def reference_scores(forest, embedder, texts) -> np.ndarray:
    """Yesterday's filter apply loop: batches of 256 texts, embedded, then the forest's P(educational)."""
    out = []
    for i in range(0, len(texts), 256):
        out.append(forest.predict_proba(embedder.embed(texts[i:i + 256]))[:, 1])
    return np.concatenate(out)


# --- helpers ---------------------------------------------------------------------------------------------------------


def _shard_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}


def _cli(module, *args, address):
    return [sys.executable, "-m", module, *args, f"--ray-address={address}", "--no-progress"]


def _mixed_corpus(folder: Path, n: int, seed: int = 0) -> Path:
    """JSONL files (blank lines among the records, a nested folder) beside .py files and one file that is not UTF-8."""
    rng = random.Random(seed)
    (folder / "sub").mkdir(parents=True)
    lines = []
    for i in range(n):
        lines.append(json.dumps({"text": snippet(rng, FAMILIES[i % len(FAMILIES)]), "id": i}) + "\n")
        if i % 9 == 0:
            lines.append("\n  \n")
    (folder / "a.jsonl").write_text("".join(lines[: len(lines) // 2]))
    (folder / "sub" / "c.jsonl").write_text("".join(lines[len(lines) // 2:]))
    for i in range(15):
        (folder / f"b{i:02d}.py").write_text(snippet(rng, FAMILIES[i % len(FAMILIES)]))
    (folder / "b07.py").write_bytes(b"x = '\xff\xfe'\n")  # not UTF-8: skipped, as before
    return folder


def _exercises(path: Path, n: int) -> Path:
    prompts = [f"def f{i}(x):\n    '''Add {i}.'''\n" for i in range(n)]
    path.write_text("".join(json.dumps({"prompt": p, "text": p + f"    return x + {i}\n" * (1 + i % 4)}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


# --- shards ----------------------------------------------------------------------------------------------------------


def test_shards_on_two_nodes_equal_the_single_process_bytes(ray_cluster, embedded, tok, tmp_path):
    corpus = _mixed_corpus(tmp_path / "corpus", 130)
    ex = _exercises(tmp_path / "ex.jsonl", 40)
    cases = [  # (input, flags, reference documents)
        (corpus, ["--docs-per-shard=9", "--limit=140"], list(reference_documents(corpus))[:140]),
        (ex, ["--docs-per-shard=6", "--prompt-field=prompt"], list(reference_documents(ex, prompt_field="prompt"))),
    ]
    for k, (src, flags, docs) in enumerate(cases):
        out = tmp_path / f"out{k}"
        r = subprocess.run(_cli("phi1_jax.data_gen.shards", f"--input={src}", f"--tokenizer={embedded.tokenizer_path}",
                                f"--out={out}", *flags, address=ray_cluster.address),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        flag = dict(f.lstrip("-").split("=") for f in flags)
        expected = reference_shards(docs, tok, int(flag["docs-per-shard"]))
        assert _shard_files(out) == expected  # every shard and its stats, byte for byte
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["documents"] == len(docs) and len(manifest["shards"]) == len(expected) // 2
    assert 100 < len(cases[0][2]) and not any(d.where.endswith("b07.py") for d in cases[0][2])


def test_a_worker_killed_mid_shards_costs_a_retry_not_the_run(ray_cluster, embedded, tok, tmp_path):
    ex = _exercises(tmp_path / "ex.jsonl", 1500)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("phi1_jax.data_gen.shards", f"--input={ex}", f"--tokenizer={embedded.tokenizer_path}",
                                 f"--out={out}", "--docs-per-shard=20", "--prompt-field=prompt",
                                 address=ray_cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = ray_cluster.kill_worker_running("MapBatches(_shard_task)", proc)  # tokenizing or writing a shard
    log, _ = proc.communicate(timeout=600)
    assert killed, f"no shard task was caught running to kill: {log}"
    assert proc.returncode == 0, log
    assert _shard_files(out) == reference_shards(list(reference_documents(ex, prompt_field="prompt")), tok, 20)
    assert not list(out.glob(".*tmp*"))  # nothing half-written is left


# --- filter apply ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hashing_classifier(tmp_path_factory):
    """A forest trained by `filter train` on graded snippets (grades by the test grader's rule, no LLM needed)."""
    from phi1_jax.data_gen import filter as edu

    d = tmp_path_factory.mktemp("clf")
    rng = random.Random(3)
    texts = [snippet(rng, FAMILIES[i % len(FAMILIES)]) for i in range(180)]
    (d / "labels.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t, "grade": true_grade(t)}) + "\n"
                                            for i, t in enumerate(texts)))
    assert edu.main(["train", f"--labels={d / 'labels.jsonl'}", f"--out={d}", "--trees=40", "--no-progress"]) == 0
    return d


def _reference_apply(classifier: Path, docs: list[Document], threshold=0.5):
    import joblib

    from phi1_jax.data_gen.embed import make_embedder

    forest = joblib.load(classifier / "classifier.joblib")
    meta = json.loads((classifier / "classifier.json").read_text())
    scores = reference_scores(forest, make_embedder(meta["embedder"]), [d.text for d in docs])
    return scores, [(d.where, d.text, s) for d, s in zip(docs, scores) if s >= threshold]


def _read_kept(lines):
    return [(r["id"], r["text"], r["score"]) for r in map(json.loads, lines)]


def test_filter_apply_on_ray_scores_as_the_single_process_loop(ray_cluster, hashing_classifier, tmp_path):
    corpus = _mixed_corpus(tmp_path / "corpus", 600, seed=5)
    scores, expected = _reference_apply(hashing_classifier, list(reference_documents(corpus, glob="**/*")))
    assert 0.2 < len(expected) / len(scores) < 0.8  # the forest keeps some and drops some
    cmd = ["apply", f"--classifier={hashing_classifier}", f"--corpus={corpus}", "--glob=**/*", "--docs-per-part=256"]
    r = subprocess.run(_cli("phi1_jax.data_gen.filter", *cmd, f"--out={tmp_path / 'kept.jsonl'}",
                            address=ray_cluster.address), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got = _read_kept((tmp_path / "kept.jsonl").read_text().splitlines())
    assert [g[:2] for g in got] == [e[:2] for e in expected]  # the same files kept, in corpus order
    assert np.abs(np.array([g[2] for g in got]) - np.round([e[2] for e in expected], 4)).max() <= 1e-6
    assert not (tmp_path / "kept.jsonl.parts").exists()  # joined into kept.jsonl, then removed

    # --out=DIR: the parts and their manifest stay; a rerun writes only the parts that are missing
    parts = tmp_path / "parts"
    r = subprocess.run(_cli("phi1_jax.data_gen.filter", *cmd, f"--out={parts}", address=ray_cluster.address),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((parts / "manifest.json").read_text())
    assert [p["file"] for p in manifest["parts"]] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert manifest["documents"] == len(scores) and manifest["kept"] == len(expected)
    (parts / "part-00001.jsonl").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*")}
    r = subprocess.run(_cli("phi1_jax.data_gen.filter", *cmd, f"--out={parts}", address=ray_cluster.address),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*")}
    assert {k for k in after if after[k] != before.get(k)} == {"part-00001.jsonl", "part-00001.json"}
    joined = [line for p in manifest["parts"] for line in (parts / p["file"]).read_text().splitlines()]
    assert _read_kept(joined) == got
    # another threshold into the same folder is refused, the parts untouched
    r = subprocess.run(_cli("phi1_jax.data_gen.filter", *cmd, f"--out={parts}", "--threshold=0.9",
                            address=ray_cluster.address), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "holds parts of another run (threshold: 0.5 there, 0.9 now)" in r.stderr, r.stderr


def test_a_scoring_actor_killed_mid_apply_costs_a_restart_not_the_run(ray_cluster, hashing_classifier, tmp_path):
    """Ray Data restarts a dead PartScorer actor and retries its part: the same files kept with the same scores,
    and no part file left half-written."""
    corpus = _mixed_corpus(tmp_path / "corpus", 1500, seed=7)
    _, expected = _reference_apply(hashing_classifier, list(reference_documents(corpus, glob="**/*")))
    out = tmp_path / "parts"
    proc = subprocess.Popen(_cli("phi1_jax.data_gen.filter", "apply", f"--classifier={hashing_classifier}",
                                 f"--corpus={corpus}", "--glob=**/*", "--docs-per-part=256", f"--out={out}",
                                 address=ray_cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = ray_cluster.kill_worker_running("PartScorer", proc)  # an actor loading the forest or scoring a part
    log, _ = proc.communicate(timeout=600)
    assert killed, f"no scoring actor was caught running to kill: {log}"
    assert proc.returncode == 0, log
    manifest = json.loads((out / "manifest.json").read_text())
    got = _read_kept(line for p in manifest["parts"] for line in (out / p["file"]).read_text().splitlines())
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert np.abs(np.array([g[2] for g in got]) - np.round([e[2] for e in expected], 4)).max() <= 1e-6
    assert not list(out.glob(".*tmp*")) and not list(out.glob("*.tmp"))  # nothing half-written is left


def test_filter_apply_with_a_phi1_jax_model_in_an_actor(ray_cluster, embedded, tmp_path):
    """The model embedder runs in a Ray actor (loaded once there) and gives the scores the single process gives."""
    import shutil

    import joblib
    from flax import nnx
    from sklearn.ensemble import RandomForestClassifier

    from phi1_jax import checkpoint
    from phi1_jax.data_gen import filter as edu
    from phi1_jax.data_gen.embed import make_embedder
    from phi1_jax.model import Phi, PhiConfig

    cfg = PhiConfig(vocab_size=2048, num_layers=2, d_model=32, num_heads=2, head_dim=16, mlp_dim=64, rotary_dim=8,
                    max_seq_len=256)
    checkpoint.save_model(tmp_path / "wd", Phi(cfg, rngs=nnx.Rngs(0)))
    shutil.copy(embedded.tokenizer_path, tmp_path / "wd" / "tokenizer.model")
    spec = f"model:{tmp_path / 'wd'}"
    rng = random.Random(1)
    train = [snippet(rng, FAMILIES[i % len(FAMILIES)]) for i in range(60)]
    forest = RandomForestClassifier(n_estimators=30, min_samples_leaf=3, random_state=0).fit(  # scores finer than 1/30
        make_embedder(spec).embed(train), [true_grade(t) >= 4 for t in train])
    clf = tmp_path / "clf"
    clf.mkdir()
    joblib.dump(forest, clf / "classifier.joblib")
    (clf / "classifier.json").write_text(json.dumps({"embedder": spec, "positive_grade": 4, "threshold": 0.5}))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(300):  # lengths from a line to ~200 tokens: batches of 8 padded to different fixed lengths
        (corpus / f"f{i:03d}.py").write_text(snippet(rng, FAMILIES[i % len(FAMILIES)]) * (1 + i % 3))
    scores, _ = _reference_apply(clf, list(reference_documents(corpus)))
    # in this process (a driver of the test cluster): one actor, the threshold at 0 so that every score is written
    assert edu.main(["apply", f"--classifier={clf}", f"--corpus={corpus}", f"--out={tmp_path / 'kept.jsonl'}",
                     "--docs-per-part=256", "--threshold=0", "--actors=1", "--no-progress"]) == 0
    got = _read_kept((tmp_path / "kept.jsonl").read_text().splitlines())
    assert [g[0] for g in got] == [str(p) for p in sorted(corpus.glob("*.py"))]
    assert np.abs(np.array([g[2] for g in got]) - np.round(scores, 4)).max() <= 1e-6
