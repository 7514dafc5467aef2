"""phi1_jax.data_gen.llm through the real `openai` client against a local OpenAI-compatible server with injected faults."""

import asyncio
import socket
import time

import pytest

from phi1_jax.data_gen.llm import BudgetExceeded, LLMClient, LLMError
from tests.openai_server import FakeOpenAI


def _ask(client, texts):
    async def run():
        return await asyncio.gather(*(client.complete([{"role": "user", "content": t}]) for t in texts))

    return asyncio.run(run())


def _client(server, tmp_path, **kw):
    return LLMClient(base_url=server.base_url, api_key="test-key", model="test-model", timeout_s=1.0, max_retries=4,
                     cache_path=tmp_path / "cache.sqlite", **kw)


def test_faults_are_retried_until_every_request_succeeds(tmp_path):
    # Requests go one at a time, each taking faults in order: a gets 429 (Retry-After 1 s), 429, 500, then succeeds;
    # b times out (the server hangs past the 1 s timeout), is dropped, then succeeds; c gets a malformed and a
    # truncated reply (retried by the client itself), then succeeds.
    script = ["429:1", "429", "500", "ok", "hang:3", "drop", "ok", "malformed", "truncated"]
    with FakeOpenAI(script) as server:
        client = _client(server, tmp_path, concurrency=1)
        t0 = time.time()
        replies = _ask(client, ["a", "b", "c"])
        assert [r.text for r in replies] == ["echo: a", "echo: b", "echo: c"]
        assert not server.script  # every fault was served and survived
        assert len(server.requests) == 3 + 7 and time.time() - t0 < 60
        assert (client.prompt_tokens, client.completion_tokens) == (300, 150)


def test_cache_means_a_rerun_sends_nothing_again(tmp_path):
    with FakeOpenAI() as server:
        _ask(_client(server, tmp_path), ["x", "y"])
        assert len(server.requests) == 2
        again = _client(server, tmp_path)  # a new process would open the same file
        replies = _ask(again, ["x", "y", "z"])
        assert [r.cached for r in replies] == [True, True, False]
        # x and y went out concurrently, so their arrival order varies; each request arrived exactly once
        assert sorted(r["messages"][0]["content"] for r in server.requests) == ["x", "y", "z"]
        assert again.cache_hits == 2 and again.prompt_tokens == 100  # cached replies cost nothing


def test_budget_stops_cleanly_and_zero_is_refused(tmp_path):
    with FakeOpenAI() as server:
        # 100 prompt + 50 completion tokens at $1 / 1k each = $0.15 a request; a $0.25 budget allows two
        client = _client(server, tmp_path, concurrency=1, budget_usd=0.25, price_in_per_1k=1.0, price_out_per_1k=1.0)
        assert client.estimate_cost(10, 100, 50) == pytest.approx(1.5)
        _ask(client, ["1", "2"])
        with pytest.raises(BudgetExceeded, match="budget of \\$0.25 reached"):
            _ask(client, ["3"])
        assert len(server.requests) == 2
    with pytest.raises(LLMError, match="positive budget"):
        LLMClient(base_url="http://127.0.0.1:9/v1", api_key="k", model="m", budget_usd=0)


def test_errors_that_retrying_cannot_fix(tmp_path):
    with FakeOpenAI(["401"]) as server:
        with pytest.raises(LLMError, match="refused the API key \\(401\\)"):
            _ask(_client(server, tmp_path), ["a"])
    with FakeOpenAI() as server:
        client = LLMClient(base_url=server.base_url, api_key="k", model="no-such-model", max_retries=0)
        with pytest.raises(LLMError, match="has no model 'no-such-model' \\(404\\)"):
            _ask(client, ["a"])
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = LLMClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", model="m", max_retries=1, timeout_s=1)
    with pytest.raises(LLMError, match=f"cannot reach http://127.0.0.1:{port}/v1"):
        _ask(client, ["a"])
