"""Where a run's numbers go: WORKDIR/metrics.jsonl, TensorBoard event files, and a loss-curve plot.

metrics.jsonl has one JSON object per line: training rows (`step`, `loss`, `lr`, `grad_norm`, `tokens_per_sec`,
`mfu`) and held-out rows (`step`, `eval_loss`). A resumed run appends; readers keep the last row per step and kind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


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
