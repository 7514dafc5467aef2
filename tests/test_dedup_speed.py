"""The dedup benchmark (phi1_jax.bench.dedup_speed): its ratios against the issue's bars, and one real run of ours on a
running one-node Ray it starts and stops itself (the `--ray=cluster` way)."""

import json
import subprocess
import sys

from phi1_jax.bench import dedup_speed


def _row(tool, ray, workers, docs_per_s):
    return {"tool": tool, "ray": ray, "workers": workers, "docs_per_s": docs_per_s, "seconds": 1.0, "peak_mb": 1,
            "recall": 1.0, "others_removed": 0, "load_before": 0.1, "load_after": 0.1}


def test_ratios_are_per_way_of_running_ours_and_against_datatrove():
    rows = [_row("phi1_jax dedup (Ray Data)", "local", 1, 100.0), _row("phi1_jax dedup (Ray Data)", "cluster", 1, 200.0),
            _row("datatrove MinHash", None, 1, 150.0), _row("phi1_jax dedup (Ray Data)", "local", 2, 150.0),
            _row("phi1_jax dedup (Ray Data)", "cluster", 2, 340.0), _row("datatrove MinHash", None, 2, 200.0),
            _row("phi1_jax dedup (Ray Data)", "warm", 1, 300.0), _row("phi1_jax dedup (Ray Data)", "warm", 2, 450.0)]
    for r, pipe in zip([rows[1], rows[4]], [250.0, 450.0]):  # the command's own seconds, its start left out
        r["pipeline_docs_per_s"] = pipe
    ra = dedup_speed._ratios(rows)
    assert ra == {"ours_local_2_over_1": 1.5, "ours_local_over_datatrove_at_1": 0.67,
                  "ours_local_over_datatrove_at_2": 0.75, "ours_cluster_2_over_1": 1.7,
                  "ours_cluster_pipeline_2_over_1": 1.8,
                  "ours_cluster_over_datatrove_at_1": 1.33, "ours_cluster_over_datatrove_at_2": 1.7,
                  "datatrove_2_over_1": 1.33, "ours_warm_2_over_1": 1.5}  # warm vs datatrove: not like for like
    text = dedup_speed.summary({"docs": 10, "planted": 1, "cores": 2, "started": "now", "rows": rows, "ratios": ra}, [])
    assert "ours_warm, 2 workers over 1: 1.50x  (the pipeline's throughput; bar >= 1.6: not met)" in text
    assert "ours_cluster, 2 workers over 1: 1.70x  (a whole command: its imports, Ray's start and the job's start" in text
    assert "bar >= 1.6" not in text.replace("ours_warm, 2 workers over 1: 1.50x  (the pipeline's throughput; bar", "")
    assert "ours_local over datatrove at 1 worker(s): 0.67x  (bar >= 1: not met)" in text
    assert "ours_cluster, 2 workers over 1, the pipeline's own docs/s" in text and ": 1.80x" in text


def _one_run(tmp_path, way: str) -> dict:
    """The bench on 200 records at 1 worker, ours only, one way of getting Ray: its one row, checked for recall."""
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, "-m", "phi1_jax.bench.dedup_speed", "--docs=200", "--copies=20", "--workers=1",
                        "--tools=ours", f"--ray={way}", f"--json={out}"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["ray"], row["workers"], row["recall"], row["others_removed"]) == (way, 1, 1.0, 0)
    return row


def test_a_run_on_a_running_cluster_finds_the_planted_copies_and_stops_the_cluster(tmp_path):
    row = _one_run(tmp_path, "cluster")
    assert row["peak_mb"] > 200  # the cluster's own processes are counted, not the command's alone
    assert row["cluster_processes_left"] == []
    assert row["pipeline_docs_per_s"] > row["docs_per_s"]  # the command's start left out


def test_the_warm_way_times_a_second_run_in_one_job_and_stops_the_cluster(tmp_path):
    row = _one_run(tmp_path, "warm")
    assert 0 < row["seconds"] and row["cluster_processes_left"] == []


def test_a_bad_ray_choice_is_a_usage_error():
    r = subprocess.run([sys.executable, "-m", "phi1_jax.bench.dedup_speed", "--ray=remote"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--ray=remote: 'remote' is not local, cluster or warm" in r.stderr
