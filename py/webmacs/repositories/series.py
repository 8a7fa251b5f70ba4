"""Series reads for the analyst path: packed per-event series, bucketed aggregates, long-range pre-selection."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, LiteralString

from psycopg import AsyncConnection, errors, sql

from webmacs.errors import Unprocessable

Agg = Literal["avg", "min", "max", "count", "first", "last", "sum"]

# Fixed SQL per aggregate name: the request picks one of these, it never supplies SQL.
AGGREGATES: dict[str, sql.Composable] = {
    "avg": sql.SQL("avg(value)"),
    "min": sql.SQL("min(value)"),
    "max": sql.SQL("max(value)"),
    "count": sql.SQL("count(*)::float8"),
    "first": sql.SQL("first(value, time)"),
    "last": sql.SQL("last(value, time)"),
    "sum": sql.SQL("sum(value)"),
}

# A series comes back as one row of packed big-endian arrays, which reach the Rust downsamplers as bytes: no
# Python object per datapoint. Times are `timestamptz_send`'s µs since 2000-01-01 (exact, and far cheaper than
# `extract(epoch …)`'s numeric arithmetic), values `float8send`, experiments int4 with 0 for none (identity keys
# start at 1). The rows come from an ordered subquery, which walks the (event_id, time) index in order: one
# range scan of one channel and no sort (an `ORDER BY` inside each aggregate sorted the rows three times; one
# event's 100,000 rows: 25 ms instead of 112). `_core.series_from_pg` shifts the times to 1970 and checks the
# order.
_PACK_HEAD = (
    "SELECT string_agg(timestamptz_send(time), ''::bytea), string_agg(float8send(value), ''::bytea),"
    " string_agg(int4send(coalesce(experiment_id, 0)), ''::bytea)"
    " FROM (SELECT time, value, experiment_id FROM datapoints WHERE event_id = %s AND "
)
_PACK_TAIL = " ORDER BY time) r"
RECENT_SQL = _PACK_HEAD + "time >= now() - make_interval(mins => %s)" + _PACK_TAIL
RANGE_SQL = _PACK_HEAD + "time >= %s AND time < %s" + _PACK_TAIL

# Buckets are few (a request may ask for at most 100,000): plain rows, the query an analyst would write, with
# nothing added (packing them as arrays in SQL cost more than it saved).
BUCKETED_SQL = sql.SQL(
    "SELECT time_bucket(%s::interval, time, %s::text) AS bucket, {agg} FROM datapoints"
    " WHERE event_id = %s AND time >= %s AND time < %s GROUP BY 1 ORDER BY 1"
)

# The first and the last datapoint of a range: two probes of the (event_id, time) index.
ENDS_SQL = (
    "SELECT f.time, f.value, l.time, l.value"
    " FROM (SELECT time, value FROM datapoints WHERE event_id = %(event)s AND time >= %(start)s AND time < %(end)s"
    " ORDER BY time LIMIT 1) f,"
    " (SELECT time, value FROM datapoints WHERE event_id = %(event)s AND time >= %(start)s AND time < %(end)s"
    " ORDER BY time DESC LIMIT 1) l"
)
# Per time slice (`width_bucket` over the slices' lower bounds, computed exactly as the Rust downsamplers
# slice [first, last]): how many datapoints, the first, the minimum, the maximum and the last one. Rows reach
# the aggregates in time order, and TimescaleDB's first()/last() keep the earliest row among equal keys, so
# the minimum and maximum are the earliest of equal values, as in Rust. Only these rows cross the wire.
PRESELECT_SQL = (
    "SELECT count(*), min(time), first(value, time), first(time, value), min(value), last(time, value),"
    " max(value), max(time), last(value, time)"
    " FROM (SELECT time, value FROM datapoints"
    " WHERE event_id = %(event)s AND time >= %(lo)s AND time <= %(hi)s ORDER BY time) r"
    " GROUP BY width_bucket(time, %(edges)s::timestamptz[])"
)

# A long range from the datapoint cells (sql/0041), never from the hypertable: of the cells strictly between
# the range's two end cells that no slice edge cuts, each partial row's first, minimum, maximum and last (a
# point standing in for an all-NaN cell's extremes is its first) and how many datapoints they hold; of the
# cut cells (the end cells among them), their packed rows, which the caller keeps within [first, last]. One
# round trip, one index range scan of the cells: ≈ 1 row per cell instead of every datapoint.
CELL_CANDIDATES_SQL = (
    "SELECT coalesce(sum(n) FILTER (WHERE NOT cut), 0)::int8,"
    " string_agg(timestamptz_send(first_time) || timestamptz_send(coalesce(min_time, first_time))"
    " || timestamptz_send(coalesce(max_time, first_time)) || timestamptz_send(last_time), ''::bytea)"
    " FILTER (WHERE NOT cut),"
    " string_agg(float8send(first_value) || float8send(coalesce(min_value, first_value))"
    " || float8send(coalesce(max_value, first_value)) || float8send(last_value), ''::bytea) FILTER (WHERE NOT cut),"
    " string_agg(packed, ''::bytea) FILTER (WHERE cut)"
    " FROM (SELECT *, cell = ANY(%(cut)s::timestamptz[]) AS cut FROM datapoint_cells"
    " WHERE event_id = %(event)s AND cell >= %(first_cell)s AND cell <= %(last_cell)s) c"
)
# Writers that bypass the engine (plain SQL, COPY by hand) refresh the cells of what they wrote; so does the
# deletion of some of a cell's datapoints.
REFRESH_CELLS_SQL = "SELECT refresh_datapoint_cells(%s::int[], %s, %s)"
COMPACT_CELLS_SQL = "SELECT compact_datapoint_cells(%s::timestamptz, %s)"

#: Errors of a request's range, bucket or time zone that PostgreSQL finds first: the request's fault (422).
_BAD_PARAMETERS = (errors.InvalidParameterValue, errors.IntervalFieldOverflow, errors.DatetimeFieldOverflow)


async def _packed(
    conn: AsyncConnection, query: LiteralString, params: tuple[object, ...]
) -> tuple[bytes, bytes, bytes | None]:
    # Binary results: bytea arrives as bytes, no hex decoding.
    cur = conn.cursor(binary=True)
    await cur.execute(query, params)
    row = await cur.fetchone()
    times, values, experiments = row if row else (None, None, None)
    return bytes(times or b""), bytes(values or b""), bytes(experiments) if experiments else None


async def packed_recent(conn: AsyncConnection, *, event_id: int, minutes: int) -> tuple[bytes, bytes, bytes | None]:
    """The event's datapoints of the last `minutes`, time ascending, as packed big-endian (times in µs since
    2000-01-01, PostgreSQL's epoch; values; experiment ids, or None when there are no datapoints)."""
    return await _packed(conn, RECENT_SQL, (event_id, minutes))


async def packed_range(
    conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime
) -> tuple[bytes, bytes, bytes | None]:
    """The event's datapoints in [start, end), time ascending, packed as `packed_recent`'s; a range PostgreSQL
    refuses is Unprocessable."""
    try:
        return await _packed(conn, RANGE_SQL, (event_id, start, end))
    except _BAD_PARAMETERS as e:
        raise Unprocessable(str(e.diag.message_primary or e)) from e


async def bucketed(
    conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime, bucket: str, tz: str, agg: Agg
) -> list[tuple[datetime, float]]:
    """`agg` per `bucket` (a PostgreSQL interval) over [start, end) as (bucket start, value), time ascending,
    buckets aligned in `tz`; a bucket or time zone PostgreSQL refuses is Unprocessable."""
    cur = conn.cursor(binary=True)
    try:
        await cur.execute(BUCKETED_SQL.format(agg=AGGREGATES[agg]), (bucket, tz, event_id, start, end))
    except _BAD_PARAMETERS as e:
        raise Unprocessable(str(e.diag.message_primary or e)) from e
    return await cur.fetchall()


async def ends(
    conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime
) -> tuple[datetime, float, datetime, float] | None:
    """The first and the last datapoint of the event in [start, end) as (time, value, time, value); None when
    the range holds none."""
    cur = conn.cursor(binary=True)
    await cur.execute(ENDS_SQL, {"event": event_id, "start": start, "end": end})
    row = await cur.fetchone()
    return None if row is None else (row[0], row[1], row[2], row[3])


async def cell_candidates(
    conn: AsyncConnection, *, event_id: int, cut: list[datetime]
) -> tuple[int, bytes, bytes, bytes]:
    """CELL_CANDIDATES_SQL's (datapoints in the uncut cells, their candidates' packed times and values, the cut
    cells' packed rows); `cut` holds the starts of the cells whose rows are wanted, the range's end cells the
    first and the last of them."""
    cur = conn.cursor(binary=True)
    params = {"event": event_id, "first_cell": min(cut), "last_cell": max(cut), "cut": cut}
    # Never prepared: a generic plan does not know the range (measured with the cut cells read from the
    # hypertable: minmax over 30 days took 2 s instead of 36 ms once psycopg prepared the statement).
    await cur.execute(CELL_CANDIDATES_SQL, params, prepare=False)
    row = await cur.fetchone()
    if row is None:  # an aggregate without GROUP BY returns one row
        return 0, b"", b"", b""
    n, times, values, packed = row
    return int(n), bytes(times or b""), bytes(values or b""), bytes(packed or b"")


async def refresh_cells(conn: AsyncConnection, *, event_ids: list[int], lo: datetime, hi: datetime) -> int:
    """Recompute the cells of `event_ids` touching [lo, hi] from their datapoints; returns the cells kept."""
    cur = await conn.execute(REFRESH_CELLS_SQL, (event_ids, lo, hi))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def delete_datapoints(conn: AsyncConnection, where: LiteralString, params: dict[str, Any]) -> int:
    """DELETE FROM datapoints WHERE `where` (a fixed condition, values in `params`), then refresh the cells
    of what it removed, per event over the span it removed, in one transaction (a savepoint inside the
    caller's). Returns the rows removed."""
    removed = 0
    async with conn.transaction():
        cur = await conn.execute(
            "WITH gone AS (DELETE FROM datapoints WHERE " + where + " RETURNING event_id, time)"
            " SELECT event_id, count(*), min(time), max(time) FROM gone GROUP BY event_id",
            params,
        )
        for event_id, n, lo, hi in await cur.fetchall():
            removed += n
            await refresh_cells(conn, event_ids=[event_id], lo=lo, hi=hi)
    return removed


async def delete_event_cells(conn: AsyncConnection, *, event_ids: list[int]) -> None:
    """The cells of events whose datapoints are all being deleted."""
    await conn.execute("DELETE FROM datapoint_cells WHERE event_id = ANY(%(ids)s)", {"ids": event_ids})


async def compact_cells(conn: AsyncConnection, *, since: datetime | None, max_cells: int) -> int:
    """Merge the partial rows of up to `max_cells` cells from `since` on (None: all); returns how many."""
    cur = await conn.execute(COMPACT_CELLS_SQL, (since or "-infinity", max_cells))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def slice_extremes(
    conn: AsyncConnection, *, event_id: int, lo: datetime, hi: datetime, edges: list[datetime]
) -> list[tuple[Any, ...]]:
    """Per time slice of [lo, hi] cut at `edges`: (count, time and value of the first datapoint, of the
    minimum, of the maximum, of the last), as PRESELECT_SQL lists them."""
    cur = conn.cursor(binary=True)
    await cur.execute(PRESELECT_SQL, {"event": event_id, "lo": lo, "hi": hi, "edges": edges})
    return await cur.fetchall()
