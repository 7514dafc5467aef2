"""The project's GPU checks and GPU benchmarks as one run ending within 9 minutes with a report; docs/gpu.md says
what each step measures, the bars, and the device call. scripts/gpu_checks.sh launches it (it first installs the
wheels this Python lacks and puts the checkout on PYTHONPATH).

Command:  python -m phi1_jax.bench.gpu_checks [--dry] [STEP ...] [--out=DIR] [--budget=540] [--train-ladder=...]
          STEP: env kernels kbench train generate (the default), and tune, dryrun (only when named)

  env       python -m phi1_jax.bench.gpu_env: versions, the devices, nvidia-smi, the Triton deprecation; on a GPU run
            that finds no GPU the other steps are skipped
  kernels   tests/test_flash_attention.py compiled (on a GPU its interpret-mode cases run the compiled kernel) and
            tests/test_model.py's cuDNN test (read from pytest's JUnit XML)
  kbench    python -m phi1_jax.bench.attention_speed at phi-1's shape (bf16, causal, batch 8, 32 heads of 64, seq
            2048), with and without segment ids: pallas, cudnn, cudnn_mask, xla
  train     python -m phi1_jax.bench.train_speed: phi-1 1.3B tokens/s and MFU on one GPU, over a ladder of
            attention:microbatch:remat settings in increasing memory order, the first out-of-memory ending the ladder
  generate  python -m phi1_jax.bench.eval_speed --part=generation --model=phi1 --dtype=bfloat16 --batches=1,16
  tune      python -m phi1_jax.bench.tune_attention (block sizes, Triton warps/stages)
  dryrun    python -m phi1_jax.train --config=configs/phi1.py --config.dry_run=True on this host's devices

Every figure comes from the benchmarks' own `--json` files; nothing is read off their printed output. --dry: the
same steps on CPU at tiny shapes (the plumbing check tests/test_gpu_checks.py runs); its figures mean nothing.
Output in --out ($OUT, else ./gpu_checks): report.json, report.md, log.txt (each step's log's end), logs.tar.gz
(every log), written even when steps fail or run out of time. Each step is time-boxed (BOXES) and the whole run by
--budget: a step that would outlast it gets what is left, or is skipped. Exit status 0 when every step ran ok, 1
otherwise, 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from phi1_jax import cli, files

ALL_STEPS = ("env", "kernels", "kbench", "train", "generate", "tune", "dryrun")
DEFAULT_STEPS = ("env", "kernels", "kbench", "train", "generate")
BOXES = dict(env=30, kernels=110, kbench=90, train=180, generate=100, tune=240, dryrun=120)  # seconds per step
RESERVE = 10  # seconds of the budget kept for the report
LADDER = dict(gpu="pallas:8:none pallas:16:none pallas:32:dots", dry="pallas:2:none xla:4:full")


class Run:
    """The steps' commands, each time-boxed, its output in WORK/<name>.log and its status in `self.status`."""

    def __init__(self, work: Path, budget: int, python: str):
        self.work, self.budget, self.python, self.t0 = work, budget, python, time.monotonic()
        self.status: dict[str, dict] = {}
        self.main_log = open(work / "main.log", "a", encoding="utf-8")

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.main_log.write(line + "\n")
        self.main_log.flush()

    def left(self) -> int:
        return int(self.budget - RESERVE - (time.monotonic() - self.t0))

    def __call__(self, name: str, limit: int, *cmd: str) -> int | None:
        """The command's exit status (124 when cut at its time box), or None when the budget is spent."""
        limit = min(limit, self.left())
        if limit < 5:
            self.say(f"== {name}: skipped, the budget is spent")
            self.status[name] = dict(name=name, rc=None, seconds=0, limit=0, note="skipped: budget spent")
            return None
        self.say(f"== {name} ({limit}s): {' '.join(cmd)}")
        start = time.monotonic()
        with open(self.work / f"{name}.log", "a", encoding="utf-8") as log:
            log.write(f"== {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen([self.python, *cmd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = 124
        seconds = round(time.monotonic() - start)
        self.say(f"== {name}: exit {rc} after {seconds} s")
        self.status[name] = dict(name=name, rc=rc, seconds=seconds, limit=limit, note="")
        return rc


# --- the steps -------------------------------------------------------------------------------------------------------


def run_steps(run: Run, steps: list[str], dry: bool, ladder: str) -> dict:
    """Runs `steps`; returns what the report needs beyond `run.status` (the training ladder's runs)."""
    work, extra = run.work, {"train_runs": []}
    no_gpu = False
    for step in steps:
        if no_gpu and step != "env":
            run.status[step] = dict(name=step, rc=None, seconds=0, limit=0, note="skipped: JAX sees no GPU")
            continue
        if step == "env":
            rc = run("env", BOXES["env"], "-m", "phi1_jax.bench.gpu_env", f"--json={work / 'env.json'}",
                     *([] if dry else ["--require-gpu"]))
            if not dry and rc == 3:
                run.say("JAX sees no GPU here: the other steps are skipped")
                no_gpu = True
        elif step == "kernels":
            sel = ["-k", "bad_shapes or gpu"] if dry else []  # the CPU-cheap cases, and the GPU ones (skipped there)
            run("kernels", BOXES["kernels"], "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5",
                f"--junitxml={work / 'kernels.xml'}", *sel, "tests/test_flash_attention.py",
                "tests/test_model.py::test_cudnn_on_gpu_equals_xla")
        elif step == "kbench":
            shape = (["--batch=1", "--heads=2", "--seqs=128", "--iters=1", "--cudnn-stand-in"] if dry
                     else ["--seqs=2048", "--iters=10"])
            run("kbench", BOXES["kbench"], "-m", "phi1_jax.bench.attention_speed", "--dtypes=bfloat16",
                "--segments=none,packed", *shape, f"--json={work / 'kbench.json'}")
        elif step == "tune":
            shape = ["--batch=1", "--seq=128", "--heads=2", "--iters=1", "--quick"] if dry else ["--iters=10"]
            run("tune", BOXES["tune"], "-m", "phi1_jax.bench.tune_attention", *shape, f"--json={work / 'tune.json'}")
        elif step == "train":
            extra["train_runs"] = _train_ladder(run, dry, ladder)
        elif step == "generate":
            peer = "transformers" if _imports(run.python, "torch, transformers") else "none"  # shown in the report
            args = (["--model=tiny", "--dtype=float32", "--prompt-len=16", "--new-tokens=8"] if dry
                    else ["--model=phi1", "--dtype=bfloat16"])
            run("generate", BOXES["generate"], "-m", "phi1_jax.bench.eval_speed", "--part=generation", *args,
                "--batches=1,16", f"--peer={peer}", f"--json={work / 'generate.json'}")
        elif step == "dryrun":
            args = (["--config=configs/tiny.py"] if dry else
                    ["--config=configs/phi1.py", "--config.model.attention_impl=pallas", "--config.grad_accum_steps=128"])
            run("dryrun", BOXES["dryrun"], "-m", "phi1_jax.train", *args, f"--workdir={work / 'dryrun_workdir'}",
                "--config.dry_run=True", "--config.mesh.fsdp=-1")
    return extra


def _train_ladder(run: Run, dry: bool, ladder: str) -> list[dict]:
    """phi-1 as configured (bf16, fp32 master weights, dropout 0.1) at seq 2048 on one GPU, one train_speed run per
    ladder entry until one runs out of memory (its --json says so) or the step's time box is spent."""
    base = (["--config=configs/tiny.py", "--steps=2", "--warmup=1"] if dry else
            ["--config=configs/phi1.py", "--steps=6", "--warmup=2", "--config.seq_len=2048"])
    end, runs = time.monotonic() + BOXES["train"], []
    for i, entry in enumerate(ladder.split(), 1):
        impl, mb, remat = entry.split(":")
        name, out = f"train_{i}", run.work / f"train_{i}.json"
        extra = ["--config.model.attn_dropout=0.0"] if impl == "cudnn" else []  # cuDNN through JAX has no dropout
        rc = run(name, int(end - time.monotonic()), "-m", "phi1_jax.bench.train_speed", "--peer=none", *base,
                 "--config.mesh.fsdp=1", f"--config.batch_size={mb}", "--config.grad_accum_steps=1",
                 f"--config.model.attention_impl={impl}", f"--config.model.remat={remat}", *extra, f"--json={out}")
        result = _load(out) or {}
        runs.append(dict(name=name, attention_impl=impl, microbatch=int(mb), remat=remat, rc=rc, result=result))
        if result.get("out_of_memory"):
            run.say(f"train: {entry} ran out of memory: the ladder ends here")
            break
        if end - time.monotonic() < 5:
            break
    return runs


def _imports(python: str, modules: str) -> bool:
    return subprocess.run([python, "-c", f"import {modules}"], capture_output=True).returncode == 0


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- the report ------------------------------------------------------------------------------------------------------


def status_of(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r["rc"] is None:
        return r["note"] or "skipped"
    return {0: "ok", 124: "timeout", 137: "timeout"}.get(r["rc"], f"failed (exit {r['rc']})")


def _kernels(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        cases = suite.findall("testcase")
    except (ET.ParseError, AttributeError) as e:
        return dict(error=f"unreadable junit report: {e}")
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    return dict(tests=len(cases), failed=failed, skipped=skipped, passed=len(cases) - len(failed) - len(skipped))


def _train_result(r: dict, status: dict) -> dict:
    res = r["result"]
    row = dict(name=r["name"], attention_impl=r["attention_impl"], microbatch=r["microbatch"], remat=r["remat"],
               status=status_of(status), seconds=(status or {}).get("seconds"))
    ours = res.get("phi1_jax")
    if ours:
        row.update(tokens_per_s=ours["tokens_per_s"], mfu=ours["mfu"], loss=ours["loss"])
    if res.get("out_of_memory"):
        row["status"] = "out of memory"
    elif row["status"] == "ok" and (not ours or ours["loss"] != ours["loss"]):
        row["status"] = "failed (no figure or NaN loss)"
    return row


def build_report(work: Path, run: Run, steps: list[str], dry: bool, extra: dict) -> dict:
    env = _load(work / "env.json")
    wheels_file = work / "wheels.txt"
    wheels = dict(missing_here=wheels_file.read_text().split() if wheels_file.exists() else [],
                  installed=not (work / "wheels_failed").exists())
    report = dict(dry=dry, steps=steps, elapsed_s=round(time.monotonic() - run.t0), budget_s=run.budget, env=env,
                  wheels=wheels, results={}, bars={})
    results = report["results"]
    results["kernels"] = kernels = _kernels(work / "kernels.xml")
    results["kbench"] = kbench = _load(work / "kbench.json")
    results["tune"] = _load(work / "tune.json")
    train = [_train_result(r, run.status.get(r["name"])) for r in extra["train_runs"]]
    ok_train = [r for r in train if r["status"] == "ok"]
    best = max(ok_train, key=lambda r: r["tokens_per_s"]) if ok_train else None
    results["train"] = dict(runs=train, best=best)
    results["generate"] = generate = _load(work / "generate.json")
    dryrun_log = work / "dryrun.log"
    results["dryrun"] = (dict(memory_lines=[line.strip() for line in dryrun_log.read_text(errors="replace").splitlines()
                                            if "GiB per device" in line or "dry run:" in line])
                         if dryrun_log.exists() else None)

    step_status = {}
    for step in steps:
        if step == "train":
            # ok: a best figure, and no run that broke (running out of memory or of the step's time is a finding)
            broken = [r["status"] for r in train if r["status"].startswith(("failed", "skipped"))]
            step_status[step] = ("ok" if ok_train and not broken else broken[0] if broken
                                 else train[0]["status"] if train else status_of(run.status.get("train_1")))
            continue
        s = status_of(run.status.get(step))
        if s == "ok" and step == "kernels" and (not kernels or kernels.get("error") or kernels["failed"]):
            s = "failed"
        if s == "ok" and step in ("kbench", "tune", "generate") and results[step] is None:
            s = "failed (no JSON written)"
        if s == "ok" and step == "kbench" and any("error" in r for r in kbench["rows"]):
            s = "ok, with failed rows"
        step_status[step] = s
    report["step_status"] = step_status
    report["ok"] = all(s == "ok" for s in step_status.values())
    report["step_seconds"] = {step: sum(r["seconds"] or 0 for n, r in run.status.items()
                                        if n == step or (step == "train" and n.startswith("train_")))
                              for step in steps}

    # bars: kernel fwd+bwd >= cuDNN; phi-1 >= 50% MFU on one H100/H200; generation at batch 16 >= 5x transformers
    bars = report["bars"]
    if kbench:
        for seg in ("none", "packed"):
            rows = {r["impl"]: r for r in kbench["rows"] if r["segments"] == seg and "error" not in r}
            if "pallas" in rows and "cudnn" in rows:
                ours, theirs = rows["pallas"]["fwd_bwd_tflops"], rows["cudnn"]["fwd_bwd_tflops"]
                bars[f"kernel_fwd_bwd_vs_cudnn_{seg}"] = dict(value=ours / theirs, bar=1.0, met=ours >= theirs)
    kind = (env or {}).get("devices", [""])[0] if (env or {}).get("devices") else ""
    if best and best.get("mfu") is not None:
        bars["phi1_mfu"] = dict(value=best["mfu"], bar=0.5, met=best["mfu"] >= 0.5,
                                applies=bool(re.search(r"H100|H200", kind)))
    if generate and generate.get("generation"):
        b16 = [r for r in generate["generation"]["rows"] if r["batch"] == 16 and "ratio" in r]
        if b16:
            bars["generation_batch16_vs_transformers"] = dict(value=b16[0]["ratio"], bar=5.0, met=b16[0]["ratio"] >= 5.0)
    if dry:
        for b in bars.values():
            b["applies"] = False  # CPU figures at tiny shapes say nothing
    return report


def markdown(report: dict) -> str:
    dry, env, res = report["dry"], report["env"] or {}, report["results"]
    md = [f"# GPU checks{' (dry run on CPU: plumbing only, figures meaningless)' if dry else ''}", "", "## Environment", ""]
    if env:
        md += [f"- python {env.get('python')} ({env.get('executable')}), {env.get('cores')} cores",
               f"- packages: {', '.join(f'{k} {v}' for k, v in env.get('packages', {}).items())}",
               f"- JAX backend {env.get('jax_backend')}, devices: {', '.join(env.get('devices', []))}",
               f"- nvidia-smi: {env.get('nvidia_smi', 'not found')}",
               f"- Pallas Triton backend deprecated in this JAX: {env.get('pallas_triton_deprecated')}"]
    else:
        md += ["- (the env step wrote nothing: see log.txt)"]
    wheels = report["wheels"]
    md += [f"- wheels from .whl/ for what this Python lacked: {', '.join(wheels['missing_here']) or 'none'}"
           + ("" if wheels["installed"] else " (their installation FAILED: see log.txt)"), ""]
    md += ["## Steps", "", "| step | status | seconds | time box |", "|---|---|---|---|"]
    for step in report["steps"]:
        md.append(f"| {step} | {report['step_status'][step]} | {report['step_seconds'][step]} | {BOXES[step]} |")
    md += ["", f"Total {report['elapsed_s']} s of a {report['budget_s']} s budget. "
               f"Overall: {'ok' if report['ok'] else 'NOT ok'}.", ""]
    kernels = res["kernels"]
    if kernels:
        md += ["## Kernel tests", ""]
        if kernels.get("error"):
            md += [f"- {kernels['error']}", ""]
        else:
            md += [f"- {kernels['passed']} passed, {len(kernels['failed'])} failed, {len(kernels['skipped'])} skipped "
                   f"of {kernels['tests']}"] + [f"- FAILED {n}" for n in kernels["failed"]] + [""]
    kbench = res["kbench"]
    if kbench:
        md += [f"## Attention at batch {kbench['batch']}, {kbench['heads']} heads of {kbench['head_dim']}, causal "
               f"({kbench['device']}, jax {kbench['jax']})", "",
               "| dtype | seq | segment ids | impl | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd ms | fwd+bwd ms |",
               "|---|---|---|---|---|---|---|---|"]
        for r in kbench["rows"]:
            impl = r["impl"] + (" (stand-in)" if r.get("stand_in") else "")
            if "error" in r:
                md.append(f"| {r['dtype']} | {r['seq']} | {r['segments']} | {impl} | failed: {r['error'][:60]} | | | |")
            else:
                md.append(f"| {r['dtype']} | {r['seq']} | {r['segments']} | {impl} | {r['fwd_tflops']:.1f} | "
                          f"{r['fwd_bwd_tflops']:.1f} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |")
        md.append("")
    if res["tune"]:
        md += ["## Tuned block sizes", "", f"- fastest: {res['tune']['best']}", ""]
    train, best = res["train"]["runs"], res["train"]["best"]
    if train:
        md += ["## Training (phi1_jax.bench.train_speed, one device)", "",
               "| attention | microbatch | remat | status | tokens/s | MFU | loss |", "|---|---|---|---|---|---|---|"]
        for r in train:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
            tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else ""
            md.append(f"| {r['attention_impl']} | {r['microbatch']} | {r['remat']} | {r['status']} | {tps} | {mfu} | "
                      f"{r.get('loss', '')} |")
        md += ["", f"Best: {best['attention_impl']} microbatch {best['microbatch']} remat {best['remat']}" if best
               else "Best: none ran", ""]
    generate = res["generate"]
    if generate and generate.get("generation"):
        g = generate["generation"]
        md += [f"## Generation ({g['model']}, {g['dtype']}, prompt {g['prompt_len']}, {g['new_tokens']} new tokens, "
               f"greedy; peer {g['peer']} on {g['peer_device']})", "",
               "| batch | phi1_jax tokens/s | transformers tokens/s | ratio | identical rows |", "|---|---|---|---|---|"]
        for r in g["rows"]:
            theirs = (f"{r['transformers_tokens_per_s']:.1f} | {r['ratio']:.2f} | {r['identical_rows']}/{r['batch']}"
                      if "ratio" in r else "- | - | -")
            md.append(f"| {r['batch']} | {r['ours_tokens_per_s']:.1f} | {theirs} |")
        md.append("")
    if res["dryrun"]:
        md += ["## Dry run (memory per device)", ""] + [f"    {line}" for line in res["dryrun"]["memory_lines"]] + [""]
    md += ["## Bars", ""]
    for name, b in report["bars"].items():
        verdict = ("met" if b["met"] else "NOT met") if b.get("applies", True) else "n/a here"
        md.append(f"- {name}: {b['value']:.3g} against {b['bar']:g}: {verdict}")
    if not report["bars"]:
        md.append("- no figures to judge")
    return "\n".join(md + [""])


def _write_logs(work: Path, out: Path) -> None:
    parts = [(work / "main.log").read_text(errors="replace")]
    for log in sorted(work.glob("*.log")):
        if log.name != "main.log":
            tail = log.read_text(errors="replace").splitlines()[-200:]
            parts.append(f"\n### {log.name} (last 200 lines)\n" + "\n".join(tail))
    files.write_text(out / "log.txt", "\n".join(parts) + "\n")
    with files.replacing(out / "logs.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.iterdir()):
            if path.is_file() and path.suffix in (".log", ".json", ".xml", ".txt"):
                tar.add(path, arcname=path.name)


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.bench.gpu_checks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("steps", nargs="*", help=f"of {', '.join(ALL_STEPS)} (default: {' '.join(DEFAULT_STEPS)})")
    p.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECKS_DRY") == "1",
                   help="the same steps on CPU at tiny shapes (GPU_CHECKS_DRY=1)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_checks", help="report folder ($OUT)")
    p.add_argument("--budget", type=int, default=int(os.environ.get("GPU_CHECKS_BUDGET", 540)),
                   help="seconds for the whole run (GPU_CHECKS_BUDGET)")
    p.add_argument("--train-ladder", default=os.environ.get("GPU_CHECKS_TRAIN"),
                   help=f"attention:microbatch:remat entries (GPU_CHECKS_TRAIN; default {LADDER['gpu']!r}, "
                        f"dry {LADDER['dry']!r})")
    p.add_argument("--work", default=None, help="scratch folder for the logs and JSON files (default: a new one)")
    args = p.parse_args(argv)
    unknown = [s for s in args.steps if s not in ALL_STEPS]
    if unknown:
        raise cli.UsageError(f"unknown step '{unknown[0]}'; steps: {' '.join(ALL_STEPS)}")
    steps = list(args.steps or DEFAULT_STEPS)
    ladder = args.train_ladder or LADDER["dry" if args.dry else "gpu"]
    if not all(re.fullmatch(r"\w+:\d+:\w+", e) for e in ladder.split()):
        raise cli.UsageError(f"--train-ladder={ladder!r}: entries attention:microbatch:remat, e.g. pallas:8:none")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("report.json", "report.md", "log.txt", "logs.tar.gz"):
        (out / name).unlink(missing_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_checks."))
    work.mkdir(parents=True, exist_ok=True)
    if args.dry:
        os.environ["JAX_PLATFORMS"] = "cpu"
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[k] = "1"
    os.environ["PYTHONUNBUFFERED"] = "1"
    run = Run(work, args.budget, sys.executable)
    run.say(f"gpu_checks: steps {' '.join(steps)}; dry={int(args.dry)}; python {sys.executable}; budget "
            f"{args.budget}s; output {out}")
    extra = {"train_runs": []}
    try:
        extra = run_steps(run, steps, args.dry, ladder)
    finally:  # the report is written whatever happened to the steps
        report = build_report(work, run, steps, args.dry, extra)
        files.write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
        text = markdown(report)
        files.write_text(out / "report.md", text)
        print(text)
        run.main_log.close()
        _write_logs(work, out)
    print(f"report: {out}/report.md, {out}/report.json; logs: {out}/log.txt, {out}/logs.tar.gz; "
          f"{report['elapsed_s']} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
