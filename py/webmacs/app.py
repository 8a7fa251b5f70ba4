"""The application factory: `create_app(settings)` with a lifespan that owns the pool and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any, Protocol, cast

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from psycopg_pool import AsyncConnectionPool

import webmacs
from webmacs.api.health import router as health_router
from webmacs.api.lineproto import router as lineproto_router
from webmacs.api.metrics import Metrics, MetricsMiddleware
from webmacs.api.metrics import router as metrics_router
from webmacs.api.v1 import api_router
from webmacs.db import migrate
from webmacs.errors import install_handlers
from webmacs.middleware import (
    BodyLimitMiddleware,
    RateLimitMiddleware,
    RequestDeadlineMiddleware,
    RequestIdMiddleware,
    TrustedProxies,
)
from webmacs.repositories import logs as logs_repo
from webmacs.repositories import users as users_repo
from webmacs.security import hash_password
from webmacs.server import ENGINE_STATE_KEY, install_log_redaction
from webmacs.services.export import ExportSlots
from webmacs.services.plugins import MAX_WHEEL_BYTES
from webmacs.settings import DEFAULT_ADMIN_PASSWORD, DEV_SECRET_WARNING, Settings

log = logging.getLogger("webmacs")


async def _seed(pool: AsyncConnectionPool, settings: Settings) -> None:
    """Create the initial admin when there are no users; write the start-up log entry (spec §3.9)."""
    async with pool.connection() as conn:
        await conn.execute("SELECT pg_advisory_xact_lock(7765626)")  # one seeder among concurrent processes
        if await users_repo.count(conn) == 0:
            if settings.env == "production" and settings.initial_admin_password == DEFAULT_ADMIN_PASSWORD:
                raise RuntimeError(
                    "ENV=production: refusing to create the initial admin with the default password; "
                    "set INITIAL_ADMIN_PASSWORD"
                )
            ph = await asyncio.to_thread(hash_password, settings.initial_admin_password, settings.webmacs_bcrypt_rounds)
            await users_repo.create(
                conn,
                email=settings.initial_admin_email.strip(),
                username=settings.initial_admin_username,
                password_hash=ph,
                role="admin",
            )
            log.info("seeded initial admin %s", settings.initial_admin_email)
        admin = await users_repo.first_admin(conn)
        await logs_repo.create(
            conn,
            content=f"WebMACS Backend v{webmacs.__version__} started.",
            logging_type="info",
            user_public_id=admin["public_id"] if admin else None,
        )


async def _purge_blacklist(pool: AsyncConnectionPool, settings: Settings) -> None:
    """Hourly: forget blacklisted JWTs that have expired anyway."""
    while True:
        await asyncio.sleep(3600)
        try:
            async with pool.connection() as conn:
                cutoff = datetime.now(UTC) - timedelta(minutes=settings.access_token_expire_minutes)
                await users_repo.purge_blacklist(conn, older_than=cutoff)
                await users_repo.purge_login_failures(conn, older_than_s=settings.webmacs_login_window_s)
        except Exception:
            log.exception("blacklist purge failed")


async def _no_catalog() -> None:
    return None


def database_url(settings: Settings) -> str:
    """The configured DATABASE_URL, or the project-managed local cluster (started if needed)."""
    if settings.database_url:
        return settings.database_url
    from webmacs.db.cluster import Cluster

    # In production the local cluster requires a password (no `trust` for every local user).
    return Cluster(settings.webmacs_home, settings.webmacs_db_port, secure=settings.env == "production").up()


# Services that hook into the lifespan: each module has `install(app)` registering start/stop hooks.
SERVICE_MODULES = [
    "webmacs.services.ingest",
    "webmacs.services.lineproto",
    "webmacs.services.dispatcher",
    "webmacs.services.retention",
]


class _ServiceModule(Protocol):
    def install(self, app: FastAPI) -> None: ...


def _modules(names: list[str]) -> list[ModuleType]:
    import importlib

    return [importlib.import_module(n) for n in names]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # In every process that serves the app (worker processes configure their logging themselves).
    install_log_redaction()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if settings.weak_secret:
            log.warning(DEV_SECRET_WARNING)
        url = await asyncio.to_thread(database_url, settings)
        await asyncio.to_thread(migrate.apply, url, settings.webmacs_chunk_interval)
        pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=settings.webmacs_pool_size,
            open=False,
            kwargs={"options": "-c timezone=UTC", "application_name": "webmacs-api"},
            timeout=settings.webmacs_db_timeout_s,
            name="webmacs-api",
        )
        await pool.open(wait=True, timeout=30)
        app.state.pool = pool
        app.state.database_url = url
        app.state.loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        try:
            await _seed(pool, settings)
            tasks.append(asyncio.create_task(_purge_blacklist(pool, settings)))
            for hook in app.state.startup_hooks:
                await hook(app)
            # Lifespan state reaches uvicorn's protocols: the WebSocket hand-over finds the engine here.
            yield {ENGINE_STATE_KEY: app.state.ingest.engine}
        finally:
            for hook in reversed(app.state.shutdown_hooks):
                with contextlib.suppress(Exception):
                    await hook(app)
            for t in tasks:
                t.cancel()
            await pool.close()

    app = FastAPI(
        title="WebMACS-TS",
        version=webmacs.__version__,
        lifespan=lifespan,
        description="Time-series-first, WebMACS-compatible backend.",
    )
    app.state.settings = settings
    app.state.started_at = time.monotonic()
    # Services register start/stop hooks here (engine, webhook dispatcher, retention…).
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []
    # Replaced by the ingest engine at start-up: re-reads its catalog snapshot (see deps.catalog_changed).
    app.state.catalog_refresh = _no_catalog
    install_handlers(app)
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(lineproto_router)
    app.state.metrics = Metrics()
    app.include_router(api_router())
    for module in _modules(SERVICE_MODULES):
        cast(_ServiceModule, module).install(app)
    app.state.trusted_proxies = TrustedProxies(settings.webmacs_trusted_proxies)
    app.state.export_slots = ExportSlots(settings.webmacs_export_concurrency)
    # Outermost first per spec §15: Request-ID → CORS → rate limit → body limit → deadline → app (add_middleware
    # prepends).
    app.add_middleware(
        RequestDeadlineMiddleware,
        seconds=max(settings.webmacs_request_timeout_s, settings.webmacs_ingest_ack_timeout_s + 5),
    )
    app.add_middleware(
        BodyLimitMiddleware,
        anonymous=settings.webmacs_body_limit_anonymous,
        default=settings.webmacs_body_limit_default,
        ingest=settings.webmacs_ingest_max_frame_bytes,
        # Uploads check their own caps (with their own messages); this is the backstop, multipart framing included.
        uploads={
            "/api/v1/ota/upload": settings.webmacs_ota_max_bundle_bytes + (1 << 20),
            "/api/v1/plugins/packages/upload": MAX_WHEEL_BYTES + (1 << 20),
        },
    )
    app.add_middleware(
        RateLimitMiddleware, limit_per_minute=settings.rate_limit_per_minute, proxies=app.state.trusted_proxies
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
        max_age=600,
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)
    return app
