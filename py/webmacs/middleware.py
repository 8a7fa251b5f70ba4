"""Pure-ASGI middleware: X-Request-ID on every HTTP response and the per-client rate limit (spec §15), the
request-body limit, and who the client is (`X-Forwarded-For` only from trusted proxies)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webmacs import runtime


class RequestIdMiddleware:
    """Every HTTP response gets a fresh `X-Request-ID` (an incoming one is ignored, as the reference)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # One id per request, shared with the log lines (webmacs.logs.AccessLogMiddleware may have made it).
        rid = str(scope.setdefault("webmacs.request_id", str(uuid.uuid4()))).encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


_PRIVATE_PREFIXES = ("10.", "127.", "192.168.", *(f"172.{n}." for n in range(16, 32)))
_EXEMPT_PATHS = ("/ws", "/health", "/metrics", "/api/v1/ota")
_TOO_MANY = orjson.dumps({"detail": "Too many requests. Please try again later."})


class TrustedProxies:
    """Which peers may say who the client is. The spec's key (first `X-Forwarded-For` entry, else `X-Real-IP`)
    is honoured only when the TCP peer is one of these networks; anyone else could name any address (and pick
    the rate-limit exemption of private addresses, or dodge the failed-login throttle)."""

    def __init__(self, networks: list[str]) -> None:
        self.networks = [ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()]

    def trusts(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in n for n in self.networks)

    def client(self, scope: Scope) -> str:
        peer: tuple[str, int] | None = scope.get("client")
        peer_host = peer[0] if peer else "unknown"
        if not self.trusts(peer_host):
            return peer_host
        headers: dict[bytes, bytes] = {k.lower(): v for k, v in scope.get("headers", [])}
        xff = headers.get(b"x-forwarded-for")
        if xff:
            first = xff.decode("latin-1").split(",")[0].strip()
            if first:
                return first[:64]
        real = headers.get(b"x-real-ip")
        if real:
            return real.decode("latin-1").strip()[:64] or peer_host
        return peer_host


def client_address(request: Request) -> str:
    """The client's address as the rate limit and the login throttle see it."""
    return runtime.of(request.app).trusted_proxies.client(request.scope)


class RateLimitMiddleware:
    """Sliding 60 s window of accepted requests per client key (spec §15.3), counted in the database so that
    every server process counts the same requests (WebMACS counts per process). A database that does not
    answer lets requests through: the limit protects the API, it must not take it down."""

    def __init__(self, app: ASGIApp, limit_per_minute: int, rt: runtime.Runtime) -> None:
        self.app = app
        self.rt = rt
        self.limit = limit_per_minute
        self.window = 60.0
        self._last_prune = time.monotonic()

    def client_key(self, scope: Scope) -> str:
        return self.rt.trusted_proxies.client(scope)

    def exempt(self, scope: Scope, key: str) -> bool:
        path: str = scope["path"]
        if path.startswith(_EXEMPT_PATHS):
            return True
        if path.startswith("/api/v1/datapoints") and scope["method"] in ("GET", "POST"):
            return True
        if path in ("/write", "/api/v2/write") and scope["method"] == "POST":
            return True  # ingest, like the datapoints routes
        return key.startswith(_PRIVATE_PREFIXES)

    async def _accepted(self, scope: Scope, key: str) -> bool:
        from webmacs.repositories import rate_limit as rate_limit_repo

        pool = self.rt.pool_
        if pool is None:  # not started yet
            return True
        try:
            async with asyncio.timeout(2.0), pool.connection(timeout=2.0) as conn:
                now = time.monotonic()
                if now - self._last_prune > self.window:
                    self._last_prune = now
                    await rate_limit_repo.prune(conn, window_s=self.window)
                return await rate_limit_repo.hit(conn, client=key, limit=self.limit, window_s=self.window)
        except Exception:  # fail open: the database being away is reported elsewhere, not by refusing requests
            return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = self.client_key(scope)
        if self.exempt(scope, key) or await self._accepted(scope, key):
            await self.app(scope, receive, send)
            return
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


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body passes its limit: FastAPI lets HTTPExceptions through its own body
    parsing (anything else it would turn into a 400), so the client gets the 413."""

    def __init__(self) -> None:
        super().__init__(413, "Request body too large.")


_TOO_LARGE = orjson.dumps({"detail": "Request body too large."})


class BodyLimitMiddleware:
    """Refuse request bodies over a limit while reading them, before parsing and before authentication (413).

    The limit depends on who asks for what: requests without credentials get `anonymous` bytes (a login body
    has no business being larger), ingest routes the engine's frame cap, uploads their own caps, everything else
    `default`. A declared Content-Length over the limit is refused before a byte is read; a chunked body is cut
    off as soon as it passes the limit."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        anonymous: int,
        default: int,
        ingest: int,
        uploads: dict[str, int],
    ) -> None:
        self.app = app
        self.anonymous = anonymous
        self.default = default
        self.ingest = ingest
        self.uploads = uploads

    def limit(self, scope: Scope) -> int:
        path: str = scope["path"]
        for prefix, cap in self.uploads.items():
            if path.startswith(prefix):
                return cap
        if not any(k.lower() == b"authorization" for k, _ in scope.get("headers", [])):
            return self.anonymous
        if path.startswith(("/api/v1/datapoints", "/api/v2/write", "/write")):
            return self.ingest
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        declared = next((v for k, v in scope.get("headers", []) if k.lower() == b"content-length"), None)
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = False  # h11/httptools refuse a malformed Content-Length before we are called
            if too_large:
                await _send_json(send, 413, _TOO_LARGE)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, _TOO_LARGE)


async def _send_json(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_TOO_SLOW = orjson.dumps({"detail": "The database did not answer in time; retry later."})


class RequestDeadlineMiddleware:
    """No request waits forever: a handler that has not started its response within `seconds` (a database that
    stopped answering mid-query, a pool with every connection stuck) is cancelled and answered 503. Streaming
    responses that have started (exports) are left to their own bounds."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds
        self.timed_out = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = asyncio.Event()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        waiter = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({task, waiter}, timeout=self.seconds, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not started.is_set():
                self.timed_out += 1
                task.cancel()
                # The cancelled handler may itself wait on the network a little; it gets a short grace.
                await asyncio.wait({task}, timeout=2)
                if not started.is_set():
                    await _send_json(send, 503, _TOO_SLOW, [(b"retry-after", b"5")])
                return
            await task
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
