"""Tokenizer (SentencePiece and tokenizer.json), the shard writer, and the embedded corpus."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from phi1_jax.data_gen.shards import (
    ShardError, decode_record, iter_documents, read_manifest, write_shards,
)
from phi1_jax import embedded_corpus, ngrams
from phi1_jax.tokenizer import Tokenizer, TokenizerError, check_vocab_fits

# --- tokenizer ---------------------------------------------------------------------------------------------------------


def test_round_trip_on_the_whole_embedded_corpus(tok):
    docs, _ = embedded_corpus.collect_documents()
    assert len(docs) > 300
    ids = tok.encode_batch([d.text for d in docs])
    for d, i in zip(docs, ids):
        assert tok.decode(i) == d.text, d.where
        assert 0 not in i, f"{d.where}: <unk> in its encoding"


def test_whitespace_unicode_and_literal_eos(tok):
    text = "def f(x):\n\tif x:\r\n        return '<|endoftext|>'  # 日本語 🐍 \u00a0\n\n\n   \n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id not in ids  # the literal string is text, not a document separator
    assert 0 not in ids  # byte fallback: never <unk>
    assert tok.decode([tok.eos_id]) == "" or tok.eos_id == 1


def test_hugging_face_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):
        t = Tokenizer.load(path)
        assert t.kind == "huggingface" and t.eos_id == 0 and t.vocab_size == hf.get_vocab_size()
        text = "def  sub(a, b):\n\treturn a - b  # é\n"
        assert t.decode(t.encode(text)) == text
        assert t.encode_batch([text, "x"]) == [t.encode(text), t.encode("x")]


def test_tokenizer_bad_files(tmp_path, tok):
    with pytest.raises(TokenizerError, match="nope.model: tokenizer file not found"):
        Tokenizer.load(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(TokenizerError, match="junk.json: not a Hugging Face tokenizer.json"):
        Tokenizer.load(tmp_path / "junk.json")
    with pytest.raises(TokenizerError, match="empty"):
        Tokenizer.train([], vocab_size=512, path=tmp_path / "t.model")
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train(["x"], vocab_size=100, path=tmp_path / "t.model")
    with pytest.raises(TokenizerError, match=r"vocab_size 2048 does not fit the model's vocab_size 1000"):
        check_vocab_fits(tok, 1000)
    check_vocab_fits(tok, 2048)


# --- shards ------------------------------------------------------------------------------------------------------------


def _exercises(n):
    return [{"prompt": f'def f{i}(x):\n    """Return x plus {i}."""\n', "text": f'def f{i}(x):\n    """Return x plus {i}."""\n'
             f"    return x + {i}\n" * (1 + i % 4)} for i in range(n)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_with_prompt_field(tmp_path, tok):
    src = _write_jsonl(tmp_path / "ex.jsonl", _exercises(30))
    m = write_shards(iter_documents(str(src), prompt_field="prompt"), tok, tmp_path / "out", source_name="exercises",
                     input_desc=str(src), docs_per_shard=8, progress=False)
    assert (m["documents"], len(m["shards"]), m["dtype"]) == (30, 4, "uint16")
    import grain

    records = grain.sources.ArrayRecordDataSource([str(tmp_path / "out" / s["file"]) for s in m["shards"]])
    for i, rec in enumerate(_exercises(30)):
        prompt_len, ids = decode_record(records[i], np.uint16)
        assert prompt_len == len(tok.encode(rec["prompt"]))
        assert tok.decode(ids) == rec["text"]
    assert m["tokens"] == sum(len(decode_record(records[i], np.uint16)[1]) for i in range(30))


def _shard_files(d: Path):
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}


def test_killed_writer_reruns_to_the_same_shards(tmp_path, embedded):
    src = _write_jsonl(tmp_path / "ex.jsonl", _exercises(60))
    cmd = [sys.executable, "-m", "phi1_jax.data_gen.shards", f"--input={src}", f"--tokenizer={embedded.tokenizer_path}",
           "--docs-per-shard=6", "--prompt-field=prompt"]
    clean = subprocess.run(cmd + [f"--out={tmp_path / 'clean'}"], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr

    out = tmp_path / "killed"
    slow = [sys.executable, "-m", "tests.slow_shards", "0.5", *cmd[3:]]  # 0.5 s after each shard: killed between two
    proc = subprocess.Popen(slow + [f"--out={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 300  # the command starts a local Ray first: minutes on a loaded machine
    while len(list(out.glob("shard-*.arrayrecord"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = sorted(out.glob("shard-*.arrayrecord"))
    assert 3 <= len(done) < 10
    (out / ".shard-00009.arrayrecord.tmp").write_bytes(b"half a shard")  # as if killed mid-write
    for f in done:  # every shard that looks complete has its stats and is readable
        assert f.with_suffix(".json").exists()
    rerun = subprocess.run(cmd + [f"--out={out}"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert _shard_files(out) == _shard_files(tmp_path / "clean")
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "clean"))
    assert a["shards"] == b["shards"] and a["tokens"] == b["tokens"]
    assert a["new_tokens"] < b["new_tokens"]  # finished shards were not tokenized again


def test_bad_input_is_refused_by_name(tmp_path, embedded, tok):
    run = lambda *a: subprocess.run([sys.executable, "-m", "phi1_jax.data_gen.shards", *a], capture_output=True, text=True)  # noqa: E731
    r = run(f"--input={tmp_path / 'missing'}", f"--tokenizer={embedded.tokenizer_path}", f"--out={tmp_path / 'o'}")
    assert r.returncode == 2 and "missing: input not found" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run(f"--input={tmp_path / 'empty'}", f"--tokenizer={embedded.tokenizer_path}", f"--out={tmp_path / 'o2'}")
    assert r.returncode == 2 and "corpus is empty" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n')
    r = run(f"--input={bad}", f"--tokenizer={embedded.tokenizer_path}", f"--out={tmp_path / 'o3'}")
    assert r.returncode == 2 and "bad.jsonl:2: malformed JSON line" in r.stderr
    r = run(f"--input={bad}", f"--tokenizer={tmp_path / 'nope.model'}", f"--out={tmp_path / 'o3'}")
    assert r.returncode == 2 and "nope.model: tokenizer file not found" in r.stderr

    # An output folder from another tokenizer is refused and left exactly as it was.
    src = _write_jsonl(tmp_path / "ex.jsonl", _exercises(10))
    write_shards(iter_documents(str(src)), tok, tmp_path / "shards", source_name="ex", input_desc=str(src), progress=False)
    before = _shard_files(tmp_path / "shards")
    other = Tokenizer.train([r["text"] for r in _exercises(200)] * 5, vocab_size=320, path=tmp_path / "other.model")
    with pytest.raises(ShardError, match="holds shards of another run .*tokenizer_fingerprint"):
        write_shards(iter_documents(str(src)), other, tmp_path / "shards", source_name="ex", input_desc=str(src),
                     progress=False)
    assert _shard_files(tmp_path / "shards") == before
    with pytest.raises(ShardError, match="manifest.json: shards were tokenized with another tokenizer"):
        read_manifest(tmp_path / "shards", tokenizer_fingerprint=other.fingerprint)


# --- embedded corpus -------------------------------------------------------------------------------------------------


def test_embedded_corpus_is_cached(embedded):
    report_mtime = (embedded.root / "report.json").stat().st_mtime
    t0 = time.perf_counter()
    again = embedded_corpus.build(2048, progress=False)
    assert time.perf_counter() - t0 < 2.0 and again.root == embedded.root
    assert (embedded.root / "report.json").stat().st_mtime == report_mtime
    assert again.report["files_kept"] == embedded.report["files_kept"] > 300
    assert read_manifest(again.shard_dir, tokenizer_fingerprint=again.tokenizer().fingerprint)["tokens"] > 1_000_000


def test_decontamination_finds_planted_humaneval_and_spares_unrelated_code():
    problems = embedded_corpus.humaneval_texts()
    reference = ngrams.reference_ngrams(problems)
    planted = "import os\n\n" + problems[0] + "\n\ndef unrelated():\n    return 1\n"
    assert ngrams.overlapping_ngrams(planted, reference)
    reformatted = planted.upper().replace("    ", "\t")  # case and whitespace do not hide an overlap
    assert ngrams.overlapping_ngrams(reformatted, reference)
    assert not ngrams.overlapping_ngrams(Path(json.__file__).read_text(), reference)


def test_quality_filter_reasons():
    body = "def f(x):\n    return x\n" * 10
    assert embedded_corpus.quality_reason(Path("lib/foo.py"), body) is None
    assert embedded_corpus.quality_reason(Path("lib/test/foo.py"), body) == "test file"
    assert embedded_corpus.quality_reason(Path("lib/foo.py"), "x = 1\n") == "size"
    assert embedded_corpus.quality_reason(Path("lib/foo.py"), body + "x = '" + "a" * 400 + "'\n") == "long line"
    table = "def f():\n    pass\n" + "    0x0041: 'A',\n" * 40
    assert embedded_corpus.quality_reason(Path("lib/foo.py"), table) == "data table"
    assert embedded_corpus.quality_reason(Path("lib/foo.py"), body + "def (:\n") == "does not parse"


def test_hugging_face_dataset_input_streams_through_datasets(tmp_path, tok):
    """`hf://NAME` goes through `datasets.load_dataset(NAME, streaming=True)`; a local data folder is a valid NAME."""
    folder = tmp_path / "hfdata"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", _exercises(12))
    docs = list(iter_documents(f"hf://{folder}", prompt_field="prompt"))
    assert [d.text for d in docs] == [r["text"] for r in _exercises(12)]
    assert docs[3].prompt == _exercises(12)[3]["prompt"]
    with pytest.raises(ShardError, match="hf://no/such-dataset-here: cannot open Hugging Face dataset"):
        list(iter_documents("hf://no/such-dataset-here"))
