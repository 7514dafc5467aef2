"""Where a run's numbers go: WORKDIR/metrics.jsonl, TensorBoard event files, and a loss-curve plot.

metrics.jsonl has one JSON object per line, of three kinds: training rows (`step`, `loss`, `lr`, `grad_norm`,
`tokens_per_sec`, `mfu`), held-out rows (`step`, `eval_loss`) and code-eval rows (`step`, `tokens_seen`,
`<task>/pass@1`, maybe `<task>/pass@10` and `<task>/pass@100`, `<task>/n_problems`, `code_eval_seconds`; a row is
one when a key ends in "/pass@1"). Readers keep the last row per step and kind (per step and task for code evals).
A resumed run first drops the rows of the steps it trains again (those after the checkpoint it restarts from, see
`MetricsWriter`'s `resume_step`), so a step's rows come from the run that produced the saved state; a line cut off
by a kill mid-write is dropped then too. A training row's `loss` is the mean over every step since the previous row
(the logging window; `TrainWindow`), so `log_every` changes how often the curve is sampled, not how noisy it is;
`lr` and `grad_norm` are the logged step's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from phi1_jax import files
from phi1_jax.errors import UserError


def _window_zeros():
    import jax.numpy as jnp

    return {"loss_sum": jnp.float32(0.0), "steps": jnp.int32(0), "first_bad": jnp.int32(-1),
            "bad_loss": jnp.float32(0.0), "bad_grad_norm": jnp.float32(0.0)}


def _window_add(sums, m, step):
    import jax.numpy as jnp

    # An fp16 step skipped for overflow has non-finite gradients by design and changed nothing: it is not a failure.
    grads_ok = jnp.isfinite(m["grad_norm"]) | (m["skipped"] > 0) if "skipped" in m else jnp.isfinite(m["grad_norm"])
    new_bad = (sums["first_bad"] < 0) & ~(jnp.isfinite(m["loss"]) & grads_ok)
    return {"loss_sum": sums["loss_sum"] + m["loss"], "steps": sums["steps"] + 1,
            "first_bad": jnp.where(new_bad, step, sums["first_bad"]),
            "bad_loss": jnp.where(new_bad, m["loss"], sums["bad_loss"]),
            "bad_grad_norm": jnp.where(new_bad, m["grad_norm"], sums["bad_grad_norm"])}


class TrainWindow:
    """The training steps since the last logged row, summed on the device.

    The logged loss is their mean (one batch's loss is noise), and the first step whose loss or gradient norm was not
    finite is remembered, so a check at a log or before a save covers every step since the last check. `add` only
    dispatches a small jitted update (no host sync per step); `read` is the one sync, made when logging or saving.
    """

    def __init__(self, sharding):
        import jax

        self._zeros = jax.jit(_window_zeros, out_shardings=sharding)
        self._add = jax.jit(_window_add, out_shardings=sharding)
        self.reset()

    def reset(self) -> None:
        self._sums = self._zeros()

    def add(self, step_metrics: dict, step: int) -> None:
        m = {k: step_metrics[k] for k in ("loss", "grad_norm", "skipped") if k in step_metrics}
        self._sums = self._add(self._sums, m, np.int32(step))

    def read(self) -> dict:
        """{"loss": mean loss (None if no steps), "steps", "first_bad": first non-finite step or None, "bad_loss",
        "bad_grad_norm"} as host numbers."""
        import jax

        s = {k: v.item() for k, v in jax.device_get(self._sums).items()}
        return {"loss": s["loss_sum"] / s["steps"] if s["steps"] else None, "steps": s["steps"],
                "first_bad": s["first_bad"] if s["first_bad"] >= 0 else None, "bad_loss": s["bad_loss"],
                "bad_grad_norm": s["bad_grad_norm"]}


# --- metrics.jsonl: writing, resuming, reading --------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"
PASS1_SUFFIX = "/pass@1"  # a code-eval row has a "<task>/pass@1" key


class MetricsError(UserError, ValueError):
    """A metrics.jsonl line that is not a metrics row; the message names the file and line."""


def _parse(line: str) -> dict | None:
    """The row on one line, or None if the line is not a JSON object with an integer `step`."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _lines(path: Path) -> list[tuple[str, bool]]:
    """(line, terminated) for each line of the file; only the last one can lack its newline."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    parts = text.split("\n")
    return [(line, i < len(parts) - 1) for i, line in enumerate(parts) if line.strip()]


def drop_rows_after(workdir, resume_step: int | None) -> int:
    """Rewrites WORKDIR/metrics.jsonl without the rows of steps > resume_step (None: keeps every step) and without
    lines that are not rows (a line cut off by a kill mid-write); returns how many lines went. The file is replaced
    only when something goes, and atomically and durably (phi1_jax.files): a crash at any point leaves either the old
    file or the new one, never a mix."""
    path = Path(workdir) / METRICS_FILE
    lines = _lines(path)
    kept = [line for line, _ in lines
            if (row := _parse(line)) is not None and (resume_step is None or row["step"] <= resume_step)]
    last_cut = bool(lines) and not lines[-1][1]  # a complete last row without its newline still needs one
    if len(kept) == len(lines) and not last_cut:
        return 0
    files.write_text(path, "".join(line + "\n" for line in kept), durable=True)
    return len(lines) - len(kept)


class MetricsWriter:
    """Appends rows to WORKDIR/metrics.jsonl and TensorBoard. Pass `resume_step=` the checkpoint step a run restarts
    from (0 for a fresh start): the rows, and TensorBoard events, of later steps are dropped first, since those steps
    are trained again and their rows would otherwise appear twice. Only the primary process writes (`enabled`)."""

    def __init__(self, workdir: Path, enabled: bool = True, resume_step: int | None = None):
        self.workdir, self.enabled = Path(workdir), enabled
        self._file = self._tb = None
        if enabled:
            drop_rows_after(self.workdir, resume_step)
            self._file = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1  # hides the events of steps >= purge_step
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        # Non-finite numbers (an fp16 step that overflowed) are written as null: NaN is not JSON.
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, row["step"])
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()



def read_rows(workdir) -> list[dict]:
    """Every row of WORKDIR/metrics.jsonl in file order. An unterminated last line that is not a row is skipped (a
    write in progress, or one cut off by a kill); any other line that is not a row is an error naming it."""
    path = Path(workdir) / METRICS_FILE
    rows = []
    for n, (line, terminated) in enumerate(_lines(path), 1):
        row = _parse(line)
        if row is None and terminated:
            raise MetricsError(f"{path}:{n}: not a metrics row (a JSON object with an integer step): {line[:80]!r}")
        if row is not None:
            rows.append(row)
    return rows


def is_code_eval(row: dict) -> bool:
    return any(k.endswith(PASS1_SUFFIX) for k in row)


def code_eval_tasks(row: dict) -> list[str]:
    return sorted(k[: -len(PASS1_SUFFIX)] for k in row if k.endswith(PASS1_SUFFIX))


def read_metrics(workdir) -> tuple[dict[int, dict], dict[int, float]]:
    """({step: training row}, {step: eval_loss}), the last row written for each step (code-eval rows: read_code_evals)."""
    train, evals = {}, {}
    for row in read_rows(workdir):
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
        elif not is_code_eval(row):
            train[row["step"]] = row
    return train, evals


def read_code_evals(workdir) -> dict[int, dict]:
    """{step: code-eval row}. Rows of one step are merged, a later row replacing an earlier one's keys of the tasks
    it has (`<task>/...`), so separate rows per task at one step all count and a rewritten task keeps its last."""
    out: dict[int, dict] = {}
    for row in filter(is_code_eval, read_rows(workdir)):
        tasks = tuple(f"{t}/" for t in code_eval_tasks(row))
        old = {k: v for k, v in out.get(row["step"], {}).items() if not k.startswith(tasks)}
        out[row["step"]] = {**old, **row}
    return out


# --- the loss plot -------------------------------------------------------------------------------------------------


def loss_figure(workdir):
    """The figure plot_loss saves (a matplotlib Figure; the caller closes it), or None without training rows: the
    loss per logged step and the held-out loss; below it, sharing the step axis, pass@1 where code evals ran."""
    train, evals = read_metrics(workdir)
    if not train:
        return None
    code = read_code_evals(workdir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if code:
        fig, (ax, cax) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True, height_ratios=(2, 1))
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], label="train loss", lw=1.2)
    if evals:
        es = sorted(evals)
        ax.plot(es, [evals[s] for s in es], "o-", label="held-out loss", lw=1.2, ms=4)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{Path(workdir).name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if code:
        _pass_at_1_panel(cax, code)
    (cax if code else ax).set_xlabel("step")
    fig.tight_layout()
    return fig


def pass_at_1_top(highest_percent: float) -> float:
    """The pass@1 axis's top: at least 5%, so a curve at 0 (a young or tiny model) reads as zero, not as noise on an
    axis that ends at 0.05%; above that, 15% headroom over the highest point."""
    return max(5.0, 1.15 * highest_percent)


def _pass_at_1_panel(ax, code: dict[int, dict]) -> None:
    tasks = sorted({t for row in code.values() for t in code_eval_tasks(row)})
    highest = 0.0
    for task in tasks:
        key = f"{task}{PASS1_SUFFIX}"
        pts = sorted((s, r[key]) for s, r in code.items() if isinstance(r.get(key), (int, float)))
        ax.plot([s for s, _ in pts], [100 * v for _, v in pts], "o-", label=task, lw=1.2, ms=4)
        highest = max([highest] + [100 * v for _, v in pts])
    ax.set_ylabel("pass@1 (%)")
    ax.set_ylim(0, pass_at_1_top(highest))
    ax.set_title(f"{', '.join(tasks)} pass@1")
    ax.grid(alpha=0.3)
    if len(tasks) > 1:
        ax.legend()


def plot_loss(workdir) -> Path | None:
    """WORKDIR/loss.png (loss_figure), written atomically; None without training rows."""
    fig = loss_figure(workdir)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    out = Path(workdir) / "loss.png"
    try:
        with files.replacing(out) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return out
