"""Ray clusters of one or more nodes on this machine, each node a `ray start --block` in a process group of its own,
stopped by those ids (never a broad `ray stop`, which would also end Ray processes someone else started): what the
two-node test cluster (tests/ray_cluster.py) and the dedup benchmark's running clusters (phi1_jax.bench.dedup_speed)
are made of. A user's own cluster is started with `ray start` as Ray's docs say; this is for tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalCluster:
    """A head with `head_cpus` CPUs and one more node per entry of `nodes` ({"cpus": N, "resources": {...}});
    `address` is what `--ray-address` takes."""

    def __init__(self, head_cpus: int = 1, nodes: list[dict] | None = None):
        self.head_cpus, self.nodes = head_cpus, list(nodes or [])
        self.tmp = tempfile.mkdtemp(prefix="p1rt")  # short: Ray's socket paths must fit in 107 bytes
        self.procs: list[subprocess.Popen] = []
        # No token authentication (tests/conftest.py sets RAY_AUTH_MODE=disabled for the test process and what it
        # starts, drivers included: Ray reads it once per process, at import; a benchmark sets it for its commands).
        # A raylet waits for its node's dashboard agent (a Python process) before registering, 15 s by default: not
        # enough for a loaded 2-core machine.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                    "RAY_agent_register_timeout_ms": "120000"}
        self.port = _free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, args: list[str]) -> subprocess.Popen:
        agent, grpc, runtime_env, metrics, om, nm = _free_ports(6)
        cmd = [RAY, "start", "--block", "--disable-usage-stats", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--metrics-export-port={metrics}", f"--object-manager-port={om}", f"--node-manager-port={nm}",
               *args]
        log = open(Path(self.tmp) / f"start{len(self.procs)}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def connect(self, timeout: float = 600) -> None:
        """Starts the head, connects this process to it (ray.init), then starts the other nodes. `ray start` gives
        a raylet 30 s to register (fixed in Ray), which a loaded 2-core machine can miss; the raylet it leaves
        usually registers a little later, so a node counts as started when it shows up within 2 minutes, whatever
        `ray start` said; one that does not is ended and started again, three times at most."""
        import ray

        end = time.time() + timeout
        for _ in range(3):
            head = self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                                f"--temp-dir={self.tmp}", f"--num-cpus={self.head_cpus}"])
            give_up = min(end, time.time() + 120)
            # ray.init is only tried once the head's GCS takes connections: against a head that died during its start
            # (a raylet that missed its 30 s on a loaded machine) it can block for good
            while time.time() < give_up and head.poll() is None:
                if not _listening(self.port):
                    time.sleep(1)
                    continue
                try:
                    ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
                    break
                except (ConnectionError, RuntimeError):
                    time.sleep(2)
            if ray.is_initialized():
                break
            self._end([head])
        else:
            raise RuntimeError(f"the head did not start: {self.logs()}")
        for k, spec in enumerate(self.nodes, 2):
            for _ in range(3):
                node = self._start([f"--address={self.address}", f"--num-cpus={spec.get('cpus', 1)}",
                                    *([f"--resources={json.dumps(spec['resources'])}"] if spec.get("resources") else [])])
                give_up = min(end, time.time() + 120)
                while sum(n["Alive"] for n in ray.nodes()) < k and time.time() < give_up:
                    time.sleep(1)
                if sum(n["Alive"] for n in ray.nodes()) == k:
                    break
                self._end([node])
            else:
                raise RuntimeError(f"node {k} did not join: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(Path(self.tmp).glob("start*.log")))

    def descendants(self) -> set[int]:
        """Every process below the `ray start` processes (Ray puts each worker in a process group of its own, so
        the groups alone do not find them)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" (", 1)
                ppid = int(rest.rsplit(") ", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(pid))
        out, todo = set(), [p.pid for p in self.procs]
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in out:
                    out.add(c)
                    todo.append(c)
        return out

    def worker_pids(self) -> list[tuple[int, str]]:
        """(pid, title) of this cluster's Ray workers: processes below its nodes titled `ray::...`."""
        out = []
        for pid in sorted(self.descendants()):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::"):
                out.append((pid, title))
        return out

    def kill_worker_running(self, task: str, proc: subprocess.Popen, timeout: float = 300,
                            poll: float = 0.02) -> str | None:
        """SIGKILLs the first of this cluster's workers whose title names TASK (e.g. "MapBatches(_shard_task)": a
        worker mid-task), watching while PROC (the command under test) runs, for at most TIMEOUT s; its title, or
        None when no such worker was caught."""
        end = time.time() + timeout
        while proc.poll() is None and time.time() < end:
            for pid, title in self.worker_pids():
                if task in title:
                    os.kill(pid, signal.SIGKILL)
                    return title
            time.sleep(poll)
        return None

    def stop(self) -> list[str]:
        """Ends every process of every node (by process group, then any worker left by its pid) and says which, if
        any, survived."""
        below = self.descendants()
        self._end(self.procs)
        for pid in below:  # workers have process groups of their own; a raylet's end normally ends them too
            try:
                if b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes():  # still ours, not a reused pid
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        time.sleep(0.5)
        left = self._alive() + [str(pid) for pid in below if Path(f"/proc/{pid}").exists()
                                and not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")]
        shutil.rmtree(self.tmp, ignore_errors=True)
        return left

    def _end(self, procs) -> None:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            for p in procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            end = time.time() + grace
            while time.time() < end and self._alive(procs, by_dir=False):
                time.sleep(0.5)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def _alive(self, procs=None, by_dir: bool = True) -> list[str]:
        left = []
        for p in self.procs if procs is None else procs:
            left += subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
        if by_dir:
            left += subprocess.run(["pgrep", "-f", self.tmp], capture_output=True, text=True).stdout.split()
        return sorted(set(left))
