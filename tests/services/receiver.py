"""A real HTTP receiver on 127.0.0.1 for webhook and download tests: records requests, answers as scripted."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    #: Seconds to wait before answering (a slow or hanging receiver).
    delay: float = 0.0


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.default = Reply()
        self.cond = threading.Condition()
        self.inflight = 0
        self.max_inflight = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver.cond:
                    receiver.requests.append(
                        Recorded(self.command, self.path, dict(self.headers.items()), body, time.monotonic())
                    )
                    reply = receiver.replies.popleft() if receiver.replies else receiver.default
                    receiver.inflight += 1
                    receiver.max_inflight = max(receiver.max_inflight, receiver.inflight)
                    receiver.cond.notify_all()
                try:
                    if reply.delay:
                        time.sleep(reply.delay)
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up (timeout tests); nothing to answer
                finally:
                    with receiver.cond:
                        receiver.inflight -= 1

            do_GET = do_POST = do_PUT = _handle  # noqa: N815 - http.server's naming

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def script(self, *replies: Reply) -> None:
        with self.cond:
            self.replies.extend(replies)

    def wait(self, n: int, timeout: float = 15) -> list[Recorded]:
        """Block until at least `n` requests arrived (bounded); returns all so far."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"receiver got {len(self.requests)} requests, expected {n}")
                self.cond.wait(left)
            return list(self.requests)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
