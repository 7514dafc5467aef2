"""The paper's Figure 2.1 and Table 3 from this project's outputs (arXiv 2306.11644 §2, §5).

    python -m phi1_jax.figures fig2_1 --runs=NAME=WORKDIR[,NAME=WORKDIR...] --out=fig2_1.png [--task=humaneval]
        [--xscale=log|linear] [--finetuned-from=FT_NAME=BASE_NAME,...]
    python -m phi1_jax.figures table3 --report=[NAME=]OUT/decontamination_report.json [--report=...] --out=table3.md

fig2_1 reads the code-eval rows the trainer writes to each WORKDIR/metrics.jsonl (`config.code_eval.every`) and
draws pass@1 (%) against training tokens seen, one line per run, the model's size (from WORKDIR/model_config.json)
in the legend: one line per data regime and model size, where the paper's figure shows the end points as bars. A
finetuning run counts its tokens from 0; `--finetuned-from` draws it on from its base run's last point.
table3 renders the report of `python -m phi1_jax.data_gen.decontaminate` (made with `--humaneval-results` for pass rates) as
the paper's Table 3: for each tau, the HumanEval problems similar and not similar to the training data, and each
model's pass@1 on them; several `--report`s made on the same training data give one column per model.
Outputs are written atomically (.png, .pdf or .svg for figures; .md or .png for the table). Bad input is one
`error:` line and exit status 2. docs/reproduce.md has the commands that make the inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phi1_jax import cli, files, metrics
from phi1_jax.errors import UserError

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
TASK_NAMES = {"humaneval": "HumanEval", "mbpp": "MBPP"}


class FigureError(UserError, ValueError):
    """Bad input to a figure or table; the message names the flag, run or file."""


# --- output --------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_out(out: Path, suffixes: tuple[str, ...]) -> None:
    if out.suffix.lower() not in suffixes:
        raise FigureError(f"--out={out}: must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise FigureError(f"--out={out}: is a directory; name the file to write")


def _save_figure(fig, out: Path) -> Path:
    plt = _pyplot()
    try:
        with files.replacing(out) as tmp:  # a reader never sees half a file; a failure leaves the old one
            fig.savefig(tmp, bbox_inches="tight")
        return out
    finally:
        plt.close(fig)


# --- Figure 2.1 ----------------------------------------------------------------------------------------------------


def parse_runs(spec: str) -> list[tuple[str, Path]]:
    """"NAME=WORKDIR,NAME=WORKDIR" -> [(name, workdir)], each workdir a directory that exists."""
    runs = []
    for part in spec.split(","):
        name, sep, workdir = part.partition("=")
        if not sep or not name.strip() or not workdir.strip():
            raise FigureError(f"--runs: {part!r} is not NAME=WORKDIR (e.g. --runs=textbook=workdirs/a,stack=workdirs/b)")
        path = Path(workdir.strip())
        if not path.is_dir():
            raise FigureError(f"--runs: run {name.strip()}: workdir {path} not found")
        runs.append((name.strip(), path))
    names = [n for n, _ in runs]
    if len(set(names)) < len(names):
        raise FigureError(f"--runs: a run name is given twice: {names}")
    return runs


def model_size(workdir: Path) -> int:
    """Parameters of the workdir's model, counted on its abstract shape (nothing is allocated)."""
    from phi1_jax.checkpoint import read_model_config
    from phi1_jax.model import abstract_model, count_params

    return count_params(abstract_model(read_model_config(workdir)))


def size_label(n: int) -> str:
    """1_418_270_720 -> "1.4B", 356_794_368 -> "357M", 296_000 -> "0.3M"."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.1f}M"


def pass_curve(workdir: Path, task: str) -> list[tuple[int, float]]:
    """[(tokens seen, pass@1 in %)] from the run's code-eval rows for `task`, by step."""
    key = f"{task}{metrics.PASS1_SUFFIX}"
    rows = metrics.read_code_evals(workdir)  # a MetricsError names the file and line
    points = []
    for step, row in sorted(rows.items()):
        if not isinstance(row.get(key), (int, float)):
            continue
        if not isinstance(row.get("tokens_seen"), int):
            raise FigureError(f"{workdir / metrics.METRICS_FILE}: the code-eval row of step {step} has no tokens_seen")
        points.append((row["tokens_seen"], 100.0 * row[key]))
    if not points:
        raise FigureError(f"{workdir}: no {task} code-eval rows in {metrics.METRICS_FILE} (train with "
                          f"--config.code_eval.every=N and --config.code_eval.task={task})")
    return points


def parse_finetuned_from(spec: str | None, names: list[str]) -> dict[str, str]:
    """"FT=BASE,..." -> {finetuning run: the run it started from}, both among the --runs names."""
    pairs = {}
    for part in spec.split(",") if spec else []:
        ft, sep, base = (x.strip() for x in part.partition("="))
        if not sep or ft not in names or base not in names or ft == base:
            raise FigureError(f"--finetuned-from: {part!r} is not FINETUNED=BASE with two different --runs names "
                              f"({', '.join(names)})")
        pairs[ft] = base
    return pairs


def _end_tokens(run: str, points: dict, finetuned_from: dict[str, str], depth: int = 0) -> int:
    """Tokens seen at the run's last point, counted from the first pretraining run of its chain."""
    if depth > len(points):
        raise FigureError("--finetuned-from: the runs form a cycle")
    base = finetuned_from.get(run)
    return points[run][-1][0] + (_end_tokens(base, points, finetuned_from, depth + 1) if base else 0)


def fig2_1(runs: list[tuple[str, Path]], out: Path, task: str = "humaneval", xscale: str = "log",
           finetuned_from: dict[str, str] | None = None) -> Path:
    """One line per run: pass@1 against tokens seen; colour per run, line style per model size. A finetuning run
    (`finetuned_from` {run: base run}) counts its tokens from 0, as its trainer does; it is drawn from where its base
    run's last point is, so its line continues the base's, as the paper's (C) bars stand beside their base's (B)."""
    _check_out(out, FIGURE_SUFFIXES)
    finetuned_from = finetuned_from or {}
    raw = {name: pass_curve(workdir, task) for name, workdir in runs}
    shift = {ft: _end_tokens(base, raw, finetuned_from) for ft, base in finetuned_from.items()}
    curves = [(name, [(t + shift.get(name, 0), v) for t, v in raw[name]], model_size(workdir)) for name, workdir in runs]
    styles = dict(zip(sorted({n for _, _, n in curves}, reverse=True), ["-", "--", ":", "-."] * 8))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, points, n_params in curves:
        if xscale == "log":
            points = [(t, v) for t, v in points if t > 0]  # tokens 0 has no place on a log axis
        tokens, values = [t for t, _ in points], [v for _, v in points]
        (line,) = ax.plot(tokens, values, styles[n_params], marker="o", ms=4, lw=1.4,
                          label=f"{name} ({size_label(n_params)})")
        if points:  # the end point's value: what the paper's bar shows
            ax.annotate(f"{values[-1]:.1f}", (tokens[-1], values[-1]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color=line.get_color())
    ax.set_xscale(xscale)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel(f"{TASK_NAMES.get(task, task)} pass@1 (%)")
    ax.set_ylim(0, metrics.pass_at_1_top(max([v for _, points, _ in curves for _, v in points], default=0.0)))
    ax.margins(x=0.08)  # room for the end points' labels
    ax.set_title(f"Figure 2.1: {TASK_NAMES.get(task, task)} pass@1 by data, size and tokens seen")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="run (parameters)", fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, out)


# --- Table 3 -------------------------------------------------------------------------------------------------------

_ROW_KEYS = {"benchmark": str, "tau": (int, float), "similar": int, "non_similar": int}


def read_report(path: Path) -> dict:
    """A phi1_jax.data_gen.decontaminate report (its JSON), checked for what Table 3 needs."""
    if not path.is_file():
        raise FigureError(f"--report: {path} not found")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FigureError(f"{path}: not JSON ({e})") from None
    rows = report.get("table3") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in _ROW_KEYS.items()) for r in rows):
        raise FigureError(f"{path}: not a phi1_jax.data_gen.decontaminate report (expected a JSON object whose 'table3' is a "
                          f"list of rows with {', '.join(_ROW_KEYS)})")
    return report


def parse_report_arg(spec: str, i: int) -> tuple[str, Path]:
    """"NAME=FILE" or "FILE" (named "model" or "model N")."""
    name, sep, file = spec.partition("=")
    if sep and not Path(spec).exists():
        if not name.strip() or not file.strip():
            raise FigureError(f"--report: {spec!r} is not FILE or NAME=FILE")
        return name.strip(), Path(file.strip())
    return ("model" if i == 0 else f"model {i + 1}"), Path(spec)


def _split(rows: list[dict]) -> dict:
    return {(r["benchmark"], r["tau"]): (r["similar"], r["non_similar"]) for r in rows}


def _total(r: dict) -> float | None:
    """pass@1 on all problems: the groups' rates weighted by their sizes (an empty group counts nothing)."""
    parts = [(r.get(f"pass_{g}"), r[g]) for g in ("similar", "non_similar")]
    if any(n and not isinstance(p, (int, float)) for p, n in parts):
        return None
    n = sum(c for _, c in parts)
    return sum(p * c for p, c in parts if c) / n if n else None


def table3_rows(reports: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) in the paper's layout: per benchmark and tau, a similar, a non-similar and a total row, with
    the problem count and each model's pass@1. Reports must share the split (the same training data)."""
    first = reports[0][1]["table3"]
    for name, rep in reports[1:]:
        if _split(rep["table3"]) != _split(first):
            raise FigureError(f"--report {name}: its similar/non-similar split differs from the first report's; "
                              "Table 3 compares models on one split (the same training data, the same taus)")
    by_name = [(name, {(r["benchmark"], r["tau"]): r for r in rep["table3"]}) for name, rep in reports]
    header = ["benchmark", "tau", "problems", "count"] + [f"{name} pass@1" for name, _ in by_name]
    out = []
    for row in first:
        key = (row["benchmark"], row["tau"])
        for group, label in (("similar", "similar"), ("non_similar", "non-similar"), ("total", "total")):
            count = row["similar"] + row["non_similar"] if group == "total" else row[group]
            cells = [_total(r[key]) if group == "total" else r[key].get(f"pass_{group}") for _, r in by_name]
            out.append([row["benchmark"] if group == "similar" else "", f"{row['tau']:g}" if group == "similar" else "",
                        label, str(count)] + [f"{100 * c:.1f}%" if isinstance(c, (int, float)) else "-" for c in cells])
    return header, out


def _notes(reports: list[tuple[str, dict]]) -> list[str]:
    first = reports[0][1]
    notes = [f"Training items: {first.get('items', '?')}. Similar: some training item has an AST match rate >= tau "
             "with the problem's reference solution (names, literals, comments and docstrings ignored)."]
    removed = ", ".join(f"{r['tau']:g}: {r['items_removed']}" for r in first["table3"]
                        if r["benchmark"] == "HumanEval" and "items_removed" in r)
    if removed:
        notes.append(f"Training items a pruning at tau removes (HumanEval): {removed}.")
    for name, rep in reports:
        if not any("pass_similar" in r for r in rep["table3"]):
            notes.append(f"{name}: no pass rates (the report was made without --humaneval-results).")
    return notes


def table3_markdown(reports: list[tuple[str, dict]]) -> str:
    header, rows = table3_rows(reports)
    lines = ["# Table 3: HumanEval pass@1 on problems similar and not similar to the training data", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in _notes(reports)]) + "\n"


def table3_figure(reports: list[tuple[str, dict]]):
    header, rows = table3_rows(reports)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.3 * len(header) + 0.5, 0.22 * len(rows) + 0.6), dpi=100)
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    ax.set_title("Table 3: pass@1 on problems similar / not similar to the training data", fontsize=10)
    fig.tight_layout()
    return fig


def table3(report_args: list[str], out: Path) -> Path:
    _check_out(out, (".md", ".png"))
    reports = [(name, read_report(path)) for name, path in (parse_report_arg(s, i) for i, s in enumerate(report_args))]
    if out.suffix.lower() == ".md":
        text = table3_markdown(reports)
        return files.write_text(out, text)
    return _save_figure(table3_figure(reports), out)


# --- CLI -----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.figures", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{fig2_1,table3}")
    what = "pass@1 against training tokens seen, one line per run (Figure 2.1)"
    f = sub.add_parser("fig2_1", help=what, description=what)
    f.add_argument("--runs", required=True, help="NAME=WORKDIR,NAME=WORKDIR,...: trainer workdirs with code-eval rows")
    f.add_argument("--out", required=True, type=Path, help="the figure to write (.png, .pdf or .svg)")
    f.add_argument("--task", default="humaneval", help="the code-eval task to plot: humaneval (the paper's) or mbpp")
    f.add_argument("--xscale", choices=("log", "linear"), default="log", help="the tokens axis")
    f.add_argument("--finetuned-from", default=None, metavar="FT=BASE,...",
                   help="runs that finetune another run (configs/phi1_finetune.py): drawn from the base's last point")
    what = "the decontamination table from phi1_jax.data_gen.decontaminate's report (Table 3)"
    t = sub.add_parser("table3", help=what, description=what)
    t.add_argument("--report", required=True, action="append",
                   help="[NAME=]OUT/decontamination_report.json; repeat for one pass@1 column per model")
    t.add_argument("--out", required=True, type=Path, help="the table to write: .md or .png")
    return p


@cli.reports_user_errors  # FigureError, MetricsError, the checkpoint module's errors: one `error:` line, exit 2
def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command == "fig2_1":
            runs = parse_runs(a.runs)
            out = fig2_1(runs, a.out, a.task, a.xscale, parse_finetuned_from(a.finetuned_from, [n for n, _ in runs]))
        else:
            out = table3(a.report, a.out)
    except OSError as e:  # an output folder that cannot be written, a file that cannot be read
        raise FigureError(str(e)) from None
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
