"""Log output: plain text or one JSON object per line (`WEBMACS_LOG_FORMAT`), with the request's context."""

from __future__ import annotations

import contextvars
import logging
import math
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webmacs.server import redact

#: The id of the HTTP request being served (also its `X-Request-ID`); None outside a request.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("webmacs_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Fields a record may carry (`extra=`) that go into its JSON object as they are.
_CONTEXT_FIELDS = ("route", "method", "path", "status", "duration_ms", "user_id", "client")
access_log = logging.getLogger("webmacs.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, and the request's fields when known.

    The message is redacted here as well as by the loggers' filters: a filter on a logger does not see records
    that its children propagate, a formatter sees every record it prints."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for field in _CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                out[field] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps({k: _plain(v) for k, v in out.items()}).decode()


_INT64 = range(-(1 << 63), 1 << 63)


def _plain(value: Any) -> Any:
    """A value orjson encodes: text without lone surrogates (they are not UTF-8), integers of 64 bits, finite
    floats; anything else as its text. A log line must never be lost to what a client sent."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in _INT64:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return _plain(str(value))


def configure(log_format: str, level: int | str = logging.INFO) -> None:
    """Send every logger's records (uvicorn's included) to one stderr handler in the chosen format. Idempotent;
    called by `webmacs` (the CLI) and by `create_app` for JSON (worker processes build the app themselves)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    if log_format == "json":
        # uvicorn's own handlers print text; let its records reach the root handler instead.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True


def uvicorn_log_config(log_format: str) -> dict[str, Any] | None:
    """What uvicorn is given as `log_config`: its own (text) configuration, or none for JSON, where `configure`
    already routed every record to the JSON handler (uvicorn would otherwise put its text handlers back)."""
    if log_format != "json":
        from uvicorn.config import LOGGING_CONFIG

        return LOGGING_CONFIG
    return None


class AccessLogMiddleware:
    """Sets the request id for every log line of a request and, in JSON mode, writes one access record per
    HTTP request: route template, status, duration and the authenticated user (uvicorn's access line has
    neither the route nor the duration; it is off in JSON mode)."""

    def __init__(self, app: ASGIApp, *, enabled: bool) -> None:
        self.app = app
        self.enabled = enabled
        #: Full path templates by route: FastAPI's scope names the route as its router declared it, without the
        #: prefixes of the routers that include it.
        self._templates: dict[int, str] | None = None

    def _template(self, scope: Scope) -> str | None:
        route = scope.get("route")
        if route is None:
            return None
        if self._templates is None:
            from fastapi.routing import iter_route_contexts

            app = scope.get("app")
            contexts = iter_route_contexts(getattr(app, "routes", []))
            self._templates = {id(c.original_route): str(c.path_format) for c in contexts if c.path_format}
        return self._templates.get(id(route)) or getattr(route, "path", None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid: str = scope.setdefault("webmacs.request_id", _new_request_id())
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it answers

        async def send_tracking(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        finally:
            if self.enabled:
                self._log(scope, status, (time.perf_counter() - started) * 1000.0)
            request_id.reset(token)

    def _log(self, scope: Scope, status: int, duration_ms: float) -> None:
        template = self._template(scope)
        state = scope.get("state") or {}
        client = scope.get("client")
        method = scope.get("method", "")
        path = scope.get("path", "")
        query = scope.get("query_string", b"")
        target = path + ("?" + query.decode("latin-1") if query else "")
        access_log.info(
            "%s %s %d",
            method,
            redact(target),
            status,
            extra={
                "route": template,
                "method": method,
                "path": target,
                "status": status,
                "duration_ms": round(duration_ms, 3),
                "user_id": state.get("user_id"),
                "client": client[0] if client else None,
            },
        )


def _new_request_id() -> str:
    import uuid

    return str(uuid.uuid4())
