"""An OpenAI-compatible HTTP server for any phi1_jax model: trainer workdir, phi1_jax checkpoint, Hugging Face directory.

    python -m phi1_jax.serve --checkpoint=workdirs/tiny [--host=127.0.0.1] [--port=8000] [--slots=16]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="workdirs/tiny", prompt="def add(a, b):", max_tokens=32, temperature=0)

Routes: GET /health ("warming" with progress while the engine compiles, then "ok"), GET /v1/models (503 until every
shape is compiled: answering means ready), POST /v1/completions (prompt: a string, a list of strings, token ids or lists
of token ids; max_tokens, temperature, top_p, stop, n, seed, echo, logprobs, stream with server-sent events,
stream_options.include_usage; usage token counts), POST /v1/chat/completions (a plain template: "User: ...\\nAssistant:";
logprobs, top_logprobs), POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's, for lm-evaluation-harness).
The served model name is the --checkpoint value, as given. Requests are batched continuously onto the device
(phi1_jax/serving/batching.py). A bad request gets a 400 with an OpenAI-style error body; one that does not fit the
model's context is a 400 saying by how much. SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in
flight, then exits. Compiled programs are kept in JAX's persistent cache (--compile-cache), so a restart is quick.
See docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from phi1_jax import cli
from phi1_jax.serving.api import ApiError, Server
from phi1_jax.serving.batching import Engine

COMPILE_CACHE_ENV = "PHI1_JAX_COMPILE_CACHE"


def default_compile_cache() -> Path:
    """$PHI1_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/phi1_jax/jax_compile (~/.cache/phi1_jax/jax_compile)."""
    if os.environ.get(COMPILE_CACHE_ENV):
        return Path(os.environ[COMPILE_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi1_jax" / "jax_compile"


def use_compile_cache(directory: Path) -> None:
    """JAX's persistent compilation cache in `directory`, for every program however quick to compile."""
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def count_compiles(stats: dict) -> None:
    """Counts every program JAX compiles in this process (a cache hit included) into stats["compiles"]: after
    warm-up the engine's count must not move, and /health shows it."""
    import jax

    stats.setdefault("compiles", 0)

    def listen(event: str, duration: float, **_):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            stats["compiles"] = stats.get("compiles", 0) + 1

    jax.monitoring.register_event_duration_secs_listener(listen)


# --- HTTP --------------------------------------------------------------------------------------------------------------


def build_app(server: Server):
    """The Starlette app: routes, OpenAI-style errors for every failure, the engine stopped at shutdown."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    engine = server.engine

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

    def warming() -> JSONResponse | None:
        if engine.ready.is_set():
            return None
        return error(ApiError(503, f"the server is compiling ({engine.warming or 'starting'}); GET /health says how "
                                   "far it is", kind="server_error", code="warming"))

    async def health(request):
        ok = engine.alive()
        status = "ok" if ok and engine.ready.is_set() else "warming" if ok else "engine stopped"
        return JSONResponse({"status": status, "compiling": engine.warming, "model": server.name,
                             "busy": engine.busy(), **engine.stats}, status_code=200 if status == "ok" else 503)

    async def models(request):
        return warming() or JSONResponse(server.models())

    async def model(request):
        if request.path_params["name"] != server.name:
            return error(ApiError(404, f"no model {request.path_params['name']!r}", None, "model_not_found"))
        return warming() or JSONResponse(server.model_card())

    async def tokenizer_info(request):
        return JSONResponse(server.tokenizer_info())

    async def http_error(request, exc: HTTPException):
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    async def crash(request, exc: Exception):
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.draining = True
        await asyncio.to_thread(engine.stop)

    return Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/v1/models/{name:path}", model),
        Route("/v1/completions", endpoint(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(server.chat), methods=["POST"]),
        Route("/tokenize", endpoint(server.tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(server.detokenize), methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info),
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
    p.add_argument("--revision", default=None, help="a hub id's branch, tag or commit (default: main)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=16, help="rows of the shared KV cache: requests decoded at once")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache slots per row, prompt + completion (default and maximum: the model's max_seq_len)")
    p.add_argument("--chunk-tokens", type=int, default=8, help="decode steps on the device between host visits")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="when idle, how long the first request waits for others to share its prefill (the wave stays "
                        "open while requests keep coming this close together, at most 8x as long)")
    p.add_argument("--prefix-reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="a prompt sharing 32+ leading tokens with a request in flight copies its keys and values "
                        "instead of prefilling them again")
    p.add_argument("--compile-cache", default=None,
                   help=f"JAX's persistent compilation cache (default: ${COMPILE_CACHE_ENV}, else "
                        "~/.cache/phi1_jax/jax_compile); 'none' turns it off")
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
    if a.compile_cache != "none":
        cache = Path(a.compile_cache) if a.compile_cache else default_compile_cache()
        try:
            use_compile_cache(cache)
        except OSError as e:
            return _fail(f"--compile-cache={cache}: {e}")
    try:  # a port in use is refused before the model loads and before "serving ... on" is printed (#30)
        import socket

        with socket.create_server((a.host, a.port)):
            pass
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        return _fail(f"--port={a.port}: cannot listen on {a.host}:{a.port} ({why}); stop what holds it, "
                     "or pick another --port")
    loaded = _load(a.checkpoint, a.revision)
    if loaded.tokenizer is None:
        return _fail(f"--checkpoint={a.checkpoint}: no tokenizer.model or tokenizer.json beside the model")
    engine = Engine(loaded.model, loaded.tokenizer, slots=a.slots, max_len=a.max_len, chunk_tokens=a.chunk_tokens,
                    wave_ms=a.batch_wait_ms, prefix_reuse=a.prefix_reuse)
    del loaded
    count_compiles(engine.stats)
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
    print(f"serving {a.checkpoint} on http://{a.host}:{a.port}/v1 ({engine.slots} slots of {engine.max_len} tokens); "
          f"compiling {len(engine.shapes())} programs first (GET /health)", file=sys.stderr, flush=True)
    engine.start()  # compiles every shape, then serves; /v1/models answers once it is done
    http.run()
    if not http.started:
        return _fail(f"could not listen on {a.host}:{a.port}")
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _load(checkpoint: str, revision: str | None):
    """The model and tokenizer of --checkpoint through phi1_jax.loader (its LoadError is reported as one line)."""
    from phi1_jax import loader

    return loader.open(checkpoint, revision)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
