"""A local HTTP server speaking the OpenAI chat-completions API, with scripted faults, for tests of data_gen.llm.

It is the real protocol over real sockets on 127.0.0.1: the `openai` client under test cannot tell it from a vLLM or
OpenAI endpoint. Each request takes the next fault from `script` (then answers normally): "429" (optionally with a
Retry-After of N seconds as "429:N"), "500", "hang:N" (answers after N seconds), "drop" (closes the connection with no
answer), "malformed" (200 with a body that is not JSON), "truncated" (200 with half a JSON body), "401", "404", "ok" (a normal answer).
A normal answer echoes the last user message. `requests` records every request body received.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, script=(), model="test-model"):
        self.script, self.model, self.requests = list(script), model, []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
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
                user = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"][-1]
                reply = {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                         "model": server.model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {user}"},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}}
                raw = json.dumps(reply).encode()
                if fault == "malformed":
                    raw = b"<html>not json</html>"
                elif fault == "truncated":
                    raw = raw[: len(raw) // 2]
                self._send(200, raw, {})

            def _send(self, code, raw, headers):
                try:
                    self.send_response(code)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
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

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
