"""phi1_jax.files: a file is whole or absent, a crash mid-write leaves no temporary file, appends are whole lines."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from phi1_jax import files


def _leftovers(directory, keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_an_error_mid_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "rows.jsonl"
    files.write_jsonl(path, [{"a": 1}, {"a": 2}])
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'

    def rows():
        yield {"a": 3}
        raise RuntimeError("the writer fails halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        files.write_jsonl(path, rows())
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'  # the old file, whole
    with pytest.raises(TypeError):
        files.write_jsonl(tmp_path / "new.jsonl", [{"a": 1}, object()])  # not JSON
    with pytest.raises(TypeError):
        files.write_text(tmp_path / "new.txt", None)
    assert _leftovers(tmp_path, {"rows.jsonl"}) == []  # no temp file, no half-written new file


def _write_and_die(path, how):
    """A child that is inside `replacing(path)`, its temp file half written, when `how` ends it."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from phi1_jax import files
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        with files.replacing({str(path)!r}) as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.{how})
            signal.pause()
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_a_killed_writer_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old\n")
    r = _write_and_die(path, "SIGTERM")  # a stop Python unwinds: the temp file is removed on the way out
    assert r.returncode == 143, r.stderr
    assert path.read_text() == "old\n" and _leftovers(tmp_path, {"out.json"}) == []
    r = _write_and_die(path, "SIGKILL")  # no unwinding: the hidden temp name stays until the next write of the file
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert path.read_text() == "old\n"
    files.write_text(path, "new\n")
    assert path.read_text() == "new\n" and _leftovers(tmp_path, {"out.json"}) == []


def test_appends_are_whole_lines_and_a_cut_last_line_is_dropped(tmp_path):
    path = tmp_path / "sub" / "samples.jsonl"
    with files.appending(path) as out:
        out.write_jsonl([{"i": 0}, {"i": 1}])
        out.write_lines(["x", "y\n"])
    assert path.read_text() == '{"i": 0}\n{"i": 1}\nx\ny\n'
    assert not files.drop_cut_last_line(path)  # ends in a newline: nothing to drop
    with open(path, "a") as f:
        f.write('{"i": 2')  # a kill mid-write
    assert files.drop_cut_last_line(path)
    assert [json.loads(line) for line in path.read_text().splitlines()[:2]] == [{"i": 0}, {"i": 1}]
    assert path.read_text().endswith("y\n")
    one = tmp_path / "one.jsonl"
    one.write_text("no newline at all " * 10000)  # longer than one read-back block
    assert files.drop_cut_last_line(one) and one.read_text() == ""
    assert not files.drop_cut_last_line(tmp_path / "missing.jsonl") and not (tmp_path / "missing.jsonl").exists()


def test_a_directory_appears_whole_or_not_at_all(tmp_path):
    root = tmp_path / "cache" / "corpus"
    with pytest.raises(RuntimeError, match="halfway"):
        with files.new_directory(root) as tmp:
            (tmp / "a.txt").write_text("a")
            raise RuntimeError("the build fails halfway")
    assert not root.exists() and _leftovers(root.parent, set()) == []
    with files.new_directory(root) as tmp:
        (tmp / "a.txt").write_text("first")
    with files.new_directory(root) as tmp:  # another builder finished first: its folder is kept
        (tmp / "a.txt").write_text("second")
    assert (root / "a.txt").read_text() == "first" and _leftovers(root.parent, {"corpus"}) == []


def test_concurrent_writers_each_use_a_temp_name_of_their_own(tmp_path):
    path = tmp_path / "truth.pkl"
    with files.replacing(path, concurrent=True) as mine:  # another process's temp name has its own pid
        assert mine.name == f".truth.{os.getpid()}.tmp.pkl"
        mine.write_bytes(b"mine")
    assert path.read_bytes() == b"mine" and _leftovers(tmp_path, {"truth.pkl"}) == []
    with files.replacing(path) as fixed:
        assert fixed.name == ".truth.tmp.pkl"
        fixed.write_bytes(b"fixed")
    assert path.read_bytes() == b"fixed"
