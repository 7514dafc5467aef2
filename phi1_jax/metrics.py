"""Where a run's numbers go: WORKDIR/metrics.jsonl, TensorBoard event files, and a loss-curve plot.

metrics.jsonl has one JSON object per line: training rows (`step`, `loss`, `lr`, `grad_norm`, `tokens_per_sec`,
`mfu`) and held-out rows (`step`, `eval_loss`). A resumed run appends; readers keep the last row per step and kind.
A training row's `loss` is the mean over every step since the previous row (the logging window; `TrainWindow`), so
`log_every` changes how often the curve is sampled, not how noisy it is; `lr` and `grad_norm` are the logged step's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


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


class MetricsWriter:
    def __init__(self, workdir: Path, enabled: bool = True):
        self.workdir, self.enabled = Path(workdir), enabled
        self._file = open(self.workdir / "metrics.jsonl", "a") if enabled else None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

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


def read_metrics(workdir) -> tuple[dict[int, dict], dict[int, float]]:
    """({step: training row}, {step: eval_loss}), the last row written for each step."""
    train, evals = {}, {}
    path = Path(workdir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
        else:
            train[row["step"]] = row
    return train, evals


def plot_loss(workdir) -> Path | None:
    """WORKDIR/loss.png: training loss per logged step, and the held-out loss where measured."""
    train, evals = read_metrics(workdir)
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = sorted(train)
    ax.plot(steps, [train[s]["loss"] for s in steps], label="train loss", lw=1.2)
    if evals:
        es = sorted(evals)
        ax.plot(es, [evals[s] for s in es], "o-", label="held-out loss", lw=1.2, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{Path(workdir).name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(workdir) / "loss.png"
    tmp = out.with_name(".loss.png.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
