"""Pure-ASGI middleware of spec §15: X-Request-ID on every HTTP response, and the per-client rate limit."""

from __future__ import annotations

import time
import uuid
from collections import deque

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestIdMiddleware:
    """Every HTTP response gets a fresh `X-Request-ID` (an incoming one is ignored, as the reference)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = str(uuid.uuid4()).encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


_PRIVATE_PREFIXES = ("10.", "127.", "192.168.", *(f"172.{n}." for n in range(16, 32)))
_EXEMPT_PATHS = ("/ws", "/health", "/api/v1/ota")
_TOO_MANY = orjson.dumps({"detail": "Too many requests. Please try again later."})


class RateLimitMiddleware:
    """Sliding 60 s window of accepted requests per client key (spec §15.3), in memory, per process."""

    def __init__(self, app: ASGIApp, limit_per_minute: int) -> None:
        self.app = app
        self.limit = limit_per_minute
        self.window = 60.0
        self.hits: dict[str, deque[float]] = {}
        self._last_prune = time.monotonic()

    @staticmethod
    def client_key(scope: Scope) -> str:
        headers: dict[bytes, bytes] = {k.lower(): v for k, v in scope.get("headers", [])}
        xff = headers.get(b"x-forwarded-for")
        if xff:
            first = xff.decode("latin-1").split(",")[0].strip()
            if first:
                return first
        real = headers.get(b"x-real-ip")
        if real:
            return real.decode("latin-1").strip()
        client: tuple[str, int] | None = scope.get("client")
        return client[0] if client else "unknown"

    def exempt(self, scope: Scope, key: str) -> bool:
        path: str = scope["path"]
        if path.startswith(_EXEMPT_PATHS):
            return True
        if path.startswith("/api/v1/datapoints") and scope["method"] in ("GET", "POST"):
            return True
        return key.startswith(_PRIVATE_PREFIXES)

    def _prune(self, now: float) -> None:
        cutoff = now - self.window
        for key in [k for k, q in self.hits.items() if not q or q[-1] < cutoff]:
            del self.hits[key]
        self._last_prune = now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = self.client_key(scope)
        if self.exempt(scope, key):
            await self.app(scope, receive, send)
            return
        now = time.monotonic()
        if now - self._last_prune > self.window:
            self._prune(now)
        q = self.hits.setdefault(key, deque())
        cutoff = now - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if len(q) >= self.limit:
            await send(
                {
                    "type": "http.response.start",
                    "status": 429,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"retry-after", b"60"),
                        (b"content-length", str(len(_TOO_MANY)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _TOO_MANY})
            return
        q.append(now)
        await self.app(scope, receive, send)
