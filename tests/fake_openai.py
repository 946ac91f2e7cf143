"""A fake OpenAI-compatible server on 127.0.0.1, for the judge tests and bench/judge.py.

It answers `POST /v1/chat/completions` in OpenAI's response shape. What it says
is scripted by markers inside the judged answers, so a test chooses behaviour
per comparison without talking to the server:

- `#q=<n>`: the answer's quality; the first marker in the prompt is answer A's,
  the second answer B's (default 5). The reply scores or picks by quality, in
  the format the prompt asks for (a prompt mentioning `[[tie]]` wants a verdict).
- `#fault=<kind>` or `#fault=<kind>*<n>`: misbehave on the first n requests
  with this prompt text (always, without `*n`). Kinds: `429` (with Retry-After),
  `quota` (a 429 for an exhausted account), `500`, `400`, `401` (echoing the key
  back), `slow` (answers after `slow_s`, past the client's timeout), `garbage`
  (unparseable text), `quote` (a verdict reply quoting "[[A]]" before ending with
  its real verdict), `echo` (a valid reply that repeats the Authorization header
  in its explanation), `nousage` (no usage block), `bare` (a scores reply in the
  paper's shape: a first line with only the two numbers, "8 3").

The judged text is the last message's (the user message); `bodies` keeps every
request body (messages, max_tokens, ...) for tests that check what was sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

QUALITY = re.compile(r"#q=(\d+)")
FAULT = re.compile(r"#fault=(\w+)(?:\*(\d+))?")


class FakeOpenAI:
    """Start with `with FakeOpenAI() as server:`; `server.url` is the client's base_url."""

    def __init__(self, *, latency: float = 0.0, retry_after: str = "0.1",
                 slow_s: float = 2.0) -> None:
        self.latency = latency
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.requests = 0
        self.statuses: Counter[int] = Counter()
        self.seen: Counter[str] = Counter()  # prompt hash -> requests
        self.times: dict[str, list[float]] = {}  # fault kind -> request arrival times
        self.in_flight = 0
        self.max_in_flight = 0
        self.tokens = {"prompt": 0, "completion": 0}
        self.bodies: list[dict[str, Any]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real API
            # headers and body go out in two writes: without this, Nagle's algorithm and
            # the client's delayed ACK add ~40 ms to every reply
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return None

            def do_POST(self) -> None:  # noqa: N802
                fake._handle(self)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        # a client that timed out closes its socket: nothing to report
        server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour ----------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = json.loads(handler.rfile.read(length) or b"{}")
        if handler.path.rstrip("/") != "/v1/chat/completions":
            self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
            return
        content = body["messages"][-1]["content"]
        digest = hashlib.sha256(content.encode()).hexdigest()
        fault = FAULT.search(content)
        kind = fault.group(1) if fault else None
        with self.lock:
            self.requests += 1
            self.bodies.append(body)
            self.seen[digest] += 1
            nth = self.seen[digest]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if kind:
                self.times.setdefault(kind, []).append(time.monotonic())
        try:
            if self.latency:
                time.sleep(self.latency)
            active = kind is not None and (fault.group(2) is None  # type: ignore[union-attr]
                                           or nth <= int(fault.group(2)))  # type: ignore[union-attr]
            self._respond(handler, body, content, kind if active else None)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _respond(self, handler: BaseHTTPRequestHandler, body: dict[str, Any], content: str,
                 fault: str | None) -> None:
        auth = handler.headers.get("Authorization", "")
        if fault == "429":
            self._send(handler, 429, {"error": {"message": "Rate limit reached",
                                                "type": "requests"}},
                       {"Retry-After": self.retry_after})
            return
        if fault == "quota":
            self._send(handler, 429, {"error": {"message": "You exceeded your current quota",
                                                "code": "insufficient_quota"}})
            return
        if fault in ("500", "400"):
            self._send(handler, int(fault), {"error": {"message": f"fake {fault}"}})
            return
        if fault == "401":
            self._send(handler, 401, {"error": {"message": f"Incorrect API key provided: "
                                                           f"{auth.removeprefix('Bearer ')}"}})
            return
        if fault == "slow":
            time.sleep(self.slow_s)
        verdict_format = "[[tie]]" in content
        qualities = [int(q) for q in QUALITY.findall(content)[:2]] + [5, 5]
        a, b = qualities[0], qualities[1]
        if fault == "garbage":
            text = "Both replies have merits; I cannot decide.\nThey are fine."
        elif verdict_format:
            token = "[[A]]" if a > b else "[[B]]" if b > a else "[[tie]]"
            text = f"Reply A is {a}/10 and reply B is {b}/10.\n{token}"
            if fault == "quote":
                text = ("Reply A ends by claiming it deserves [[A]], which is not an "
                        "argument.\nOn the merits B is better.\n[[B]]")
        elif fault == "bare":
            text = f"{a} {b}\nReply A is {a}/10 and reply B is {b}/10."
        else:
            text = f"Scores: A={a} B={b}\nReply A is {a}/10 and reply B is {b}/10."
        if fault == "echo":
            text += f"\n(debug: your request carried {auth})"
        prompt_tokens, completion_tokens = len(content) // 4, len(text) // 4
        reply: dict[str, Any] = {
            "id": f"chatcmpl-{self.requests}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
        }
        if fault != "nousage":
            reply["usage"] = {"prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
            with self.lock:
                self.tokens["prompt"] += prompt_tokens
                self.tokens["completion"] += completion_tokens
        self._send(handler, 200, reply)

    def _send(self, handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        with self.lock:
            self.statuses[status] += 1
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): as a real server, carry on
