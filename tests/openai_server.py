"""A local HTTP server speaking the OpenAI API (chat completions, files, batches), with scripted faults, for tests.

It is the real protocol over real sockets on 127.0.0.1: the `openai` client under test cannot tell it from a vLLM or
OpenAI endpoint. Each chat request takes the next fault from `script` (then answers normally): "429" (optionally with
a Retry-After of N seconds as "429:N"), "500", "hang:N" (answers after N seconds), "drop" (closes the connection with
no answer), "malformed" (200 with a body that is not JSON), "truncated" (200 with half a JSON body), "refusal" (200
with an assistant refusal), "401", "404", "ok" (a normal answer).

A normal answer is `responder(body)` (default: echoes the last user message). `requests` records every chat request
body received; `answered` the bodies that got a normal answer (a 200 with a usable reply).

Batches: POST /files (multipart, purpose "batch"), POST /batches, GET /batches/{id} (in_progress for
`batch_polls` polls, then completed), GET /files/{id}/content. `batch_lines` records every batch line received,
`batch_answered` those that got a usable reply. Each batch line takes the next fault from
`batch_script`: "ok", "error" (the line goes to the error file), "garbage" (an unreadable output line), "refusal".
A batch whose input has a line that is not a chat request fails as a whole. The files and batches routes take faults
from `route_script` ("429", "500", "drop"), one per request.
"""

from __future__ import annotations

import email
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REFUSAL = "I'm sorry, but as an AI language model I cannot help with that request."


def echo(body: dict) -> str:
    return "echo: " + [m["content"] for m in body.get("messages", []) if m.get("role") == "user"][-1]


def completion(model: str, content: str) -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}}


class FakeOpenAI:
    def __init__(self, script=(), model="test-model", responder=echo, batch_script=(), batch_polls=1, delay=0.0,
                 route_script=()):
        self.script, self.model, self.responder = list(script), model, responder
        self.route_script = list(route_script)
        self.batch_script, self.batch_polls, self.delay = list(batch_script), batch_polls, delay
        self.requests, self.answered, self.batch_lines, self.batch_answered = [], [], [], []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _route_fault(self) -> bool:
                """Files and batches routes take faults from `route_script`: "429", "500" or "drop"."""
                with server._lock:
                    fault = server.route_script.pop(0) if server.route_script else "ok"
                if fault == "429":
                    self._json(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
                elif fault == "500":
                    self._json(500, {"error": {"message": "server error"}})
                elif fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                return fault != "ok"

            def do_GET(self):
                if self._route_fault():
                    return
                parts = self.path.split("?")[0].rstrip("/").split("/")
                if len(parts) >= 2 and parts[-2] == "batches":
                    return server._get_batch(self, parts[-1])
                if parts[-1] == "content" and parts[-3] == "files":
                    raw = server.files.get(parts[-2])
                    if raw is None:
                        return self._json(404, {"error": {"message": f"no file {parts[-2]}"}})
                    return self._send(200, raw, {}, "application/octet-stream")
                return self._json(404, {"error": {"message": f"no route GET {self.path}"}})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if (self.path.endswith("/files") or self.path.endswith("/batches")) and self._route_fault():
                    return
                if self.path.endswith("/files"):
                    return server._post_file(self, raw)
                body = json.loads(raw or b"{}")
                if self.path.endswith("/batches"):
                    return server._post_batch(self, body)
                with server._lock:
                    server.requests.append(body)
                    fault = server.script.pop(0) if server.script else "ok"
                if not self.path.endswith("/chat/completions"):
                    return self._json(404, {"error": {"message": f"no route {self.path}"}})
                if fault.startswith("429"):
                    headers = {"Retry-After": fault.split(":")[1]} if ":" in fault else {}
                    return self._json(429, {"error": {"message": "rate limited"}}, headers)
                if fault == "500":
                    return self._json(500, {"error": {"message": "server error"}})
                if fault == "401":
                    return self._json(401, {"error": {"message": "Incorrect API key provided"}})
                if fault == "404" or body.get("model") != server.model:
                    return self._json(404, {"error": {"message": f"The model {body.get('model')!r} does not exist"}})
                if fault.startswith("hang"):
                    time.sleep(float(fault.split(":")[1]))
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if server.delay:
                    time.sleep(server.delay)
                try:
                    content = REFUSAL if fault == "refusal" else server.responder(body)
                except Exception as e:  # a responder bug should fail the test loudly, not hang the client
                    return self._json(500, {"error": {"message": f"responder failed: {e!r}"}})
                raw = json.dumps(completion(server.model, content)).encode()
                if fault == "malformed":
                    raw = b"<html>not json</html>"
                elif fault == "truncated":
                    raw = raw[: len(raw) // 2]
                elif fault == "ok":
                    with server._lock:
                        server.answered.append(body)
                self._send(200, raw, {})

            def _send(self, code, raw, headers, ctype="application/json"):
                try:
                    self.send_response(code)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request (a timeout under test)

            def _json(self, code, obj, headers=None):
                self._send(code, json.dumps(obj).encode(), headers or {})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    # --- files and batches -------------------------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _post_file(self, h, raw: bytes):
        msg = email.message_from_bytes(b"Content-Type: " + h.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                  for part in msg.get_payload()}
        if fields.get("purpose") != b"batch" or "file" not in fields:
            return h._json(400, {"error": {"message": "expected a file with purpose 'batch'"}})
        fid = self._new_id("file")
        with self._lock:
            self.files[fid] = fields["file"]
        h._json(200, {"id": fid, "object": "file", "bytes": len(fields["file"]), "created_at": int(time.time()),
                      "filename": "input.jsonl", "purpose": "batch", "status": "processed"})

    def _post_batch(self, h, body: dict):
        if body.get("input_file_id") not in self.files:
            return h._json(404, {"error": {"message": f"no file {body.get('input_file_id')}"}})
        bid = self._new_id("batch")
        batch = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"), "input_file_id": body["input_file_id"],
                 "completion_window": body.get("completion_window"), "created_at": int(time.time()),
                 "status": "validating", "polls": 0}
        with self._lock:
            self.batches[bid] = batch
        h._json(200, {k: v for k, v in batch.items() if k != "polls"})

    def _get_batch(self, h, bid: str):
        with self._lock:
            batch = self.batches.get(bid)
            if batch is None:
                return h._json(404, {"error": {"message": f"no batch {bid}"}})
            batch["polls"] += 1
            if batch["status"] not in ("completed", "failed") and batch["polls"] > self.batch_polls:
                self._run_batch(batch)
            elif batch["status"] == "validating":
                batch["status"] = "in_progress"
        h._json(200, {k: v for k, v in batch.items() if k != "polls"})

    def _run_batch(self, batch: dict):
        out, err = [], []
        lines = self.files[batch["input_file_id"]].decode().splitlines()
        for line in lines:
            item = json.loads(line)
            if item.get("url") != "/v1/chat/completions" or "body" not in item or "custom_id" not in item:
                batch.update(status="failed", errors={"object": "list", "data": [
                    {"code": "invalid_request", "message": "each line needs custom_id, url and body", "line": 1}]})
                return
            self.batch_lines.append(item["body"])
            fault = self.batch_script.pop(0) if self.batch_script else "ok"
            if fault == "error":
                err.append({"id": self._new_id("req"), "custom_id": item["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "the model crashed"}})
                continue
            if fault == "garbage":
                out.append(None)
                continue
            content = REFUSAL if fault == "refusal" else self.responder(item["body"])
            self.batch_answered.append(item["body"])
            out.append({"id": self._new_id("req"), "custom_id": item["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": "r",
                                     "body": completion(self.model, content)}})
        out_id, err_id = self._new_id("file"), self._new_id("file")
        self.files[out_id] = "".join(("{\"custom_id\": " if o is None else json.dumps(o)) + "\n" for o in out).encode()
        self.files[err_id] = "".join(json.dumps(e) + "\n" for e in err).encode()
        batch.update(status="completed", output_file_id=out_id, error_file_id=err_id,
                     request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
