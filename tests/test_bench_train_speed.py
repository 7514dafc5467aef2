"""python -m phi1_jax.bench.train_speed prints its figures alone: no library INFO line (JAX's backend probing) leaks."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_train_speed_prints_its_figures_and_no_absl_info_line(tmp_path):
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, "-m", "phi1_jax.bench.train_speed", "--config=configs/tiny.py", "--peer=none",
                        "--steps=1", "--warmup=1", f"--json={out}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    leaked = [line for line in (r.stdout + r.stderr).splitlines() if re.match(r"[IWEF]\d{4} ", line)]
    assert not leaked, leaked  # absl's format: I1205 00:01:07.593588 ... xla_bridge.py:861] ...
    assert "phi1_jax:" in r.stdout and json.loads(out.read_text())["phi1_jax"]["tokens_per_s"] > 0
