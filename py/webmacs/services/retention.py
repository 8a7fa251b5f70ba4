"""Datapoint retention (policy or our own drop_chunks job), the upkeep of the datapoint cells, and the storage
report of `GET /admin/storage`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from webmacs import _core
from webmacs.repositories import retention as retention_repo
from webmacs.repositories import series as series_repo
from webmacs.runtime import Runtime
from webmacs.settings import Settings

log = logging.getLogger("webmacs.retention")

JOB_INTERVAL_S = 3600
#: The cells' upkeep (sql/0041) runs this often: it merges the partial rows of the cells of the last
#: CELLS_RECENT (one per transaction that wrote into a cell, so a busy cell gains one a batch); every
#: CELLS_FULL_EVERY runs, and at start, it merges every cell and drops the cells that retention left without
#: datapoints. Every process runs it; two runs wait for each other (an advisory lock) and merge each
#: partial row once.
CELLS_INTERVAL_S = 60
CELLS_RECENT = timedelta(hours=2)
CELLS_FULL_EVERY = 60
#: Cells merged per transaction.
CELLS_BATCH = 20_000


@dataclass
class RetentionState:
    #: "policy" (TimescaleDB job), "job" (our hourly drop_chunks task) or "off".
    mode: str = "off"
    license: str | None = None
    last_run: datetime | None = None
    last_dropped: int | None = None
    task: asyncio.Task[None] | None = None
    cells_task: asyncio.Task[None] | None = None


async def drop_expired(pool: AsyncConnectionPool, *, days: int) -> int | None:
    """Drop the datapoints chunks entirely older than `days`; the number dropped, or None when another
    process holds the job."""
    async with pool.connection() as conn, conn.transaction():
        if not await retention_repo.try_drop_lock(conn):
            return None
        return await retention_repo.drop_chunks_older_than(conn, days=days)


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


async def maintain_cells(pool: AsyncConnectionPool, *, full: bool) -> int:
    """Merge the cells' partial rows (of the recent cells, or of all when `full`; then also drop the cells
    older than the oldest chunk); returns how many cells were merged."""
    since = None if full else datetime.now(UTC) - CELLS_RECENT
    merged = 0
    while True:
        async with pool.connection() as conn, conn.transaction():
            n = await series_repo.compact_cells(conn, since=since, max_cells=CELLS_BATCH)
        merged += n
        if n < CELLS_BATCH:
            break
    if full:
        async with pool.connection() as conn:
            await retention_repo.drop_cells_without_chunks(conn, width=timedelta(microseconds=_core.CELL_US))
    return merged


async def _cells_job(rt: Runtime) -> None:
    runs = 0
    while True:
        try:
            await maintain_cells(rt.pool, full=runs % CELLS_FULL_EVERY == 0)
        except Exception:
            log.exception("datapoint cells upkeep failed")
        runs += 1
        await asyncio.sleep(CELLS_INTERVAL_S)


async def apply_policies(conn: AsyncConnection, *, retention_days: int | None, compress_after_days: int | None) -> None:
    """Timescale-License edition: make the retention and compression policies match the settings (created or
    replaced when their interval differs; left alone when unset)."""
    if retention_days is not None:
        wanted = f"{retention_days} days"
        current = await retention_repo.policy_config(conn, proc_name="policy_retention")
        if current is not None and f'"drop_after": "{wanted}"' not in current[1]:
            await retention_repo.remove_retention_policy(conn)
        await retention_repo.add_retention_policy(conn, days=retention_days)
    if compress_after_days is not None:
        if not await retention_repo.compression_enabled(conn):
            # Only once: the segmenting cannot change while chunks are compressed.
            await retention_repo.enable_compression(conn)
        wanted = f"{compress_after_days} days"
        current = await retention_repo.policy_config(conn, proc_name="policy_compression")
        if current is not None and f'"compress_after": "{wanted}"' not in current[1]:
            await retention_repo.remove_compression_policy(conn)
        await retention_repo.add_compression_policy(conn, days=compress_after_days)


def install(rt: Runtime) -> None:
    async def start(rt: Runtime) -> None:
        settings = rt.settings
        state = rt.retention
        state.cells_task = asyncio.create_task(_cells_job(rt), name="webmacs-cells")
        async with rt.pool.connection() as conn:
            state.license = await retention_repo.license_of(conn)
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
        for task in (rt.retention.task, rt.retention.cells_task):
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
    head, chunks, job_rows = await retention_repo.storage(conn)
    jobs = [
        StorageJob(
            job_id=r["job_id"],
            kind=r["proc_name"],
            schedule_interval=r["schedule"],
            config=r["config"],
            next_start=r["next_start"],
        )
        for r in job_rows
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
