"""Export reads: the chunk windows, the binary COPY statements read in Rust, lookups, the experiment CSV rows."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection

# Each hypertable chunk is one window, read with one COPY ordered by time: PostgreSQL sorts one chunk at a time
# (never the whole range) and each chunk is read once. Memory is bounded by the frame size, not the chunk size.
_CHUNKS = (
    "SELECT range_start, range_end, CASE WHEN NOT is_compressed"
    " THEN pg_relation_size(format('%%I.%%I', chunk_schema, chunk_name)::regclass) END"
    " FROM timescaledb_information.chunks"
    " WHERE hypertable_schema = current_schema() AND hypertable_name = 'datapoints'"
    " AND (%(end)s::timestamptz IS NULL OR range_start < %(end)s)"
    " AND (%(start)s::timestamptz IS NULL OR range_end > %(start)s)"
    " ORDER BY range_start"
)
# Raw columns in binary COPY: `time` arrives as int8 µs since 2000-01-01 and is shifted in Rust (no per-row
# epoch arithmetic in PostgreSQL); names, units and public ids become Arrow dictionaries, not a join per row.
_SELECT = "SELECT time, event_id, value, experiment_id FROM datapoints"
# Ordered by time only: rows of equal time are put in event order by the Rust reader (`ties_by_event`), because
# PostgreSQL sorts on one int8 key about twice as fast as on (time, event_id) — measured on 333k-row chunks.
# (Reading event by event through the (event_id, time) index needs no sort but visits every heap page once per
# event when the events' rows are interleaved, as ingest writes them: slower still.)
EVENTS_QUERY = _SELECT + " WHERE event_id = ANY(%(events)s) AND time >= %(start)s AND time < %(end)s ORDER BY time"
# Rows are selected by their experiment tag only, as in the experiment CSV (spec §13): client timestamps may lie
# outside the experiment's span. No index on experiment_id: one sequential pass per chunk.
EXPERIMENT_QUERY = (
    _SELECT + " WHERE experiment_id = %(experiment)s AND time >= %(start)s AND time < %(end)s ORDER BY time"
)
EVENTS_COPY = "COPY (" + EVENTS_QUERY + ") TO STDOUT (FORMAT binary)"
EXPERIMENT_COPY = "COPY (" + EXPERIMENT_QUERY + ") TO STDOUT (FORMAT binary)"
# The same rows unordered, for chunks small enough to be sorted by the Rust reader (`sort=True`): PostgreSQL
# streams a chunk about 3× faster when it does not sort it.
EVENTS_QUERY_UNORDERED = _SELECT + " WHERE event_id = ANY(%(events)s) AND time >= %(start)s AND time < %(end)s"
EXPERIMENT_QUERY_UNORDERED = _SELECT + " WHERE experiment_id = %(experiment)s AND time >= %(start)s AND time < %(end)s"
EVENTS_COPY_UNORDERED = "COPY (" + EVENTS_QUERY_UNORDERED + ") TO STDOUT (FORMAT binary)"
EXPERIMENT_COPY_UNORDERED = "COPY (" + EXPERIMENT_QUERY_UNORDERED + ") TO STDOUT (FORMAT binary)"

# Rows are selected by their experiment tag only, not by the experiment's time window: client timestamps and
# values ingested while a stop was committing carry the tag with a time outside [started_on, stopped_on].
EXPERIMENT_CSV_QUERY = (
    "SELECT d.time, e.name, e.public_id, d.value, e.unit FROM datapoints d JOIN events e ON e.id = d.event_id"
    " WHERE d.experiment_id = %(x)s ORDER BY d.time, d.event_id"
)


def chunks(conn: psycopg.Connection, *, start: datetime | None, end: datetime | None) -> list[tuple[Any, ...]]:
    """The datapoints chunks overlapping [start, end) (None = open), in time order, as (range_start, range_end,
    heap size in bytes or None for a compressed chunk)."""
    return conn.execute(_CHUNKS, {"start": start, "end": end}).fetchall()


def copy_statements(
    conn: psycopg.Connection,
    *,
    event_ids: Sequence[int],
    experiment_id: int | None,
    windows: Sequence[tuple[datetime, datetime, bool]],
) -> list[str]:
    """One binary COPY statement per window `(lo, hi, unordered)`: the experiment's rows when `experiment_id`
    is given, else those of `event_ids`; ordered by time unless `unordered` (the reader sorts them then)."""
    statements: list[tuple[str, dict[str, Any]]] = []
    for lo, hi, unordered in windows:
        if experiment_id is not None:
            query = EXPERIMENT_COPY_UNORDERED if unordered else EXPERIMENT_COPY
            statements.append((query, {"experiment": experiment_id, "start": lo, "end": hi}))
        else:
            query = EVENTS_COPY_UNORDERED if unordered else EVENTS_COPY
            statements.append((query, {"events": list(event_ids), "start": lo, "end": hi}))
    # COPY takes no bind parameters: psycopg binds them client-side as literals, as `cursor.copy` would.
    mogrify = psycopg.ClientCursor(conn).mogrify
    return [mogrify(query, params) for query, params in statements]


def event_lookup(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Every event as (id, public_id, name, unit), by id."""
    return conn.execute("SELECT id, public_id, name, unit FROM events ORDER BY id").fetchall()


def experiment_lookup(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Every experiment as (id, public_id), by id."""
    return conn.execute("SELECT id, public_id FROM experiments ORDER BY id").fetchall()


async def experiment_csv_rows(
    conn: AsyncConnection, *, experiment_id: int, batch_rows: int
) -> AsyncGenerator[list[tuple[Any, ...]], None]:
    """The experiment's datapoints as (time, event name, event public_id, value, unit), ordered by time then
    event, `batch_rows` at a time from a server-side cursor (memory stays bounded however long the export)."""
    async with conn.cursor(name="experiment_csv") as cur:
        cur.itersize = batch_rows
        await cur.execute(EXPERIMENT_CSV_QUERY, {"x": experiment_id})
        while rows := await cur.fetchmany(batch_rows):
            yield rows
