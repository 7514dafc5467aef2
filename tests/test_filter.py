"""phi1_jax.data_gen.filter end to end: LLM grading over the local OpenAI server, the random forest, and corpus filtering."""

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from phi1_jax.data_gen import filter as edu
from phi1_jax.data_gen.embed import EmbedError, make_embedder
from tests.fake_llm import IDENT, WORDS, _function, _prose
from tests.openai_server import FakeOpenAI


def snippet(rng: random.Random, family: str) -> str:
    name = "_".join(rng.sample(WORDS, 2))
    if family == "documented":  # docstring and comments: what a grader calls educational
        body = _function(rng, name, _prose(rng, 15))
        return f"# {_prose(rng, 8)}\n{body}\n\n# {_prose(rng, 6)}\nprint({name}([3, 1, 2], 2))\n"
    if family == "docstring":
        return _function(rng, name, _prose(rng, 12))
    if family == "plain":  # readable but unexplained
        return re.sub(r'    """.*?"""\n', "", _function(rng, name, "x"), flags=re.S)
    if family == "terse":
        v = rng.sample("abcdefghk", 4)
        return (f"def {v[0]}({v[1]},{v[2]}):\n {v[3]}={v[1]}*{v[2]}+{rng.randint(0, 9)}\n"
                f" return {v[3]}%{rng.randint(2, 97)}\n")
    if family == "config":
        keys = rng.sample(IDENT, 6)
        return "CONFIG = {\n" + "".join(f"    '{k}': {rng.randint(0, 999)},\n" for k in keys) + "}\n"
    return "TABLE = [\n" + "".join(f"    0x{rng.randint(0, 255):02x}, 0x{rng.randint(0, 255):02x},\n"
                                    for _ in range(rng.randint(5, 30))) + "]\n"


FAMILIES = ["documented", "docstring", "plain", "terse", "config", "table"]


def true_grade(code: str) -> int:
    """The hidden rule the stand-in grader follows; the forest has to learn it from embeddings."""
    if '"""' in code:
        return 5 if "\n# " in "\n" + code else 4
    if "def " in code:
        return 3 if re.search(r"def [a-z]+_[a-z]+\(", code) else 2
    return 2 if "CONFIG" in code else 1


def grader(body: dict) -> str:
    code = re.search(r"```python\n(.*)```", body["messages"][-1]["content"], re.S).group(1)
    g = true_grade(code)
    forms = [f"Grade: {g}\nReasons: fine.", json.dumps({"grade": g, "why": "ok"}), f"I would rate this {g}/5.",
             f"**{g}**\n\nIt is what it is.", f"{g} - see above", "I cannot tell what this code is for."]
    return forms[int(hashlib.md5(code.encode()).hexdigest(), 16) % len(forms)]


def write_corpus(folder: Path, n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    truth = {}
    for i in range(n):
        code = snippet(rng, FAMILIES[i % len(FAMILIES)])
        (folder / f"f{i:04d}.py").write_text(code)
        truth[str(folder / f"f{i:04d}.py")] = true_grade(code)
    return truth


def test_parse_grade_reads_the_usual_forms():
    cases = {"Grade: 4\nbecause": 4, '{"grade": 2}': 2, "I'd rate it 3/5": 3, "**5**": 5, "1 - a data table": 1,
             "Grade: 9": None, "no idea": None, "The grade is 4.": 4, "3 out of 5": 3}
    assert {k: edu.parse_grade(k) for k in cases} == cases


def test_annotate_train_apply(tmp_path, capsys):
    truth = write_corpus(tmp_path / "corpus", 360, seed=0)
    out = tmp_path / "filt"
    with FakeOpenAI(["429", "500", "malformed"], responder=grader) as server:
        args = ["annotate", f"--corpus={tmp_path / 'corpus'}", f"--out={out}", "--n=300", f"--base-url={server.base_url}",
                "--model=test-model", "--concurrency=8", "--timeout=5", "--no-progress"]
        assert edu.main(args) == 0
        labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
        assert 200 < len(labels) < 300  # a sixth of the replies carry no grade and are skipped
        assert all(r["grade"] == truth[r["id"]] for r in labels)  # every parsed grade is the grader's
        sent = len(server.requests)
        assert edu.main(args) == 0 and len(server.requests) == sent  # rerun: all cached, nothing sent
    assert edu.main(["train", f"--labels={out / 'labels.jsonl'}", f"--out={out}", "--no-progress"]) == 0
    report = json.loads((out / "filter_report.json").read_text())
    assert report["f1"] >= 0.9 and report["held_out"] >= 40, report
    assert (out / "pr_curve.png").stat().st_size > 1000
    # a fresh corpus the forest never saw: what it keeps is what the grader would call educational
    fresh = write_corpus(tmp_path / "fresh", 120, seed=1)
    assert edu.main(["apply", f"--classifier={out}", f"--corpus={tmp_path / 'fresh'}",
                     f"--out={tmp_path / 'kept.jsonl'}", "--no-progress"]) == 0
    kept = {json.loads(line)["id"] for line in (tmp_path / "kept.jsonl").read_text().splitlines()}
    good = {k for k, g in fresh.items() if g >= 4}
    precision, recall = len(kept & good) / max(len(kept), 1), len(kept & good) / len(good)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    assert "held-out" in capsys.readouterr().out


def test_model_embedder_mean_pools_a_phi1_jax_checkpoint(tmp_path, embedded):
    import shutil

    from flax import nnx

    from phi1_jax import checkpoint
    from phi1_jax.model import Phi, PhiConfig

    cfg = PhiConfig(vocab_size=2048, num_layers=2, d_model=32, num_heads=2, head_dim=16, mlp_dim=64, rotary_dim=8,
                    max_seq_len=256)
    model = Phi(cfg, rngs=nnx.Rngs(0))
    checkpoint.save_model(tmp_path / "wd", model)
    shutil.copy(embedded.tokenizer_path, tmp_path / "wd" / "tokenizer.model")
    emb = make_embedder(f"model:{tmp_path / 'wd'}")
    texts = ["def add(a, b):\n    return a + b\n", "import os\n" * 50, "x = 1\n"]
    got = emb.embed(texts)
    ids = emb.tokenizer.encode(texts[0])
    hidden = np.asarray(model(np.array([ids])).hidden)[0]
    np.testing.assert_allclose(got[0], hidden.mean(0), atol=1e-5)  # padding and batch-mates change nothing
    assert got.shape == (3, 32) and np.isfinite(got).all()
    # the same weights exported in the Hugging Face layout embed the same
    from phi1_jax import convert

    convert.to_hf(model, tmp_path / "hf")
    shutil.copy(embedded.tokenizer_path, tmp_path / "hf" / "tokenizer.model")
    np.testing.assert_allclose(make_embedder(f"model:{tmp_path / 'hf'}").embed(texts), got, atol=1e-5)
    with pytest.raises(EmbedError, match="is not a phi1_jax model checkpoint"):
        make_embedder(f"model:{tmp_path}")
    with pytest.raises(EmbedError, match="unknown embedder"):
        make_embedder("codegen")


def test_bad_input(tmp_path, capsys):
    assert edu.main(["train", f"--labels={tmp_path / 'none.jsonl'}", f"--out={tmp_path}"]) == 2
    assert "labels file not found" in capsys.readouterr().err
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"text": "x", "grade": 5}) + "\n" for _ in range(20)))
    assert edu.main(["train", f"--labels={tmp_path / 'one.jsonl'}", f"--out={tmp_path}"]) == 2
    assert "each class needs at least 5" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "grade": 5}\n{"text": \n')
    assert edu.main(["train", f"--labels={tmp_path / 'bad.jsonl'}", f"--out={tmp_path}"]) == 2
    assert "bad.jsonl:2: malformed JSON line" in capsys.readouterr().err
    assert edu.main(["apply", f"--classifier={tmp_path}", f"--corpus={tmp_path}", f"--out={tmp_path / 'k.jsonl'}"]) == 2
    assert "no classifier.json" in capsys.readouterr().err
    assert edu.main(["annotate", f"--corpus={tmp_path / 'missing'}", f"--out={tmp_path / 'o'}", "--model=m",
                     "--base-url=http://127.0.0.1:9/v1"]) == 2
    assert "input not found" in capsys.readouterr().err
