"""Datapoint retention (policy or our own drop_chunks job) and the storage report of `GET /admin/storage`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from webmacs.runtime import Runtime
from webmacs.settings import Settings

log = logging.getLogger("webmacs.retention")

JOB_INTERVAL_S = 3600
# One dropper among several server processes sharing the database.
_LOCK_KEY = 7765627


@dataclass
class RetentionState:
    #: "policy" (TimescaleDB job), "job" (our hourly drop_chunks task) or "off".
    mode: str = "off"
    license: str | None = None
    last_run: datetime | None = None
    last_dropped: int | None = None
    task: asyncio.Task[None] | None = None


async def license_of(conn: AsyncConnection) -> str:
    cur = await conn.execute("SELECT coalesce(current_setting('timescaledb.license', true), 'apache')")
    row = await cur.fetchone()
    return str(row[0]) if row else "apache"


async def drop_expired(pool: AsyncConnectionPool, *, days: int) -> int | None:
    """Drop the datapoints chunks entirely older than `days`; the number dropped, or None when another
    process holds the job."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_KEY,))
        row = await cur.fetchone()
        if not row or not row[0]:
            return None
        cur = await conn.execute(
            "SELECT count(*) FROM drop_chunks('datapoints', older_than => now() - make_interval(days => %s))",
            (days,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def _job(rt: Runtime, days: int) -> None:
    state = rt.retention
    while True:
        try:
            dropped = await drop_expired(rt.pool, days=days)
            state.last_run = datetime.now(UTC)
            if dropped is not None:
                state.last_dropped = dropped
                if dropped:
                    log.info("retention: dropped %d chunk(s) older than %d days", dropped, days)
        except Exception:
            log.exception("retention job failed")
        await asyncio.sleep(JOB_INTERVAL_S)


async def _policy_config(conn: AsyncConnection, proc_name: str) -> tuple[int, str] | None:
    cur = await conn.execute(
        "SELECT job_id, config::text FROM timescaledb_information.jobs"
        " WHERE proc_name = %s AND hypertable_schema = current_schema() AND hypertable_name = 'datapoints'",
        (proc_name,),
    )
    row = await cur.fetchone()
    return (int(row[0]), str(row[1])) if row else None


async def apply_policies(conn: AsyncConnection, *, retention_days: int | None, compress_after_days: int | None) -> None:
    """Timescale-License edition: make the retention and compression policies match the settings (created or
    replaced when their interval differs; left alone when unset)."""
    if retention_days is not None:
        wanted = f"{retention_days} days"
        current = await _policy_config(conn, "policy_retention")
        if current is not None and f'"drop_after": "{wanted}"' not in current[1]:
            await conn.execute("SELECT remove_retention_policy('datapoints', if_exists => true)")
        await conn.execute(
            "SELECT add_retention_policy('datapoints', drop_after => make_interval(days => %s), if_not_exists => true)",
            (retention_days,),
        )
    if compress_after_days is not None:
        cur = await conn.execute(
            "SELECT compression_enabled FROM timescaledb_information.hypertables"
            " WHERE hypertable_schema = current_schema() AND hypertable_name = 'datapoints'"
        )
        row = await cur.fetchone()
        if not (row and row[0]):
            # Segment by channel, ordered by time: the shape of the (event_id, time) unique index, which
            # compressed chunks must still enforce. Only once: it cannot change while chunks are compressed.
            await conn.execute(
                "ALTER TABLE datapoints SET (timescaledb.compress, timescaledb.compress_segmentby = 'event_id',"
                " timescaledb.compress_orderby = 'time')"
            )
        wanted = f"{compress_after_days} days"
        current = await _policy_config(conn, "policy_compression")
        if current is not None and f'"compress_after": "{wanted}"' not in current[1]:
            await conn.execute("SELECT remove_compression_policy('datapoints', if_exists => true)")
        await conn.execute(
            "SELECT add_compression_policy('datapoints', compress_after => make_interval(days => %s),"
            " if_not_exists => true)",
            (compress_after_days,),
        )


def install(rt: Runtime) -> None:
    async def start(rt: Runtime) -> None:
        settings = rt.settings
        state = rt.retention
        async with rt.pool.connection() as conn:
            state.license = await license_of(conn)
            if state.license == "timescale":
                await apply_policies(
                    conn,
                    retention_days=settings.webmacs_retention_days,
                    compress_after_days=settings.webmacs_compress_after_days,
                )
                state.mode = "policy" if settings.webmacs_retention_days else "off"
                return
        if settings.webmacs_compress_after_days:
            log.warning("WEBMACS_COMPRESS_AFTER_DAYS needs the Timescale-License edition; compression stays off")
        if settings.webmacs_retention_days:
            state.mode = "job"
            state.task = asyncio.create_task(_job(rt, settings.webmacs_retention_days), name="webmacs-retention")

    async def stop(rt: Runtime) -> None:
        task = rt.retention.task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    rt.lifecycle.append((start, stop))


class StorageJob(BaseModel):
    job_id: int | None
    kind: str
    schedule_interval: str
    config: dict[str, Any] | None
    next_start: datetime | None


class StorageReport(BaseModel):
    hypertable: str
    size_bytes: int
    chunks: int
    row_estimate: int
    chunk_interval: str | None
    oldest_chunk_start: datetime | None
    newest_chunk_end: datetime | None
    timescaledb_version: str
    license: str
    retention_days: int | None
    retention_mode: str
    compress_after_days: int | None
    retention_last_run: datetime | None
    retention_last_dropped: int | None
    jobs: list[StorageJob]


async def storage_report(conn: AsyncConnection, settings: Settings, state: RetentionState) -> StorageReport:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT hypertable_size('datapoints') AS size_bytes, approximate_row_count('datapoints') AS rows,"
        " (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS version,"
        " coalesce(current_setting('timescaledb.license', true), 'apache') AS license,"
        " (SELECT time_interval::text FROM timescaledb_information.dimensions"
        "   WHERE hypertable_schema = current_schema() AND hypertable_name = 'datapoints' LIMIT 1) AS interval"
    )
    head = await cur.fetchone()
    assert head is not None  # an aggregate-free SELECT without FROM always returns one row
    await cur.execute(
        "SELECT count(*) AS n, min(range_start) AS oldest, max(range_end) AS newest"
        " FROM timescaledb_information.chunks WHERE hypertable_schema = current_schema()"
        " AND hypertable_name = 'datapoints'"
    )
    chunks = await cur.fetchone()
    assert chunks is not None
    await cur.execute(
        "SELECT job_id, proc_name, schedule_interval::text AS schedule, config, next_start"
        " FROM timescaledb_information.jobs"
        " WHERE hypertable_schema = current_schema() AND hypertable_name = 'datapoints' ORDER BY job_id"
    )
    jobs = [
        StorageJob(
            job_id=r["job_id"],
            kind=r["proc_name"],
            schedule_interval=r["schedule"],
            config=r["config"],
            next_start=r["next_start"],
        )
        for r in await cur.fetchall()
    ]
    if state.mode == "job":
        jobs.append(
            StorageJob(
                job_id=None,
                kind="webmacs_drop_chunks",
                schedule_interval=f"{JOB_INTERVAL_S} seconds",
                config={"drop_after": f"{settings.webmacs_retention_days} days"},
                next_start=None,
            )
        )
    return StorageReport(
        hypertable="datapoints",
        size_bytes=int(head["size_bytes"] or 0),
        chunks=int(chunks["n"]),
        row_estimate=max(0, int(head["rows"] or 0)),
        chunk_interval=head["interval"],
        oldest_chunk_start=chunks["oldest"],
        newest_chunk_end=chunks["newest"],
        timescaledb_version=head["version"],
        license=head["license"],
        retention_days=settings.webmacs_retention_days,
        retention_mode=state.mode,
        compress_after_days=settings.webmacs_compress_after_days,
        retention_last_run=state.last_run,
        retention_last_dropped=state.last_dropped,
        jobs=jobs,
    )
