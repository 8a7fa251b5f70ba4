"""Series queries: one packed SQL aggregate per event, downsampled in Rust (stride, LTTB, min/max, M4, avg)."""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any, Literal

from psycopg import AsyncConnection

from webmacs import _core
from webmacs.epoch import PG_EPOCH_US, from_micros, to_micros
from webmacs.errors import Unprocessable
from webmacs.repositories import series as series_repo
from webmacs.repositories.series import Agg as Agg

Mode = Literal["stride", "lttb", "minmax", "m4", "avg"]


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
        return from_micros(self.micros)


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


def from_pg(packed: tuple[bytes, bytes, bytes | None]) -> PackedSeries:
    """A series as the repository reads it (times since PostgreSQL's epoch) → since 1970, in time order."""
    return PackedSeries(*_core.series_from_pg(*packed))


async def recent(conn: AsyncConnection, *, event_id: int, minutes: int) -> PackedSeries:
    """The event's datapoints of the last `minutes`, time ascending."""
    return from_pg(await series_repo.packed_recent(conn, event_id=event_id, minutes=minutes))


async def in_range(conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime) -> PackedSeries:
    """The event's datapoints in [start, end), time ascending (Unprocessable for a range PostgreSQL refuses)."""
    return from_pg(await series_repo.packed_range(conn, event_id=event_id, start=start, end=end))


async def bucketed(
    conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime, bucket: str, tz: str, agg: Agg
) -> list[tuple[datetime, float]]:
    """`agg` per `bucket` (a PostgreSQL interval) over [start, end) as (bucket start, value), time ascending;
    buckets are aligned in `tz`, so day buckets start at local midnight and last 23 or 25 hours across a DST
    change. Buckets without datapoints are absent. Unprocessable for a bucket or time zone PostgreSQL refuses."""
    return await series_repo.bucketed(conn, event_id=event_id, start=start, end=end, bucket=bucket, tz=tz, agg=agg)


#: Without max_points a request returns at most this many buckets (or raw datapoints) per event.
MAX_BUCKETS = 100_000


async def event_points(
    conn: AsyncConnection,
    *,
    event_id: int,
    label: str,
    start: datetime,
    end: datetime,
    bucket: Bucket | None,
    agg: Agg,
    tz: str,
    zone: tzinfo,
    mode: Mode | None,
    max_points: int | None,
    preselect: bool,
    cells: bool,
) -> list[list[Any]]:
    """One event's `GET /series` answer as [time in `zone`, value] pairs: its datapoints in [start, end), or `agg`
    per `bucket` (aligned in `tz`); thinned to at most `max_points` (default 1000) by `mode` (default stride)
    when either is given. A long range's m4/minmax/lttb input comes from the datapoint cells (`cells`), else
    is pre-selected in SQL (`preselect`), else read whole. Unprocessable (naming the event by `label`) for more
    than MAX_BUCKETS points unthinned, or a range, bucket or time zone PostgreSQL refuses."""
    thin = max_points is not None or mode is not None
    count = agg == "count" and bucket is not None
    for use, select in ((cells, from_cells), (preselect, preselected)):
        if bucket is None and thin and use:
            picked = await select(
                conn, event_id=event_id, start=start, end=end, max_points=max_points or 1000, mode=mode or "stride"
            )
            if picked is not None:
                return [[p.time.astimezone(zone), p.value] for p in picked]
    rows: list[tuple[datetime, float]] | None = None
    if bucket is None:
        series = await in_range(conn, event_id=event_id, start=start, end=end)
    else:
        rows = await bucketed(conn, event_id=event_id, start=start, end=end, bucket=bucket.interval, tz=tz, agg=agg)
        series = packed(rows) if thin else PackedSeries(b"", b"")
    if not thin and max(len(series), len(rows or ())) > MAX_BUCKETS:
        raise Unprocessable(f"More than {MAX_BUCKETS} points for event '{label}': pass a bucket or max_points.")
    if rows is not None and not thin:
        # Buckets straight from the rows: no detour through packed arrays.
        return [[t.astimezone(zone), int(v) if count else v] for t, v in rows]
    points = downsample(series, max_points or 1000, mode or "stride") if thin else all_points(series)
    return [[p.time.astimezone(zone), int(p.value) if count else p.value] for p in points]


# --- long ranges: pre-selection in SQL --------------------------------------------------------------------

#: Modes whose input is pre-selected in SQL for a long range (stride counts rows and avg averages all of them).
PRESELECTED: frozenset[str] = frozenset({"m4", "minmax", "lttb"})
#: LTTB runs on the M4 points (at most 4 × max_points) of max_points × this many slices, when the range holds
#: at least LTTB_LONG × max_points datapoints (shorter ranges are read whole, as before). More slices cost more
#: than they bring: 4 × max_points groups of first()/last() states outgrow the hash aggregate's memory, whose
#: group count PostgreSQL overestimates, and spill to disk (one event, 100k datapoints: 250 slices 129 ms,
#: 1000 slices 159 ms, 4000 slices 724 ms with 65 batches on disk).
LTTB_SLICES = 1
LTTB_LONG = 16
#: Above this many slices (max_points beyond ~8000) the aggregate spills, and the range is read whole instead.
PRESELECT_MAX_SLICES = 2000


def slice_edges(t_first: int, t_last: int, slices: int) -> list[int]:
    """Lower bounds (µs) of time slices 1 … slices−1 of [t_first, t_last] as the Rust downsamplers cut them
    (point t is in slice ⌊(t − t_first)·slices / span⌋): slice j starts at t_first + ⌈j·span / slices⌉."""
    span = t_last - t_first
    return [t_first - (-j * span // slices) for j in range(1, slices)]


async def preselected(
    conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime, max_points: int, mode: Mode
) -> list[Point] | None:
    """`downsample(in_range(…), max_points, mode)` for m4, minmax and lttb without reading the whole range:
    SQL keeps per time slice the first, minimum, maximum and last datapoint (and the count), the downsampler
    runs on those. For m4 and minmax the slices are the downsampler's own, so the result is the same as from
    all rows (for values that are not NaN); lttb runs on the M4 points of LTTB_SLICES × max_points slices.
    None when the range is short (at most max_points, or for lttb fewer than LTTB_LONG × max_points
    datapoints) or max_points needs more than PRESELECT_MAX_SLICES slices: the caller reads it whole."""
    if mode not in PRESELECTED:
        return None
    ends = await series_repo.ends(conn, event_id=event_id, start=start, end=end)
    if ends is None:
        return []
    t_first, v_first, t_last, v_last = to_micros(ends[0]), ends[1], to_micros(ends[2]), ends[3]
    if t_first == t_last:
        return None
    if mode == "m4":
        slices, lo, hi = max_points // 4, ends[0], ends[2]
    elif mode == "minmax":
        # minmax keeps the first and the last point and slices only what lies between them.
        slices, lo, hi = (max_points - 2) // 2, ends[0] + timedelta(microseconds=1), ends[2] - timedelta(microseconds=1)
    else:
        slices, lo, hi = max_points * LTTB_SLICES, ends[0], ends[2]
    if slices > PRESELECT_MAX_SLICES:
        return None
    edges = [from_micros(t) for t in slice_edges(t_first, t_last, slices)]
    groups = await series_repo.slice_extremes(conn, event_id=event_id, lo=lo, hi=hi, edges=edges)
    total = sum(g[0] for g in groups) + (2 if mode == "minmax" else 0)
    if total <= max_points or (mode == "lttb" and total < LTTB_LONG * max_points):
        return None
    picked: dict[datetime, float] = {}
    for _, t1, v1, t2, v2, t3, v3, t4, v4 in groups:
        if mode != "minmax":
            picked[t1] = v1
            picked[t4] = v4
        picked[t2] = v2
        picked[t3] = v3
    if mode == "minmax":
        picked[ends[0]] = v_first
        picked[ends[2]] = v_last
    rows = sorted(picked.items())
    return downsample(packed(rows), max_points, mode)


# --- long ranges: the datapoint cells -------------------------------------------------------------------------

#: Width of a datapoint cell (sql/0041: one event's 10 minutes, aligned to the Unix epoch).
CELL_US: int = _core.CELL_US
#: m4 and minmax use the cells when a slice spans at least this many: each slice edge cuts one cell, whose
#: packed rows are read whole, so narrower slices save little.
CELLS_PER_SLICE = 4


def cell_of(micros: int) -> int:
    """Start (µs) of the cell holding `micros`."""
    return micros - micros % CELL_US


async def from_cells(
    conn: AsyncConnection, *, event_id: int, start: datetime, end: datetime, max_points: int, mode: Mode
) -> list[Point] | None:
    """`downsample(in_range(…), max_points, mode)` for m4, minmax and lttb from the datapoint cells: the
    cells no slice edge cuts give their first, minimum, maximum and last datapoint, the cut cells (and the
    two at the range's ends) every datapoint, from their packed copy, and the downsampler runs on these
    candidates — for m4 and minmax exactly the answer from every row, for lttb LTTB over the candidates.
    The hypertable is not read. None when it would not pay
    (slices narrower than CELLS_PER_SLICE cells; for lttb, fewer cells than max_points or fewer than
    LTTB_LONG × max_points datapoints) or the range holds at most max_points: the caller reads otherwise."""
    if mode not in PRESELECTED:
        return None
    ends = await series_repo.ends(conn, event_id=event_id, start=start, end=end)
    if ends is None:
        return []
    t_first, t_last = to_micros(ends[0]), to_micros(ends[2])
    span = t_last - t_first
    if mode == "lttb":
        if span < max_points * CELL_US:
            return None
        edges: list[int] = []
    else:
        slices = max_points // 4 if mode == "m4" else (max_points - 2) // 2
        if slices < 1 or span < slices * CELLS_PER_SLICE * CELL_US:
            return None
        edges = slice_edges(t_first, t_last, slices)
    cut = [from_micros(c) for c in sorted({cell_of(t) for t in (t_first, t_last, *edges)})]
    n_uncut, times, values, rows = await series_repo.cell_candidates(conn, event_id=event_id, cut=cut)
    n_cut, cut_times, cut_values = _core.cell_rows_in(rows, t_first - PG_EPOCH_US, t_last - PG_EPOCH_US)
    total = n_uncut + n_cut
    if total <= max_points or (mode == "lttb" and total < LTTB_LONG * max_points):
        return None
    picked = _core.series_from_candidates(mode, times + cut_times, values + cut_values, total, max_points)
    return all_points(PackedSeries(*picked))


def packed(rows: Sequence[tuple[datetime, float]]) -> PackedSeries:
    """(time, value) rows as a PackedSeries, for the downsamplers."""
    return PackedSeries(pack_times([to_micros(t) for t, _ in rows]), pack_values([v for _, v in rows]))


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
