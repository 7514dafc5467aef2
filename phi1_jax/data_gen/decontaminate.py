"""Decontamination against HumanEval (and optionally MBPP), arXiv 2306.11644 §5.

    python -m phi1_jax.data_gen.decontaminate gen/exercises/exercises.jsonl --out=clean/ [--tau=0.95] [--taus=0.95,0.9,0.85,0.8]
        [--mbpp=PATH/mbpp.jsonl] [--embedder=hashing|model:PATH|none] [--l2-threshold=0.35]

Three tests flag a training item:
- 13-gram overlap: a 13-gram of lower-cased words shared with a problem's prompt (its signature and docstring);
- embedding distance: the L2 distance between the embeddings of the item's code and a problem's reference code (both
  without docstrings and comments, so a rewritten docstring hides nothing) is below `--l2-threshold` (phi1_jax.data_gen.embed; the paper used CodeGen-Mono-350M, `model:PATH` takes any phi1_jax or HF Phi
  model, `hashing` is the light fallback, `none` skips the test);
- AST match rate (phi1_jax.data_gen.ast_match): a function of the item against the problem's reference function, ignoring names,
  literals, comments and docstrings; an item's rate is its best function's.

The report (`OUT/decontamination_report.{json,md}`) is the paper's Table 3: for each tau, how many problems have a
training item with match rate >= tau ("similar") and how many do not, and how many training items a pruning at that
tau removes; with `--humaneval-results` (the per-sample file `python -m phi1_jax.evals` writes) it also gives the model's pass
rate on the similar and non-similar problems. Pruning at `--tau` (plus the 13-gram and embedding tests) writes each
input's survivors to `OUT/<input name>` and the removed items, with why, to `OUT/removed.jsonl`.

The n-gram helpers are phi1_jax.ngrams (the embedded default corpus uses them too); the problems come from
phi1_jax.evals.tasks, the one HumanEval/MBPP loader.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from phi1_jax.data_gen import ast_match
from phi1_jax import cli, files
from phi1_jax.data_gen import engine
from phi1_jax.data_gen.records import RecordsError, check_outputs, write_records
from phi1_jax.errors import UserError
from phi1_jax.ngrams import NGRAM, ngrams, overlapping_ngrams, reference_ngrams, words  # noqa: F401 (re-exported)

TAUS = (0.95, 0.9, 0.85, 0.8)


# --- references and items --------------------------------------------------------------------------------------------


class DecontaminationError(UserError, ValueError):
    """Bad input; the message names the file and line."""


@dataclasses.dataclass
class Reference:
    id: str  # "HumanEval/0", "MBPP/11"
    benchmark: str
    prompt: str  # what the 13-gram test reads: signature and docstring
    code: str  # prompt + reference solution
    function: str | None  # the function the AST test compares with (None: every function in `code`)


def humaneval_references() -> list[Reference]:
    from phi1_jax.evals.tasks import humaneval

    return [Reference(tid, "HumanEval", p.prompt, p.reference, p.entry_point) for tid, p in humaneval().problems.items()]


def mbpp_references(path: str) -> list[Reference]:
    from phi1_jax.evals.tasks import TaskError, mbpp

    try:
        task = mbpp(path)
    except (TaskError, OSError) as e:
        raise DecontaminationError(f"--mbpp={path}: {e}") from None
    return [Reference(f"MBPP/{tid}", "MBPP", p.prompt, p.reference, None) for tid, p in task.problems.items()]


def code_units(text: str) -> list[str]:
    """The code in a training item: its ```python blocks, or the whole text if it has none."""
    from phi1_jax.data_gen.validate import python_blocks

    return python_blocks(text) if "```" in text else [text]


# --- the three tests -------------------------------------------------------------------------------------------------


def ngram_hits(items: list[str], refs: list[Reference], n: int = NGRAM) -> list[set[int]]:
    """For each item, the indices of the references it shares an n-gram with."""
    index: dict[tuple, set[int]] = collections.defaultdict(set)
    for j, r in enumerate(refs):
        for g in ngrams(r.prompt, n):
            index[g].add(j)
    out = []
    for text in items:
        hit: set[int] = set()
        for g in ngrams(text, n):
            hit |= index.get(g, set())
        out.append(hit)
    return out


def ast_rates(items: list[str], refs: list[Reference], min_tau: float) -> dict[tuple[int, int], float]:
    """{(item, reference): best AST match rate} for every pair whose rate is >= min_tau."""
    vocab = ast_match.Vocabulary()
    train_seqs, train_owner = [], []
    for i, text in enumerate(items):
        for unit in code_units(text):
            for _, seq in ast_match.functions(unit):
                train_seqs.append(vocab.encode(seq))
                train_owner.append(i)
    ref_seqs, ref_owner = [], []
    for j, r in enumerate(refs):
        for name, seq in ast_match.functions(r.code):
            if r.function is None or name == r.function:
                ref_seqs.append(vocab.encode(seq))
                ref_owner.append(j)
    rates: dict[tuple[int, int], float] = {}
    if not train_seqs or not ref_seqs:
        return rates
    for a, b in ast_match.candidates(train_seqs, ref_seqs, min_tau, len(vocab.ids)):
        key = (train_owner[a], ref_owner[b])
        if rates.get(key, 0.0) >= 1.0:
            continue
        rate = ast_match.match_rate(train_seqs[a], ref_seqs[b])
        if rate >= min_tau and rate > rates.get(key, 0.0):
            rates[key] = rate
    return rates


def code_only(text: str) -> str:
    """The code of an item without docstrings and comments (unparsed from the AST), so that a rewritten docstring does
    not hide a copied solution from the embedding test; code that does not parse is kept as it is."""
    from phi1_jax.data_gen.ast_match import strip_docstrings

    parts = []
    for unit in code_units(text):
        try:
            tree = ast_match.parse(unit)
        except (SyntaxError, ValueError):
            parts.append(unit)
            continue
        strip_docstrings(tree)
        parts.append(ast.unparse(tree))
    return "\n\n".join(parts)


def nearest_l2(items: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each item embedding, the L2 distance to the nearest reference embedding, and that reference."""
    d = np.sqrt(np.maximum((items * items).sum(1)[:, None] - 2 * items @ refs.T + (refs * refs).sum(1)[None, :], 0.0))
    return d.min(1), d.argmin(1)


# --- the three tests on Ray ------------------------------------------------------------------------------------------


class ItemTests:
    """Ray Data stage (an actor: the references and their embeddings are made once per actor, not per chunk): the
    three tests for each record of a chunk of lines. Emits only the records something flagged, as
    {doc, hits: JSON {ngram: [reference index], ast: [[reference index, rate]], l2: distance or None}}."""

    def __init__(self, refs: list[Reference], text_field: str, min_tau: float, embedder: str, l2_threshold: float):
        self.refs, self.text_field, self.min_tau, self.l2_threshold = refs, text_field, min_tau, l2_threshold
        self.embedder = None
        if embedder != "none":
            from phi1_jax.data_gen.embed import make_embedder

            self.embedder = make_embedder(embedder)
            self.ref_emb = self.embedder.embed([code_only(x.code) for x in refs])

    def __call__(self, batch: dict) -> dict:
        from phi1_jax.data_gen import engine
        from phi1_jax.data_gen.records import RecordsError

        docs, texts = [], []
        for chunk in [{k: batch[k][i] for k in batch} for i in range(len(batch["path"]))]:
            for d, _, rec in engine.read_chunk(chunk, self.text_field, RecordsError):
                docs.append(d)
                texts.append(rec[self.text_field])
        ngram = ngram_hits(texts, self.refs)
        rates = ast_rates(texts, self.refs, self.min_tau)
        dist = np.full(len(texts), np.inf)
        if self.embedder is not None and texts:
            dist, _ = nearest_l2(self.embedder.embed([code_only(t) for t in texts]), self.ref_emb)
        by_item: dict[int, list] = collections.defaultdict(list)
        for (i, j), v in rates.items():
            by_item[i].append([j, v])
        out_doc, out_hits = [], []
        for i, d in enumerate(docs):
            near = bool(dist[i] < self.l2_threshold)
            if ngram[i] or by_item.get(i) or near:
                out_doc.append(d)
                out_hits.append(json.dumps({"ngram": sorted(ngram[i]), "ast": by_item.get(i, []),
                                            "l2": float(dist[i]) if near else None}))
        return {"doc": np.asarray(out_doc, np.int64), "hits": np.asarray(out_hits, dtype=object)}


def flagged_items(paths: list[Path], refs: list[Reference], *, text_field: str, min_tau: float, embedder: str,
                  l2_threshold: float, chunk_bytes: int, actors: int | None = None) -> dict[int, dict]:
    """{doc number: its hits} for every record a test flagged, as a Ray Data pipeline (inside an `engine.session`):
    chunks of lines -> ItemTests actors (the references broadcast once to each) -> the driver."""
    import ray
    import ray.data

    from phi1_jax.data_gen import engine

    chunks = engine.line_chunks(paths, chunk_bytes)
    if not chunks:
        return {}
    n = actors or max(1, min(len(chunks), int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        ItemTests, batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n),
        fn_constructor_kwargs={"refs": refs, "text_field": text_field, "min_tau": min_tau, "embedder": embedder,
                               "l2_threshold": l2_threshold})
    out = {}
    with engine.user_errors():
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for d, h in zip(batch["doc"].tolist(), batch["hits"]):
                out[d] = json.loads(h)
    return out


# --- the report ------------------------------------------------------------------------------------------------------


def table3(refs: list[Reference], n_items: int, rates: dict, taus, ngram: list[set[int]], near: set[int],
           pass_rate: dict[str, float] | None = None) -> list[dict]:
    rows = []
    for bench in sorted({r.benchmark for r in refs}):
        members = {j for j, r in enumerate(refs) if r.benchmark == bench}
        for tau in taus:
            pairs = [(i, j) for (i, j), v in rates.items() if v >= tau and j in members]
            similar = {j for _, j in pairs}
            row = {"benchmark": bench, "tau": tau, "similar": len(similar), "non_similar": len(members) - len(similar),
                   "items_removed": len({i for i, _ in pairs}), "items": n_items}
            if pass_rate is not None and bench == "HumanEval":
                for name, group in (("similar", similar), ("non_similar", members - similar)):
                    vals = [pass_rate[refs[j].id] for j in group if refs[j].id in pass_rate]
                    row[f"pass_{name}"] = round(float(np.mean(vals)), 4) if vals else None
            rows.append(row)
    return rows


def report_markdown(report: dict) -> str:
    has_pass = any("pass_similar" in r for r in report["table3"])
    head = "| benchmark | tau | problems similar | non-similar | training items removed |"
    lines = [f"# Decontamination report ({report['items']} training items)", "",
             "AST match rate (names, literals, comments and docstrings ignored), the paper's Table 3:", "",
             head + (" pass@1 similar | pass@1 non-similar |" if has_pass else ""),
             "|---|---|---|---|---|" + ("---|---|" if has_pass else "")]
    for r in report["table3"]:
        cells = [r.get("pass_similar"), r.get("pass_non_similar")]  # None: no sample scored in that group (or MBPP)
        extra = "".join(f" {'—' if v is None else v} |" for v in cells) if has_pass else ""
        lines.append(f"| {r['benchmark']} | {r['tau']} | {r['similar']} | {r['non_similar']} | "
                     f"{r['items_removed']} |{extra}")
    lines += ["", f"13-gram overlap: {report['ngram_items']} items share a 13-gram with "
              f"{report['ngram_problems']} problems.",
              f"Embedding ({report['embedder']}): {report['embedding_items']} items within L2 "
              f"{report['l2_threshold']} of a problem.",
              f"Pruned at tau = {report['tau']} (AST) + 13-gram + embedding: {report['removed']} items removed, "
              f"{report['kept']} kept.", "", "Closest pairs:", "", "| item | problem | AST match rate |", "|---|---|---|"]
    lines += [f"| {p['item']} | {p['problem']} | {p['rate']:.3f} |" for p in report["closest"]]
    return "\n".join(lines) + "\n"


def _pass_rates(path: str) -> dict[str, float]:
    from phi1_jax.jsonl import read_jsonl

    by: dict[str, list[bool]] = collections.defaultdict(list)
    for where, rec in read_jsonl(path, DecontaminationError):
        if not isinstance(rec, dict) or "task_id" not in rec or "status" not in rec:
            raise DecontaminationError(f"{where}: expected a per-sample result with task_id and status")
        by[rec["task_id"]].append(rec["status"] == "passed")
    return {k: float(np.mean(v)) for k, v in by.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.data_gen.decontaminate", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSONL files of training items")
    p.add_argument("--out", required=True, help="folder for the pruned inputs, removed.jsonl and the report")
    p.add_argument("--tau", type=float, default=0.95, help="AST match rate at which an item is removed")
    p.add_argument("--taus", default=",".join(map(str, TAUS)), help="the report's tau column")
    p.add_argument("--mbpp", default=None, help="also check MBPP's test split (path to mbpp.jsonl)")
    p.add_argument("--embedder", default="hashing", help="hashing, hashing:DIM, model:PATH, or none")
    p.add_argument("--l2-threshold", type=float, default=0.35, help="embedding distance below which an item is removed")
    p.add_argument("--humaneval-results", default=None, help="OUT.results.jsonl of `python -m phi1_jax.evals`, for pass rates")
    p.add_argument("--text-field", default="text")
    return p


@cli.reports_user_errors
def main(argv=None) -> int:
    p = build_parser()
    engine.add_flags(p)
    a = p.parse_args(argv)
    out = Path(a.out)
    inputs = [Path(i) for i in a.inputs]
    try:
        taus = sorted({float(t) for t in a.taus.split(",")} | {a.tau}, reverse=True)
    except ValueError:
        raise DecontaminationError(f"--taus={a.taus}: expected numbers separated by commas") from None
    if not all(0 < t <= 1 for t in taus):
        raise DecontaminationError(f"taus must be in (0, 1]: {taus}")
    check_outputs(inputs, out)
    if missing := [str(i) for i in inputs if not i.is_file()]:
        raise RecordsError(f"{missing[0]}: input not found")
    refs = humaneval_references() + (mbpp_references(a.mbpp) if a.mbpp else [])
    pass_rate = _pass_rates(a.humaneval_results) if a.humaneval_results else None
    if a.embedder != "none":
        from phi1_jax.data_gen.embed import make_embedder

        make_embedder(a.embedder)  # a bad --embedder fails here, before Ray starts
    with engine.session(a.ray_address, a.num_cpus, progress=not a.no_progress):
        flagged = flagged_items(inputs, refs, text_field=a.text_field, min_tau=min(taus), embedder=a.embedder,
                                l2_threshold=a.l2_threshold, chunk_bytes=a.chunk_kb << 10)
    rates = {(i, j): v for i, h in flagged.items() for j, v in h["ast"]}
    ngram = {i: set(h["ngram"]) for i, h in flagged.items() if h["ngram"]}
    near = {i for i, h in flagged.items() if h["l2"] is not None}
    ast_hits: dict[int, dict[str, float]] = collections.defaultdict(dict)  # item -> {problem: rate >= tau}
    for (i, j), v in rates.items():
        if v >= a.tau:
            ast_hits[i][refs[j].id] = round(v, 4)
    removed = set(ast_hits) | set(ngram) | near
    closest = sorted(rates.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    named = removed | {i for (i, _), _ in closest}
    ids: dict[int, str] = {}
    n_items = 0

    def survivors(path: Path):
        nonlocal n_items
        base = n_items
        for chunk in engine.line_chunks([path]):
            for k, _, rec in engine.read_chunk(chunk, a.text_field, RecordsError):
                k += base
                n_items += 1
                if k in named:
                    ids[k] = f"{path.name}#{rec.get('id', k)}"
                if k not in removed:
                    yield rec

    for path in inputs:  # each input's survivors, streamed in order, whole or absent
        write_records(out / path.name, survivors(path))
    report = {
        "items": n_items, "tau": a.tau, "taus": taus, "embedder": a.embedder, "l2_threshold": a.l2_threshold,
        "table3": table3(refs, n_items, rates, taus, None, near, pass_rate),
        "ngram_items": len(ngram), "ngram_problems": len(set().union(*ngram.values())),
        "embedding_items": len(near), "removed": len(removed), "kept": n_items - len(removed),
        "closest": [{"item": ids[i], "problem": refs[j].id, "rate": round(v, 4)} for (i, j), v in closest],
    }
    with files.replacing(out / "removed.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for k in sorted(removed):
            why = {"ngram": sorted(refs[j].id for j in ngram.get(k, ())),
                   "ast": ast_hits.get(k, {}),
                   "embedding": k in near}
            f.write(json.dumps({"item": ids[k], **why}) + "\n")
    files.write_text(out / "decontamination_report.json", json.dumps(report, indent=2) + "\n")
    files.write_text(out / "decontamination_report.md", report_markdown(report))
    print(report_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
