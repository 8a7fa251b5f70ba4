"""Datapoint exports as CSV, Parquet or an Arrow IPC stream, streamed frame by frame with bounded memory."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import psycopg

from webmacs import _core
from webmacs.repositories import exports as exports_repo

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

Format = Literal["csv", "parquet", "arrow"]

CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
    "arrow": "application/vnd.apache.arrow.stream",
}
#: File name extensions: `.arrows` is the registered one of the Arrow IPC stream format.
EXTENSIONS = {"csv": "csv", "parquet": "parquet", "arrow": "arrows"}
COLUMNS = ("time", "event_public_id", "event_name", "unit", "value", "experiment_public_id")

#: No heap tuple of `datapoints` is smaller: 24 bytes of header, 20 or 24 of data (MAXALIGNed to 48) and a
#: 4-byte line pointer. A chunk's size / this bounds its rows from above.
MIN_ROW_BYTES = 52
#: The row bound of a chunk whose size says nothing about its rows (compressed).
UNBOUNDED = 2**62
#: CSV is formatted this many rows at a time: polars' intermediate string columns stay small.
CSV_SLICE_ROWS = 20_000
#: Rows per Parquet row group: about 3 MB of buffered columns while one fills.
ROW_GROUP_ROWS = 131_072


def parquet_schema() -> pa.Schema:
    """The export's schema as a reader of the file sees it."""
    import pyarrow as pa

    return pa.schema(
        [
            ("time", pa.timestamp("us", tz="UTC")),
            ("event_public_id", pa.string()),
            ("event_name", pa.string()),
            ("unit", pa.string()),
            ("value", pa.float64()),
            ("experiment_public_id", pa.string()),
        ]
    )


def frame_schema() -> pa.Schema:
    """The frames' schema: the string columns are dictionaries over the events and experiments tables
    (Parquet stores them as dictionary-encoded strings: the file's schema is `parquet_schema()`)."""
    import pyarrow as pa

    text = pa.dictionary(pa.int32(), pa.string())
    return pa.schema(
        [
            ("time", pa.timestamp("us", tz="UTC")),
            ("event_public_id", text),
            ("event_name", text),
            ("unit", text),
            ("value", pa.float64()),
            ("experiment_public_id", text),
        ]
    )


@dataclass(frozen=True)
class Selection:
    """What to export: some events' datapoints within [start, end) (None = open), or one experiment's."""

    event_ids: tuple[int, ...] = ()
    experiment_id: int | None = None
    start: datetime | None = None
    end: datetime | None = None


def content_disposition(stem: str, fmt: Format) -> str:
    """`attachment; filename="<stem>.<ext>"` (see csv_export.attachment)."""
    from webmacs.services.csv_export import attachment

    return attachment(f"{stem}.{EXTENSIONS[fmt]}")


class _Sink:
    """A write-only file for pyarrow's IPC writer that hands out what was written since the last take."""

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
    """Event and experiment attributes by internal id as Arrow dictionaries (small tables, read once)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        import pyarrow as pa

        events = exports_repo.event_lookup(conn)
        experiments = exports_repo.experiment_lookup(conn)
        self.event_ids = pa.array([e[0] for e in events], pa.int32())
        self.event_public_ids = pa.array([e[1] for e in events], pa.string())
        self.event_names = pa.array([e[2] for e in events], pa.string())
        self.units = pa.array([e[3] for e in events], pa.string())
        self.experiment_ids = pa.array([x[0] for x in experiments], pa.int32())
        self.experiment_public_ids = pa.array([x[1] for x in experiments], pa.string())
        self.schema = frame_schema()

    def frame(self, columns: tuple[int, bytes, bytes, bytes, bytes, bytes, int, bool]) -> pa.Table:
        """Decoded COPY columns (`webmacs._core.decode_datapoints`) → a frame."""
        import pyarrow as pa
        import pyarrow.compute as pc

        n, times, events, values, experiments, validity, nulls, _ = columns
        event = pa.Array.from_buffers(pa.int32(), n, [None, pa.py_buffer(events)])
        experiment = pa.Array.from_buffers(
            pa.int32(), n, [pa.py_buffer(validity) if nulls else None, pa.py_buffer(experiments)], null_count=nulls
        )
        event_index = pc.index_in(event, value_set=self.event_ids)
        experiment_index = pc.index_in(experiment, value_set=self.experiment_ids)
        table = pa.Table.from_arrays(
            [
                pa.Array.from_buffers(pa.timestamp("us", tz="UTC"), n, [None, pa.py_buffer(times)]),
                pa.DictionaryArray.from_arrays(event_index, self.event_public_ids),
                pa.DictionaryArray.from_arrays(event_index, self.event_names),
                pa.DictionaryArray.from_arrays(event_index, self.units),
                pa.Array.from_buffers(pa.float64(), n, [None, pa.py_buffer(values)]),
                pa.DictionaryArray.from_arrays(experiment_index, self.experiment_public_ids),
            ],
            schema=self.schema,
        )
        if event_index.null_count:
            # Rows of an event deleted while the export ran are left out, as in spec §13.
            table = table.filter(event_index.is_valid())
        return table


def _bounds(conn: psycopg.Connection, sel: Selection) -> list[tuple[datetime, datetime, int]]:
    """The chunks' time windows within the selection, in time order (empty when nothing can match), each with
    an upper bound of the chunk's rows (from its size on disk; UNBOUNDED for a compressed chunk)."""
    rows = exports_repo.chunks(conn, start=sel.start, end=sel.end)
    windows = []
    for lo, hi, size in rows:
        lo = max(lo, sel.start) if sel.start else lo
        hi = min(hi, sel.end) if sel.end else hi
        if lo < hi:
            # A compressed chunk's rows are not in its heap: no bound, PostgreSQL sorts it.
            windows.append((lo, hi, size // MIN_ROW_BYTES if size is not None else UNBOUNDED))
    return windows


def _copies(conn: psycopg.Connection, sel: Selection, sort_rows: int) -> list[tuple[str, bool]]:
    """One binary COPY statement per chunk window of the selection, each with whether it is read unordered and
    sorted by the reader (chunks of at most `sort_rows` rows) rather than sorted by PostgreSQL."""
    windows = [(lo, hi, most <= sort_rows) for lo, hi, most in _bounds(conn, sel)]
    statements = exports_repo.copy_statements(
        conn, event_ids=list(dict.fromkeys(sel.event_ids)), experiment_id=sel.experiment_id, windows=windows
    )
    return [(statement, sort) for statement, (_, _, sort) in zip(statements, windows, strict=True)]


def frames(
    conn: psycopg.Connection,
    sel: Selection,
    *,
    dsn: str,
    chunk_rows: int,
    sort_rows: int = 0,
    progress: Callable[[float, int], None] | None = None,
) -> Iterator[pa.Table]:
    """The selection as Arrow tables of about `chunk_rows` rows (schema `frame_schema()`), ordered by time then
    event (where PostgreSQL sorts, a frame ends between two times, so it may exceed `chunk_rows` by one row per
    event).

    `conn` reads the lookups; the COPYs run on connections of their own to `dsn`, read and decoded in Rust a
    couple of frames ahead (PostgreSQL streams while this thread encodes). Chunks of at most `sort_rows` rows
    are read unordered and sorted by the reader; larger ones are sorted by PostgreSQL. `progress(fraction of
    the chunks done, rows so far)` is called after every frame."""
    lookups = _Lookups(conn)
    copies = _copies(conn, sel, sort_rows)
    if not copies:
        return
    reader = _core.CopyReader(dsn)
    rows_done = 0
    try:
        for done, (copy, sort) in enumerate(copies):
            # The next chunk's COPY starts on a second connection: PostgreSQL reads it while this one streams.
            following = copies[done + 1][0] if done + 1 < len(copies) else None
            reader.start(copy, chunk_rows, ties_by_event=not sort, prefetch=following, sort=sort)
            while (columns := reader.next_frame()) is not None:
                frame = lookups.frame(columns)
                if frame.num_rows:
                    rows_done += frame.num_rows
                    yield frame
                    if progress:
                        progress(done / len(copies), rows_done)
            if progress:
                progress((done + 1) / len(copies), rows_done)
    finally:
        reader.close()


def _csv_time(tz: str | None) -> pl.Expr:
    """Python `isoformat()` of the time in `tz` (UTC if None): microseconds only when non-zero."""
    import polars as pl

    time = pl.col("time").dt.convert_time_zone(tz or "UTC")
    return (
        pl.when(time.dt.microsecond() == 0)
        .then(time.dt.to_string("%Y-%m-%dT%H:%M:%S%:z"))
        .otherwise(time.dt.to_string("%Y-%m-%dT%H:%M:%S%.6f%:z"))
        .alias("time")
    )


def _guarded(table: pa.Table) -> pa.Table:
    """Neutralise formula-like names and units (text only, never numbers) by rewriting the small dictionaries
    the columns index into, not the rows."""
    import pyarrow as pa

    from webmacs.services.csv_export import neutralise

    for name in ("event_name", "unit"):
        column = table.column(name)
        chunks = []
        for chunk in column.chunks:
            words = chunk.dictionary.to_pylist()
            safe = [None if w is None else neutralise(w) for w in words]
            if safe != words:
                chunk = pa.DictionaryArray.from_arrays(chunk.indices, pa.array(safe, pa.string()))
            chunks.append(chunk)
        table = table.set_column(table.schema.get_field_index(name), name, pa.chunked_array(chunks, column.type))
    return table


def encode_csv(frames: Iterator[pa.Table], *, tz: str | None = None, guard: bool = True) -> Iterator[bytes]:
    """RFC 4180 CSV (CRLF) with the header row first, even when there are no rows. `guard`: names and units a
    spreadsheet would run as a formula get a leading `'`."""
    import polars as pl

    yield (",".join(COLUMNS) + "\r\n").encode()
    time = _csv_time(tz)
    for table in frames:
        if guard:
            table = _guarded(table)
        # Dictionary columns become Categoricals, written as their strings: no string column per frame
        # (materialising them cost ~40 MiB of peak memory).
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        for part in frame.iter_slices(CSV_SLICE_ROWS):
            buf = io.BytesIO()
            part.with_columns(time).write_csv(buf, include_header=False, line_terminator="\r\n")
            yield buf.getvalue()


def encode_parquet(
    conn: psycopg.Connection,
    sel: Selection,
    *,
    dsn: str,
    chunk_rows: int,
    sort_rows: int = 0,
    row_group_rows: int = ROW_GROUP_ROWS,
    progress: Callable[[float, int], None] | None = None,
) -> Iterator[bytes]:
    """The selection as a Parquet file (schema `parquet_schema()`, rows ordered as `frames` orders them), encoded
    in Rust (`webmacs._core.ParquetExport`): the COPY frames never become Python or Arrow objects, pyarrow is
    not imported, and each row group of `row_group_rows` rows is yielded as soon as it is written (snappy,
    dictionary-encoded strings, delta-coded times); the footer last. An empty selection gives a file with the
    schema and no row group."""
    events = exports_repo.event_lookup(conn)
    experiments = exports_repo.experiment_lookup(conn)
    copies = _copies(conn, sel, sort_rows)
    writer = _core.ParquetExport(dsn, events, experiments, row_group_rows)
    try:
        for done, (copy, sort) in enumerate(copies):
            # The next chunk's COPY starts on a second connection: PostgreSQL reads it while this one streams.
            following = copies[done + 1][0] if done + 1 < len(copies) else None
            writer.start(copy, chunk_rows, ties_by_event=not sort, prefetch=following, sort=sort)
            while (chunk := writer.next_chunk()) is not None:
                yield chunk
                if progress:
                    progress(done / len(copies), writer.rows)
            if progress:
                progress((done + 1) / len(copies), writer.rows)
        yield writer.finish()
    finally:
        writer.close()


def encode_arrow(frames: Iterator[pa.Table]) -> Iterator[bytes]:
    """An Arrow IPC stream: the schema, the dictionaries (names, units, public ids: the same for every frame, so
    sent once), then one record batch per frame, each yielded as soon as it is written; the end marker last.
    Readers see `frame_schema()`: the string columns stay dictionary-encoded."""
    import pyarrow as pa

    sink = _Sink()
    writer = pa.ipc.new_stream(sink, frame_schema())
    try:
        for frame in frames:
            writer.write_table(frame)
            yield sink.take()
    finally:
        writer.close()
    yield sink.take()


def export(
    conn: psycopg.Connection,
    sel: Selection,
    fmt: Format,
    *,
    dsn: str,
    tz: str | None = None,
    chunk_rows: int = 100_000,
    sort_rows: int = 0,
    progress: Callable[[float, int], None] | None = None,
    guard: bool = True,
) -> Iterator[bytes]:
    """The encoded export body, piece by piece (`dsn`: where the COPYs connect, the database of `conn`)."""
    if fmt == "parquet":
        return encode_parquet(conn, sel, dsn=dsn, chunk_rows=chunk_rows, sort_rows=sort_rows, progress=progress)
    rows = frames(conn, sel, dsn=dsn, chunk_rows=chunk_rows, sort_rows=sort_rows, progress=progress)
    if fmt == "csv":
        return encode_csv(rows, tz=tz, guard=guard)
    return encode_arrow(rows)


class ExportSlots:
    """How many exports may run at once. An export holds connections of its own and a producer thread for its
    whole duration; past the cap, new exports are refused (503) rather than queued behind running ones."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0
        self.refused = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self.running >= self.capacity:
                self.refused += 1
                return False
            self.running += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.running = max(0, self.running - 1)


def connect(url: str) -> psycopg.Connection:
    """An export's own connection: a long export must not hold one of the API pool's few connections."""
    return psycopg.connect(url, autocommit=True, options="-c timezone=UTC")


def stream(
    url: str,
    sel: Selection,
    fmt: Format,
    *,
    tz: str | None = None,
    chunk_rows: int = 100_000,
    sort_rows: int = 0,
    guard: bool = True,
) -> Generator[bytes, None, None]:
    """`export` over a connection of its own, closed when the body ends or the consumer stops early."""
    with connect(url) as conn:
        yield from export(conn, sel, fmt, dsn=url, tz=tz, chunk_rows=chunk_rows, sort_rows=sort_rows, guard=guard)
