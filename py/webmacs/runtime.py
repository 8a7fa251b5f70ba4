"""What a running app holds, typed: one `Runtime` per app, built by `create_app` and filled in by its lifespan.

Starlette's `app.state` is untyped; it carries exactly one attribute, `runtime`, read in exactly one place
(`of`). Routers reach it through `deps.RuntimeDep` and the typed dependencies built on it; services are handed
it (their `install(runtime)` registers start/stop hooks that receive it too).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from starlette.applications import Starlette

from webmacs.settings import Settings

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from webmacs.api.metrics import Metrics
    from webmacs.db.replicas import ReadRouter
    from webmacs.middleware import TrustedProxies
    from webmacs.services.dispatcher import Dispatcher
    from webmacs.services.export import ExportSlots
    from webmacs.services.ingest import Ingest
    from webmacs.services.lineproto import LineProtocol
    from webmacs.services.ota import GithubCache
    from webmacs.services.retention import RetentionState
    from webmacs.services.sso import SsoState

T = TypeVar("T")

#: A service's start or stop hook.
Hook = Callable[["Runtime"], Awaitable[None]]


async def _no_catalog() -> None:
    return None


class NotStarted(RuntimeError):
    """A part of the runtime the lifespan sets up was used before start-up or after shut-down."""


@dataclass(eq=False)
class Runtime:
    settings: Settings
    metrics: Metrics
    trusted_proxies: TrustedProxies
    export_slots: ExportSlots
    sso: SsoState
    retention: RetentionState
    ota_github_cache: GithubCache
    started_at: float = field(default_factory=time.monotonic)
    #: (start, stop) pairs of the services, started in this order by the lifespan and stopped in reverse.
    lifecycle: list[tuple[Hook, Hook]] = field(default_factory=list)
    #: Engine and WebSocket tuning merged over the settings' at start-up (tests shrink queues with it).
    ingest_options: dict[str, Any] = field(default_factory=dict)
    ws_options: dict[str, Any] = field(default_factory=dict)
    #: Re-reads the ingest catalog snapshot after a committed write (see deps.CatalogWrites); the engine's once
    #: it runs.
    catalog_refresh: Callable[[], Awaitable[None]] = _no_catalog
    #: Set by the lifespan and the services' start hooks.
    pool_: AsyncConnectionPool | None = None
    database_url_: str | None = None
    reads_: ReadRouter | None = None
    ingest_: Ingest | None = None
    #: The loop serving the app: other threads hand it work with run_coroutine_threadsafe.
    loop_: asyncio.AbstractEventLoop | None = None
    #: Where the engine's own telemetry listener is bound (WEBMACS_TELEMETRY_LISTEN), if it has one.
    telemetry_listen: str | None = None
    lineproto_: LineProtocol | None = None
    webhook_dispatcher: Dispatcher | None = None

    @property
    def pool(self) -> AsyncConnectionPool:
        return _started(self.pool_, "pool")

    @property
    def database_url(self) -> str:
        return _started(self.database_url_, "database_url")

    @property
    def reads(self) -> ReadRouter:
        return _started(self.reads_, "reads")

    @property
    def ingest(self) -> Ingest:
        return _started(self.ingest_, "ingest")

    @property
    def lineproto(self) -> LineProtocol:
        return _started(self.lineproto_, "lineproto")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return _started(self.loop_, "loop")


def _started(value: T | None, what: str) -> T:
    if value is None:
        raise NotStarted(f"{what} is not available before start-up")
    return value


def install(app: Starlette, runtime: Runtime) -> None:
    app.state.runtime = runtime


def of(app: Starlette) -> Runtime:
    """The app's runtime (the one untyped look-up)."""
    return cast(Runtime, app.state.runtime)
