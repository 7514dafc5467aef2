"""The educational-value filter (arXiv 2306.11644 §2.1): an LLM grades a sample, a random forest learns the grade from
code embeddings, and the forest filters the whole corpus.

    python -m phi1_jax.data_gen.filter annotate --corpus=SRC --out=filt/ --n=2000 --base-url=URL --model=NAME
    python -m phi1_jax.data_gen.filter train --labels=filt/labels.jsonl --out=filt/ [--embedder=hashing|model:PATH]
    python -m phi1_jax.data_gen.filter apply --classifier=filt/ --corpus=SRC --out=kept.jsonl [--threshold=0.5]
        [--ray-address=ADDR] [--num-gpus=G --actors=N] [--docs-per-part=4096]

SRC is a folder of files (`--glob`, default **/*.py), a JSONL file with a text field, or `hf://NAME` (a Hugging Face
dataset streamed through `datasets`, e.g. `hf://bigcode/the-stack-smol --hf-config=data/python`).

- annotate: a seeded reservoir sample of `--n` files (from the first `--scan` the source yields) is graded with the
  rubric below; grades are parsed robustly (a JSON field, "Grade: 4", "4/5", a lone number) and unparseable replies
  are counted and skipped. Output `OUT/labels.jsonl` ({id, text, grade, reply}) grows as replies arrive; requests are
  cached in `OUT/cache.sqlite`, so a rerun continues without paying twice.
- train: embeds the labelled texts, holds out `--test-fraction` (stratified, seeded), fits a scikit-learn random forest
  on grade >= `--positive-grade`, and reports held-out precision, recall and F1 (`OUT/filter_report.json`, and a
  precision-recall curve in `OUT/pr_curve.png`). The forest is saved as `OUT/classifier.joblib` beside
  `OUT/classifier.json` (embedder spec, positive grade, metrics).
- apply: scores every file of SRC and writes those with P(educational) >= `--threshold` to a JSONL file
  ({id, text, score}), atomically (a crash leaves no half-written output). It runs on Ray (a local one, or
  `--ray-address`): parts of `--docs-per-part` files are scored by actors that each hold the embedder (a model on the
  actor's device, `--num-gpus` per actor) and the forest once; each part is written whole or absent to `OUT.parts/`
  with a manifest and joined into OUT at the end (a folder --out keeps the parts); a rerun skips finished parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from phi1_jax.data_gen import engine
from phi1_jax.data_gen.llm import BudgetExceeded, LLMClient, resolve_api_key
from phi1_jax.data_gen.shards import Document, iter_documents
from phi1_jax import cli, files
from phi1_jax.errors import UserError
from phi1_jax.jsonl import read_jsonl

GRADE_MIN, GRADE_MAX = 1, 5
RUBRIC = """You are grading source code for a course. Determine its educational value for a student whose goal is to
learn basic coding concepts (the phi-1 paper's criterion). Use this scale:
5 - clear, self-contained, well-documented code that teaches an algorithm or concept; a student could learn from it.
4 - readable and instructive, with meaningful names and some explanation, but less focused.
3 - correct but ordinary code: little explanation, or mostly glue around other modules.
2 - hard to learn from: configuration, boilerplate, heavy dependence on context not shown, few meaningful names.
1 - no educational value: data tables, generated code, minified or obfuscated code, or mostly non-code.
Reply with one line of the form "Grade: N" (N from 1 to 5), then at most two sentences of reasons.

```python
{code}
```"""
_GRADE_PATTERNS = [re.compile(p, re.I) for p in (
    r'"grade"\s*:\s*"?(\d+)', r"\bgrade\b\W{0,3}(?:is\s*|of\s*)?(\d+)", r"\b(\d+)\s*(?:/|out of)\s*5\b",
    r"\*\*(\d+)\*\*", r"^\s*(\d+)\s*(?:$|[.\-:)])")]


class FilterError(UserError, RuntimeError):
    """Bad input or a state the filter cannot go on from; the message names it."""


def parse_grade(reply: str) -> int | None:
    """The grade in an LLM reply, or None. The first pattern that yields an in-range number wins."""
    for pat in _GRADE_PATTERNS:
        for m in pat.finditer(reply or ""):
            g = int(m.group(1))
            if GRADE_MIN <= g <= GRADE_MAX:
                return g
    return None


def _documents(source: str, args) -> Iterator[Document]:
    return iter_documents(source, text_field=args.text_field, glob=args.glob, hf_split=args.hf_split,
                          hf_config=args.hf_config)


def reservoir(docs, n: int, scan: int, seed: int) -> list:
    rng, sample = random.Random(seed), []
    for i, d in enumerate(docs):
        if i >= scan:
            break
        if len(sample) < n:
            sample.append(d)
        elif (j := rng.randrange(i + 1)) < n:
            sample[j] = d
    return sample


# --- annotate --------------------------------------------------------------------------------------------------------


async def _annotate(client: LLMClient, docs, out: Path, max_chars: int, progress: bool) -> tuple[int, int]:
    path = out / "labels.jsonl"
    done = {rec["id"] for _, rec in read_jsonl(path, FilterError)} if path.exists() else set()
    todo = [d for d in docs if d.where not in done]
    unparsed = 0

    async def grade(d):
        reply = await client.complete([{"role": "user", "content": RUBRIC.format(code=d.text[:max_chars])}],
                                      temperature=0.0, max_tokens=100)
        return d, reply.text

    with path.open("a", encoding="utf-8") as sink, tqdm(total=len(docs), initial=len(docs) - len(todo),
                                                         desc="grading", disable=not progress) as bar:
        tasks = [asyncio.ensure_future(grade(d)) for d in todo]
        try:
            for fut in asyncio.as_completed(tasks):
                d, reply = await fut
                g = parse_grade(reply)
                if g is None:
                    unparsed += 1
                else:
                    sink.write(json.dumps({"id": d.where, "text": d.text, "grade": g, "reply": reply}) + "\n")
                    sink.flush()
                bar.update(1)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return len(todo) - unparsed, unparsed


def annotate(args) -> int:
    out = Path(args.out)
    client = LLMClient(base_url=args.base_url, api_key=resolve_api_key(args.api_key, args.base_url), model=args.model, concurrency=args.concurrency,
                       timeout_s=args.timeout, max_retries=args.max_retries, budget_usd=args.budget_usd,
                       price_in_per_1k=args.price_in, price_out_per_1k=args.price_out)
    docs = reservoir(_documents(args.corpus, args), args.n, args.scan, args.seed)
    if not docs:
        raise FilterError(f"{args.corpus}: no documents to grade")
    out.mkdir(parents=True, exist_ok=True)
    client.open_cache(out / "cache.sqlite")
    tokens = sum(min(len(d.text), args.max_chars) for d in docs) / 4 / len(docs) + len(RUBRIC) / 4
    cost = client.estimate_cost(len(docs), tokens, 60)
    print(f"plan: grade {len(docs)} documents, ~{tokens:.0f} prompt tokens each" +
          (f", about ${cost:.2f}" if cost else ""), file=sys.stderr)
    graded, unparsed = asyncio.run(_annotate(client, docs, out, args.max_chars, not args.no_progress))
    print(f"graded {graded} new documents ({unparsed} replies had no readable grade); labels: {out / 'labels.jsonl'}")
    return 0


# --- train -----------------------------------------------------------------------------------------------------------


def load_labels(path: Path) -> tuple[list[str], np.ndarray]:
    if not path.exists():
        raise FilterError(f"{path}: labels file not found (make it with `python -m phi1_jax.data_gen.filter annotate`)")
    texts, grades = [], []
    for where, rec in read_jsonl(path, FilterError):
        if not (isinstance(rec, dict) and isinstance(rec.get("text"), str) and isinstance(rec.get("grade"), int)):
            raise FilterError(f"{where}: a label needs a string 'text' and an integer 'grade'")
        texts.append(rec["text"])
        grades.append(rec["grade"])
    return texts, np.array(grades)


def train(args) -> int:
    import joblib
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import confusion_matrix, precision_recall_curve, precision_recall_fscore_support
    from sklearn.model_selection import train_test_split

    from phi1_jax.data_gen.embed import make_embedder

    texts, grades = load_labels(Path(args.labels))
    y = (grades >= args.positive_grade).astype(int)
    counts = np.bincount(y, minlength=2)
    if counts.min() < 5:
        raise FilterError(f"{args.labels}: {counts[1]} positive (grade >= {args.positive_grade}) and {counts[0]} "
                          "negative labels; each class needs at least 5 to train and evaluate")
    embedder = make_embedder(args.embedder)
    x = embed_all(embedder, texts, "embedding", not args.no_progress)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=args.test_fraction, stratify=y, random_state=args.seed)
    forest = RandomForestClassifier(n_estimators=args.trees, class_weight="balanced", random_state=args.seed,
                                    n_jobs=-1, min_samples_leaf=2)
    forest.fit(xtr, ytr)
    proba = forest.predict_proba(xte)[:, 1]
    pred = (proba >= 0.5).astype(int)
    p, r, f1, _ = precision_recall_fscore_support(yte, pred, average="binary", zero_division=0)
    metrics = {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f1), 4),
               "accuracy": round(float((pred == yte).mean()), 4), "held_out": int(len(yte)),
               "train": int(len(ytr)), "positives": int(counts[1]), "negatives": int(counts[0]),
               "confusion": confusion_matrix(yte, pred).tolist()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(forest, out / "classifier.joblib")
    meta = {"embedder": embedder.spec, "positive_grade": args.positive_grade, "threshold": 0.5, "metrics": metrics}
    (out / "classifier.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "filter_report.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _plot_pr(*precision_recall_curve(yte, proba)[:2], out / "pr_curve.png", metrics)
    print(f"held-out ({len(yte)} files): precision {p:.3f} recall {r:.3f} F1 {f1:.3f}; classifier: {out}")
    return 0


def embed_all(embedder, texts: list[str], desc: str, progress: bool, chunk: int = 256) -> np.ndarray:
    parts = []
    with tqdm(total=len(texts), desc=desc, disable=not progress) as bar:
        for i in range(0, len(texts), chunk):
            parts.append(embedder.embed(texts[i:i + chunk]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts)


def _plot_pr(precision, recall, path: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(recall, precision)
    ax.scatter([metrics["recall"]], [metrics["precision"]], color="C1", zorder=3, label="threshold 0.5")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"educational-value filter (held-out F1 {metrics['f1']:.3f})")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- apply -----------------------------------------------------------------------------------------------------------


SCORE_BATCH = 256  # texts embedded and scored together (the model embedder pads each 8 of them to a fixed length)


def score_texts(forest, embedder, texts: list[str]) -> np.ndarray:
    """P(educational) of each text: embedded and scored in batches of SCORE_BATCH, in order."""
    out = [forest.predict_proba(embedder.embed(texts[i:i + SCORE_BATCH]))[:, 1]
           for i in range(0, len(texts), SCORE_BATCH)]
    return np.concatenate(out) if out else np.zeros(0)


class PartScorer:
    """Ray Data stage (an actor: the forest and the embedder, a phi1_jax model on the actor's device or the hashing
    embedder, are loaded once per actor, not per part): scores one part of the corpus and writes the part's kept
    records and its stats, each whole or absent (stats first, so a part file that exists always has them)."""

    def __init__(self, classifier: str, embedder: str, threshold: float, parts: str, text_field: str):
        import joblib

        from phi1_jax.data_gen.embed import make_embedder

        self.forest = joblib.load(Path(classifier) / "classifier.joblib")
        self.forest.n_jobs = 1  # one core per actor (Ray's CPU), not every core of the node per actor
        self.embedder = make_embedder(embedder)
        self.threshold, self.parts, self.text_field = threshold, Path(parts), text_field

    def __call__(self, batch: dict) -> dict:
        from phi1_jax.data_gen.shards import read_block

        out = []
        for k, plan in zip(batch["index"].tolist(), batch["plan"]):
            docs = read_block(json.loads(plan), text_field=self.text_field)
            scores = score_texts(self.forest, self.embedder, [d.text for d in docs])
            kept = [{"id": d.where, "text": d.text, "score": round(float(s), 4)}
                    for d, s in zip(docs, scores) if s >= self.threshold]
            stats = {"file": f"part-{k:05d}.jsonl", "documents": len(docs), "kept": len(kept)}
            files.write_text(self.parts / f"part-{k:05d}.json", json.dumps(stats) + "\n")
            files.write_jsonl(self.parts / stats["file"], kept)
            out.append(json.dumps(stats))
        return {"index": batch["index"], "stats": np.asarray(out, dtype=object)}


def apply(args) -> int:
    """Scores the corpus in parts of --docs-per-part documents on Ray (PartScorer actors); the parts and a manifest
    go to `OUT.parts/` (or to --out itself when it is a folder), and with a .jsonl --out they are joined into it in
    corpus order at the end (whole or absent) and the parts folder removed. A rerun skips the finished parts."""
    import hashlib
    import shutil
    import time

    import ray
    import ray.data

    from phi1_jax.data_gen.embed import make_embedder
    from phi1_jax.data_gen.shards import plan_blocks

    cdir = Path(args.classifier)
    if not (cdir / "classifier.json").exists() or not (cdir / "classifier.joblib").exists():
        raise FilterError(f"{cdir}: no classifier.json/classifier.joblib (train one with `phi1_jax.data_gen.filter train`)")
    if args.docs_per_part < 1 or args.docs_per_part % SCORE_BATCH:
        raise FilterError(f"--docs-per-part={args.docs_per_part}: must be a positive multiple of {SCORE_BATCH} (whole "
                          "scoring batches, so that each batch is the one a single process would score)")
    meta = json.loads((cdir / "classifier.json").read_text())
    if meta["embedder"].startswith("model:") and not Path(meta["embedder"][len("model:"):]).exists():
        raise FilterError(f"{cdir / 'classifier.json'}: embedder {meta['embedder']!r}: no such model here")
    if not meta["embedder"].startswith("model:"):
        make_embedder(meta["embedder"])  # a bad spec is one error here, not one per actor
    threshold = meta["threshold"] if args.threshold is None else args.threshold
    out = Path(args.out)
    joined = out.suffix == ".jsonl"
    parts = out.with_name(out.name + ".parts") if joined else out
    run = {"classifier": str(cdir.resolve()),
           "classifier_sha256": hashlib.sha256((cdir / "classifier.joblib").read_bytes()).hexdigest()[:16],
           "embedder": meta["embedder"], "threshold": threshold, "corpus": args.corpus, "text_field": args.text_field,
           "glob": args.glob, "hf_split": args.hf_split, "hf_config": args.hf_config,
           "docs_per_part": args.docs_per_part}
    parts.mkdir(parents=True, exist_ok=True)
    if (parts / "run.json").exists():
        previous = json.loads((parts / "run.json").read_text())
        if diff := {k: (previous.get(k), v) for k, v in run.items() if previous.get(k) != v}:
            detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise FilterError(f"{parts} holds parts of another run ({detail}); use a new --out")
    else:
        files.write_text(parts / "run.json", json.dumps(run, indent=2) + "\n")
    seconds = 0.0
    blocks = list(plan_blocks(args.corpus, args.docs_per_part, text_field=args.text_field, glob=args.glob,
                              hf_split=args.hf_split, hf_config=args.hf_config))
    stats: dict[int, dict] = {}
    for k in range(len(blocks)):  # finished parts: their stats are written before them
        if (parts / f"part-{k:05d}.jsonl").exists() and (parts / f"part-{k:05d}.json").exists():
            stats[k] = json.loads((parts / f"part-{k:05d}.json").read_text())
    todo = [{"index": k, "plan": json.dumps(b)} for k, b in enumerate(blocks) if k not in stats]
    if todo:
        # the stage's bar is this one (Ray Data's are off)
        with engine.session(args.ray_address, args.num_cpus, progress=False), \
                tqdm(total=sum(b["docs"] for b in blocks), initial=sum(s["documents"] for s in stats.values()),
                     desc="scoring", unit="file", disable=args.no_progress) as bar:
            if args.num_gpus:
                n = args.actors or max(1, int(ray.cluster_resources().get("GPU", 0) // args.num_gpus))
            else:
                n = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
            ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
                PartScorer, batch_size=1, num_gpus=args.num_gpus or None,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(n, len(todo))),
                fn_constructor_kwargs={"classifier": str(cdir.resolve()), "embedder": meta["embedder"],
                                       "threshold": threshold, "parts": str(parts.resolve()),
                                       "text_field": args.text_field})
            t0 = time.perf_counter()  # the manifest's seconds: the Ray stage, from a running Ray to its last part
            with engine.user_errors():
                for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                    for k, s in zip(batch["index"].tolist(), batch["stats"]):
                        stats[k] = json.loads(s)
                        bar.update(stats[k]["documents"])
            seconds = time.perf_counter() - t0
    for stray in parts.glob(".part-*tmp*"):  # a temporary file a killed actor left (its part was written again)
        stray.unlink(missing_ok=True)
    ordered = [stats[k] for k in range(len(blocks))]
    seen, kept = sum(s["documents"] for s in ordered), sum(s["kept"] for s in ordered)
    manifest = {**run, "documents": seen, "kept": kept, "parts": ordered, "seconds": round(seconds, 3)}
    files.write_text(parts / "manifest.json", json.dumps(manifest, indent=2) + "\n")  # written last: complete
    if joined:
        with files.replacing(out) as tmp, tmp.open("wb") as sink:
            for s in ordered:
                with (parts / s["file"]).open("rb") as part:
                    shutil.copyfileobj(part, sink)
        shutil.rmtree(parts)
    print(f"kept {kept} of {seen} files (P(educational) >= {threshold}) in {out}")
    return 0


# --- the command -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.data_gen.filter", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def corpus_flags(q):
        q.add_argument("--corpus", required=True, help="folder, JSONL file, or hf://NAME")
        q.add_argument("--text-field", default="text", help="JSONL / dataset field holding the code")
        q.add_argument("--glob", default="**/*.py", help="files to read from a folder")
        q.add_argument("--hf-split", default="train")
        q.add_argument("--hf-config", default=None)
        q.add_argument("--no-progress", action="store_true")

    a = sub.add_parser("annotate", help="grade a sample with an LLM")
    corpus_flags(a)
    a.add_argument("--out", required=True, help="folder for labels.jsonl and the request cache")
    a.add_argument("--n", type=int, default=2000, help="files to grade")
    a.add_argument("--scan", type=int, default=100_000, help="sample from the first SCAN files of the source")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--max-chars", type=int, default=6000, help="cut each file to this many characters for grading")
    a.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL"),
                   help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL or OpenAI)")
    a.add_argument("--model", required=True)
    a.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    a.add_argument("--concurrency", type=int, default=8)
    a.add_argument("--timeout", type=float, default=60.0)
    a.add_argument("--max-retries", type=int, default=6)
    a.add_argument("--budget-usd", type=float, default=None)
    a.add_argument("--price-in", type=float, default=0.0, help="USD per 1k prompt tokens")
    a.add_argument("--price-out", type=float, default=0.0, help="USD per 1k completion tokens")

    t = sub.add_parser("train", help="fit the random forest on graded files")
    t.add_argument("--labels", required=True, help="labels.jsonl from annotate")
    t.add_argument("--out", required=True, help="folder for the classifier and its report")
    t.add_argument("--embedder", default="hashing", help="hashing, hashing:DIM, or model:PATH (phi1_jax or HF dir)")
    t.add_argument("--positive-grade", type=int, default=4, help="grade from which a file counts as educational")
    t.add_argument("--test-fraction", type=float, default=0.2)
    t.add_argument("--trees", type=int, default=300)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")

    y = sub.add_parser("apply", help="keep the files the classifier scores as educational")
    corpus_flags(y)
    y.add_argument("--classifier", required=True, help="folder written by train")
    y.add_argument("--out", required=True,
                   help="JSONL file of kept files (its parts in OUT.parts/ until joined), or a folder: the parts and "
                        "manifest.json stay there")
    y.add_argument("--threshold", type=float, default=None, help="default: the classifier's (0.5)")
    y.add_argument("--docs-per-part", type=int, default=4096,
                   help=f"files per part (a Ray task's work; a multiple of {SCORE_BATCH})")
    y.add_argument("--num-gpus", type=float, default=0, help="GPUs per embedding actor (Ray resource; 0: CPU)")
    y.add_argument("--actors", type=int, default=None,
                   help="embedding actors, each holding the model once (default: one per core, or per --num-gpus)")
    engine.add_ray_flags(y)
    return p


@cli.reports_user_errors  # FilterError, LLMError, ...: exit 2, as below
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"annotate": annotate, "train": train, "apply": apply}[args.command](args)
    except BudgetExceeded as e:
        print(f"stopped: {e}; labels so far are kept, rerun to continue", file=sys.stderr)
        return 3
    except (OSError, ValueError) as e:  # unreadable files; scikit-learn's own checks (--test-fraction, --trees)
        print(f"error: {e}", file=sys.stderr)
        return cli.USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
