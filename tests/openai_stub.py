"""A controllable OpenAI-compatible endpoint for tests: the request's ``model`` picks how it
misbehaves, so one server covers every failure mode.

| model | answer |
|---|---|
| ``ok`` | 200, echoes the last user message, 3 token log-probs, usage |
| ``flaky`` | 500 for the first 2 calls of each prompt, then as ``ok`` |
| ``ratelimit`` | 429 (Retry-After: 0) for the first call of each prompt, then as ``ok`` |
| ``down`` | 500 forever |
| ``slow`` | sleeps ``slow_s`` seconds, then as ``ok`` |
| ``garbage`` | 200 with a body that is not JSON (an HTML page that echoes the bearer token) |
| ``nochoices`` | 200 with JSON that has no ``choices`` |
| ``unauthorized`` | 401 whose message echoes the bearer token (as OpenAI echoes a masked key) |
| ``bad`` | 400 |
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

LOGPROBS = [-0.5, -1.0, -1.5]


class StubServer(ThreadingHTTPServer):
    daemon_threads = True          # a handler still sleeping (``slow``) never blocks shutdown

    def __init__(self, slow_s: float = 1.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.slow_s = slow_s
        self.calls: Counter[tuple[str, str]] = Counter()     # (model, last user message) -> calls
        self.requests: list[dict] = []                       # bodies and auth headers, in order
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def n_calls(self, model: str) -> int:
        return sum(n for (m, _), n in self.calls.items() if m == model)

    def __enter__(self) -> Self:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: StubServer

    def log_message(self, format: str, *args: object) -> None:     # keep test output quiet
        pass

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model, prompt = body["model"], body["messages"][-1]["content"]
        auth = self.headers.get("Authorization")
        with self.server.lock:
            self.server.calls[(model, prompt)] += 1
            n = self.server.calls[(model, prompt)]
            self.server.requests.append({"body": body, "authorization": auth})
        if model == "flaky" and n <= 2 or model == "down":
            return self._send(500, {"error": {"message": "internal error"}})
        if model == "ratelimit" and n == 1:
            return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
        if model == "slow":
            time.sleep(self.server.slow_s)
        if model == "garbage":
            return self._send_raw(200, f"<html>502 Bad Gateway ({auth})</html>".encode(), "text/html")
        if model == "nochoices":
            return self._send(200, {"object": "chat.completion", "choices": []})
        if model == "unauthorized":
            return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth}"}})
        if model == "bad":
            return self._send(400, {"error": {"message": "max_tokens is too large"}})
        self._send(200, _completion(model, f"echo: {prompt}"))

    def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_raw(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):   # the client timed out and left
            pass


def _completion(model: str, text: str) -> dict:
    return {"id": "stub-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": [{"token": f"t{i}", "logprob": lp, "bytes": None, "top_logprobs": []}
                                                  for i, lp in enumerate(LOGPROBS)]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": len(LOGPROBS), "total_tokens": 5 + len(LOGPROBS)}}
