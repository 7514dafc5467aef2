"""The OpenAI API on the engine: request parsing, completions, chat, log-probabilities, tokenize (no HTTP here).

Completions follow OpenAI's legacy API as vLLM serves it: `logprobs` = k (0..TOP_LOGPROBS) returns per token
`tokens`, `token_logprobs`, `top_logprobs` (the k best and the chosen token) and `text_offset`; with `echo` the prompt's
tokens come first (the first has no log-probability: null), and `max_tokens=0` then scores the prompt alone (what
lm-evaluation-harness sends for a log-likelihood). Chat takes `logprobs: true` and `top_logprobs` (0..20).
Log-probabilities are the model's own fp32 log-softmax over all of its vocabulary rows (see phi1_jax.serving.batching).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

from phi1_jax.serving.batching import TOP_LOGPROBS, Engine, Job
from phi1_jax.tokenizer import EOS_PIECE

MAX_N = 64  # choices per request
MAX_STOPS = 16  # OpenAI takes 4; harnesses send more (HumanEval's Codex stops are 5)
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"  # a chat reply also ends where the model starts the next user turn


class ApiError(Exception):
    """An OpenAI-style error answer: status, message, type, param, code. Not a UserError: it goes to the HTTP client
    as a 4xx/5xx answer, and the server goes on."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- request parsing -------------------------------------------------------------------------------------------------


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}",
                       name)
    if not (lo < value if lo_open else lo <= value) or value > hi:
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    return tuple(stops)


def _token_ids(value) -> bool:
    """A non-empty list of ints (JSON's: `type(t) is int` leaves out bools, which are ints to isinstance)."""
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _unsupported(body: dict, names: dict) -> None:
    """Fields this server does not implement: accepted at their neutral value, otherwise a 400 naming them."""
    for name, neutral in names.items():
        if body.get(name) not in (None, *neutral):
            raise ApiError(400, f"'{name}' is not supported by this server", name)


class Server:
    """The model's engine and the request handlers (one instance per process)."""

    def __init__(self, name: str, engine: Engine):
        self.name, self.engine, self.tok = name, engine, engine.tokenizer
        self.created = int(time.time())
        self.draining = False
        self.in_flight = 0  # requests being generated

    # --- shared ------------------------------------------------------------------------------------------------------

    def _common(self, body) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if "model" not in body:
            raise ApiError(400, "'model' is required", "model")
        if body["model"] != self.name:
            raise ApiError(404, f"The model {json.dumps(body['model'])} does not exist; this server serves "
                                f"{json.dumps(self.name)}", "model", "model_not_found")
        _unsupported(body, {"suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
                            "tools": ([],), "response_format": ()})
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        return {"temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
                "n": _number(body, "n", 1, 1, MAX_N, integer=True),
                "seed": _number(body, "seed", None, -(2**63), 2**64 - 1, integer=True),
                "stream": _flag(body, "stream"), "include_usage": bool((so or {}).get("include_usage"))}

    def _max_tokens(self, body: dict, prompt_lens: list[int], default: int | None, lowest: int = 1) -> int:
        room = self.engine.max_len
        names = [n for n in ("max_tokens", "max_completion_tokens") if body.get(n) is not None]
        value = _number(body, names[0], None, lowest, 1 << 30, integer=True) if names else None
        longest = max(prompt_lens)
        if value is None:
            value = default if default is not None else room - longest  # chat: what the context leaves
        if longest + value > room or value < lowest:
            raise ApiError(400, f"This model's maximum context length is {room} tokens. However, you requested "
                                f"{longest + max(value, 1)} tokens ({longest} in the prompt, {max(value, 1)} for the "
                                "completion). Please reduce the prompt or the completion length.",
                           names[0] if names else "messages", "context_length_exceeded")
        return value

    def _jobs(self, prompts: list[list[int]], opts: dict, max_tokens: int, stops, emit, *, logprobs=None,
              prompt_logprobs=False) -> list[Job]:
        seed = opts["seed"] if opts["seed"] is not None else int.from_bytes(os.urandom(8), "little") >> 1
        jobs = []
        for p, prompt in enumerate(prompts):
            for j in range(opts["n"]):
                index = p * opts["n"] + j
                jobs.append(Job(prompt=prompt, max_tokens=max_tokens, temperature=opts["temperature"],
                                top_p=opts["top_p"], seed=seed % (2**63), stop=stops, choice=index,
                                logprobs=logprobs, prompt_logprobs=prompt_logprobs, stream=opts["stream"],
                                emit=lambda ev, i=index: emit(i, ev)))
        return jobs

    async def _run(self, jobs: list[Job], queue: asyncio.Queue):
        """Submits the jobs and yields (choice, event) until every job has ended; cancels them if abandoned."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        if not self.engine.ready.is_set():
            raise ApiError(503, "the server is still compiling (GET /health says how far it is)", kind="server_error")
        for job in jobs:
            self.engine.submit(job)
        left = len(jobs)
        self.in_flight += 1
        try:
            while left:
                i, ev = await queue.get()
                if ev[0] == "error":
                    raise ApiError(500, ev[1], kind="server_error")
                left -= ev[0] == "end"
                yield i, ev
        finally:
            self.in_flight -= 1
            for job in jobs:
                job.cancelled = True  # a no-op for finished jobs; frees the slots of a client that went away

    @staticmethod
    def _queue():
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        return queue, lambda i, ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

    def _usage(self, prompts, jobs) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(j.tokens) for j in jobs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # --- log-probabilities --------------------------------------------------------------------------------------------

    def _pieces(self, ids: list[int]) -> tuple[list[str], list[int]]:
        """Each token's text and its character offset, such that the pieces join to decode(ids)."""
        texts, offsets, before = [], [], ""
        for i in range(len(ids)):
            now = self.tok.decode(ids[: i + 1])
            common = len(before) if now.startswith(before) else 0
            offsets.append(common)
            texts.append(now[common:])
            before = now
        return texts, offsets

    def _top(self, ids: list[int], lps: list[float], k: int, chosen: int, chosen_lp: float) -> dict:
        top = {self.tok.decode([t]): lp for t, lp in zip(ids[:k], lps[:k])}
        top.setdefault(self.tok.decode([chosen]), chosen_lp)  # vLLM's: the chosen token is always there
        return top

    def completion_logprobs(self, job: Job, k: int, echo: bool, offset: int) -> dict:
        """OpenAI's legacy `logprobs` object for one choice; offsets count from `offset` (the echoed prompt's length
        in characters when the prompt is echoed as given)."""
        ids = (job.prompt if echo else []) + job.tokens
        texts, offsets = self._pieces(ids)
        token_lps: list[float | None] = []
        tops: list[dict | None] = []
        if echo:
            token_lps.append(None)
            tops.append(None)
            for tok, (lp, top_ids, top_lps) in zip(job.prompt[1:], job.prompt_scores):
                token_lps.append(lp)
                tops.append(self._top(top_ids, top_lps, k, tok, lp))
        for tok, lp, (top_ids, top_lps) in zip(job.tokens, job.token_logprobs, job.top):
            token_lps.append(lp)
            tops.append(self._top(top_ids, top_lps, k, tok, lp))
        base = 0 if echo else offset
        return {"tokens": texts, "token_logprobs": token_lps, "top_logprobs": tops,
                "text_offset": [base + o for o in offsets]}

    def chat_logprobs(self, job: Job, k: int) -> dict:
        texts, _ = self._pieces(job.tokens)

        def entry(text, lp):
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        content = []
        for text, lp, (top_ids, top_lps) in zip(texts, job.token_logprobs, job.top):
            content.append({**entry(text, lp), "top_logprobs": [entry(self.tok.decode([t]), x)
                                                                for t, x in zip(top_ids[:k], top_lps[:k])]})
        return {"content": content}

    # --- completions ------------------------------------------------------------------------------------------------

    def _prompts(self, body: dict) -> tuple[list[list[int]], list[str | None]]:
        """Token ids and texts of `prompt`: a string, a list of strings, a list of ids, or a list of lists of ids. A
        prompt of token ids has text None here (`_texts` decodes it, when echo needs it)."""
        prompt = body.get("prompt")
        bad = ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of "
                            "token ids", "prompt")
        if isinstance(prompt, str) or _token_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise bad
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                # An empty prompt starts a new document: EOS is what precedes every document in training.
                ids.append(self.tok.encode(p) or [self.tok.eos_id])
                texts.append(p)
            elif _token_ids(p):
                if min(p) < 0 or max(p) >= self.engine.cfg.vocab_size:
                    raise ApiError(400, f"'prompt' has token ids outside [0, {self.engine.cfg.vocab_size})", "prompt")
                ids.append(list(p))
                texts.append(None)
            else:
                raise bad
        return ids, texts

    def _texts(self, ids: list[list[int]], texts: list[str | None]) -> list[str]:
        """Every prompt's text: a token-id prompt's decoded."""
        return [self.tok.decode(p) if t is None else t for p, t in zip(ids, texts)]

    async def completions(self, body) -> dict | object:
        opts = self._common(body)
        prompts, texts = self._prompts(body)
        stops, echo = _stops(body), _flag(body, "echo")
        logprobs = body.get("logprobs")
        if logprobs is False:
            logprobs = None
        if logprobs is not None:
            logprobs = _number(body, "logprobs", None, 0, TOP_LOGPROBS, integer=True)
        max_tokens = self._max_tokens(body, [len(p) for p in prompts], 16, lowest=0 if echo else 1)
        _unsupported(body, {"best_of": (opts["n"],)})
        if logprobs is not None and opts["stream"]:
            raise ApiError(400, "'logprobs' is not supported with 'stream' by this server", "logprobs")
        if echo:
            texts = self._texts(prompts, texts)
        queue, emit = self._queue()
        jobs = self._jobs(prompts, opts, max_tokens, stops, emit, logprobs=logprobs,
                          prompt_logprobs=echo and logprobs is not None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices, usage=None):
            out = {"id": rid, "object": "text_completion", "created": created, "model": self.name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if opts["stream"]:
            async def events():
                if echo:
                    yield chunk([{"index": i, "text": texts[i // opts["n"]], "logprobs": None, "finish_reason": None}
                                 for i in range(len(jobs))])
                async for i, ev in self._run(jobs, queue):
                    text, finish = (ev[1], None) if ev[0] == "text" else ("", ev[1])
                    yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": finish}])
                if opts["include_usage"]:
                    yield chunk([], self._usage(prompts, jobs))
            return events()

        out = {i: [texts[i // opts["n"]]] if echo else [] for i in range(len(jobs))}
        finish = {}
        async for i, ev in self._run(jobs, queue):
            if ev[0] == "text":
                out[i].append(ev[1])
            else:
                finish[i] = ev[1]
        choices = [{"index": i, "text": "".join(out[i]), "finish_reason": finish[i],
                    "logprobs": None if logprobs is None else self.completion_logprobs(
                        jobs[i], logprobs, echo, len(texts[i // opts["n"]]) if echo else 0)}
                   for i in range(len(jobs))]
        return chunk(choices, self._usage(prompts, jobs))

    # --- chat --------------------------------------------------------------------------------------------------------

    def chat_prompt(self, messages) -> str:
        """The plain template: one "Role: content" line per message, then "Assistant:" for the reply."""
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        lines = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: only text ones
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise ApiError(400, "only text content parts are supported", "messages")
                content = "".join(c["text"] for c in content)
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(content, str):
                raise ApiError(400, "each message needs a role (system, user or assistant) and string content",
                               "messages")
            lines.append(f"{CHAT_ROLES[m['role']]}: {content}\n")
        return "".join(lines) + "Assistant:"

    async def chat(self, body) -> dict | object:
        opts = self._common(body)
        prompt = self.tok.encode(self.chat_prompt(body.get("messages")))
        max_tokens = self._max_tokens(body, [len(prompt)], None)
        stops = _stops(body) + (CHAT_STOP,)
        want = _flag(body, "logprobs")
        top = _number(body, "top_logprobs", None, 0, TOP_LOGPROBS, integer=True)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if want and opts["stream"]:
            raise ApiError(400, "'logprobs' is not supported with 'stream' by this server", "logprobs")
        queue, emit = self._queue()
        jobs = self._jobs([prompt], opts, max_tokens, stops, emit, logprobs=(top or 0) if want else None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(obj, choices, usage=None):
            out = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        if opts["stream"]:
            async def events():
                yield chunk("chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "finish_reason": None} for i in range(len(jobs))])
                async for i, ev in self._run(jobs, queue):
                    delta, finish = ({"content": ev[1]}, None) if ev[0] == "text" else ({}, ev[1])
                    yield chunk("chat.completion.chunk", [{"index": i, "delta": delta, "finish_reason": finish}])
                if opts["include_usage"]:
                    yield chunk("chat.completion.chunk", [], self._usage([prompt], jobs))
            return events()

        out, finish = {i: [] for i in range(len(jobs))}, {}
        async for i, ev in self._run(jobs, queue):
            if ev[0] == "text":
                out[i].append(ev[1])
            else:
                finish[i] = ev[1]
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(out[i])},
                    "logprobs": self.chat_logprobs(jobs[i], top or 0) if want else None,
                    "finish_reason": finish[i]} for i in range(len(jobs))]
        return chunk("chat.completion", choices, self._usage([prompt], jobs))

    # --- models and the tokenizer (vLLM's /tokenize, /detokenize, /tokenizer_info: lm-eval's remote tokenizer) ----

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "phi1_jax",
                "max_model_len": self.engine.max_len}

    async def tokenize(self, body) -> dict:
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError(400, "'prompt' must be a string", "prompt")
        ids = self.tok.encode(body["prompt"])
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_len}

    async def detokenize(self, body) -> dict:
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "'tokens' must be a list of token ids", "tokens")
        return {"prompt": self.tok.decode(ids)}

    def tokenizer_info(self) -> dict:
        return {"eos_token": EOS_PIECE, "bos_token": None, "pad_token": None, "model_max_length": self.engine.max_len,
                "vocab_size": self.tok.vocab_size, "chat_template": None}
