"""The bridge between the app and the Rust ingest engine: lifecycle, commit waits with deadlines, durable
rule side effects. WebSockets (telemetry and the live stream) are served by the engine itself."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import os
from typing import Any

from psycopg_pool import AsyncConnectionPool

from webmacs._core import Engine, Receipt
from webmacs.exceptions import DatabaseError, EngineClosedError
from webmacs.repositories import logs as logs_repo
from webmacs.repositories import rules as rules_repo
from webmacs.runtime import Runtime
from webmacs.services import webhooks

log = logging.getLogger("webmacs.ingest")
mqtt_log = logging.getLogger("webmacs.mqtt")


_OP_TEXT = {
    "gt": ">",
    "lt": "<",
    "eq": "==",
    "gte": ">=",
    "lte": "<=",
    "between": "between",
    "not_between": "not between",
}


def rule_log_text(f: dict[str, Any]) -> str:
    op = f["operator"]
    if op in ("between", "not_between"):
        cond = f"{f['value']} {_OP_TEXT[op]} {f['threshold']}..{f['threshold_high']}"
    else:
        cond = f"{f['value']} {_OP_TEXT.get(op, op)} {f['threshold']}"
    return f"Rule '{f['rule']}' triggered: {cond}"


class CommitTimeout(Exception):
    """A frame was not written within the deadline (the database is failing or overloaded). Its rows stay
    queued and may still be written: the sender was never told they were stored."""

    def __init__(self, waited_s: float, last_error: str | None) -> None:
        super().__init__(f"not written within {waited_s:g} s")
        self.waited_s = waited_s
        self.last_error = last_error


#: Firings waiting to be recorded at most (a long database outage with rules firing); older ones go first.
MAX_PENDING_FIRINGS = 100_000


class Ingest:
    """Owns the engine for one app: resolves commit waits from the engine's commit pipe (the engine never
    calls into Python) and turns rule firings into webhooks and log entries, retrying until recorded."""

    def __init__(
        self, engine: Engine, pool: AsyncConnectionPool, loop: asyncio.AbstractEventLoop, *, ack_timeout_s: float
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.loop = loop
        self.ack_timeout_s = ack_timeout_s
        self._fd = engine.commit_fd()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._next_commit: list[asyncio.Future[None]] = []
        self._firings_due = asyncio.Event()
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self.firings_dropped = 0
        self.firing_retries = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def start(self) -> None:
        self.loop.add_reader(self._fd, self._on_commit)
        self._tasks = [asyncio.create_task(self._firings_loop(), name="ingest-firings")]
        if self.engine.mqtt_client_id is not None:
            self._tasks.append(asyncio.create_task(self._mqtt_log_loop(), name="ingest-mqtt-log"))

    async def close(self, timeout_s: float) -> None:
        self._closed = True
        self.engine.stop_websockets_now()
        self.loop.remove_reader(self._fd)
        left = await asyncio.to_thread(self.engine.close, timeout_s)
        if left:
            log.error("ingest engine closed with %d unwritten rows (never acknowledged)", left)
        self._on_commit()
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        # Record what the last batches fired (firings of committed data), within the same budget.
        self._take_firings()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._record_pending(), timeout=min(5.0, timeout_s))
        if self._pending:
            log.error("%d rule firings could not be recorded before shutdown", len(self._pending))
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

    async def wait_committed(self, ticket: int, timeout_s: float | None = None) -> None:
        """Return once every row of the receipt with this ticket is committed; CommitTimeout after
        `timeout_s` (default: the configured ack timeout), EngineClosedError if the engine closes first."""
        if ticket <= self.engine.committed_ticket():
            return
        if self._closed:
            raise EngineClosedError("the ingest engine is closed")
        fut: asyncio.Future[None] = self.loop.create_future()
        entry = (ticket, next(self._order), fut)
        heapq.heappush(self._waiters, entry)
        # The commit may have landed between the check above and registering.
        if ticket <= self.engine.committed_ticket():
            self._on_commit()
        limit = self.ack_timeout_s if timeout_s is None else timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(fut), limit)
        except TimeoutError:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise CommitTimeout(limit, self.engine.health()["last_error"]) from None

    async def next_commit(self, timeout: float = 1.0) -> None:  # noqa: ASYNC109 - the bound is this wait's contract
        """Wait for the next commit (room in the queue), at most `timeout` seconds."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self._next_commit.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)

    def submit(self, frame: bytes, *, strict: bool = False, source: int = 0, instance: int | None = None) -> Receipt:
        # Called on the loop thread: parsing a 500-point frame takes tens of µs with the GIL released,
        # cheaper than a hop to a worker thread. `instance`: the sender's token is bound to that plugin instance.
        return self.engine.submit(frame, strict, source, instance)

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
    def _take_firings(self) -> None:
        self._pending.extend(self.engine.drain_firings())
        overflow = len(self._pending) - MAX_PENDING_FIRINGS
        if overflow > 0:
            for _ in range(overflow):
                self._pending.popleft()
            self.firings_dropped += overflow
            log.error("dropped %d unrecorded rule firings (database unavailable for long)", overflow)

    async def _firings_loop(self) -> None:
        backoff = 0.1
        while True:
            if not self._pending:
                await self._firings_due.wait()
            self._firings_due.clear()
            self._take_firings()
            try:
                await self._record_pending()
                backoff = 0.1
            except Exception as e:
                # A pool timeout or a database blip: the firing stays first in line and is tried again.
                self.firing_retries += 1
                log.warning("recording %d rule firings failed, retrying in %.1f s: %s", len(self._pending), backoff, e)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await self._firings_due.wait()
                backoff = min(backoff * 2, 5.0)

    async def _mqtt_log_loop(self) -> None:
        """The MQTT writer's rejections and connection trouble (rate-limited in the engine: no reply channel)."""
        while True:
            for line in self.engine.drain_mqtt_log():
                mqtt_log.warning("%s", line)
            await asyncio.sleep(1.0)

    async def _record_pending(self) -> None:
        """Record pending firings in order, each in its own transaction: a rule's cooldown is claimed in the
        same transaction that writes its log entry and queues its webhooks, so it is consumed only when the
        firing is recorded. A firing leaves the queue only after its transaction committed."""
        if not self._pending:
            return
        async with self.pool.connection(timeout=10) as conn:
            while self._pending:
                f = self._pending[0]
                async with conn.transaction():
                    await self._record(conn, f)
                self._pending.popleft()

    async def _record(self, conn: Any, f: dict[str, Any]) -> None:
        if f["kind"] == "reading":
            await webhooks.enqueue(conn, event_type="sensor.reading", sensor=f["sensor"], value=f["value"])
            return
        claimed = await rules_repo.claim_firing(conn, rule_id=f["rule_id"])
        if claimed is None:
            return  # another process fired it within the cooldown, or the rule is gone
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
            conn, content=rule_log_text(f), logging_type="warning", user_public_id=claimed["user_public_id"]
        )


def fanout_options(settings: Any) -> dict[str, Any]:
    """The engine's fan-out transport: NATS when a URL is configured (unless WEBMACS_FANOUT says otherwise)."""
    if settings.webmacs_nats_url and settings.webmacs_fanout != "off":
        return {"fanout": "nats", "nats_url": settings.webmacs_nats_url}
    return {"fanout": "off" if settings.webmacs_fanout == "nats" else settings.webmacs_fanout}


def mqtt_options(settings: Any) -> dict[str, Any]:
    """The engine's MQTT writer (README "MQTT"); off without WEBMACS_MQTT_URL."""
    if not settings.webmacs_mqtt_url:
        return {}
    return {
        "mqtt_url": settings.webmacs_mqtt_url,
        "mqtt_topics": settings.webmacs_mqtt_topics,
        "mqtt_token": settings.webmacs_mqtt_token,
        "mqtt_client_id": settings.webmacs_mqtt_client_id or None,
        "mqtt_shared": settings.webmacs_mqtt_shared,
        "mqtt_error_topic": settings.webmacs_mqtt_error_topic or None,
    }


def install(rt: Runtime) -> None:
    async def start(rt: Runtime) -> None:
        # Engine tuning (max_rows, max_bytes, max_age_ms, queue_capacity, …) may be set before start-up
        # (`rt.ingest_options`); the defaults suit a single server process.
        settings = rt.settings
        options: dict[str, Any] = {
            "max_rows": settings.webmacs_ingest_max_rows,
            "max_bytes": settings.webmacs_ingest_max_bytes,
            "max_age_ms": settings.webmacs_ingest_max_age_ms,
            "queue_capacity": settings.webmacs_ingest_queue_capacity,
            "writers": settings.webmacs_ingest_writers,
            "source_share": settings.webmacs_ingest_source_share,
            "write_timeout_s": settings.webmacs_ingest_write_timeout_s,
            "max_frame_bytes": settings.webmacs_ingest_max_frame_bytes,
            **fanout_options(settings),
            **mqtt_options(settings),
        }
        options.update(rt.ingest_options)
        ws_options: dict[str, Any] = {"recheck_s": settings.webmacs_ws_recheck_s}
        ws_options.update(rt.ws_options)
        engine = await asyncio.to_thread(Engine, rt.database_url, **options)
        try:
            bound = await asyncio.to_thread(
                engine.serve_websockets,
                secret_key=settings.secret_key_effective,
                algorithm=settings.algorithm,
                listen=settings.webmacs_telemetry_listen or None,
                **ws_options,
            )
        except Exception:
            await asyncio.to_thread(engine.close, 5.0)
            raise
        if bound:
            log.info("engine WebSocket listener on ws://%s (also served on the API's port)", bound)
            rt.telemetry_listen = bound
        ingest = Ingest(
            engine, rt.pool, asyncio.get_running_loop(), ack_timeout_s=settings.webmacs_ingest_ack_timeout_s
        )
        ingest.start()
        rt.ingest_ = ingest
        rt.catalog_refresh = ingest.refresh_catalog

    async def stop(rt: Runtime) -> None:
        if rt.ingest_ is not None:
            await rt.ingest_.close(rt.settings.webmacs_shutdown_timeout_s)

    rt.lifecycle.append((start, stop))
