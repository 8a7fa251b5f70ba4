"""Series queries: one packed SQL aggregate per event, downsampled in Rust (stride, LTTB, min/max, M4, avg)."""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, LiteralString

from psycopg import AsyncConnection, sql

from webmacs import _core

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Mode = Literal["stride", "lttb", "minmax", "m4", "avg"]
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

# A series comes back as one row of packed big-endian arrays (int8send/float8send), which reach the Rust
# downsamplers as bytes: no Python object per datapoint. Experiments are packed as int4 with 0 for none
# (identity keys start at 1).
_PACK = (
    "SELECT string_agg(int8send((extract(epoch FROM time) * 1000000)::int8), ''::bytea ORDER BY time),"
    " string_agg(float8send(value), ''::bytea ORDER BY time),"
    " string_agg(int4send(coalesce(experiment_id, 0)), ''::bytea ORDER BY time)"
)
# Uses the (event_id, time) index: a range scan of one channel, never the whole hypertable.
RECENT_SQL = _PACK + " FROM datapoints WHERE event_id = %s AND time >= now() - make_interval(mins => %s)"
RANGE_SQL = _PACK + " FROM datapoints WHERE event_id = %s AND time >= %s AND time < %s"

# Buckets are few (a request may ask for at most 100,000): plain rows, the query an analyst would write, with
# nothing added (packing them as arrays in SQL cost more than it saved).
BUCKETED_SQL = sql.SQL(
    "SELECT time_bucket(%s::interval, time, %s::text) AS bucket, {agg} FROM datapoints"
    " WHERE event_id = %s AND time >= %s AND time < %s GROUP BY 1 ORDER BY 1"
)


@dataclass(frozen=True)
class PackedSeries:
    """One event's series as packed big-endian arrays: times (µs since the epoch), values, experiment ids."""

    times: bytes
    values: bytes
    experiments: bytes | None = None

    def __len__(self) -> int:
        return len(self.times) // 8


@dataclass(frozen=True)
class Point:
    micros: int
    value: float
    experiment_id: int | None

    @property
    def time(self) -> datetime:
        return EPOCH + timedelta(microseconds=self.micros)


def _native(typecode: str, packed: bytes) -> array[int] | array[float]:
    a: array[Any] = array(typecode)
    a.frombytes(packed)
    if sys.byteorder == "little":
        a.byteswap()  # PostgreSQL's send functions are big-endian
    return a


def pack_times(times: Sequence[int]) -> bytes:
    """Big-endian packing of µs timestamps, the input format of the Rust downsamplers (for callers with lists)."""
    a = array("q", times)
    if sys.byteorder == "little":
        a.byteswap()
    return a.tobytes()


def pack_values(values: Sequence[float]) -> bytes:
    a = array("d", values)
    if sys.byteorder == "little":
        a.byteswap()
    return a.tobytes()


def downsample(series: PackedSeries, max_points: int, mode: Mode = "stride") -> list[Point]:
    """At most `max_points` points of `series`, chosen (or, for `avg`, computed) by `mode`.

    `stride` is the WebMACS reference (spec §4.2). `avg` points are bucket means at the bucket's mean time;
    they carry no experiment (a bucket may straddle experiments)."""
    if mode == "avg":
        times, values = _core.downsample_avg(series.times, series.values, max_points)
        return [Point(t, v, None) for t, v in zip(times, values, strict=True)]
    if mode == "stride":
        kept = _core.downsample_stride(len(series), max_points)
    else:
        select = {"lttb": _core.downsample_lttb, "minmax": _core.downsample_minmax, "m4": _core.downsample_m4}[mode]
        kept = select(series.times, series.values, max_points)
    return _points(series, kept)


def all_points(series: PackedSeries) -> list[Point]:
    return _points(series, range(len(series)))


def _points(series: PackedSeries, kept: Sequence[int]) -> list[Point]:
    times, values = _native("q", series.times), _native("d", series.values)
    experiments = _native("i", series.experiments) if series.experiments else None
    return [Point(int(times[i]), float(values[i]), int(experiments[i]) or None if experiments else None) for i in kept]


async def _fetch(conn: AsyncConnection, query: LiteralString, params: tuple[object, ...]) -> PackedSeries:
    # Binary results: bytea arrives as bytes, no hex decoding.
    cur = conn.cursor(binary=True)
    await cur.execute(query, params)
    row = await cur.fetchone()
    times, values, experiments = row if row else (None, None, None)
    return PackedSeries(bytes(times or b""), bytes(values or b""), bytes(experiments) if experiments else None)


async def recent(conn: AsyncConnection, *, event_id: int, minutes: int) -> PackedSeries:
    """The event's datapoints of the last `minutes`, time ascending."""
    return await _fetch(conn, RECENT_SQL, (event_id, minutes))


async def in_range(conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime) -> PackedSeries:
    """The event's datapoints in [start, end), time ascending."""
    return await _fetch(conn, RANGE_SQL, (event_id, start, end))


async def bucketed(
    conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime, bucket: str, tz: str, agg: Agg
) -> list[tuple[datetime, float]]:
    """`agg` per `bucket` (a PostgreSQL interval) over [start, end) as (bucket start, value), time ascending;
    buckets are aligned in `tz`, so day buckets start at local midnight and last 23 or 25 hours across a DST
    change. Buckets without datapoints are absent."""
    cur = conn.cursor(binary=True)
    await cur.execute(BUCKETED_SQL.format(agg=AGGREGATES[agg]), (bucket, tz, event_id, start, end))
    return await cur.fetchall()


def packed(rows: Sequence[tuple[datetime, float]]) -> PackedSeries:
    """(time, value) rows as a PackedSeries, for the downsamplers."""
    one = timedelta(microseconds=1)
    return PackedSeries(pack_times([(t - EPOCH) // one for t, _ in rows]), pack_values([v for _, v in rows]))


# --- bucket intervals ---------------------------------------------------------------------------------------

_UNITS = {
    "ms": "milliseconds",
    "millisecond": "milliseconds",
    "milliseconds": "milliseconds",
    "s": "seconds",
    "sec": "seconds",
    "secs": "seconds",
    "second": "seconds",
    "seconds": "seconds",
    "m": "minutes",
    "min": "minutes",
    "mins": "minutes",
    "minute": "minutes",
    "minutes": "minutes",
    "h": "hours",
    "hr": "hours",
    "hrs": "hours",
    "hour": "hours",
    "hours": "hours",
    "d": "days",
    "day": "days",
    "days": "days",
    "w": "weeks",
    "week": "weeks",
    "weeks": "weeks",
    "mo": "months",
    "mon": "months",
    "month": "months",
    "months": "months",
    "y": "years",
    "year": "years",
    "years": "years",
}
# Nominal lengths, only to bound how many buckets a request may produce.
_NOMINAL_SECONDS = {
    "milliseconds": 0.001,
    "seconds": 1,
    "minutes": 60,
    "hours": 3600,
    "days": 86400,
    "weeks": 7 * 86400,
    "months": 28 * 86400,
    "years": 365 * 86400,
}
_BUCKET = re.compile(r"\s*([0-9]{1,9})\s*([A-Za-z]+)\s*")


@dataclass(frozen=True)
class Bucket:
    count: int
    unit: str

    @property
    def interval(self) -> str:
        """The PostgreSQL interval literal, passed as a query parameter."""
        return f"{self.count} {self.unit}"

    @property
    def nominal_seconds(self) -> float:
        return self.count * _NOMINAL_SECONDS[self.unit]


def parse_bucket(text: str) -> Bucket | None:
    """`1m`, `15 minutes`, `1 day`, `2h`, `1mo` … → Bucket; None if it is not one positive count and a unit."""
    match = _BUCKET.fullmatch(text)
    if match is None:
        return None
    count, unit = int(match.group(1)), _UNITS.get(match.group(2).lower())
    if unit is None or count <= 0:
        return None
    return Bucket(count, unit)
