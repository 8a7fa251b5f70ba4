"""Serving the app: uvicorn for HTTP, the Rust engine for WebSockets on the same port.

uvicorn owns the listening socket and parses every request head. When a request is a WebSocket upgrade,
uvicorn hands the connection to its "ws protocol" class with the head it read; ours passes the socket and
that head to the engine (`Engine.adopt_websocket`), which answers the upgrade and serves every frame after it
in Rust. HTTP requests never leave uvicorn; WebSocket frames never reach Python. Several worker processes
share the port the way uvicorn's workers always do (one listening socket, the kernel spreads accepted
connections), and each worker's engine serves the sockets its uvicorn accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from typing import Any, cast

import uvicorn
from fastapi import FastAPI
from uvicorn.supervisors import Multiprocess

log = logging.getLogger("webmacs.server")

#: The key under which the lifespan publishes the engine to uvicorn's protocols (ASGI lifespan state).
ENGINE_STATE_KEY = "webmacs.engine"

_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 20\r\n"
    b"connection: close\r\n\r\nService Unavailable\n"
)


class WebSocketHandoff(asyncio.Protocol):
    """uvicorn's `ws` protocol class: gives the upgraded connection to the engine's WebSocket server."""

    def __init__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        self.app_state = app_state
        self.transport: asyncio.Transport | None = None
        self.handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvicorn serves streams (asyncio's or uvloop's TCP transport, which does not subclass asyncio's).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        # The first call carries the request head uvicorn rebuilt; nothing else arrives before we let go.
        transport = self.transport
        if self.handed_over or transport is None:
            return
        self.handed_over = True
        transport.pause_reading()
        engine = self.app_state.get(ENGINE_STATE_KEY)
        sock = transport.get_extra_info("socket")
        if engine is None or sock is None:
            transport.write(_UNAVAILABLE)
            transport.close()
            return
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            log.warning("cannot hand a WebSocket connection over (out of file descriptors?)")
            transport.abort()
            return
        try:
            # From here the engine owns `fd` (also when this raises).
            engine.adopt_websocket(fd, data)
        except Exception:
            log.warning("the engine refused a WebSocket connection", exc_info=True)
        # Our descriptor closes; the engine's duplicate keeps the connection open (close() of one descriptor
        # of a socket neither sends FIN nor RST while another refers to it).
        transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


#: Query parameters whose values are credentials or one-time secrets (WebSocket tokens, SSO codes and state).
_SECRET_PARAMS = re.compile(r"([?&](?:token|access_token|code|state|password|secret)=)[^&\s\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """The text with secret query-parameter values replaced by `[redacted]`."""
    return _SECRET_PARAMS.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    """Keeps tokens and SSO codes out of the logs: uvicorn's access log prints every request's full path."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) for a in record.args):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    """Attach the redaction to the loggers that print request targets (idempotent)."""
    for name in ("uvicorn.access", "uvicorn.error", "webmacs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


def uvicorn_config(
    app: FastAPI | str, *, host: str, port: int, log_level: str = "info", log_format: str = "text", **kwargs: Any
) -> uvicorn.Config:
    """The uvicorn configuration every way of serving the app uses (CLI, tests, benchmarks). `app` is the app,
    or the import string of its factory (several worker processes each build their own). `log_format` "json":
    uvicorn keeps its hands off the logging (see `webmacs.logs`) and its access line gives way to ours."""
    from webmacs import logs

    if log_format == "json":
        kwargs.setdefault("access_log", False)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws=WebSocketHandoff,
        lifespan="on",
        # Open connections (a long REST ingest wait, an export) get this long to finish on shutdown.
        timeout_graceful_shutdown=10,
        # uvicorn would rewrite the client address from X-Forwarded-For (its last entry); the app decides who
        # the client is itself (spec §15.3's first entry, only from WEBMACS_TRUSTED_PROXIES).
        proxy_headers=False,
        log_config=logs.uvicorn_log_config(log_format),
        **kwargs,
    )
    # uvicorn configured its loggers just now (Config.__init__): filter what they print from here on.
    install_log_redaction()
    return config


def serve(app: FastAPI, *, host: str, port: int, log_level: str = "info", log_format: str = "text") -> None:
    server = uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level, log_format=log_format))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()


def serve_workers(*, workers: int, host: str, port: int, log_level: str = "info", log_format: str = "text") -> None:
    """`workers` server processes on one port: uvicorn binds the socket once and every worker accepts from it
    (the kernel spreads connections). Each worker builds the app from the environment (`create_app`) and runs
    its own engine; WebSocket connections are handed to the engine of the worker that accepted them. What must
    be the same everywhere lives in the database (migrations under an advisory lock, rate limits, login
    failures, SSO codes) or travels through the fan-out (live datapoints, latest values, catalog changes)."""
    config = uvicorn_config(
        "webmacs.app:create_app",
        host=host,
        port=port,
        log_level=log_level,
        log_format=log_format,
        factory=True,
        workers=workers,
    )
    sock = config.bind_socket()
    with contextlib.suppress(KeyboardInterrupt):
        Multiprocess(config, sockets=[sock]).run()
