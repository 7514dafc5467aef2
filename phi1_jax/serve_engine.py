"""Continuous batching for `phi1_jax.serve`: many requests share one decode loop and one KV cache of `slots` rows.

    engine = Engine(model, tokenizer, slots=16)
    engine.start()                                   # a thread owns the device from here on
    engine.submit(Job(prompt=[...], max_tokens=64, temperature=0.0, top_p=1.0, seed=0, stop=("\\n\\n",), emit=print))

Each job (one choice of one prompt) holds one row ("slot") of the cache for its lifetime. Every slot keeps its own
write index and positions, so a job joins a running batch as soon as a slot is free: between two decode chunks the
engine prefills the waiting prompts together (left-padded to a multiple of 64, like `phi1_jax.generate`) and copies
their keys and values into free slots; the next chunk decodes old and new rows in one step. A chunk is up to
`chunk_tokens` steps of a `lax.while_loop` on the device (it exits early once every row is done); between chunks the
host hands out the new text, applies stop strings, frees finished slots and admits new jobs. The step runs on the
lowest power-of-two number of rows that covers the busy slots and on the lowest power-of-two window of cache slots
that covers their positions, so one short request does not pay for 16 rows of 2048 slots.

Sampling is per row: greedy when temperature == 0, else softmax(logits / temperature) within top_p; a row's random
key is fold_in(key(seed), choice), then fold_in(that, tokens so far), so the same seed gives the same text whatever
else shares the batch. Greedy decoding runs the same prefill and the same model step as `generate`.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi1_jax.generate import PROMPT_BUCKET, for_decoding, last_logits
from phi1_jax.model import KVCache, Phi
from phi1_jax.tokenizer import Tokenizer

MIN_WINDOW = 128  # smallest cache window a chunk attends over


@dataclasses.dataclass(eq=False)
class Job:
    """One row to generate. `emit` is called from the engine's thread with ("text", delta), then exactly once with
    ("end", finish_reason, completion_tokens) or ("error", message)."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    emit: Callable[[tuple], None]
    choice: int = 0
    cancelled: bool = False  # set by the server when the client goes away; the slot is freed at the next chunk
    # engine state
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of the text already emitted
    slot: int = -1


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# --- device functions --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, ids, segment_ids, positions):
    """The prompt's cache (exactly its length: k, v, segment ids) and logits at its last position [G, V], computed as
    generate's prefill computes them."""
    model = nnx.merge(graphdef, state)
    out = model(ids, segment_ids=segment_ids, positions=positions, cache=KVCache.init(model.cfg, *ids.shape))
    return out.cache.k, out.cache.v, out.cache.segment_ids, last_logits(model, out)


@functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3))
def _insert(k, v, seg, logits, new_k, new_v, new_seg, new_logits, slots):
    """Copies prefilled rows into `slots` ([G]; an out-of-range slot drops that row, the batch's padding)."""
    p = new_seg.shape[1]
    put = lambda full, new: full.at[slots, :, :p].set(new, mode="drop")  # noqa: E731  [B, N, S, H] <- [G, N, P, H]
    return (tuple(map(put, k, new_k)), tuple(map(put, v, new_v)), seg.at[slots, :p].set(new_seg, mode="drop"),
            logits.at[slots].set(new_logits, mode="drop"))


def _nucleus(logits, top_p):
    """logits [R, V] restricted per row to the smallest set whose probability reaches top_p [R]."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the better tokens
    sorted_logits = jnp.where(before < top_p[:, None], sorted_logits, -jnp.inf)  # always keeps the best token
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, order].set(sorted_logits)


def _sample(logits, keys, count, temperature, top_p, vocab):
    """Next token per row [R] from logits [R, V]; keys [R, 2] raw threefry key data. Ids from `vocab` up (the model's
    padding beyond the tokenizer, e.g. phi-1's 51200 rows for 50295 ids) are never sampled."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    scaled = jax.lax.cond(jnp.any(top_p < 1.0), _nucleus, lambda x, _: x, scaled, top_p)
    step_keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), count)
    sampled = jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)
    return jnp.where(temperature == 0.0, greedy, sampled)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5, 6, 7, 8))
def _decode_chunk(graphdef, rows, window, steps, state, k, v, seg, logits, index, pos, count, done, limit,
                  temperature, top_p, keys, eos, vocab):
    """Up to `steps` decode steps for rows [:rows] over cache slots [:window]; each row has its own write index.

    k, v: L x [B, N, S, H]; seg [B, S]; logits [B, V]; index, pos, count, limit [rows] int32; done [rows] bool.
    Returns the updated cache and logits, new tokens [rows, steps], index, pos, count, done."""
    model = nnx.merge(graphdef, state)
    kw = tuple(x[:rows, :, :window] for x in k)
    vw = tuple(x[:rows, :, :window] for x in v)
    sw, lw = seg[:rows, :window], logits[:rows]

    def row_step(kr, vr, sr, i, tok, p):  # one row: L x [N, W, H], [W], scalars; the model sees a batch of one
        cache = KVCache(k=tuple(x[None] for x in kr), v=tuple(x[None] for x in vr), segment_ids=sr[None], index=i)
        out = model(tok[None, None], segment_ids=jnp.ones((1, 1), jnp.int32), positions=p[None, None], cache=cache)
        cache = out.cache
        return out.logits[0, -1], tuple(x[0] for x in cache.k), tuple(x[0] for x in cache.v), cache.segment_ids[0]

    def cond(carry):
        step, done = carry[0], carry[9]
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, kw, vw, sw, lw, out, index, pos, count, done = carry
        tok = jnp.where(done, 0, _sample(lw, keys, count, temperature, top_p, vocab))
        out = out.at[:, step].set(tok)
        live = ~done
        count = count + live
        now_done = done | (tok == eos) | (count >= limit)
        lw, kw, vw, sw = jax.vmap(row_step)(kw, vw, sw, jnp.minimum(index, window - 1), tok, pos)
        return step + 1, kw, vw, sw, lw, out, index + live, pos + live, count, now_done

    out = jnp.zeros((rows, steps), jnp.int32)
    _, kw, vw, sw, lw, out, index, pos, count, done = jax.lax.while_loop(
        cond, body, (jnp.int32(0), kw, vw, sw, lw, out, index, pos, count, done))
    back = lambda full, win: jax.lax.dynamic_update_slice(full, win, (0,) * full.ndim)  # noqa: E731
    return (tuple(map(back, k, kw)), tuple(map(back, v, vw)), back(seg, sw), back(logits, lw),
            out, index, pos, count, done)


# --- the engine --------------------------------------------------------------------------------------------------------


class Engine:
    """Owns the model on the device and a thread that runs admitted jobs in one batch (see the module docstring)."""

    def __init__(self, model: Phi, tokenizer: Tokenizer, *, slots: int = 16, max_len: int | None = None,
                 chunk_tokens: int = 8, wave_ms: float = 5.0):
        cfg = model.cfg
        self.tokenizer, self.cfg = tokenizer, cfg
        self.slots = _pow2(slots)
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)  # cache slots per row: prompt + completion
        self.chunk_tokens, self.wave_s = chunk_tokens, wave_ms / 1000
        self.graphdef, self.state = nnx.split(for_decoding(model))
        shape = (self.slots, cfg.num_heads, self.max_len, cfg.head_dim)
        self.k = tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers))
        self.v = tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers))
        self.seg = jnp.zeros((self.slots, self.max_len), jnp.int32)
        self.logits = jnp.zeros((self.slots, cfg.vocab_size), jnp.float32)
        b = self.slots
        self.index, self.pos, self.count, self.limit = (np.zeros(b, np.int32) for _ in range(4))
        self.temperature, self.top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
        self.keys = np.zeros((b, 2), np.uint32)
        self.eos = jnp.int32(tokenizer.eos_id)
        self.vocab = jnp.int32(min(tokenizer.vocab_size, cfg.vocab_size))
        self.active: dict[int, Job] = {}  # slot -> job
        self.waiting: list[Job] = []
        self.inbox: queue.Queue = queue.Queue()
        self.stats = {"chunks": 0, "steps": 0, "row_steps": 0, "prefills": 0, "jobs": 0}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- public ---------------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if len(job.prompt) + job.max_tokens > self.max_len:  # the server checks first; this is the engine's own guard
            raise ValueError(f"{len(job.prompt)} prompt + {job.max_tokens} new tokens exceed {self.max_len} slots")
        self.inbox.put(job)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="phi1-serve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        if self._thread is not None:
            self._thread.join()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def busy(self) -> int:
        return len(self.active) + len(self.waiting) + self.inbox.qsize()

    # --- the loop ----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._take_inbox(block=not self.active and not self.waiting)
                self._admit()
                if self.active:
                    self._chunk()
            except Exception as e:  # a bug or a device error: fail the jobs in flight, keep serving
                traceback.print_exc(file=sys.stderr)
                for job in [*self.active.values(), *self.waiting]:
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                self.active.clear()
                self.waiting.clear()

    def _take_inbox(self, block: bool) -> None:
        """Moves submitted jobs to `waiting`. When idle, waits for one, then `wave_s` more for others that come with it
        (concurrent clients' requests land within a few ms; they then share one prefill)."""
        try:
            if block:
                first = self.inbox.get()
                if first is None:
                    return
                self.waiting.append(first)
                deadline = time.monotonic() + self.wave_s
                while (left := deadline - time.monotonic()) > 0:
                    job = self.inbox.get(timeout=left)
                    if job is None:
                        return
                    self.waiting.append(job)
            while True:
                job = self.inbox.get_nowait()
                if job is not None:
                    self.waiting.append(job)
        except queue.Empty:
            pass

    def _admit(self) -> None:
        """Prefills waiting jobs into free slots, as many groups as fit (a group shares one padded prompt length)."""
        self.waiting = [j for j in self.waiting if not self._dropped(j)]
        while self.waiting and len(self.active) < self.slots:
            free = [s for s in range(self.slots) if s not in self.active]
            group, longest, room = [], 0, self.max_len
            for job in list(self.waiting):
                if len(group) == len(free):
                    break
                if max(longest, len(job.prompt)) <= min(room, self.max_len - job.max_tokens):
                    group.append(job)
                    self.waiting.remove(job)
                    longest, room = max(longest, len(job.prompt)), min(room, self.max_len - job.max_tokens)
            plen = min(-(-longest // PROMPT_BUCKET) * PROMPT_BUCKET, room)
            g = _pow2(len(group))
            ids, seg, pos = (np.zeros((g, plen), np.int32) for _ in range(3))
            slots = np.full(g, self.slots, np.int32)  # padding rows go nowhere
            for r, (job, slot) in enumerate(zip(group, free)):
                n = len(job.prompt)
                ids[r, plen - n:], seg[r, plen - n:], pos[r, plen - n:] = job.prompt, 1, np.arange(n)
                job.slot, slots[r] = slot, slot
                self.active[slot] = job
                self.index[slot], self.pos[slot], self.count[slot], self.limit[slot] = plen, n, 0, job.max_tokens
                self.temperature[slot], self.top_p[slot] = job.temperature, job.top_p
                self.keys[slot] = _row_key(job.seed, job.choice)
            ids[len(group):, -1] = seg[len(group):, -1] = 1  # padding rows: one token, so no row is all padding
            out = _prefill(self.graphdef, self.state, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos))
            self.k, self.v, self.seg, self.logits = _insert(self.k, self.v, self.seg, self.logits, *out,
                                                            jnp.asarray(slots))
            self.stats["prefills"] += 1
            self.stats["jobs"] += len(group)

    def _dropped(self, job: Job) -> bool:
        if job.cancelled:
            job.emit(("end", "cancelled", 0))
        return job.cancelled

    def _chunk(self) -> None:
        rows = _pow2(max(self.active) + 1)
        steps = self.chunk_tokens
        need = max(int(self.index[s]) for s in self.active) + steps
        window = min(self.max_len, max(MIN_WINDOW, _pow2(need)))
        done = np.array([s not in self.active for s in range(rows)])
        r = slice(0, rows)
        self.k, self.v, self.seg, self.logits, out, index, pos, count, done = _decode_chunk(
            self.graphdef, rows, window, steps, self.state, self.k, self.v, self.seg, self.logits,
            jnp.asarray(self.index[r]), jnp.asarray(self.pos[r]), jnp.asarray(self.count[r]), jnp.asarray(done),
            jnp.asarray(self.limit[r]), jnp.asarray(self.temperature[r]), jnp.asarray(self.top_p[r]),
            jnp.asarray(self.keys[r]), self.eos, self.vocab)
        out, count = np.asarray(out), np.asarray(count)
        before = self.count[r].copy()
        self.index[r], self.pos[r], self.count[r] = np.asarray(index), np.asarray(pos), count
        self.stats["chunks"] += 1
        self.stats["steps"] += int((count - before).max(initial=0))
        self.stats["row_steps"] += int((count - before).sum())
        for slot, job in list(self.active.items()):
            new = out[slot, : count[slot] - before[slot]].tolist()
            finish = None
            if self.tokenizer.eos_id in new:
                new, finish = new[: new.index(self.tokenizer.eos_id)], "stop"
            job.tokens += new
            if finish is None and len(job.tokens) >= job.max_tokens:
                finish = "length"
            if job.cancelled:
                finish = "cancelled"
            self._hand_out(job, finish)

    def _hand_out(self, job: Job, finish: str | None) -> None:
        """Emits the row's new text; ends the job at EOS, max_tokens or the first stop string."""
        text = self.tokenizer.decode(job.tokens)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
            while len(job.tokens) > 1 and any(s in self.tokenizer.decode(job.tokens[:-1]) for s in job.stop):
                job.tokens.pop()  # usage counts the tokens up to the one that completed the stop string
        if finish is None:
            hold = max((k for s in job.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = len(text) - hold
            while safe > job.sent and text[safe - 1] == "\ufffd":  # a character whose bytes are still coming
                safe -= 1
        else:
            safe = len(text)
        if safe > job.sent:
            job.emit(("text", text[job.sent:safe]))
            job.sent = safe
        if finish is not None:
            del self.active[job.slot]
            job.emit(("end", finish, len(job.tokens)))


def _row_key(seed: int, choice: int) -> np.ndarray:
    return np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), choice)), np.uint32)
