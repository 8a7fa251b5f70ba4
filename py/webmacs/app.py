"""The application factory: `create_app(settings)` with a lifespan that owns the pool and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from psycopg_pool import AsyncConnectionPool

import webmacs
from webmacs import logs, openapi, runtime
from webmacs.api.health import router as health_router
from webmacs.api.lineproto import router as lineproto_router
from webmacs.api.metrics import Metrics, MetricsMiddleware
from webmacs.api.metrics import router as metrics_router
from webmacs.api.v1 import api_router
from webmacs.db import POOL_OPTIONS, migrate
from webmacs.db.replicas import ReadRouter
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
from webmacs.runtime import Hook, Runtime
from webmacs.security import hash_password
from webmacs.server import ENGINE_STATE_KEY, install_log_redaction
from webmacs.services import dispatcher, retention
from webmacs.services import ingest as ingest_service
from webmacs.services import lineproto as lineproto_service
from webmacs.services.export import ExportSlots
from webmacs.services.ota import GithubCache
from webmacs.services.plugins import MAX_WHEEL_BYTES
from webmacs.services.sso import SsoState
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


def database_url(settings: Settings) -> str:
    """The configured DATABASE_URL, or the project-managed local cluster (started if needed)."""
    if settings.database_url:
        return settings.database_url
    from webmacs.db.cluster import Cluster

    # In production the local cluster requires a password (no `trust` for every local user).
    return Cluster(settings.webmacs_home, settings.webmacs_db_port, secure=settings.env == "production").up()


# Services that hook into the lifespan: each has `install(runtime)` registering start/stop hooks, run in this order.
SERVICES = [ingest_service.install, lineproto_service.install, dispatcher.install, retention.install]


async def _stop_quietly(stop: Hook, rt: Runtime) -> None:
    try:
        await stop(rt)
    except Exception:  # one service failing to stop must not keep the others running
        log.exception("stopping %s failed", getattr(stop, "__qualname__", stop))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # In every process that serves the app (worker processes configure their logging themselves).
    if settings.webmacs_log_format == "json":
        logs.configure("json")
    install_log_redaction()
    rt = Runtime(
        settings=settings,
        metrics=Metrics(),
        trusted_proxies=TrustedProxies(settings.webmacs_trusted_proxies),
        export_slots=ExportSlots(settings.webmacs_export_concurrency),
        sso=SsoState(),
        retention=retention.RetentionState(),
        ota_github_cache=GithubCache(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        if settings.weak_secret:
            log.warning(DEV_SECRET_WARNING)
        # Whatever has started is stopped in reverse order, however far start-up got.
        async with contextlib.AsyncExitStack() as stack:
            url = await asyncio.to_thread(database_url, settings)
            await asyncio.to_thread(migrate.apply, url, settings.webmacs_chunk_interval)
            pool = AsyncConnectionPool(
                url,
                min_size=1,
                max_size=settings.webmacs_pool_size,
                open=False,
                kwargs={"options": POOL_OPTIONS, "application_name": "webmacs-api"},
                timeout=settings.webmacs_db_timeout_s,
                name="webmacs-api",
            )
            await pool.open(wait=True, timeout=30)
            stack.push_async_callback(pool.close)
            rt.pool_ = pool
            rt.database_url_ = url
            reads = ReadRouter.build(
                pool,
                url,
                settings.webmacs_read_database_url,
                settings.webmacs_read_max_staleness_s,
                settings.webmacs_pool_size,
            )
            await reads.open()
            stack.push_async_callback(reads.close)
            rt.reads_ = reads
            rt.loop_ = asyncio.get_running_loop()
            await _seed(pool, settings)
            purge = asyncio.create_task(_purge_blacklist(pool, settings))
            stack.callback(purge.cancel)
            for start, stop in rt.lifecycle:
                await start(rt)
                stack.push_async_callback(_stop_quietly, stop, rt)
            # Lifespan state reaches uvicorn's protocols: the WebSocket hand-over finds the engine here.
            yield {ENGINE_STATE_KEY: rt.ingest.engine}

    app = FastAPI(
        title="WebMACS-TS",
        version=webmacs.__version__,
        lifespan=lifespan,
        description="Time-series-first, WebMACS-compatible backend.",
    )
    runtime.install(app, rt)
    install_handlers(app)
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(lineproto_router)
    app.include_router(api_router())
    openapi.install(app)
    for install in SERVICES:
        install(rt)
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
    app.add_middleware(RateLimitMiddleware, limit_per_minute=settings.rate_limit_per_minute, rt=rt)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=True,
        allow_methods=["*"],
        allow_headers=["*"],
        max_age=600,
    )
    app.add_middleware(MetricsMiddleware, metrics=rt.metrics)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(logs.AccessLogMiddleware, enabled=settings.webmacs_log_format == "json")
    return app
