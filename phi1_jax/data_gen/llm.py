"""The LLM client for data generation: OpenAI, or any OpenAI-compatible server (vLLM, TGI, llama.cpp), via `openai`.

    client = LLMClient(base_url="http://localhost:8000/v1", api_key="...", model="gpt-3.5-turbo",
                       concurrency=16, cache_path="out/llm_cache.sqlite", budget_usd=20.0,
                       price_in_per_1k=0.0005, price_out_per_1k=0.0015)
    reply = asyncio.run(client.complete([{"role": "user", "content": "Write a textbook section on loops."}]))

- Retries are the `openai` package's own: connection errors, timeouts, 408, 409, 429 and 5xx are retried with
  exponential backoff and jitter, honouring `Retry-After`, up to `max_retries` times; `timeout_s` bounds each attempt
  (the package's default of 600 s is far too long for generation jobs). Replies that arrive but cannot be read
  (malformed or truncated JSON, no text) are retried here, `max_retries` times too.
- Concurrency is bounded by a semaphore; calls are async.
- Every finished request is cached in SQLite, keyed by a hash of the request's content (model, messages, sampling
  parameters). A rerun finds it there and never sends it again: interrupted jobs resume without paying twice.
- Token usage is counted from the server's `usage`. With prices set, `estimate_cost` says what a run would cost before
  it starts, and `budget_usd` is a hard stop: once spent reaches it, further requests raise `BudgetExceeded` (cached
  replies are still served). A budget of 0 is refused up front.
- The OpenAI Batch API mode (half price) is phi1_jax/data_gen/batch.py: its results land in this client's request cache, so
  the code that reads replies is the same in both modes.
- Errors that retrying cannot fix (bad API key, unknown model, unreachable server) raise `LLMError` with the cause.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path

import openai

from phi1_jax.errors import UserError


class LLMError(UserError, RuntimeError):
    """A request that cannot succeed; the message says why (server, key, model)."""


class BudgetExceeded(RuntimeError):
    """The run's spending limit is reached; no further requests are sent. A planned stop, not an error (and not a
    UserError): the commands report it as "stopped", keep what was paid for, exit 3, and a rerun continues."""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool


class RequestCache:
    """SQLite {sha256 of the request: reply}, safe to share between threads; writes are committed one by one."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()

    @staticmethod
    def key(request: dict) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, reply: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, json.dumps(reply)))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


def resolve_api_key(api_key: str | None, base_url: str | None) -> str:
    """--api-key, else $OPENAI_API_KEY, else a placeholder when --base-url names a local server (which needs none)."""
    key = api_key or os.environ.get("OPENAI_API_KEY") or ("EMPTY" if base_url else None)
    if key is None:
        raise LLMError("no API key: set $OPENAI_API_KEY or --api-key (or point --base-url at a local server)")
    return key


class LLMClient:
    def __init__(self, *, base_url: str | None, api_key: str, model: str, concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 6, cache_path: str | Path | None = None,
                 budget_usd: float | None = None, price_in_per_1k: float = 0.0, price_out_per_1k: float = 0.0):
        if budget_usd is not None and budget_usd <= 0:
            raise LLMError(f"budget_usd={budget_usd}: a run needs a positive budget (or none)")
        if concurrency < 1:
            raise LLMError(f"concurrency={concurrency}: must be at least 1")
        self.base_url, self.model = base_url, model
        self.max_retries = max_retries
        self.budget_usd, self.price_in, self.price_out = budget_usd, price_in_per_1k, price_out_per_1k
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s,
                                          max_retries=max_retries)
        self._cache = RequestCache(cache_path) if cache_path else None
        self._concurrency = concurrency
        self._semaphore: asyncio.Semaphore | None = None
        self.prompt_tokens = self.completion_tokens = self.requests_sent = self.cache_hits = 0
        self.batch_prompt_tokens = self.batch_completion_tokens = 0
        self._api_key, self._timeout_s = api_key, timeout_s

    @property
    def concurrency(self) -> int:
        return self._concurrency

    def open_cache(self, path: str | Path) -> None:
        """Use (or create) the request cache at `path` from now on."""
        self._cache = RequestCache(path)

    # --- money -------------------------------------------------------------------------------------------------------

    @property
    def spent_usd(self) -> float:
        live = self.prompt_tokens / 1000 * self.price_in + self.completion_tokens / 1000 * self.price_out
        batch = self.batch_prompt_tokens / 1000 * self.price_in + self.batch_completion_tokens / 1000 * self.price_out
        return live + 0.5 * batch

    def estimate_cost(self, n_requests: int, prompt_tokens: int, completion_tokens: int) -> float:
        """What `n_requests` of about this size would cost at the configured prices."""
        return n_requests * (prompt_tokens / 1000 * self.price_in + completion_tokens / 1000 * self.price_out)

    # --- requests ----------------------------------------------------------------------------------------------------

    def request(self, messages: list[dict], *, temperature: float = 1.0, max_tokens: int = 1024,
                seed: int | None = None) -> dict:
        req = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            req["seed"] = seed
        return req

    def cached(self, messages: list[dict], **params) -> Completion | None:
        """The cached reply to this request, or None: never sends anything (the Batch API mode reads results so)."""
        if self._cache is None or (hit := self._cache.get(RequestCache.key(self.request(messages, **params)))) is None:
            return None
        self.cache_hits += 1
        return Completion(hit["text"], hit["prompt_tokens"], hit["completion_tokens"], cached=True)

    async def complete(self, messages: list[dict], **params) -> Completion:
        req = self.request(messages, **params)
        key = RequestCache.key(req)
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            self.cache_hits += 1
            return Completion(hit["text"], hit["prompt_tokens"], hit["completion_tokens"], cached=True)
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._concurrency)
        async with self._semaphore:
            if self.budget_usd is not None and self.spent_usd >= self.budget_usd:
                raise BudgetExceeded(f"budget of ${self.budget_usd:.2f} reached (spent ${self.spent_usd:.4f}); "
                                     "stopping before sending more requests")
            reply = await self._send(req)
        self.prompt_tokens += reply["prompt_tokens"]
        self.completion_tokens += reply["completion_tokens"]
        if self._cache is not None:
            self._cache.put(key, reply)
        return Completion(reply["text"], reply["prompt_tokens"], reply["completion_tokens"], cached=False)

    def explain(self, e: openai.APIError) -> LLMError:
        """An `openai` error that retrying did not fix, as an LLMError that says what is wrong where."""
        where = self.base_url or "api.openai.com"
        if isinstance(e, openai.AuthenticationError):
            return LLMError(f"{where} refused the API key (401): {_message(e)}")
        if isinstance(e, openai.PermissionDeniedError):
            return LLMError(f"{where} denied access (403): {_message(e)}")
        if isinstance(e, openai.NotFoundError):
            return LLMError(f"{where} has no model {self.model!r} (404): {_message(e)}")
        if isinstance(e, openai.BadRequestError):
            return LLMError(f"{where} rejected the request (400): {_message(e)}")
        if isinstance(e, openai.APITimeoutError):
            return LLMError(f"{where}: no reply within the timeout after {self.max_retries} retries")
        if isinstance(e, openai.APIConnectionError):
            return LLMError(f"cannot reach {where} after {self.max_retries} retries ({e.__cause__ or e})")
        if isinstance(e, openai.APIStatusError):
            return LLMError(f"{where} answered {e.status_code} after {self.max_retries} retries: {_message(e)}")
        return LLMError(f"{where}: {e}")

    def sync_client(self) -> openai.OpenAI:
        """A blocking client with the same endpoint, key, timeout and retries (for the Batch API's file calls)."""
        return openai.OpenAI(base_url=self.base_url, api_key=self._api_key, timeout=self._timeout_s,
                             max_retries=self.max_retries)

    def add_batch_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Tokens used through the Batch API, which costs half the listed price."""
        self.batch_prompt_tokens += prompt_tokens
        self.batch_completion_tokens += completion_tokens

    def store(self, key: str, reply: dict) -> None:
        """Cache a reply obtained elsewhere (a batch's output file) under its request's key (`RequestCache.key`)."""
        self._cache.put(key, reply)

    async def _send(self, req: dict) -> dict:
        where = self.base_url or "api.openai.com"
        for attempt in range(self.max_retries + 1):
            self.requests_sent += 1
            try:
                resp = await self._client.chat.completions.create(**req)
            except openai.APIError as e:
                if isinstance(e, openai.APIResponseValidationError):
                    continue  # a reply that cannot be parsed: ask again
                raise self.explain(e) from None
            except (json.JSONDecodeError, ValueError, TypeError):
                continue  # a reply that cannot be parsed: ask again
            if (reply := reply_of(resp)) is not None:
                return reply
        raise LLMError(f"{where}: {self.max_retries + 1} replies in a row could not be read (malformed or empty)")


def reply_of(resp) -> dict | None:
    """{text, prompt_tokens, completion_tokens} of a chat completion (an object or its JSON dict); None if unreadable."""
    if isinstance(resp, dict):
        try:
            text, usage = resp["choices"][0]["message"]["content"], resp.get("usage") or {}
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        except (KeyError, IndexError, TypeError, AttributeError):
            return None
    else:
        text, usage = _text(resp), getattr(resp, "usage", None)
        prompt, completion = getattr(usage, "prompt_tokens", 0), getattr(usage, "completion_tokens", 0)
    if not isinstance(text, str):
        return None
    return {"text": text, "prompt_tokens": int(prompt or 0), "completion_tokens": int(completion or 0)}


def _text(resp) -> str | None:
    try:
        text = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


def _message(e: openai.APIStatusError) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    err = body.get("error", body) if isinstance(body, dict) else {}
    return str(err.get("message") if isinstance(err, dict) and err.get("message") else e)[:300]
