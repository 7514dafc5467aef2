"""The OpenAI Batch API mode: half the price, results within the completion window (24 h).

A round writes the requests as JSONL (`{custom_id, method, url, body}`; custom_id is the request's cache key), uploads
it with purpose "batch", creates the batch, and records its id in a state file *before* waiting, so a killed run
resumes polling instead of paying again. When the batch ends (completed, expired or cancelled), the output file's
replies go into the LLMClient's request cache; the error file's failures and unreadable lines do not, so the caller
resubmits those in its next round. A batch the server rejects as a whole ("failed": bad input) is an error.
Inputs are split at 50,000 requests or 190 MB per batch (the API's limits are 50,000 and 200 MB).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
from tqdm import tqdm

from phi1_jax.data_gen.llm import BudgetExceeded, LLMClient, LLMError, RequestCache, reply_of
from phi1_jax import files

ENDPOINT = "/v1/chat/completions"
MAX_REQUESTS, MAX_BYTES = 50_000, 190 * 2**20
DONE = ("completed", "failed", "expired", "cancelled")


class BatchRunner:
    def __init__(self, client: LLMClient, state_path: Path, *, poll_interval: float = 30.0, progress: bool = True):
        self.client, self.state_path = client, Path(state_path)
        self.poll_interval, self.progress = poll_interval, progress
        self._api = client.sync_client()
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"batches": []}

    def _save(self) -> None:
        files.write_text(self.state_path, json.dumps(self.state, indent=2) + "\n", durable=True)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except openai.APIError as e:
            raise self.client.explain(e) from None

    # --- submit ------------------------------------------------------------------------------------------------------

    def _affordable(self, requests: list[dict]) -> list[dict]:
        c = self.client
        if c.budget_usd is None:
            return requests
        per_request = [0.5 * c.estimate_cost(1, len(json.dumps(r["messages"])) / 4, r.get("max_tokens", 1024))
                       for r in requests]
        left, n = c.budget_usd - c.spent_usd, 0
        while n < len(requests) and per_request[n] <= left:
            left -= per_request[n]
            n += 1
        if n == 0:
            raise BudgetExceeded(f"budget of ${c.budget_usd:.2f} reached (spent ${c.spent_usd:.4f}); "
                                 "the next batch would exceed it")
        return requests[:n]

    def _chunks(self, requests: list[dict]):
        lines, size = [], 0
        for r in requests:
            line = json.dumps({"custom_id": RequestCache.key(r), "method": "POST", "url": ENDPOINT, "body": r}) + "\n"
            if lines and (len(lines) >= MAX_REQUESTS or size + len(line) > MAX_BYTES):
                yield lines
                lines, size = [], 0
            lines.append(line)
            size += len(line)
        if lines:
            yield lines

    def submit(self, requests: list[dict]) -> list[str]:
        """Upload and create batches for these requests (cut to what the budget allows); returns their ids."""
        ids = []
        for lines in self._chunks(self._affordable(requests)):
            path = self.state_path.parent / f"batch_input_{len(self.state['batches']):04d}.jsonl"
            path.write_text("".join(lines))
            with path.open("rb") as f:
                uploaded = self._call(self._api.files.create, file=f, purpose="batch")
            batch = self._call(self._api.batches.create, input_file_id=uploaded.id, endpoint=ENDPOINT,
                               completion_window="24h")
            self.state["batches"].append({"id": batch.id, "input_file_id": uploaded.id, "requests": len(lines),
                                          "collected": False})
            self._save()  # from here a rerun polls this batch instead of submitting it again
            path.unlink()
            ids.append(batch.id)
        return ids

    # --- wait and collect --------------------------------------------------------------------------------------------

    def wait(self, batch_id: str):
        with tqdm(desc=f"batch {batch_id}", unit="req", disable=not self.progress, dynamic_ncols=True) as bar:
            while True:
                b = self._call(self._api.batches.retrieve, batch_id)
                counts = getattr(b, "request_counts", None)
                if counts is not None and getattr(counts, "total", None):
                    bar.total = counts.total
                    bar.n = (counts.completed or 0) + (counts.failed or 0)
                    bar.refresh()
                if b.status in DONE:
                    return b
                time.sleep(self.poll_interval)

    def _read_file(self, file_id: str | None) -> list[str]:
        if not file_id:
            return []
        return self._call(self._api.files.content, file_id).text.splitlines()

    def collect(self, entry: dict) -> int:
        """Cache the replies of one ended batch; returns how many were usable."""
        b = self.wait(entry["id"])
        if b.status == "failed" and not getattr(b, "output_file_id", None):
            errors = getattr(getattr(b, "errors", None), "data", None) or []
            said = "; ".join(f"{getattr(e, 'code', '')}: {getattr(e, 'message', e)}" for e in errors) or "no reason given"
            raise LLMError(f"batch {entry['id']} failed as a whole: {said}")
        good = 0
        requests = {}
        for line in self._read_file(getattr(b, "output_file_id", None)):
            try:
                item = json.loads(line)
                key, response = item["custom_id"], item.get("response") or {}
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # an unreadable line: that request is simply asked again next round
            reply = reply_of(response.get("body")) if response.get("status_code") == 200 else None
            if reply is None:
                continue
            requests[key] = reply
        for key, reply in requests.items():
            self.client.store(key, reply)
            self.client.add_batch_usage(reply["prompt_tokens"], reply["completion_tokens"])
            good += 1
        errors = self._read_file(getattr(b, "error_file_id", None))
        entry.update(collected=True, status=b.status, usable=good, failed=len(errors))
        if errors:
            entry["first_error"] = _error_message(errors[0])
        self._save()
        return good

    def last_error(self) -> str | None:
        """The first error message of the most recent batch that had failures (for the caller's error message)."""
        for e in reversed(self.state["batches"]):
            if e.get("first_error"):
                return e["first_error"]
        return None

    def resume(self) -> int:
        """Collect every batch an earlier run submitted but did not collect."""
        return sum(self.collect(e) for e in self.state["batches"] if not e["collected"])

    def submit_and_collect(self, requests: list[dict]) -> int:
        self.submit(requests)
        return self.resume()


def _error_message(line: str) -> str:
    try:
        item = json.loads(line)
        err = item.get("error") or (item.get("response") or {}).get("body", {}).get("error") or {}
        return str(err.get("message") or err)[:300]
    except (json.JSONDecodeError, AttributeError, TypeError):
        return line[:300]
