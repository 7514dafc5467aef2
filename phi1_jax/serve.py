"""An OpenAI-compatible HTTP server for any phi1_jax model: trainer workdir, phi1_jax checkpoint, Hugging Face directory.

    python -m phi1_jax.serve --checkpoint=workdirs/tiny [--host=127.0.0.1] [--port=8000] [--slots=16]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="workdirs/tiny", prompt="def add(a, b):", max_tokens=32, temperature=0)

Routes: GET /health, GET /v1/models, POST /v1/completions (prompt: a string, a list of strings, token ids or lists of
token ids; max_tokens, temperature, top_p, stop, n, seed, echo, stream with server-sent events, stream_options
.include_usage; usage token counts), POST /v1/chat/completions (a plain template: "User: ...\\nAssistant:").
The served model name is the --checkpoint value, as given. Requests are batched continuously onto the device
(phi1_jax/serve_engine.py: slots in one KV cache, new requests join between decode chunks). A bad request gets a 400
with an OpenAI-style error body; one that does not fit the model's context is a 400 saying by how much. SIGTERM (or
Ctrl-C) stops accepting connections, finishes the requests in flight, then exits. See docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

from phi1_jax import cli
from phi1_jax.serve_engine import Engine, Job

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


def load(checkpoint: str):
    """(model, tokenizer) for --checkpoint: the one place serve imports the loader."""
    from phi1_jax.loader import load_model_and_tokenizer

    return load_model_and_tokenizer(checkpoint)


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


def _unsupported(body: dict, names: dict) -> None:
    """Fields this server does not implement: accepted at their neutral value, otherwise a 400 naming them."""
    for name, neutral in names.items():
        if body.get(name) not in (None, *neutral):
            raise ApiError(400, f"'{name}' is not supported by this server", name)


class Server:
    """The model, its engine and the request handlers (one instance per process)."""

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
        _unsupported(body, {"logprobs": (False, 0), "top_logprobs": (0,), "suffix": ("",), "presence_penalty": (0,),
                            "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],), "response_format": ()})
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        return {"temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                "top_p": float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
                "n": _number(body, "n", 1, 1, MAX_N, integer=True),
                "seed": _number(body, "seed", None, -(2**63), 2**64 - 1, integer=True),
                "stream": _flag(body, "stream"), "include_usage": bool((so or {}).get("include_usage"))}

    def _max_tokens(self, body: dict, prompt_lens: list[int], default: int | None) -> int:
        room = self.engine.max_len
        names = [n for n in ("max_tokens", "max_completion_tokens") if body.get(n) is not None]
        value = _number(body, names[0], None, 1, 1 << 30, integer=True) if names else None
        longest = max(prompt_lens)
        if value is None:
            value = default if default is not None else room - longest  # chat: what the context leaves
        if longest + max(value, 1) > room or value < 1:
            raise ApiError(400, f"This model's maximum context length is {room} tokens. However, you requested "
                                f"{longest + max(value, 1)} tokens ({longest} in the prompt, {max(value, 1)} for the "
                                "completion). Please reduce the prompt or the completion length.",
                           names[0] if names else "messages", "context_length_exceeded")
        return value

    def _jobs(self, prompts: list[list[int]], opts: dict, max_tokens: int, stops, emit) -> list[Job]:
        seed = opts["seed"] if opts["seed"] is not None else int.from_bytes(os.urandom(8), "little") >> 1
        jobs = []
        for p, prompt in enumerate(prompts):
            for j in range(opts["n"]):
                index = p * opts["n"] + j
                jobs.append(Job(prompt=prompt, max_tokens=max_tokens, temperature=opts["temperature"],
                                top_p=opts["top_p"], seed=seed % (2**63), stop=stops, choice=index,
                                emit=lambda ev, i=index: emit(i, ev)))
        return jobs

    async def _run(self, jobs: list[Job], queue: asyncio.Queue):
        """Submits the jobs and yields (choice, event) until every job has ended; cancels them if abandoned."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", kind="server_error")
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

    # --- completions ------------------------------------------------------------------------------------------------

    def _prompts(self, body: dict) -> tuple[list[list[int]], list[str]]:
        """Token ids and texts of `prompt`: a string, a list of strings, a list of ids, or a list of lists of ids."""
        prompt = body.get("prompt")
        bad = ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of "
                            "token ids", "prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise bad
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                # An empty prompt starts a new document: EOS is what precedes every document in training.
                ids.append(self.tok.encode(p) or [self.tok.eos_id])
                texts.append(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                if not all(0 <= t < self.engine.cfg.vocab_size for t in p):
                    raise ApiError(400, f"'prompt' has token ids outside [0, {self.engine.cfg.vocab_size})", "prompt")
                ids.append(list(p))
                texts.append(self.tok.decode(p))
            else:
                raise bad
        return ids, texts

    async def completions(self, body) -> dict | object:
        opts = self._common(body)
        prompts, texts = self._prompts(body)
        max_tokens = self._max_tokens(body, [len(p) for p in prompts], 16)
        stops, echo = _stops(body), _flag(body, "echo")
        _unsupported(body, {"best_of": (opts["n"],)})
        queue, emit = self._queue()
        jobs = self._jobs(prompts, opts, max_tokens, stops, emit)
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
        choices = [{"index": i, "text": "".join(out[i]), "logprobs": None, "finish_reason": finish[i]}
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
        stops = _stops(body)
        stops = stops + (CHAT_STOP,)
        queue, emit = self._queue()
        jobs = self._jobs([prompt], opts, max_tokens, stops, emit)
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
                    "finish_reason": finish[i]} for i in range(len(jobs))]
        return chunk("chat.completion", choices, self._usage([prompt], jobs))

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "phi1_jax",
                "max_model_len": self.engine.max_len}


# --- HTTP --------------------------------------------------------------------------------------------------------------


def build_app(server: Server):
    """The Starlette app: routes, OpenAI-style errors for every failure, the engine stopped at shutdown."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def endpoint(handler):
        async def route(request: Request):
            try:
                raw = await request.body()
                try:
                    body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ApiError(400, f"the request body is not valid JSON ({e})") from None
                result = await handler(body)
            except ApiError as e:
                return error(e)
            if isinstance(result, dict):
                return JSONResponse(result)
            return StreamingResponse(_sse(result), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return route

    async def health(request):
        ok = server.engine.alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": server.name,
                             "busy": server.engine.busy(), **server.engine.stats}, status_code=200 if ok else 503)

    async def models(request):
        return JSONResponse(server.models())

    async def model(request):
        if request.path_params["name"] != server.name:
            return error(ApiError(404, f"no model {request.path_params['name']!r}", None, "model_not_found"))
        return JSONResponse(server.model_card())

    async def http_error(request, exc: HTTPException):
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def crash(request, exc: Exception):
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.draining = True
        await asyncio.to_thread(server.engine.stop)

    return Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/v1/models/{name:path}", model),
        Route("/v1/completions", endpoint(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(server.chat), methods=["POST"]),
    ], exception_handlers={HTTPException: http_error, Exception: crash}, lifespan=lifespan)


async def _sse(chunks):
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`; an error mid-stream is sent as an event."""
    try:
        async for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


# --- command line ------------------------------------------------------------------------------------------------------


@cli.reports_user_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phi1_jax.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", required=True, help="trainer workdir, phi1_jax checkpoint, HF directory or ORG/NAME; "
                                                       "also the served model name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=16, help="rows of the shared KV cache: requests decoded at once")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache slots per row, prompt + completion (default and maximum: the model's max_seq_len)")
    p.add_argument("--chunk-tokens", type=int, default=8, help="decode steps on the device between host visits")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="when idle, how long the first request waits for others to share its prefill")
    a = p.parse_args(argv)
    for name in ("slots", "chunk_tokens"):
        if getattr(a, name) < 1:
            return _fail(f"--{name.replace('_', '-')}={getattr(a, name)}: must be at least 1")
    if a.max_len is not None and a.max_len < 2:
        return _fail(f"--max-len={a.max_len}: must be at least 2")
    try:
        import uvicorn
    except ImportError:
        return _fail("phi1_jax.serve needs starlette and uvicorn: pip install starlette uvicorn")
    try:
        model, tokenizer = load(a.checkpoint)
    except (ValueError, OSError) as e:  # the loader's LoadError, and anything else loading raises: named with the flag
        return _fail(f"--checkpoint={a.checkpoint}: {e}")
    if tokenizer is None:
        return _fail(f"--checkpoint={a.checkpoint}: no tokenizer.model or tokenizer.json beside the model")
    engine = Engine(model, tokenizer, slots=a.slots, max_len=a.max_len, chunk_tokens=a.chunk_tokens,
                    wave_ms=a.batch_wait_ms)
    del model
    engine.start()
    _warm_up(engine)
    server = Server(a.checkpoint, engine)

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                print(f"signal {sig}: finishing {server.in_flight} requests in flight ({engine.busy()} choices), then "
                      "exiting", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a drained server exits 0, rather than by re-raising the signal

    config = uvicorn.Config(build_app(server), host=a.host, port=a.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=None)
    http = Uvicorn(config)
    print(f"serving {a.checkpoint} on http://{a.host}:{a.port}/v1 ({engine.slots} slots of {engine.max_len} tokens)",
          file=sys.stderr, flush=True)
    http.run()
    if not http.started:
        return _fail(f"could not listen on {a.host}:{a.port}")
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _warm_up(engine: Engine) -> None:
    """One short greedy request through the engine, so the first client does not wait for the common compiles."""
    import threading

    done = threading.Event()
    engine.submit(Job(prompt=[engine.tokenizer.eos_id], max_tokens=min(2, engine.max_len - 1), temperature=0.0,
                      top_p=1.0, seed=0, stop=(), emit=lambda ev: ev[0] != "text" and done.set()))
    done.wait()


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
