"""The bridge between the app and the Rust ingest engine: lifecycle, commit waits, rule firings, live stream."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from fastapi import FastAPI, WebSocket
from psycopg_pool import AsyncConnectionPool

from webmacs._core import Engine, Receipt
from webmacs.exceptions import DatabaseError, EngineClosedError
from webmacs.repositories import logs as logs_repo
from webmacs.services import webhooks

log = logging.getLogger("webmacs.ingest")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# One process wins a firing: the cooldown is claimed in the database, so several server processes (each
# with its own in-memory cooldown mirror) still fire a rule once per cooldown.
CLAIM_RULE_SQL = """
UPDATE rules SET last_triggered_at = now()
 WHERE id = %(id)s AND enabled
   AND (last_triggered_at IS NULL OR last_triggered_at <= now() - make_interval(secs => cooldown_seconds))
RETURNING user_public_id
"""

_OP_TEXT = {
    "gt": ">",
    "lt": "<",
    "eq": "==",
    "gte": ">=",
    "lte": "<=",
    "between": "between",
    "not_between": "not between",
}


def time_of(us: int) -> datetime:
    """Aware UTC datetime from Unix microseconds (exact, unlike `fromtimestamp` on a float)."""
    return EPOCH + timedelta(microseconds=us)


def rule_log_text(f: dict[str, Any]) -> str:
    op = f["operator"]
    if op in ("between", "not_between"):
        cond = f"{f['value']} {_OP_TEXT[op]} {f['threshold']}..{f['threshold_high']}"
    else:
        cond = f"{f['value']} {_OP_TEXT.get(op, op)} {f['threshold']}"
    return f"Rule '{f['rule']}' triggered: {cond}"


class Ingest:
    """Owns the engine for one app: resolves commit waits from the engine's commit pipe (the engine never
    calls into Python) and turns firings and live points into webhooks, log entries and stream messages."""

    def __init__(self, engine: Engine, pool: AsyncConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.pool = pool
        self.loop = loop
        self.subscribers: set[WebSocket] = set()
        self._fd = engine.commit_fd()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._next_commit: list[asyncio.Future[None]] = []
        self._firings_due = asyncio.Event()
        self._live_due = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def start(self) -> None:
        self.loop.add_reader(self._fd, self._on_commit)
        self._tasks = [
            asyncio.create_task(self._firings_loop(), name="ingest-firings"),
            asyncio.create_task(self._live_loop(), name="ingest-live"),
        ]

    async def close(self) -> None:
        self._closed = True
        self.engine.stop_listening()
        self.loop.remove_reader(self._fd)
        left = await asyncio.to_thread(self.engine.close, 30.0)
        if left:
            log.error("ingest engine closed with %d unwritten rows (never acknowledged)", left)
        self._on_commit()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        # Handle what the last batches produced (firings of committed data).
        with contextlib.suppress(Exception):
            await self._handle_firings(self.engine.drain_firings())
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(EngineClosedError("the ingest engine closed before this data was written"))
        self._waiters.clear()
        for fut in self._next_commit:
            if not fut.done():
                fut.set_exception(EngineClosedError("the ingest engine is closed"))

    # -- commits -------------------------------------------------------------------------------------
    def _on_commit(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._fd, 4096):
                pass
        committed = self.engine.committed_ticket()
        while self._waiters and self._waiters[0][0] <= committed:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
        waiting, self._next_commit = self._next_commit, []
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)
        self._firings_due.set()
        self._live_due.set()

    async def wait_committed(self, ticket: int) -> None:
        """Return once every row of the receipt with this ticket is committed."""
        if ticket <= self.engine.committed_ticket():
            return
        if self._closed:
            raise EngineClosedError("the ingest engine is closed")
        fut: asyncio.Future[None] = self.loop.create_future()
        heapq.heappush(self._waiters, (ticket, next(self._order), fut))
        # The commit may have landed between the check above and registering.
        if ticket <= self.engine.committed_ticket():
            self._on_commit()
        await fut

    async def next_commit(self, timeout: float = 1.0) -> None:  # noqa: ASYNC109 - the bound is this wait's contract
        """Wait for the next commit (room in the queue), at most `timeout` seconds."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self._next_commit.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)

    def submit(self, frame: bytes, *, strict: bool = False) -> Receipt:
        # Called on the loop thread: parsing a 500-point frame takes tens of µs with the GIL released,
        # cheaper than a hop to a worker thread.
        return self.engine.submit(frame, strict)

    async def refresh_catalog(self) -> None:
        try:
            await asyncio.to_thread(self.engine.refresh_catalog)
        except DatabaseError:
            # The change is committed; the LISTEN task reloads once the database answers again.
            log.warning("catalog refresh failed; relying on the webmacs_catalog notification", exc_info=True)

    async def datapoints_deleted(self, event_public_ids: list[str] | None = None) -> None:
        """Call after deleting datapoints outside the engine (by id, by event, by experiment; None = any):
        `GET /datapoints/latest` is served from the engine's cache."""
        await asyncio.to_thread(self.engine.reload_latest, event_public_ids)

    # -- firings -------------------------------------------------------------------------------------
    async def _firings_loop(self) -> None:
        while True:
            await self._firings_due.wait()
            self._firings_due.clear()
            firings = self.engine.drain_firings()
            if not firings:
                continue
            try:
                await self._handle_firings(firings)
            except Exception:
                log.exception("handling %d rule firings / sensor readings failed", len(firings))

    async def _handle_firings(self, firings: list[dict[str, Any]]) -> None:
        if not firings:
            return
        async with self.pool.connection() as conn:
            for f in firings:
                if f["kind"] == "reading":
                    await webhooks.enqueue(conn, event_type="sensor.reading", sensor=f["sensor"], value=f["value"])
                    continue
                cur = await conn.execute(CLAIM_RULE_SQL, {"id": f["rule_id"]})
                claimed = await cur.fetchone()
                if claimed is None:
                    continue  # another process fired it within the cooldown, or the rule is gone
                if f["action_type"] == "webhook":
                    await webhooks.enqueue(
                        conn,
                        event_type=f["webhook_event_type"] or "sensor.threshold_exceeded",
                        sensor=f["sensor"],
                        value=f["value"],
                        rule=f["rule"],
                        operator=f["operator"],
                        threshold=f["threshold"],
                    )
                log.warning("Rule triggered: %s", rule_log_text(f))
                await logs_repo.create(
                    conn, content=rule_log_text(f), logging_type="warning", user_public_id=claimed[0]
                )

    # -- live stream ---------------------------------------------------------------------------------
    async def _live_loop(self) -> None:
        while True:
            await self._live_due.wait()
            self._live_due.clear()
            points = self.engine.drain_broadcast()
            if not points or not self.subscribers:
                continue
            message = orjson.dumps(
                {
                    "type": "datapoints_batch",
                    "datapoints": [
                        {
                            "value": v,
                            "event_public_id": e,
                            "timestamp": time_of(us).isoformat(),
                            "experiment_public_id": x,
                        }
                        for e, v, us, x in points
                    ],
                }
            ).decode()
            await asyncio.gather(*(self._send(ws, message) for ws in list(self.subscribers)))

    async def _send(self, ws: WebSocket, message: str) -> None:
        try:
            await ws.send_text(message)
        except Exception:
            self.subscribers.discard(ws)


def engine_of(app: FastAPI) -> Ingest:
    return cast(Ingest, app.state.ingest)  # app.state is untyped (Starlette's State); set by install()'s start


def install(app: FastAPI) -> None:
    async def start(app: FastAPI) -> None:
        # Engine tuning (max_rows, max_bytes, max_age_ms, queue_capacity, …) may be set before start-up;
        # the defaults suit a single server process.
        settings = app.state.settings
        options: dict[str, Any] = {
            "max_rows": settings.webmacs_ingest_max_rows,
            "max_bytes": settings.webmacs_ingest_max_bytes,
            "max_age_ms": settings.webmacs_ingest_max_age_ms,
            "queue_capacity": settings.webmacs_ingest_queue_capacity,
            "writers": settings.webmacs_ingest_writers,
        }
        options.update(getattr(app.state, "ingest_options", {}))
        engine = await asyncio.to_thread(Engine, app.state.database_url, **options)
        if settings.webmacs_telemetry_listen:
            try:
                bound = await asyncio.to_thread(
                    engine.listen,
                    settings.webmacs_telemetry_listen,
                    secret_key=settings.secret_key_effective,
                    algorithm=settings.algorithm,
                )
            except Exception:
                await asyncio.to_thread(engine.close, 5.0)
                raise
            log.info("native telemetry listener on ws://%s/ws/controller/telemetry", bound)
            app.state.telemetry_listen = bound
        ingest = Ingest(engine, app.state.pool, asyncio.get_running_loop())
        ingest.start()
        app.state.ingest = ingest
        app.state.catalog_refresh = ingest.refresh_catalog

    async def stop(app: FastAPI) -> None:
        ingest: Ingest | None = getattr(app.state, "ingest", None)
        if ingest is not None:
            await ingest.close()

    app.state.startup_hooks.append(start)
    app.state.shutdown_hooks.append(stop)
