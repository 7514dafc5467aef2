"""scripts/gpu_checks.sh end to end in its CPU dry mode: the plumbing of the one device call (docs/gpu.md), checked
here so that no device minute is lost to a typo. About 1.5-2 minutes on 2 cores (each step's python at tiny shapes,
the kernel interpreted); the figures it produces mean nothing and are not checked, only that they are there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
DEFAULT_STEPS = ["env", "kernels", "kbench", "train", "generate"]


def _run(out: Path, *args, timeout=400, **env):
    environ = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_checks")
    proc = _run(out, "--dry")
    return out, proc


def test_dry_run_writes_a_complete_report(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "logs.tar.gz", "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["dry"] is True and report["steps"] == DEFAULT_STEPS and report["ok"] is True
    assert report["step_status"] == {step: "ok" for step in DEFAULT_STEPS}
    assert report["elapsed_s"] < report["budget_s"] == 540

    env = report["env"]
    assert env["jax_backend"] == "cpu" and env["packages"]["jax"] and "pallas_triton_deprecated" in env

    kernels = report["results"]["kernels"]
    assert kernels["failed"] == [] and kernels["passed"] >= 1

    rows = report["results"]["kbench"]["rows"]  # every implementation, with and without segment ids, has figures
    assert {(r["impl"], r["segments"]) for r in rows} == {(i, s) for i in ("pallas", "cudnn", "cudnn_mask", "xla")
                                                          for s in ("none", "packed")}
    assert all(r["fwd_tflops"] > 0 and r["fwd_bwd_tflops"] > 0 for r in rows)

    train = report["results"]["train"]
    assert [r["status"] for r in train["runs"]] == ["ok", "ok"]
    assert train["best"]["tokens_per_s"] == max(r["tokens_per_s"] for r in train["runs"])
    assert all(r["loss"] > 0 for r in train["runs"])

    gen = report["results"]["generate"]["generation"]
    assert [r["batch"] for r in gen["rows"]] == [1, 16] and all(r["ours_tokens_per_s"] > 0 for r in gen["rows"])

    # the bars are computed from the figures, and marked as not applying to a dry run
    assert {"kernel_fwd_bwd_vs_cudnn_none", "kernel_fwd_bwd_vs_cudnn_packed"} <= set(report["bars"])
    assert not any(b["applies"] for b in report["bars"].values())

    md = (out / "report.md").read_text()
    for heading in ("## Environment", "## Steps", "## Kernel tests", "## Attention", "## Training", "## Generation",
                    "## Bars"):
        assert heading in md
    for step in DEFAULT_STEPS:
        assert f"| {step} | ok |" in md


def test_a_failing_step_is_reported_and_the_run_is_not_ok(tmp_path):
    proc = _run(tmp_path, "--dry", "train", GPU_CHECKS_TRAIN="xla:3:nosuchpolicy xla:2:none")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    runs = report["results"]["train"]["runs"]
    assert runs[0]["status"].startswith("failed (exit") and runs[1]["status"] == "ok"  # not out of memory: goes on
    assert report["step_status"] == {"train": runs[0]["status"]} and report["ok"] is False
    assert report["results"]["train"]["best"]["microbatch"] == 2


def test_a_spent_budget_skips_steps_and_still_reports(tmp_path):
    proc = _run(tmp_path, "--dry", "env", "kbench", GPU_CHECKS_BUDGET="10", timeout=60)  # 10 s: the report's own
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False
    assert report["step_status"] == {"env": "skipped: budget spent", "kbench": "skipped: budget spent"}
    assert "NOT ok" in (tmp_path / "report.md").read_text()


def test_unknown_step_is_refused(tmp_path):
    proc = _run(tmp_path, "--dry", "nosuchstep", timeout=30)
    assert proc.returncode == 2 and "unknown step 'nosuchstep'" in proc.stderr
