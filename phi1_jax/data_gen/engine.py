"""Ray for the data tools: where their corpus-wide steps run, from one machine to a cluster.

Every corpus-wide step of `phi1_jax.data_gen` (dedup, decontaminate) is a Ray Data pipeline. By default the command
starts an embedded local Ray itself (`ray.init(address="local")`: a new one on this machine's cores, never one that
happens to be running; no dashboard, no usage statistics, its logs in a temporary folder removed afterwards);
`--ray-address=auto` joins the cluster started on this machine with `ray start`, `--ray-address=HOST:PORT` or
`ray://HOST:PORT` a remote one. Workers import phi1_jax, so each node needs the project installed (`pip install -e .`).

Inputs are cut into chunks of whole lines (`line_chunks`) so that a worker reads its own part of a file: the driver
holds offsets, not records, and a chunk a killed worker was reading is simply read again by the retry.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from phi1_jax.errors import UserError

CHUNK_BYTES = 1 << 20  # ~1 MB of JSONL per task: big enough to amortise a task, small enough to retry cheaply


class EngineError(UserError, RuntimeError):
    """Ray could not be started or reached; the message names the address."""


def add_flags(p: argparse.ArgumentParser, chunk_bytes: int = CHUNK_BYTES) -> None:
    p.add_argument("--ray-address", default=None,
                   help="join a running Ray cluster (auto, HOST:PORT or ray://HOST:PORT); default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="cores of the local Ray this command starts (default: all of this machine's)")
    p.add_argument("--chunk-kb", type=int, default=chunk_bytes >> 10,
                   help="input per task, in KB of JSONL (a killed worker's retry redoes one chunk)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@contextlib.contextmanager
def session(address: str | None = None, num_cpus: int | None = None, progress: bool = True) -> Iterator[None]:
    """Ray for the length of a command: a new local Ray (address None) or a connection to `address`. Inside a session
    that is already connected (a test, a notebook), it uses that one and leaves it running."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no prompt, no reporting
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # a bad record's RecordsError reaches the driver as itself, not wrapped
    tune_for_short_tasks(ctx)
    if ray.is_initialized():
        yield
        return
    logs = None
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    # A raylet waits for its node's dashboard agent (a Python process) before registering, 15 s by default, and
    # ray.init gives the raylet 30 s (fixed): a busy machine misses both, so the first is longer and a local start
    # that timed out is tried again.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    try:
        if address is None:
            logs = tempfile.mkdtemp(prefix="phi1ray_")  # short: Ray's socket paths must fit in 107 bytes
            for attempt in range(3):
                try:
                    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                             _temp_dir=logs, **quiet)
                    break
                except Exception as e:  # Ray raises a bare Exception for a node that timed out during startup
                    ray.shutdown()
                    if "timed out during startup" not in str(e) or attempt == 2:
                        raise RuntimeError(str(e)) from None
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
        if logs:
            shutil.rmtree(logs, ignore_errors=True)
        where = f"--ray-address={address}" if address else "a local Ray"
        raise EngineError(f"{where}: cannot start or reach Ray ({type(e).__name__}: {e})") from None
    try:
        yield
    finally:
        ray.shutdown()
        if logs:
            shutil.rmtree(logs, ignore_errors=True)


def tune_for_short_tasks(ctx) -> None:
    """Ray Data settings for pipelines of many short CPU tasks (what every data_gen step is), from task timelines of
    the dedup pipeline at 2 CPUs (`ray.timeline()`, docs/data.md "Ray's own costs"):

    - Ray Data's default shuffle (SHUFFLE_V2 since Ray 2.5x) runs its map and reduce tasks in worker pools of their
      own (runtime-env markers that keep their memory apart), so each shuffle waited for fresh Python worker processes
      to start: 8-9 s per pool on this machine, twice per groupby, longer than the work. The pull-based sort shuffle
      runs on the workers the map stage already has: a groupby takes 17.6 s instead of 27-41 s.
    - Operator resource reservation keeps part of the CPUs for operators that are still waiting on an all-to-all
      barrier, so a map stage ahead of a shuffle ran one task at a time on 2 CPUs; without it every CPU maps.
    """
    from ray.data.context import ShuffleStrategy

    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.op_resource_reservation_enabled = False


def user_error_in(e: BaseException) -> UserError | None:
    """The UserError a Ray task raised (Ray wraps it in RayTaskError / UserCodeException), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: the task's own exception (Ray's copy is both, with a trace)
        if isinstance(e, UserError) and not isinstance(cause, UserError):
            return e
        e = cause or e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raises a UserError from inside a Ray task as itself, so the command reports it as one `error:` line."""
    try:
        yield
    except Exception as e:
        if (inner := user_error_in(e)) is not None and inner is not e:
            raise inner from None
        raise


def line_chunks(paths: list[Path], chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Each input cut into runs of whole lines of about `chunk_bytes`: {input, path, start, end, first_line,
    first_record, first_doc}. Records are the non-blank lines; `first_doc` numbers them across all inputs in order
    (the order "keep the first" goes by), `first_record` within their input (the index a record without an id gets).
    One streaming pass over the bytes; nothing is parsed here (workers do, with errors naming the line)."""
    chunks, doc = [], 0
    for k, path in enumerate(paths):
        start = pos = 0
        line = first_line = 0
        record = first_record = 0
        with open(path, "rb") as f:
            for raw in f:
                pos += len(raw)
                line += 1
                if raw.strip():
                    record += 1
                if pos - start >= chunk_bytes:
                    chunks.append({"input": k, "path": str(path), "start": start, "end": pos, "first_line": first_line,
                                   "first_record": first_record, "first_doc": doc + first_record})
                    start, first_line, first_record = pos, line, record
        if pos > start:
            chunks.append({"input": k, "path": str(path), "start": start, "end": pos, "first_line": first_line,
                           "first_record": first_record, "first_doc": doc + first_record})
        doc += record
    return chunks


def read_chunk(chunk: dict, text_field: str, error: type[Exception]) -> Iterator[tuple[int, int, dict]]:
    """(doc number, record index in its input, record) for each record of a chunk; a bad line raises `error` naming
    the file and line, as `phi1_jax.jsonl.read_jsonl` does (the same line parser)."""
    from phi1_jax import jsonl

    path = chunk["path"]
    with open(path, "rb") as f:
        f.seek(chunk["start"])
        data = f.read(chunk["end"] - chunk["start"])
    lines = data.split(b"\n")  # as a file iterates: on \n only
    if lines and not lines[-1]:
        lines.pop()
    record = chunk["first_record"]
    for lineno, raw in enumerate(lines, chunk["first_line"] + 1):
        where = f"{path}:{lineno}"
        rec = jsonl.parse_line(raw, where, error)
        if rec is jsonl.BLANK:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise error(f"{where}: record has no string field {text_field!r}")
        yield chunk["first_doc"] + record - chunk["first_record"], record, rec
        record += 1


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    """--ray-address and --num-cpus alone, for commands that read in blocks of documents rather than chunks of bytes
    and have a --no-progress of their own (shards, filter apply)."""
    p.add_argument("--ray-address", default=None,
                   help="join a running Ray cluster (auto, HOST:PORT or ray://HOST:PORT); default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="cores of the local Ray this command starts (default: all of this machine's)")
