"""Continuous batching for `python -m phi1_jax.serve`: many requests share one decode loop and one KV cache.

    engine = Engine(model, tokenizer, slots=16)
    engine.start()                       # a thread owns the device: it compiles every shape, then serves
    engine.ready.wait()
    engine.submit(Job(prompt=[...], max_tokens=64, temperature=0.0, top_p=1.0, seed=0, stop=("\\n\\n",), emit=print))

Each job (one choice of one prompt) holds one row ("slot") of the cache for its lifetime. All rows write at one shared
cache index `t`, so a decode step is the model's own batched step, exactly `phi1_jax.decoding.generate`'s (no per-row
scatter). A new job joins a running batch between two decode chunks: its prompt is prefilled (with others of the same
length bucket, left-padded) and its keys and values are written into its row so that they end at `t` (when the prompt
is longer than `t`, `t` jumps to its length: the older rows get a gap of empty slots, which attention never reads, as
slot order does not matter to it, only segment ids and the rotary positions baked into each key). Before a chunk, when
the rows' own lengths would fit a smaller window than `t` does (or `t` reached the end of the cache), `compact` moves
every row's filled slots to end at the longest row's length, and `t` comes down to it.

Shapes. Everything the engine runs on the device is one of a fixed, documented set, compiled ahead of time by `warm_up`
before the server answers (`shapes()` lists it; the executables are kept in `self.compiled`, and the engine calls
nothing else, so traffic can never trigger a compile):
  admit  (group G, prompt bucket P): G in 1, 4 (MAX_GROUP), P in 64 x powers of two up to --max-len;
  decode (rows R, window W): R in 1, 4, 16, ... up to --slots, W in 128 x powers of two up to --max-len;
  compact (window W);
  extend (group G, prompt bucket P), with prefix reuse: prompts' tails prefilled on busy rows' copied prefixes
         (`_extend`), G and P as for admit but P below --max-len (PREFIX_MIN reused tokens come before the tail).
(--slots=16 --max-len=2048: 12 + 15 + 5 + 10 = 42 programs; --max-len=512: 8 + 9 + 3 + 6 = 26; --max-len=128:
4 + 3 + 1 + 2 = 10.)
A group larger than a compiled G is admitted in several; a prompt goes to the smallest P that holds it; a chunk runs
on the smallest R that covers the busy slots and the smallest W that covers `t` plus the chunk.

Sampling is `phi1_jax.decoding.sample` per row: greedy when temperature == 0, else softmax(logits / temperature)
within top_p; ids past the tokenizer are never chosen. A row's key is fold_in(key(seed), choice), then fold_in(that,
tokens so far), so the same seed gives the same text whatever else shares the batch. Log-probabilities, when a job asks
for them, are the model's own log-softmax (fp32, over all of its vocabulary rows) of the logits each token was chosen
from, with the top TOP_LOGPROBS alternatives; the prompt's come from the same prefill that fills the cache.
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

from phi1_jax.decoding import DecodeProjection, for_decoding, last_logits, sample
from phi1_jax.model import KVCache, Phi, Projection
from phi1_jax.tokenizer import Tokenizer

MIN_WINDOW = 128  # smallest cache window a chunk attends over
MIN_PROMPT = 64  # smallest prefill length bucket (generate pads to multiples of 64 too)
TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's chat limit)
# Prompts prefilled in one admit program at most. Measured on the 2-core CPU (tiny model, 256-token bucket): one
# 16-prompt admit took 0.10-0.18 s where two 4-prompt admits took 0.014 s each, so larger groups are admitted in 4s.
MAX_GROUP = 4
# Prefix reuse: a prompt sharing at least this many leading tokens with a busy row's copies that row's keys and
# values for the shared part and prefills only the rest (one ("extend", G, S) program per group size G and prompt
# bucket S: up to MAX_GROUP such prompts whose rests fit the same bucket go in one call).
PREFIX_MIN = 32
WAVE_CAP = 8  # an idle engine's wave of arrivals stays open at most this many --batch-wait-ms


@dataclasses.dataclass(eq=False)
class Job:
    """One row to generate. `emit` is called from the engine's thread with ("text", delta), then exactly once with
    ("end", finish_reason, completion_tokens) or ("error", message).

    logprobs: None, or how many alternatives (0..TOP_LOGPROBS) to keep beside each generated token's log-probability;
    prompt_logprobs: also score the prompt's own tokens (echo). The results are on the job when "end" is emitted."""

    prompt: list[int]
    max_tokens: int  # 0: score the prompt only (prompt_logprobs)
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    emit: Callable[[tuple], None]
    choice: int = 0
    logprobs: int | None = None
    prompt_logprobs: bool = False
    cancelled: bool = False  # set by the server when the client goes away; the slot is freed at the next chunk
    stream: bool = True  # False: the text is wanted only at the end (one "text" event then, none per chunk)
    # engine state and results
    tokens: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[tuple[list[int], list[float]]] = dataclasses.field(default_factory=list)  # per token: ids, logprobs
    prompt_scores: list[tuple[float, list[int], list[float]]] = dataclasses.field(default_factory=list)  # tokens 1..
    sent: int = 0  # characters of the text already emitted
    slot: int = -1


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def buckets(lo: int, hi: int, factor: int = 2) -> list[int]:
    """lo, lo x factor, lo x factor^2, ... below hi, then hi: the sizes compiled for a dimension ranging up to hi."""
    out, b = [], min(lo, hi)
    while b < hi:
        out.append(b)
        b *= factor
    return [*out, hi]


def _fit(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


def compute_dtype_weights(model: Phi) -> Phi:
    """A copy of `model` (`model` untouched) whose projections keep their kernels and biases in the compute dtype.

    A projection casts its fp32 kernel to the compute dtype at every use; inside a decode chunk XLA hoists those casts
    out of the step loop, so every chunk began by converting every kernel (1.4 GB of fp32 read at phi-1-small, about
    as long as 3-4 decode steps on the 2-core CPU, once per 8-token chunk). Cast once here instead: the same values,
    so the same logits, and half the weights' memory. Layer norms and the embedding keep their dtypes."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    for _, module in list(nnx.iter_modules(copy)):
        if isinstance(module, (Projection, DecodeProjection)):
            for name in ("kernel", "kernel_t", "bias"):
                var = getattr(module, name, None)
                if isinstance(var, nnx.Variable) and var[...].dtype != module.dtype:
                    setattr(module, name, type(var)(var[...].astype(module.dtype)))
    return copy


# --- device functions (compiled per shape by Engine.warm_up) ----------------------------------------------------------


def _scores(model: Phi, hidden, ids, vocab):
    """Per position i of a prompt batch: log p(ids[:, i + 1]) and the TOP_LOGPROBS best (log-prob, id), from the
    model's fp32 log-softmax. hidden [G, P, D] -> [G, P], [G, P, K], [G, P, K] (the last position's are unused)."""
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)  # [G, P]

    def one(args):  # one position of every row: h [G, D], target [G]
        h, target = args
        lp, top_lp, top_id = _token_scores(model.lm_head(h[:, None])[:, 0], vocab)
        return jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0], top_lp, top_id

    # One position (of every row) at a time, 64 positions per step: the [G, 64, V] logits bound the memory.
    got = jax.lax.map(one, (hidden.transpose(1, 0, 2), targets.T), batch_size=MIN_PROMPT)
    return got[0].T, got[1].transpose(1, 0, 2), got[2].transpose(1, 0, 2)


def _token_scores(logits, vocab):
    """logits [B, V] -> log-softmax [B, V] (fp32, all V rows) and its TOP_LOGPROBS best among ids < vocab."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_id = jax.lax.top_k(jnp.where(jnp.arange(lp.shape[-1]) < vocab, lp, -jnp.inf), TOP_LOGPROBS)
    return lp, top_lp, top_id.astype(jnp.int32)


def _admit(graphdef, state, k, v, seg, logits, ids, segment_ids, positions, slots, t, score, vocab):
    """Prefills a group of prompts ([G, P], left-padded) and writes each into its row of the cache at slots
    [t - P, t) (the row's other slots are emptied). slots [G]: an out-of-range slot drops that row (group padding).
    score: also the prompt's per-token log-probabilities (else zeros). Returns the cache, the rows' next-token logits,
    and the scores [G, P], [G, P, K], [G, P, K]."""
    model = nnx.merge(graphdef, state)
    g, p = ids.shape
    out = model(ids, segment_ids=segment_ids, positions=positions, cache=KVCache.init(model.cfg, g, p))
    zeros = (jnp.zeros((g, p), jnp.float32), jnp.zeros((g, p, TOP_LOGPROBS), jnp.float32),
             jnp.zeros((g, p, TOP_LOGPROBS), jnp.int32))
    scores = jax.lax.cond(score, lambda: _scores(model, out.hidden, ids, vocab), lambda: zeros)
    cols = (t - p + jnp.arange(p))[None, :]  # [1, P]
    put = lambda full, new: full.at[slots[:, None], :, cols].set(new.transpose(0, 2, 1, 3), mode="drop")  # noqa: E731
    seg = seg.at[slots].set(0, mode="drop").at[slots[:, None], cols].set(segment_ids, mode="drop")
    return (tuple(map(put, k, out.cache.k)), tuple(map(put, v, out.cache.v)), seg,
            logits.at[slots].set(last_logits(model, out), mode="drop"), *scores)


def _extend(graphdef, state, k, v, seg, logits, src, dst, n, ids, segment_ids, positions, t):
    """Prefix reuse for a group of G prompts: row dst[i] gets row src[i]'s first n[i] filled slots (the keys and
    values of the prompt prefix the two share; each key carries its rotary position, so slots may move) at slots
    [t - S - n[i], t - S), then only the suffixes ids [G, S] (left-padded, positions from n[i]) are prefilled on top
    of them at [t - S, t), attending to the prefix as a prompt attends to itself. The rows' other slots are emptied;
    an out-of-range dst drops that row (group padding). Returns the cache and logits."""
    model = nnx.merge(graphdef, state)
    s, length = ids.shape[1], seg.shape[1]
    order = jnp.argsort(seg[src] == 0, axis=1, stable=True)  # [G, L]: each src's filled slots first, in order
    j = jnp.arange(length)[None, :] - (t - s - n)[:, None]  # [G, L]: which prefix token lands in each slot of dst
    ok = (j >= 0) & (j < n[:, None])
    idx = jnp.take_along_axis(order, jnp.clip(j, 0, length - 1), axis=1)[:, None, :, None]  # [G, 1, L, 1]
    rows = lambda x: jnp.where(ok[:, None, :, None], jnp.take_along_axis(x[src], idx, axis=2), 0)  # noqa: E731
    cache = KVCache(k=tuple(map(rows, k)), v=tuple(map(rows, v)), segment_ids=ok.astype(jnp.int32), index=t - s)
    out = model(ids, segment_ids=segment_ids, positions=positions, cache=cache)
    put = lambda full, new: full.at[dst].set(new.astype(full.dtype), mode="drop")  # noqa: E731
    return (tuple(map(put, k, out.cache.k)), tuple(map(put, v, out.cache.v)), put(seg, out.cache.segment_ids),
            logits.at[dst].set(last_logits(model, out), mode="drop"))


def _decode(graphdef, rows, window, chunk, state, k, v, seg, logits, t, steps, live, pos, count, limit, temperature,
            top_p, keys, eos, vocab, want_logprobs):
    """Up to `steps` (<= chunk) decode steps of rows [:rows] over cache slots [:window], every row writing at slot
    t + step: the model's batched step, as in `generate`. Stops early once no row is live.

    k, v: L x [B, N, S, H]; seg [B, S]; logits [B, V]; live, pos, count, limit, temperature, top_p [rows]; keys [rows, 2]
    raw threefry key data. Returns the cache and logits, tokens [rows, chunk], their log-probabilities [rows, chunk] and
    top alternatives [rows, chunk, K] x 2 (zeros unless want_logprobs), pos, count, live and the steps run."""
    model = nnx.merge(graphdef, state)
    lw = logits[:rows]
    row_keys = jax.random.wrap_key_data(keys)

    def body(carry):
        step, k, v, seg, lw, toks, lps, top_lp, top_id, pos, count, live = carry
        tok = jax.lax.cond(  # all greedy (the common case for evals): skip drawing random numbers for V ids per row
            jnp.all(temperature == 0), lambda: sample(lw, None, 0.0, 0, 1.0, vocab),
            lambda: sample(lw, jax.vmap(jax.random.fold_in)(row_keys, count), temperature, 0, top_p, vocab))
        tok = jnp.where(live, tok, 0)

        def scores():
            lp, tl, ti = _token_scores(lw, vocab)
            return jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0], tl, ti

        lp, tl, ti = jax.lax.cond(want_logprobs, scores, lambda: (
            jnp.zeros(tok.shape, jnp.float32), jnp.zeros((rows, TOP_LOGPROBS), jnp.float32),
            jnp.zeros((rows, TOP_LOGPROBS), jnp.int32)))
        toks, lps = toks.at[:, step].set(tok), lps.at[:, step].set(lp)
        top_lp, top_id = top_lp.at[:, step].set(tl), top_id.at[:, step].set(ti)
        count = count + live
        # The whole cache goes round the loop (updated in place); the model reads and writes rows [:rows] and
        # attends over slots [:window] of it. Slicing that corner out before the loop and writing it back after
        # cost about one decode step per chunk at phi-1-small's shape (docs/benchmarks.md).
        cache = KVCache(k=k, v=v, segment_ids=seg, index=t + step, window=window)
        out = model(tok[:, None], segment_ids=live.astype(jnp.int32)[:, None], positions=pos[:, None], cache=cache)
        live_next = live & (tok != eos) & (count < limit)
        return (step + 1, out.cache.k, out.cache.v, out.cache.segment_ids, out.logits[:, -1], toks, lps, top_lp,
                top_id, pos + live, count, live_next)

    carry = (jnp.int32(0), k, v, seg, lw, jnp.zeros((rows, chunk), jnp.int32), jnp.zeros((rows, chunk), jnp.float32),
             jnp.zeros((rows, chunk, TOP_LOGPROBS), jnp.float32), jnp.zeros((rows, chunk, TOP_LOGPROBS), jnp.int32),
             pos, count, live)
    step, k, v, seg, lw, toks, lps, top_lp, top_id, pos, count, live = jax.lax.while_loop(
        lambda c: (c[0] < steps) & jnp.any(c[-1]), body, carry)
    return (k, v, seg, jax.lax.dynamic_update_slice(logits, lw, (0, 0)), toks, lps, top_lp, top_id, pos, count, live,
            step)


def _compact(window, k, v, seg, active, t):
    """Moves each active row's filled slots among [:window] (in order) to end at slot t; other rows become empty."""
    s = seg[:, :window]
    filled = (s != 0) & active[:, None]  # [B, W]
    n = filled.sum(axis=1)  # [B]
    order = jnp.argsort(~filled, axis=1, stable=True)  # filled slots first, in order
    j = jnp.arange(window)[None, :] - (t - n)[:, None]  # [B, W]: which filled slot lands at each position
    ok = (j >= 0) & (j < n[:, None])
    src = jnp.take_along_axis(order, jnp.clip(j, 0, window - 1), axis=1)  # [B, W]
    move = lambda x: jax.lax.dynamic_update_slice(  # noqa: E731
        x, jnp.take_along_axis(x[:, :, :window], src[:, None, :, None], axis=2), (0, 0, 0, 0))
    new_seg = jnp.where(ok, jnp.take_along_axis(s, src, axis=1), 0)
    return tuple(map(move, k)), tuple(map(move, v)), jax.lax.dynamic_update_slice(seg, new_seg, (0, 0))


# --- the engine --------------------------------------------------------------------------------------------------------


class Engine:
    """Owns the model on the device and a thread that compiles every shape, then runs admitted jobs in one batch (see
    the module docstring)."""

    def __init__(self, model: Phi, tokenizer: Tokenizer, *, slots: int = 16, max_len: int | None = None,
                 chunk_tokens: int = 8, wave_ms: float = 5.0, prefix_reuse: bool = True):
        cfg = model.cfg
        self.tokenizer, self.cfg = tokenizer, cfg
        self.slots = _pow2(slots)
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)  # cache slots per row: prompt + completion
        self.chunk_tokens, self.wave_s, self.prefix_reuse = chunk_tokens, wave_ms / 1000, prefix_reuse
        self.graphdef, self.state = nnx.split(compute_dtype_weights(for_decoding(model)))
        # Rows and groups in powers of 4: decoding 4 rows costs about what 1 does (the weights are read once per step
        # either way), and each size less is one compile less for every window and prompt length.
        self.group_sizes = buckets(1, min(self.slots, MAX_GROUP), 4)
        self.prompt_sizes = buckets(MIN_PROMPT, self.max_len)
        self.row_sizes = buckets(1, self.slots, 4)
        self.windows = buckets(MIN_WINDOW, self.max_len)
        shape = (self.slots, cfg.num_heads, self.max_len, cfg.head_dim)
        self.k = tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers))
        self.v = tuple(jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers))
        self.seg = jnp.zeros((self.slots, self.max_len), jnp.int32)
        self.logits = jnp.zeros((self.slots, cfg.vocab_size), jnp.float32)
        b = self.slots
        self.t = 0  # the shared write index
        self.pos, self.count, self.limit, self.filled = (np.zeros(b, np.int32) for _ in range(4))
        self.temperature, self.top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
        self.keys = np.zeros((b, 2), np.uint32)
        self.eos = np.int32(tokenizer.eos_id)
        self.vocab = np.int32(min(tokenizer.vocab_size, cfg.vocab_size))
        self.active: dict[int, Job] = {}  # slot -> job
        self.waiting: list[Job] = []
        self.inbox: queue.Queue = queue.Queue()
        self.compiled: dict[tuple, Callable] = {}
        self.compile_s: dict[tuple, float] = {}  # seconds each took (a persistent-cache hit: milliseconds)
        self.ready = threading.Event()
        self.warming = ""  # what warm_up is compiling now
        self.stats = {"chunks": 0, "steps": 0, "row_steps": 0, "prefills": 0, "jobs": 0, "compactions": 0,
                      "extends": 0, "extend_calls": 0, "reused_tokens": 0, "shapes": 0, "warm_up_s": 0.0}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- public ---------------------------------------------------------------------------------------------------

    def shapes(self) -> list[tuple]:
        """Every device program the engine may run: ("admit", G, P), ("decode", R, W), ("compact", W), and with prefix
        reuse ("extend", G, S)."""
        return ([("admit", g, p) for g in self.group_sizes for p in self.prompt_sizes]
                + [("decode", r, w) for r in self.row_sizes for w in self.windows]
                + [("compact", w) for w in self.windows]
                + [("extend", g, p) for g in self.group_sizes for p in self.prompt_sizes  # a rest of p tokens
                   if self.prefix_reuse and p + PREFIX_MIN <= self.max_len])  # follows PREFIX_MIN or more reused

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

    # --- compiling -------------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compiles every shape in `shapes()` (JAX's persistent cache, when the server set one, makes a restart
        quick), runs each once, then runs one short request through the real path."""
        t0 = time.perf_counter()
        shapes = self.shapes()
        for i, shape in enumerate(shapes):
            self.warming = f"{i + 1}/{len(shapes)} {shape}"
            self.compile(shape)
        self.stats["shapes"] = len(self.compiled)
        self.warming = "running each program once"
        self._run_each_once()
        done = threading.Event()
        self.waiting.append(Job(prompt=[self.tokenizer.eos_id], max_tokens=min(2, self.max_len - 1), temperature=0.0,
                                top_p=1.0, seed=0, stop=(), emit=lambda ev: ev[0] != "text" and done.set()))
        while not done.is_set():
            self._admit()
            if self.active:
                self._chunk()
        self.stats["warm_up_s"] = round(time.perf_counter() - t0, 2)
        self.warming = ""

    def _run_each_once(self) -> None:
        """Calls every compiled program once on the still empty cache, then empties it again. The first call of an
        XLA:CPU executable costs 10-20 ms more than the next ones (181 ms over the 24 programs of the tiny model at a
        512-token context, measured in process): traffic's first rounds paid that, one program at a time."""
        i32, z = np.int32, lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        for shape in self.compiled:
            cache = (self.k, self.v, self.seg, self.logits)
            if shape[0] == "admit":
                _, g, p = shape
                out = self._call(shape, self.state, *cache, z(g, p), z(g, p), z(g, p), z(g), i32(p), np.bool_(False),
                                 self.vocab)
            elif shape[0] == "decode":
                _, r, _ = shape
                out = self._call(shape, self.state, *cache, i32(0), i32(self.chunk_tokens), np.ones(r, bool), z(r),
                                 z(r), np.full(r, self.chunk_tokens, np.int32), np.zeros(r, np.float32),
                                 np.ones(r, np.float32), np.zeros((r, 2), np.uint32), self.eos, self.vocab,
                                 np.bool_(False))
            elif shape[0] == "extend":
                _, g, p = shape
                out = self._call(shape, self.state, *cache, z(g), np.full(g, self.slots, np.int32), z(g), z(g, p),
                                 z(g, p), z(g, p), i32(p))
            else:
                out = self._call(shape, self.k, self.v, self.seg, np.zeros(self.slots, bool), i32(0)) + (self.logits,)
            self.k, self.v, self.seg, self.logits = out[:4]
        jax.block_until_ready(self.logits)
        self.k = tuple(jnp.zeros_like(x) for x in self.k)  # the inputs were donated: fresh empty buffers
        self.v = tuple(jnp.zeros_like(x) for x in self.v)
        self.seg, self.logits = jnp.zeros_like(self.seg), jnp.zeros_like(self.logits)

    def compile(self, shape: tuple) -> None:
        """Compiles one program of `shapes()` ahead of time and keeps it in `self.compiled`."""
        i32, f32 = jnp.int32, jnp.float32
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
        cache = (self.k, self.v, self.seg, self.logits)
        if shape[0] == "admit":
            _, g, p = shape
            fn = jax.jit(functools.partial(_admit, self.graphdef), donate_argnums=(1, 2, 3, 4))
            args = (self.state, *cache, spec((g, p), i32), spec((g, p), i32), spec((g, p), i32), spec((g,), i32),
                    spec((), i32), spec((), jnp.bool_), spec((), i32))
        elif shape[0] == "decode":
            _, r, w = shape
            fn = jax.jit(functools.partial(_decode, self.graphdef, r, w, self.chunk_tokens), donate_argnums=(1, 2, 3, 4))
            rows = lambda dtype: spec((r,), dtype)  # noqa: E731
            args = (self.state, *cache, spec((), i32), spec((), i32), rows(jnp.bool_), rows(i32), rows(i32), rows(i32),
                    rows(f32), rows(f32), spec((r, 2), jnp.uint32), spec((), i32), spec((), i32), spec((), jnp.bool_))
        elif shape[0] == "extend":
            _, g, p = shape
            fn = jax.jit(functools.partial(_extend, self.graphdef), donate_argnums=(1, 2, 3, 4))
            args = (self.state, *cache, spec((g,), i32), spec((g,), i32), spec((g,), i32), spec((g, p), i32),
                    spec((g, p), i32), spec((g, p), i32), spec((), i32))
        else:
            _, w = shape
            fn = jax.jit(functools.partial(_compact, w), donate_argnums=(0, 1, 2))
            args = (self.k, self.v, self.seg, spec((self.slots,), jnp.bool_), spec((), i32))
        t1 = time.perf_counter()
        self.compiled[shape] = fn.lower(*args).compile()
        self.compile_s[shape] = round(time.perf_counter() - t1, 2)

    def _call(self, shape: tuple, *args):
        fn = self.compiled.get(shape)
        if fn is None:  # a bug: the loop only asks for shapes in shapes()
            raise RuntimeError(f"no compiled program for {shape}; compiled: {sorted(self.compiled)}")
        return fn(*args)

    # --- the loop ----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.warm_up()
        except Exception:  # the server's health route then says the engine stopped
            traceback.print_exc(file=sys.stderr)
            return
        self.ready.set()
        print(f"compiled {len(self.compiled)} programs in {self.stats['warm_up_s']} s: ready", file=sys.stderr,
              flush=True)
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
                self.t = 0

    def _take_inbox(self, block: bool) -> None:
        """Moves submitted jobs to `waiting`. When idle, waits for one, then for others that come with it: the wave
        stays open while each next job comes within `wave_s` of the one before, at most WAVE_CAP x `wave_s` in all
        (concurrent clients' requests land a few ms apart, more on a busy machine; they then share one admission
        instead of trickling in between decode chunks, each moving the shared index). The wave ends as soon as its
        jobs fill every slot: a later job could not join the admission anyway (the stalls mix's rounds of 16 requests
        on 16 slots waited the whole `wave_s` after their last request, ~5 ms of a ~90 ms round)."""
        try:
            if block:
                first = self.inbox.get()
                if first is None:
                    return
                self.waiting.append(first)
                start = time.monotonic()
                deadline = start + self.wave_s
                while len(self.waiting) < self.slots and (left := deadline - time.monotonic()) > 0:
                    job = self.inbox.get(timeout=left)
                    if job is None:
                        return
                    self.waiting.append(job)
                    deadline = min(time.monotonic() + self.wave_s, start + WAVE_CAP * self.wave_s)
            while True:
                job = self.inbox.get_nowait()
                if job is not None:
                    self.waiting.append(job)
        except queue.Empty:
            pass

    def _admit(self) -> None:
        """Prefills waiting jobs into free slots. First, one at a time, every job whose prompt shares PREFIX_MIN or
        more leading tokens with a busy row's (prefix reuse: `_extend` copies that row's keys and values and prefills
        only the rest); then one group per prompt bucket, the shortest prompts first. A job sharing such a prefix with
        one already in its group waits for the next pass, where it extends from that job's row."""
        self.waiting = [j for j in self.waiting if not self._dropped(j)]
        if not self.active:
            self.t = 0
        # The jobs with the most tokens to come get the lowest free slots: a chunk decodes rows [:R] up to the highest
        # busy slot, so as the shorter jobs end the chunks shrink to 4 rows, then 1, instead of running 16 rows until
        # the longest job ends
        free = [s for s in range(self.slots) if s not in self.active]
        plan = {id(j): s for j, s in zip(sorted(self.waiting, key=lambda j: -j.max_tokens)[:len(free)], free)}
        while self.waiting and len(self.active) < self.slots:
            if self._extend_group(plan):
                continue
            free = [s for s in range(self.slots) if s not in self.active]
            p = min(_fit(self.prompt_sizes, len(j.prompt)) for j in self.waiting)
            group, keys = [], set()
            for job in self.waiting:
                key = self._prefix_key(job)
                if _fit(self.prompt_sizes, len(job.prompt)) == p and (key is None or key not in keys):
                    group.append(job)
                    keys.add(key)
            n = min(len(group), len(free), self.group_sizes[-1])
            g = _fit(self.group_sizes, n)
            if g > 2 * n:  # more than half the rows would be padding: admit the largest full group now, the rest next
                g = n = max(s for s in self.group_sizes if s <= n)
            group = group[:n]
            for job in group:
                self.waiting.remove(job)
            self.t = max(self.t, p)
            ids, seg, pos = (np.zeros((g, p), np.int32) for _ in range(3))
            slots = np.full(g, self.slots, np.int32)  # padding rows go nowhere
            for r, job in enumerate(group):
                n = len(job.prompt)
                ids[r, p - n:], seg[r, p - n:], pos[r, p - n:] = job.prompt, 1, np.arange(n)
                slots[r] = slot = self._slot_for(job, plan)
                self._take_slot(job, slot)
            ids[len(group):, -1] = seg[len(group):, -1] = 1  # padding rows: one token, so no row is all padding
            score = any(j.prompt_logprobs for j in group)
            self.k, self.v, self.seg, self.logits, lp, top_lp, top_id = self._call(
                ("admit", g, p), self.state, self.k, self.v, self.seg, self.logits, ids, seg, pos, slots,
                np.int32(self.t), np.bool_(score), self.vocab)
            self.stats["prefills"] += 1
            self.stats["jobs"] += len(group)
            if score:
                lp, top_lp, top_id = np.asarray(lp), np.asarray(top_lp), np.asarray(top_id)
            for r, job in enumerate(group):
                if job.prompt_logprobs:  # token i's score sits at the position before it, p - n + i - 1
                    n = len(job.prompt)
                    job.prompt_scores = [(float(lp[r, j]), top_id[r, j].tolist(), top_lp[r, j].tolist())
                                         for j in range(p - n, p - 1)]
                if job.max_tokens == 0:
                    self._hand_out(job, "length")

    def _take_slot(self, job: Job, slot: int) -> None:
        n = len(job.prompt)
        job.slot = slot
        self.active[slot] = job
        self.pos[slot], self.filled[slot], self.count[slot], self.limit[slot] = n, n, 0, job.max_tokens
        self.temperature[slot], self.top_p[slot] = job.temperature, job.top_p
        self.keys[slot] = _row_key(job.seed, job.choice)

    def _prefix_key(self, job: Job) -> tuple | None:
        """The first PREFIX_MIN tokens of a job that may reuse a prefix (None: it may not; a job scoring its prompt
        needs the whole prompt's own prefill)."""
        if not self.prefix_reuse or job.prompt_logprobs or len(job.prompt) <= PREFIX_MIN:
            return None
        return tuple(job.prompt[:PREFIX_MIN])

    def _slot_for(self, job: Job, plan: dict[int, int]) -> int:
        """The free slot `plan` gave the job, else the lowest free slot not planned for a job still waiting."""
        free = [s for s in range(self.slots) if s not in self.active]
        if plan.get(id(job)) in free:
            return plan[id(job)]
        taken = {plan[id(j)] for j in self.waiting if id(j) in plan and j is not job}
        return next((s for s in free if s not in taken), free[0])

    def _extend_group(self, plan: dict[int, int]) -> bool:
        """Admits waiting jobs that share PREFIX_MIN or more leading prompt tokens with a busy row, each from the row
        sharing the most, by one `_extend` of up to MAX_GROUP of them: those whose unshared rest fits the smallest
        prompt bucket any of them needs (taken first, they become sources that leave the next ones shorter rests).
        False if there is none. (One program per group rather than per job: the stalls mix's rounds ran 10-14
        extends one at a time, 1.6 ms each on the tiny model, most of it the call itself.)"""
        if not self.prefix_reuse:
            return False
        rows: dict[tuple, list[int]] = {}
        for slot, job in self.active.items():
            if len(job.prompt) >= PREFIX_MIN:
                rows.setdefault(tuple(job.prompt[:PREFIX_MIN]), []).append(slot)
        found = []  # (bucket, job, src, shared tokens)
        for job in self.waiting:
            key = self._prefix_key(job)
            if key is None or key not in rows:
                continue
            best, src = 0, -1
            for slot in rows[key]:  # the common prefix, at most all but the job's last token (its logits come next)
                m = min(len(self.active[slot].prompt), len(job.prompt) - 1)
                diff = np.flatnonzero(np.asarray(self.active[slot].prompt[:m]) != np.asarray(job.prompt[:m]))
                if (n := int(diff[0]) if len(diff) else m) > best:
                    best, src = n, slot
            s = _fit(self.prompt_sizes, len(job.prompt) - best)
            if best >= PREFIX_MIN and best + s <= self.max_len:
                found.append((s, job, src, best))
        if not found:
            return False
        s = min(f[0] for f in found)
        group = [f for f in found if f[0] == s][:min(self.slots - len(self.active), self.group_sizes[-1])]
        g = _fit(self.group_sizes, len(group))
        if g > 2 * len(group):  # more than half the rows would be padding: the largest full group now, the rest next
            g = max(x for x in self.group_sizes if x <= len(group))
            group = group[:g]
        self.t = max(self.t, *(n + s for _, _, _, n in group))
        ids, seg, pos = (np.zeros((g, s), np.int32) for _ in range(3))
        src, n_shared = np.zeros(g, np.int32), np.zeros(g, np.int32)
        dst = np.full(g, self.slots, np.int32)  # padding rows go nowhere
        for r, (_, job, from_slot, n) in enumerate(group):
            rest = len(job.prompt) - n
            ids[r, s - rest:], seg[r, s - rest:], pos[r, s - rest:] = job.prompt[n:], 1, np.arange(n, n + rest)
            src[r], n_shared[r] = from_slot, n
            self.waiting.remove(job)
            dst[r] = slot = self._slot_for(job, plan)
            self._take_slot(job, slot)
        ids[len(group):, -1] = seg[len(group):, -1] = 1  # padding rows: one token, so no row is all padding
        self.k, self.v, self.seg, self.logits = self._call(
            ("extend", g, s), self.state, self.k, self.v, self.seg, self.logits, src, dst, n_shared, ids, seg, pos,
            np.int32(self.t))
        self.stats["extend_calls"] += 1
        for _, job, _, n in group:
            self.stats["extends"] += 1
            self.stats["reused_tokens"] += n
            self.stats["jobs"] += 1
            if job.max_tokens == 0:
                self._hand_out(job, "length")
        return True

    def _dropped(self, job: Job) -> bool:
        if job.cancelled:
            job.emit(("end", "cancelled", 0))
        return job.cancelled

    def _chunk(self) -> None:
        rows = _fit(self.row_sizes, max(self.active) + 1)
        longest = max(int(self.filled[s]) for s in self.active)
        need = lambda t: _fit(self.windows, min(t + self.chunk_tokens, self.max_len))  # noqa: E731
        if self.t >= self.max_len or need(longest) < need(self.t):  # gaps cost a larger window: close them
            active = np.array([s in self.active for s in range(self.slots)])
            self.k, self.v, self.seg = self._call(("compact", _fit(self.windows, self.t)), self.k, self.v, self.seg,
                                                  active, np.int32(longest))
            self.t = longest
            self.stats["compactions"] += 1
        window = need(self.t)
        steps = min(self.chunk_tokens, window - self.t)
        live = np.array([s in self.active and self.count[s] < self.limit[s] for s in range(rows)])
        want = any(j.logprobs is not None for j in self.active.values())
        r = slice(0, rows)
        self.k, self.v, self.seg, self.logits, out, lps, top_lp, top_id, pos, count, _, ran = self._call(
            ("decode", rows, window), self.state, self.k, self.v, self.seg, self.logits, np.int32(self.t),
            np.int32(steps), live, self.pos[r], self.count[r], self.limit[r], self.temperature[r], self.top_p[r],
            self.keys[r], self.eos, self.vocab, np.bool_(want))
        out, count, ran = np.asarray(out), np.asarray(count), int(ran)
        if want:
            lps, top_lp, top_id = np.asarray(lps), np.asarray(top_lp), np.asarray(top_id)
        before = self.count[r].copy()
        self.pos[r], self.count[r] = np.asarray(pos), count
        self.t += ran
        self.filled[r] += count - before
        self.stats["chunks"] += 1
        self.stats["steps"] += ran
        self.stats["row_steps"] += int((count - before).sum())
        for slot, job in list(self.active.items()):
            got = int(count[slot] - before[slot])
            new = out[slot, :got].tolist()
            if job.logprobs is not None:
                job.token_logprobs += lps[slot, :got].tolist()
                job.top += [(top_id[slot, i].tolist(), top_lp[slot, i].tolist()) for i in range(got)]
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
        if finish is None and not job.stream and not job.stop:
            return  # nothing to look for in the text yet, nobody to send it to: decode it once, at the end
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
            del job.token_logprobs[len(job.tokens):], job.top[len(job.tokens):]
        if safe > job.sent:
            job.emit(("text", text[job.sent:safe]))
            job.sent = safe
        if finish is not None:
            self.active.pop(job.slot, None)
            job.emit(("end", finish, len(job.tokens)))


def _row_key(seed: int, choice: int) -> np.ndarray:
    """Raw threefry key data of fold_in(key(seed), choice), computed on the host (no device program to compile)."""
    return _threefry_fold_in(np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32), choice)


def _threefry_fold_in(key: np.ndarray, data: int) -> np.ndarray:
    """jax.random.fold_in for threefry2x32 keys, in plain Python: threefry_2x32(key, [0, data]) (20 rounds)."""
    m = 0xFFFFFFFF
    rot = [[13, 15, 26, 6], [17, 29, 16, 24]]
    ks = [int(key[0]), int(key[1]), int(key[0]) ^ int(key[1]) ^ 0x1BD11BDA]
    x0, x1 = ks[0], (data + ks[1]) & m
    for i in range(5):
        for r in rot[i % 2]:
            x0 = (x0 + x1) & m
            x1 = (((x1 << r) | (x1 >> (32 - r))) & m) ^ x0
        x0 = (x0 + ks[(i + 1) % 3]) & m
        x1 = (x1 + ks[(i + 2) % 3] + i + 1) & m
    return np.array([x0, x1], np.uint32)
