"""phi1_jax.data_gen.generate end to end: the real `openai` client against a local OpenAI-compatible server with faults."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi1_jax.data_gen import generate, validate
from phi1_jax.data_gen.batch import BatchRunner
from phi1_jax.data_gen.llm import LLMClient
from tests.fake_llm import respond
from tests.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ["429:1", "429", "500", "hang:3", "drop", "malformed", "truncated", "refusal", "500", "refusal"]


def _args(server, out, kind="exercises", n=30, *extra):
    return [f"--kind={kind}", f"--n={n}", f"--out={out}", f"--base-url={server.base_url}", "--model=test-model",
            "--concurrency=4", "--timeout=1", "--max-retries=4", "--no-progress", *extra]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _request_key(body: dict) -> str:
    return json.dumps({"messages": body["messages"], "seed": body.get("seed")}, sort_keys=True)


def _check_valid_and_distinct(records, kind, n):
    assert len(records) == n
    assert len({r["id"] for r in records}) == n
    assert len({r["text"] for r in records}) == n
    for r in records:
        assert validate.check(kind, r["text"], r["meta"]["factors"]).ok
        assert r["meta"]["llm_prompt"] and set(r["meta"]["factors"]) >= {"topic", "subtopic"}
        if kind == "exercises":
            assert r["text"].startswith(r["prompt"]) and f"def {r['meta']['factors']['name']}(" in r["prompt"]


@pytest.mark.parametrize("kind", ["exercises", "textbooks"])
def test_faults_and_bad_replies_end_with_exactly_n_valid_distinct_records(tmp_path, kind, capsys):
    with FakeOpenAI(FAULTS, responder=respond) as server:
        assert generate.main(_args(server, tmp_path, kind, 30)) == 0
        assert not server.script  # every fault was served and survived
        records = _records(tmp_path / f"{kind}.jsonl")
        _check_valid_and_distinct(records, kind, 30)
        err = capsys.readouterr().err
        assert "plan: 30" in err and "rejected {" in err and "refusal or boilerplate" in err
        # rerun: nothing to do, nothing sent; a larger N continues from the cache and the file
        sent = len(server.requests)
        assert generate.main(_args(server, tmp_path, kind, 30)) == 0 and len(server.requests) == sent
        assert generate.main(_args(server, tmp_path, kind, 45)) == 0
        more = _records(tmp_path / f"{kind}.jsonl")
        assert more[:30] == records
        _check_valid_and_distinct(more, kind, 45)


def test_sigkill_halfway_then_rerun_repeats_no_request_for_a_written_record(tmp_path):
    out = tmp_path / "gen"
    path = out / "textbooks.jsonl"
    with FakeOpenAI(["429", "500", "drop"], responder=respond, delay=0.05) as server:
        cmd = [sys.executable, "-m", "phi1_jax.data_gen.generate", *_args(server, out, "textbooks", 60)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not path.exists() or len(path.read_bytes().splitlines()) < 20):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = _records(path)
        assert 20 <= len(first) < 60
        rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        records = _records(path)
        assert records[:len(first)] == first
        _check_valid_and_distinct(records, "textbooks", 60)
        answered = [_request_key(b) for b in server.answered]
        for r in first:  # the request behind every record written before the kill was answered exactly once
            body = {"messages": [{"role": "user", "content": r["meta"]["llm_prompt"]}],
                    "seed": generate.attempt_request("textbooks", 0, r["meta"]["attempt"])[2]}
            assert answered.count(_request_key(body)) == 1


def test_a_line_cut_by_a_kill_is_dropped_and_the_run_goes_on(tmp_path, capsys):
    with FakeOpenAI(responder=respond) as server:
        assert generate.main(_args(server, tmp_path, "exercises", 5)) == 0
        path = tmp_path / "exercises.jsonl"
        good = path.read_bytes()
        path.write_bytes(good + b'{"id": "exercises-s0-99", "te')  # a write the kill interrupted
        assert generate.main(_args(server, tmp_path, "exercises", 8)) == 0
        assert path.read_bytes().startswith(good)
        _check_valid_and_distinct(_records(path), "exercises", 8)
        assert "dropping an incomplete last line" in capsys.readouterr().err


def test_batch_mode_survives_failed_lines_and_resumes_a_submitted_batch(tmp_path, capsys):
    out = tmp_path / "gen"
    with FakeOpenAI(responder=respond, batch_script=["error", "garbage", "refusal", "error"], batch_polls=2,
                    route_script=["429", "500", "ok", "ok", "drop", "ok", "500"]) as server:
        # a first run submitted its batch and was killed while waiting: only batches.json knows about it
        client = LLMClient(base_url=server.base_url, api_key="k", model="test-model", timeout_s=5)
        generate.check_folder(out, {"kind": "textbooks", "seed": 0, "model": "test-model", "temperature": 1.0,
                                    "max_tokens": 2048, "template_version": generate.prompts.TEMPLATE_VERSION})
        client.open_cache(out / generate.CACHE_FILE)
        gen = generate.Generator(client, "textbooks", 0, 12, out, temperature=1.0, max_tokens=2048,
                                 dedup_threshold=0.8, progress=False)
        first = []
        for k in range(8):
            _, messages, params = gen.request(k)
            first.append(client.request(messages, **params))
        BatchRunner(client, out / generate.BATCH_FILE).submit(first)
        assert len(server.batches) == 1
        assert generate.main(_args(server, out, "textbooks", 12, "--batch", "--poll-interval=0.01")) == 0
        _check_valid_and_distinct(_records(out / "textbooks.jsonl"), "textbooks", 12)
        assert server.requests == [] and not server.route_script  # nothing went live; every route fault survived
        state = json.loads((out / generate.BATCH_FILE).read_text())
        assert state["batches"][0]["id"] == "batch-1" and all(b["collected"] for b in state["batches"])
        assert len(server.batches) == len(state["batches"]) >= 2  # the first was resumed, not submitted again
        # no request that got a usable reply was sent twice; the failed and unreadable lines were resubmitted
        answered = [_request_key(b) for b in server.batch_answered]
        assert len(answered) == len(set(answered))
        assert len(server.batch_lines) == len(answered) + 3 and state["batches"][0]["failed"] == 2
        # each usable reply was judged at most once, across rounds (the refusal is counted once, not once a round)
        rejected = ast.literal_eval(re.search(r"rejected (\{.*?\})", capsys.readouterr().err).group(1))
        assert rejected.get("refusal or boilerplate") == 1 and 12 + sum(rejected.values()) <= len(answered)


def test_bad_input_gives_clear_errors_and_loses_nothing(tmp_path, capsys):
    with FakeOpenAI(responder=respond) as server:
        assert generate.main(_args(server, tmp_path / "a", "exercises", 6)) == 0
        before = (tmp_path / "a" / "exercises.jsonl").read_bytes()
        # another run's folder: a different seed, or files this command did not make
        assert generate.main(_args(server, tmp_path / "a", "exercises", 9, "--seed=1")) == 2
        assert "holds records of another run (seed: folder has 0, this run 1)" in capsys.readouterr().err
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "mine.jsonl").write_text('{"x": 1}\n')
        assert generate.main(_args(server, tmp_path / "b", "exercises", 3)) == 2
        assert "not a folder this command made" in capsys.readouterr().err
        assert (tmp_path / "b" / "mine.jsonl").read_text() == '{"x": 1}\n'
        # a malformed line inside the records is named, and nothing is touched
        bad = before.replace(b"\n", b"\n{oops\n", 1)
        (tmp_path / "a" / "exercises.jsonl").write_bytes(bad)
        assert generate.main(_args(server, tmp_path / "a", "exercises", 9)) == 2
        assert "exercises.jsonl:2: malformed JSON line" in capsys.readouterr().err
        assert (tmp_path / "a" / "exercises.jsonl").read_bytes() == bad
        (tmp_path / "a" / "exercises.jsonl").write_bytes(before)
        # invalid model, a budget of zero, a budget that runs out (records so far kept)
        assert generate.main(_args(server, tmp_path / "c", "exercises", 3, "--model=nope")) == 2
        assert "has no model 'nope' (404)" in capsys.readouterr().err
        assert generate.main(_args(server, tmp_path / "a", "exercises", 9, "--budget-usd=0", "--price-in=1")) == 2
        assert "positive budget" in capsys.readouterr().err
        assert generate.main(_args(server, tmp_path / "a", "exercises", 30, "--budget-usd=1", "--price-in=1",
                                   "--price-out=1")) == 3
        err = capsys.readouterr().err
        assert "budget of $1.00 reached" in err
        after = (tmp_path / "a" / "exercises.jsonl").read_bytes()
        assert after.startswith(before) and 6 < len(_records(tmp_path / "a" / "exercises.jsonl")) < 30
    with FakeOpenAI(["401"] * 10, responder=respond) as server:
        assert generate.main(_args(server, tmp_path / "d", "exercises", 3, "--api-key=wrong")) == 2
        assert "refused the API key (401)" in capsys.readouterr().err
    port = server.httpd.server_address[1]  # closed now: nothing listens there
    args = _args(server, tmp_path / "a", "exercises", 40, "--max-retries=1")
    assert generate.main(args) == 2
    assert f"cannot reach http://127.0.0.1:{port}/v1" in capsys.readouterr().err
    assert (tmp_path / "a" / "exercises.jsonl").read_bytes() == after


def test_help_and_factor_determinism():
    out = subprocess.run([sys.executable, "-m", "phi1_jax.data_gen.generate", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0 and "--kind {textbooks,exercises}" in out.stdout and "run.json" in out.stdout
    a = [generate.prompts.factors("exercises", 3, k) for k in range(100)]
    assert a == [generate.prompts.factors("exercises", 3, k) for k in range(100)]
    assert len({f["name"] for f in a}) > 90  # function-name constraints rarely repeat


def test_generated_exercises_feed_the_shard_writer_with_their_prompts(tmp_path, embedded):
    from phi1_jax.data_gen import shards

    with FakeOpenAI(responder=respond) as server:
        assert generate.main(_args(server, tmp_path / "gen", "exercises", 10)) == 0
    assert shards.main([f"--input={tmp_path / 'gen' / 'exercises.jsonl'}", f"--tokenizer={embedded.tokenizer_path}",
                        f"--out={tmp_path / 'shards'}", "--prompt-field=prompt", "--source-name=exercises"]) == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["documents"] == 10


def test_batch_mode_names_the_error_when_nothing_comes_back(tmp_path, capsys):
    with FakeOpenAI(responder=respond, batch_script=["error"] * 50) as server:
        args = _args(server, tmp_path, "exercises", 3, "--batch", "--poll-interval=0.01")
        assert generate.main(args) == 2
    err = capsys.readouterr().err
    assert "without a single usable reply (first error: the model crashed)" in err


def test_exercise_validation():
    fn = 'def add_pairs(xs: list[int]) -> int:\n    """Sum adjacent pairs.\n\n    >>> add_pairs([1, 2])\n    3\n    """\n    return sum(xs)\n'
    ok = validate.check_exercise(f"Here you go:\n```python\nimport math\n{fn}\nprint(add_pairs([1, 2]))\nassert add_pairs([]) == 0\n```", "add_pairs")
    assert ok.ok and ok.text == "import math\n" + fn and ok.prompt == "import math\n" + fn[:fn.index("    return")]
    assert ok.text.startswith(ok.prompt)
    reasons = {
        "wrong function name": fn.replace("add_pairs", "add_pair", 1),
        "no docstring": "def add_pairs(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n",
        "empty body": 'def add_pairs(xs):\n    """Sum adjacent pairs of the list, carefully and completely."""\n    ...\n',
        "not exactly one top-level function": fn + "\ndef helper():\n    return 1\n",
        "code before the function": "LIMIT = 3\n" + fn,
        "code does not parse": fn.replace("return sum(xs)", "return sum(xs"),
        "refusal or boilerplate": "As an AI language model, I cannot write that exercise for you, sorry about that.",
    }
    for why, code in reasons.items():
        assert validate.check_exercise(f"```python\n{code}```", "add_pairs").reason == why, why


def test_textbook_validation():
    prose = "Loops repeat a block of code. " * 10
    good = f"Sure! Here is a section on loops.\n\n## Loops\n\n{prose}\n\n```python\nfor i in range(3):\n    print(i)\n```\n"
    v = validate.check_textbook(good)
    assert v.ok and v.text.startswith("## Loops") and "Sure!" not in v.text
    assert validate.check_textbook(prose).reason == "no python code block"
    assert validate.check_textbook(prose + "```python\nfor i in range(3)\n    print(i)\n```").reason == "code block does not parse"
    assert validate.check_textbook(prose + "```python\nx = 1\n").reason == "unclosed code block"
    assert validate.check_textbook("```python\nx = 1\n```").reason == "too short"
    assert validate.check_textbook(prose + "```bash\nls -l |\n```\n```python\nx = 1\n```").ok  # other languages skipped
