"""The datapoints hypertable's retention and compression (TimescaleDB policies or our drop_chunks) and its storage."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

# One dropper among several server processes sharing the database.
_LOCK_KEY = 7765627


async def license_of(conn: AsyncConnection) -> str:
    """The TimescaleDB edition's license: "timescale" (policies available) or "apache"."""
    cur = await conn.execute("SELECT coalesce(current_setting('timescaledb.license', true), 'apache')")
    row = await cur.fetchone()
    return str(row[0]) if row else "apache"


async def try_drop_lock(conn: AsyncConnection) -> bool:
    """Whether this transaction now holds the drop job's lock (False: another process runs the job)."""
    cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_KEY,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def drop_chunks_older_than(conn: AsyncConnection, *, days: int) -> int:
    """Drop the datapoints chunks entirely older than `days`; how many were dropped."""
    cur = await conn.execute(
        "SELECT count(*) FROM drop_chunks('datapoints', older_than => now() - make_interval(days => %s))",
        (days,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def drop_cells_without_chunks(conn: AsyncConnection, *, width: timedelta) -> int:
    """Delete the datapoint cells (`width` wide) that end before the oldest chunk starts (their datapoints
    were dropped: by our job or by a retention policy inside the database); how many. One snapshot: a chunk
    and cells committed after it are not seen, so not deleted."""
    cur = await conn.execute(
        "DELETE FROM datapoint_cells WHERE cell + %s::interval <= coalesce((SELECT min(range_start)"
        " FROM timescaledb_information.chunks WHERE hypertable_schema = current_schema()"
        " AND hypertable_name = 'datapoints'), 'infinity')",
        (width,),
    )
    return cur.rowcount


async def policy_config(conn: AsyncConnection, *, proc_name: str) -> tuple[int, str] | None:
    """The datapoints job running `proc_name` as (job_id, config as JSON text); None without one."""
    cur = await conn.execute(
        "SELECT job_id, config::text FROM timescaledb_information.jobs"
        " WHERE proc_name = %s AND hypertable_schema = current_schema() AND hypertable_name = 'datapoints'",
        (proc_name,),
    )
    row = await cur.fetchone()
    return (int(row[0]), str(row[1])) if row else None


async def remove_retention_policy(conn: AsyncConnection) -> None:
    await conn.execute("SELECT remove_retention_policy('datapoints', if_exists => true)")


async def add_retention_policy(conn: AsyncConnection, *, days: int) -> None:
    """A retention policy dropping chunks older than `days`, unless one exists already."""
    await conn.execute(
        "SELECT add_retention_policy('datapoints', drop_after => make_interval(days => %s), if_not_exists => true)",
        (days,),
    )


async def compression_enabled(conn: AsyncConnection) -> bool:
    cur = await conn.execute(
        "SELECT compression_enabled FROM timescaledb_information.hypertables"
        " WHERE hypertable_schema = current_schema() AND hypertable_name = 'datapoints'"
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def enable_compression(conn: AsyncConnection) -> None:
    # Segment by channel, ordered by time: the shape of the (event_id, time) unique index, which compressed
    # chunks must still enforce. Only once: it cannot change while chunks are compressed.
    await conn.execute(
        "ALTER TABLE datapoints SET (timescaledb.compress, timescaledb.compress_segmentby = 'event_id',"
        " timescaledb.compress_orderby = 'time')"
    )


async def remove_compression_policy(conn: AsyncConnection) -> None:
    await conn.execute("SELECT remove_compression_policy('datapoints', if_exists => true)")


async def add_compression_policy(conn: AsyncConnection, *, days: int) -> None:
    """A compression policy compressing chunks older than `days`, unless one exists already."""
    await conn.execute(
        "SELECT add_compression_policy('datapoints', compress_after => make_interval(days => %s),"
        " if_not_exists => true)",
        (days,),
    )


async def storage(conn: AsyncConnection) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """What `GET /admin/storage` reports of the hypertable: its size, row estimate, TimescaleDB version and
    license, chunk interval; its chunks' count and span; its jobs."""
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
    return head, chunks, await cur.fetchall()
