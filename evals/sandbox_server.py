"""The per-worker fork server of the namespaces sandbox (evals/execution.py); standard library only.

It is started once per worker slot, as root, inside that slot's new mount, PID and network namespaces (it is PID 1
there), with the slot's directory at /mnt (root-owned, so programs cannot write there). For each program it:
  1. makes /mnt/pN owned by the slot's unprivileged uid;
  2. forks a child that starts a new session, drops to that uid (no groups), sets the rlimits (CPU, address space,
     file size, open files, processes), points stdin at /dev/null and stdout/stderr at files in /mnt/pN, closes every
     other descriptor (the channel to the harness included), and runs the program as `__main__` (then joins its
     threads and runs its atexit handlers, as interpreter exit would);
  3. waits for it (a pidfd) up to the wall-clock timeout, then kills its process group;
  4. forks a reaper that takes the slot's uid and kills every process of that uid (anything the program left behind,
     however detached), reaps all zombies, and removes /mnt/pN.
Forking this small interpreter costs about a millisecond, where a fresh `python` costs ~8 ms and the namespace set-up
as much again: that is the whole point.

Protocol on stdin/stdout: request = uint32 length + program source (UTF-8); reply = int32 exit code (negative: the
signal that killed it), uint8 timed out, float64 seconds, uint32 length + the tail of stderr.
Arguments: uid cpu_s memory_bytes file_size_bytes open_files processes timeout_s.
"""

import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback


def _child(src: bytes, workdir: str, uid: int, limits) -> None:
    cpu, mem, fsize, nofile, nproc = limits
    code = 1
    try:
        os.setsid()
        os.chdir(workdir)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        for which, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                             (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, nproc),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
        null = os.open("/dev/null", os.O_RDONLY)
        out = os.open("stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open("stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        sys.argv = ["program.py"]
        globs = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
        try:
            exec(compile(src.decode("utf-8"), "program.py", "exec"), globs)
            code = 0
            _finalize()  # what interpreter exit would do: join threads, run atexit handlers
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


def _finalize() -> None:
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit

    atexit._run_exitfuncs()


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
    except ProcessLookupError:
        pass
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


def _tail(path: str, n: int = 2000) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - n))
            return f.read()
    except OSError:
        return b""


def main() -> None:
    uid, cpu, mem, fsize, nofile, nproc = (int(a) for a in sys.argv[1:7])
    timeout = float(sys.argv[7])
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
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(src, workdir, uid, (cpu, mem, fsize, nofile, nproc))
        status, timed_out = _wait(pid, timeout)
        seconds = time.perf_counter() - start
        _reap_all(uid)
        err = _tail(workdir + "/stderr")
        shutil.rmtree(workdir, ignore_errors=True)
        code = os.waitstatus_to_exitcode(status)
        out.write(struct.pack("<iBdI", code, timed_out, seconds, len(err)) + err)
        out.flush()


if __name__ == "__main__":
    main()
