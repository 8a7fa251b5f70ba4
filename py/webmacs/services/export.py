"""Datapoint exports as CSV or Parquet, streamed chunk by chunk with bounded memory whatever the size."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import polars as pl
import psycopg

Format = Literal["csv", "parquet"]

CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}
ONE_MICROSECOND = timedelta(microseconds=1)
COLUMNS = ("time", "event_public_id", "event_name", "unit", "value", "experiment_public_id")

# Each hypertable chunk is one window: a window is read with one COPY, so TimescaleDB touches each chunk once
# (there is no index on time alone; a window smaller than a chunk would rescan it). Inside a window, rows
# stream from COPY and are cut into frames of `chunk_rows`, which bounds memory regardless of chunk size.
_CHUNKS = (
    "SELECT range_start, range_end FROM timescaledb_information.chunks"
    " WHERE hypertable_schema = current_schema() AND hypertable_name = 'datapoints'"
    " AND (%(end)s::timestamptz IS NULL OR range_start < %(end)s)"
    " AND (%(start)s::timestamptz IS NULL OR range_end > %(start)s)"
    " ORDER BY range_start"
)
# µs since the epoch as int8: exact (extract returns numeric), and polars reads integers faster than dates.
_SELECT = "SELECT (extract(epoch FROM time) * 1000000)::int8, event_id, experiment_id, value FROM datapoints"
# Served by the (event_id, time) index: one range scan per event within the window's chunk.
EVENTS_QUERY = _SELECT + " WHERE event_id = ANY(%s) AND time >= %s AND time < %s ORDER BY time, event_id"
# No index on experiment_id: the window bounds the scan to one chunk (and the experiment's span to few chunks).
EXPERIMENT_QUERY = _SELECT + " WHERE experiment_id = %s AND time >= %s AND time < %s ORDER BY time, event_id"
EVENTS_COPY = "COPY (" + EVENTS_QUERY + ") TO STDOUT (FORMAT csv)"
EXPERIMENT_COPY = "COPY (" + EXPERIMENT_QUERY + ") TO STDOUT (FORMAT csv)"
_RAW_SCHEMA = {"micros": pl.Int64, "event_id": pl.Int32, "experiment_id": pl.Int32, "value": pl.Float64}


def parquet_schema():  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return pa.schema([
        ("time", pa.timestamp("us", tz="UTC")),
        ("event_public_id", pa.string()),
        ("event_name", pa.string()),
        ("unit", pa.string()),
        ("value", pa.float64()),
        ("experiment_public_id", pa.string()),
    ])


@dataclass(frozen=True)
class Selection:
    """What to export: some events' datapoints, or one experiment's, within [start, end) (None = open)."""

    event_ids: tuple[int, ...] = ()
    experiment_id: int | None = None
    start: datetime | None = None
    end: datetime | None = None


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


def content_disposition(stem: str, fmt: Format) -> str:
    """`attachment; filename="<stem>.<ext>"` with everything but [A-Za-z0-9._-] replaced by `_`."""
    return f'attachment; filename="{_UNSAFE_FILENAME.sub("_", stem)}.{fmt}"'


class _Sink:
    """A write-only file for pyarrow's ParquetWriter that hands out what was written since the last take."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._written = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        self._parts.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class _Lookups:
    """Event and experiment attributes by internal id, joined onto each frame (small tables, read once)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        events = conn.execute("SELECT id, public_id, name, unit FROM events").fetchall()
        experiments = conn.execute("SELECT id, public_id FROM experiments").fetchall()
        self.events = pl.DataFrame(
            events, schema={"event_id": pl.Int32, "event_public_id": pl.String, "event_name": pl.String,
                            "unit": pl.String}, orient="row")
        self.experiments = pl.DataFrame(
            experiments, schema={"experiment_id": pl.Int32, "experiment_public_id": pl.String}, orient="row")

    def frame(self, raw_csv: bytes) -> pl.DataFrame:
        raw = pl.read_csv(io.BytesIO(raw_csv), has_header=False, schema=_RAW_SCHEMA)
        # Inner join on events: rows of an event deleted while the export ran are left out, as in spec §13.
        return (
            raw.join(self.events, on="event_id", how="inner", maintain_order="left")
            .join(self.experiments, on="experiment_id", how="left", maintain_order="left")
            .select(
                pl.col("micros").cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("time"),
                "event_public_id", "event_name", "unit", "value", "experiment_public_id",
            )
        )


def _windows(conn: psycopg.Connection, sel: Selection) -> list[tuple[datetime, datetime]]:
    rows = conn.execute(_CHUNKS, {"start": sel.start, "end": sel.end}).fetchall()
    windows = []
    for lo, hi in rows:
        lo = max(lo, sel.start) if sel.start else lo
        hi = min(hi, sel.end) if sel.end else hi
        if lo < hi:
            windows.append((lo, hi))
    return windows


def frames(conn: psycopg.Connection, sel: Selection, *, chunk_rows: int,
           progress: Callable[[float, int], None] | None = None) -> Iterator[pl.DataFrame]:
    """The selection as polars frames of about `chunk_rows` rows, ordered by time then event.
    `progress(fraction of the time range done, rows so far)` is called after every frame."""
    lookups = _Lookups(conn)
    windows = _windows(conn, sel)
    if not windows:
        return
    first, last = windows[0][0], windows[-1][1]
    span = (last - first).total_seconds() or 1.0
    rows_done = 0
    for lo, hi in windows:
        params: tuple[object, ...]
        if sel.experiment_id is not None:
            query, params = EXPERIMENT_COPY, (sel.experiment_id, lo, hi)
        else:
            query, params = EVENTS_COPY, (list(sel.event_ids), lo, hi)
        parts: list[bytes] = []
        with conn.cursor() as cur, cur.copy(query, params) as copy:
            # One COPY message is one row; they are joined and parsed per frame by polars, not row by row.
            for row in copy:
                parts.append(bytes(row))
                if len(parts) >= chunk_rows:
                    frame = lookups.frame(b"".join(parts))
                    parts.clear()
                    rows_done += frame.height
                    yield frame
                    if progress:
                        progress(min(1.0, (lo - first).total_seconds() / span), rows_done)
        if parts:
            frame = lookups.frame(b"".join(parts))
            rows_done += frame.height
            yield frame
        if progress:
            progress((hi - first).total_seconds() / span, rows_done)


def _csv_time(tz: str | None) -> pl.Expr:
    """Python `isoformat()` of the time in `tz` (UTC if None): microseconds only when non-zero."""
    time = pl.col("time").dt.convert_time_zone(tz or "UTC")
    return (
        pl.when(time.dt.microsecond() == 0)
        .then(time.dt.to_string("%Y-%m-%dT%H:%M:%S%:z"))
        .otherwise(time.dt.to_string("%Y-%m-%dT%H:%M:%S%.6f%:z"))
        .alias("time")
    )


def encode_csv(frames: Iterator[pl.DataFrame], *, tz: str | None = None) -> Iterator[bytes]:
    """RFC 4180 CSV (CRLF) with the header row first, even when there are no rows."""
    yield (",".join(COLUMNS) + "\r\n").encode()
    for frame in frames:
        buf = io.BytesIO()
        frame.with_columns(_csv_time(tz)).write_csv(buf, include_header=False, line_terminator="\r\n")
        yield buf.getvalue()


def encode_parquet(frames: Iterator[pl.DataFrame]) -> Iterator[bytes]:
    """One zstd-compressed Parquet row group per frame, each yielded as soon as it is written; the footer last.
    (polars cannot append row groups to one file; pyarrow's ParquetWriter can.)"""
    import pyarrow.parquet as pq

    schema = parquet_schema()
    sink = _Sink()
    writer = pq.ParquetWriter(sink, schema, compression="zstd")
    try:
        for frame in frames:
            writer.write_table(frame.to_arrow().cast(schema))
            yield sink.take()
    finally:
        writer.close()
    yield sink.take()


def export(conn: psycopg.Connection, sel: Selection, fmt: Format, *, tz: str | None = None, chunk_rows: int = 100_000,
           progress: Callable[[float, int], None] | None = None) -> Iterator[bytes]:
    """The encoded export body, piece by piece."""
    rows = frames(conn, sel, chunk_rows=chunk_rows, progress=progress)
    return encode_csv(rows, tz=tz) if fmt == "csv" else encode_parquet(rows)


def connect(url: str) -> psycopg.Connection:
    """An export's own connection: a long export must not hold one of the API pool's few connections."""
    return psycopg.connect(url, autocommit=True, options="-c timezone=UTC")


def stream(url: str, sel: Selection, fmt: Format, *, tz: str | None = None,
           chunk_rows: int = 100_000) -> Generator[bytes, None, None]:
    """`export` over a connection of its own, closed when the body ends or the consumer stops early."""
    with connect(url) as conn:
        yield from export(conn, sel, fmt, tz=tz, chunk_rows=chunk_rows)
