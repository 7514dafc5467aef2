"""`shards` and `filter apply` on Ray at 1 and 2 worker processes, interleaved in one run (docs/s of each stage).

    python -m phi1_jax.bench.ray_stages_speed --files=2000 --rounds=2 [--json=ray_stages_speed.json]

The corpus is the first FILES .py files (at most; 3.12 has 1,740) of this interpreter's standard library (nothing
downloaded), copied into a temporary folder; the tokenizer is the embedded corpus's (phi1_jax.embedded_corpus); the
classifier a 300-tree random forest on hashing embeddings (what `filter train` fits; its labels here are "has a
docstring", which changes nothing about the cost). One local Ray with 2 cores serves every run; a run at W workers
limits the shards stage to W tasks at once and filter apply to W actors. The rounds alternate 1, 2, 1, 2, ...
workers, each with the load average before and after it, so a ratio comes from runs side by side. docs/s counts the
Ray stage only (the manifests' seconds: from a running Ray to the last shard or part), not Ray's start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from phi1_jax import cli


def _corpus(folder: Path, n: int) -> int:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)[:n]
    for i, f in enumerate(files):
        shutil.copyfile(f, folder / f"{i:05d}_{f.name}")
    return len(files)


def _classifier(folder: Path, corpus: Path) -> None:
    import joblib
    from sklearn.ensemble import RandomForestClassifier

    from phi1_jax.data_gen.embed import make_embedder

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(corpus.glob("*.py"))[:400]]
    emb = make_embedder("hashing")
    forest = RandomForestClassifier(n_estimators=300, class_weight="balanced", random_state=0, min_samples_leaf=2)
    forest.fit(emb.embed(texts), ['"""' in t for t in texts])
    joblib.dump(forest, folder / "classifier.joblib")
    (folder / "classifier.json").write_text(json.dumps({"embedder": emb.spec, "positive_grade": 4, "threshold": 0.5}))


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.bench.ray_stages_speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=2000, help="standard-library files in the corpus")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (1 worker, 2 workers)")
    p.add_argument("--docs-per-block", type=int, default=256, help="documents per shard and per filter part")
    p.add_argument("--json", default=None, help="write the runs here")
    a = p.parse_args(argv)

    from phi1_jax import embedded_corpus
    from phi1_jax.data_gen import engine, shards
    from phi1_jax.data_gen import filter as edu

    tok = embedded_corpus.build(2048, progress=False).tokenizer()
    runs = []
    with tempfile.TemporaryDirectory(prefix="ray_stages_") as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        (tmp / "clf").mkdir()
        n = _corpus(tmp / "corpus", a.files)
        _classifier(tmp / "clf", tmp / "corpus")
        with engine.session(num_cpus=2, progress=False):
            for r in range(a.rounds):
                for workers in (1, 2):
                    load = os.getloadavg()[0]
                    m = shards.shards_on_ray(str(tmp / "corpus"), tok, tmp / f"shards{r}_{workers}", source_name="b",
                                             input_desc="bench", docs_per_shard=a.docs_per_block, glob="*.py",
                                             progress=False, concurrency=workers)
                    runs.append({"stage": "shards", "workers": workers, "docs": m["documents"],
                                 "tokens": m["tokens"], "seconds": m["write_seconds"],
                                 "docs_per_s": round(m["documents"] / m["write_seconds"], 1),
                                 "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)})
                    print(json.dumps(runs[-1]), file=sys.stderr)
                    load = os.getloadavg()[0]
                    out = tmp / f"filter{r}_{workers}"
                    rc = edu.main(["apply", f"--classifier={tmp / 'clf'}", f"--corpus={tmp / 'corpus'}",
                                   "--glob=*.py", f"--out={out}", f"--docs-per-part={a.docs_per_block}",
                                   f"--actors={workers}", "--no-progress"])
                    if rc != 0:
                        raise RuntimeError(f"filter apply exited {rc}")
                    f = json.loads((out / "manifest.json").read_text())
                    runs.append({"stage": "filter apply (hashing + forest)", "workers": workers,
                                 "docs": f["documents"], "kept": f["kept"], "seconds": f["seconds"],
                                 "docs_per_s": round(f["documents"] / f["seconds"], 1),
                                 "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)})
                    print(json.dumps(runs[-1]), file=sys.stderr)
    print(f"corpus: {n} standard-library files, blocks of {a.docs_per_block}")
    print("| stage | workers | docs | seconds | docs/s | load before -> after |\n|---|---|---|---|---|---|")
    for x in runs:
        print(f"| {x['stage']} | {x['workers']} | {x['docs']} | {x['seconds']:.1f} | {x['docs_per_s']} | "
              f"{x['load_before']} -> {x['load_after']} |")
    for stage in dict.fromkeys(x["stage"] for x in runs):
        rate = {w: sum(x["docs"] for x in runs if x["stage"] == stage and x["workers"] == w)
                / sum(x["seconds"] for x in runs if x["stage"] == stage and x["workers"] == w) for w in (1, 2)}
        print(f"{stage}: {rate[1]:.1f} docs/s at 1 worker, {rate[2]:.1f} at 2 ({rate[2] / rate[1]:.2f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
