"""Datapoints from CSV and Parquet files, written with the engine's checks and its first-write-wins rule.

Three layouts are read:
- **long**, one datapoint per row with an `event_public_id` column: our exports (`time, event_public_id,
  event_name, unit, value, experiment_public_id`, CSV or Parquet) and WebMACS's experiment CSV (spec §13:
  `timestamp, event_name, event_public_id, value, unit, datapoint_public_id`);
- **one event** (`--event`): a time column and a value column;
- **wide** (`--map COLUMN=EVENT …`): a time column and one column per event, as spreadsheets and other
  tools write them; an empty cell is no datapoint.

Files are read in batches (bounded memory) and each batch goes to `webmacs._core.DatapointWriter`: finite
values and times from 1970 to 5 minutes ahead as the engine demands, one transaction, and a row whose event
already has a datapoint at that time is kept out and counted as a duplicate — importing a file twice stores
it once. Events and experiments must exist, unless `create_missing` creates those the file names (from its
`event_name`/`unit` columns and the values' span).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psycopg

from webmacs import _core
from webmacs.importer.report import Report

if TYPE_CHECKING:
    import pyarrow as pa

FileFormat = Literal["csv", "parquet"]
#: Columns of datapoints on their way in: times (int64 µs), event ids, values, experiment ids.
Part = tuple["pa.Array", "pa.Array", "pa.Array", "pa.Array"]
#: Rows per batch read from the file and written in one transaction.
BATCH_ROWS = 50_000
TIME_COLUMNS = ("time", "timestamp")
COUNTERS = ("read", "inserted", "duplicate", "unknown_event", "unknown_experiment", "invalid_value", "bad_time")


class FileImportError(Exception):
    """The file or the options cannot be imported as asked (nothing was written)."""


@dataclass(frozen=True)
class Layout:
    time: str
    #: long layout: the columns naming each row's event, value and (optional) experiment.
    event_column: str | None = None
    value_column: str | None = None
    experiment_column: str | None = None
    #: one event / wide: value column → event (public id or name).
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def needed(self) -> list[str]:
        cols = [self.time, self.event_column, self.value_column, self.experiment_column, *self.columns]
        return [c for c in dict.fromkeys(cols) if c]


def detect(
    names: list[str], *, event: str | None, mapping: dict[str, str], time_column: str | None, value_column: str | None
) -> Layout:
    """Which layout a file with columns `names` has, given the options."""
    time = time_column or next((c for c in TIME_COLUMNS if c in names), None)
    if time is None or time not in names:
        raise FileImportError(f"no time column (looked for {time_column or ' or '.join(TIME_COLUMNS)}) in {names}")
    if mapping:
        if event:
            raise FileImportError("give --event or --map, not both")
        unknown = [c for c in mapping if c not in names]
        if unknown:
            raise FileImportError(f"--map names columns the file does not have: {', '.join(unknown)}")
        return Layout(time=time, columns=dict(mapping))
    if event:
        value = value_column or ("value" if "value" in names else None)
        if value is None:
            others = [c for c in names if c != time]
            if len(others) != 1:
                raise FileImportError(f"which column holds the values? give --value-column (columns: {names})")
            value = others[0]
        if value not in names:
            raise FileImportError(f"no column {value!r} in {names}")
        return Layout(time=time, columns={value: event})
    if "event_public_id" in names and "value" in names:
        experiment = "experiment_public_id" if "experiment_public_id" in names else None
        return Layout(time=time, event_column="event_public_id", value_column="value", experiment_column=experiment)
    raise FileImportError(
        "the file has no event_public_id column: say which event its values belong to (--event) or map its"
        " columns to events (--map COLUMN=EVENT …)"
    )


def _batches(
    path: Path, fmt: FileFormat, layout: Layout, batch_rows: int, extra: tuple[str, ...] = ()
) -> Iterator[pa.RecordBatch]:
    """The layout's columns (and `extra` text columns) in batches of about `batch_rows` rows."""
    import pyarrow as pa

    columns = layout.needed + [c for c in extra if c not in layout.needed]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)
        return
    import pyarrow.csv as pacsv

    types: dict[str, pa.DataType] = {c: pa.string() for c in (layout.time, *extra)}
    for c in (layout.event_column, layout.experiment_column):
        if c:
            types[c] = pa.string()
    for c in [layout.value_column, *layout.columns]:
        if c:
            types[c] = pa.float64()
    yield from pacsv.open_csv(
        path,
        # About `batch_rows` rows of a 100-byte line per block.
        read_options=pacsv.ReadOptions(block_size=max(batch_rows * 100, 1 << 16)),
        # Only an empty cell is missing ("nan" is a value, which the checks then refuse).
        convert_options=pacsv.ConvertOptions(
            column_types=types, include_columns=columns, null_values=[""], strings_can_be_null=True
        ),
    )


def column_names(path: Path, fmt: FileFormat) -> list[str]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    with path.open("rb") as f:
        import csv
        import io

        first = f.readline().decode("utf-8-sig")
        return next(csv.reader(io.StringIO(first)), [])


def _times(column: pa.Array, tz: str | None) -> pa.Array:
    """µs since the Unix epoch as int64: aware times as they are, naive ones read in `tz` (default UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    utc = pa.timestamp("us", tz="UTC")
    if pa.types.is_timestamp(column.type):
        # Nanoseconds (pandas' unit) are cut to our microseconds.
        if column.type.tz is None:
            naive = pc.cast(column, pa.timestamp("us"), safe=False)
            column = pc.assume_timezone(naive, tz or "UTC", ambiguous="earliest")
        return pc.cast(column, utc, safe=False).cast(pa.int64())
    if pa.types.is_date(column.type):
        return pc.assume_timezone(column.cast(pa.timestamp("us")), tz or "UTC").cast(pa.int64())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise FileImportError(f"the time column holds {column.type}, not times")
    try:
        parsed = pc.cast(column, utc)
    except pa.ArrowInvalid:
        try:
            naive = pc.cast(column, pa.timestamp("us"))
        except pa.ArrowInvalid as e:
            raise FileImportError(f"unreadable time: {e}") from e
        parsed = pc.assume_timezone(naive, tz or "UTC", ambiguous="earliest")
    return parsed.cast(utc).cast(pa.int64())


@dataclass
class _Lookup:
    """Public id (or name) → id, for the events and experiments here."""

    events: dict[str, int]
    experiments: dict[str, int]

    @classmethod
    def load(cls, conn: psycopg.Connection) -> _Lookup:
        events: dict[str, int] = {}
        migrated = conn.execute("SELECT to_regclass('events') IS NOT NULL").fetchone()
        if not (migrated and migrated[0]):
            return cls(events, {})  # a dry run into a database without our tables yet
        for public_id, name, i in conn.execute("SELECT public_id, name, id FROM events ORDER BY id"):
            events.setdefault(name, i)
            events[public_id] = i  # a public id wins over another event's equal name
        experiments: dict[str, int] = dict(conn.execute("SELECT public_id, id FROM experiments").fetchall())
        return cls(events, experiments)


def _ids(values: pa.Array, known: dict[str, int]) -> pa.Array:
    """int32 ids for the strings in `values` (null where unknown), through the distinct values only."""
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = values.dictionary_encode() if not pa.types.is_dictionary(values.type) else values
    assert isinstance(encoded, pa.DictionaryArray)
    ids = pa.array([known.get(v) for v in encoded.dictionary.to_pylist()], pa.int32())
    return pc.take(ids, encoded.indices)


def _sum(mask: pa.Array) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc

    return int(pc.sum(mask.cast(pa.int64())).as_py() or 0)


def _columns(array: pa.Array, width: int) -> tuple[bytes, bytes | None]:
    """The values (native order) and, when there are nulls, the LSB-first validity bitmap of a primitive
    array, both starting at its first element."""
    import pyarrow as pa

    array = pa.concat_arrays([array])  # fresh buffers: offset 0
    data, validity = array.buffers()[1], array.buffers()[0]
    assert data is not None
    n = len(array)
    bits = None if validity is None or not array.null_count else validity.to_pybytes()[: (n + 7) // 8]
    return data.to_pybytes()[: n * width], bits


def import_file(
    path: Path,
    target_url: str,
    *,
    fmt: FileFormat,
    event: str | None = None,
    mapping: dict[str, str] | None = None,
    experiment: str | None = None,
    time_column: str | None = None,
    value_column: str | None = None,
    tz: str | None = None,
    create_missing: bool = False,
    dry_run: bool = False,
    batch_rows: int = BATCH_ROWS,
) -> Report:
    """Import the datapoints of one file into the database at `target_url`; returns what happened. Every
    datapoint read lands in one counter: inserted, duplicate, unknown_event, invalid_value or bad_time
    (`unknown_experiment` counts rows written untagged)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    layout = detect(
        column_names(path, fmt), event=event, mapping=mapping or {}, time_column=time_column, value_column=value_column
    )
    report = Report()
    counts = dict.fromkeys(COUNTERS, 0)
    with psycopg.connect(target_url, autocommit=True, options="-c timezone=UTC") as conn:
        if create_missing and layout.event_column:
            _create_missing(conn, path, fmt, layout, batch_rows, report, dry_run=dry_run)
        lookup = _Lookup.load(conn)
        fixed = {c: lookup.events.get(e) for c, e in layout.columns.items()}
        missing = sorted({layout.columns[c] for c, i in fixed.items() if i is None})
        if missing:
            raise FileImportError(f"Event '{missing[0]}' not found." + (" (and others)" if len(missing) > 1 else ""))
        tag: int | None = None
        if experiment is not None:
            tag = lookup.experiments.get(experiment)
            if tag is None:
                raise FileImportError(f"Experiment '{experiment}' not found.")
        writer = None if dry_run else _core.DatapointWriter(target_url)
        try:
            for batch in _batches(path, fmt, layout, batch_rows):
                n = batch.num_rows
                times = _times(batch.column(layout.time), tz)
                tags = pa.array([tag] * n, pa.int32()) if tag is not None else pa.nulls(n, pa.int32())
                parts: list[Part] = []
                if layout.event_column and layout.value_column:
                    events = _ids(batch.column(layout.event_column).cast(pa.string()), lookup.events)
                    if tag is None and layout.experiment_column:
                        named = batch.column(layout.experiment_column).cast(pa.string())
                        tags = _ids(named, lookup.experiments)
                        known = pc.is_valid(events)
                        lost = pc.and_(pc.and_(known, pc.is_null(tags)), pc.is_valid(named))
                        counts["unknown_experiment"] += _sum(lost)
                    counts["read"] += n
                    counts["unknown_event"] += events.null_count
                    parts.append((times, events, batch.column(layout.value_column).cast(pa.float64()), tags))
                else:
                    for column, event_id in fixed.items():
                        values = batch.column(column).cast(pa.float64())
                        present = pc.is_valid(values)  # an empty cell is no datapoint
                        counts["read"] += _sum(present)
                        events = pa.array([event_id] * n, pa.int32())
                        parts.append(
                            (
                                times.filter(present),
                                events.filter(present),
                                values.filter(present),
                                tags.filter(present),
                            )
                        )
                for part in parts:
                    t, e, v, x = _usable(part, counts)
                    if not len(t):
                        continue
                    if writer is None:
                        counts["invalid_value"] += len(v) - _sum(pc.is_finite(v))
                        continue
                    inserted, duplicates, rejected = writer.write(
                        _columns(t, 8)[0],
                        _columns(e.cast(pa.int32()), 4)[0],
                        _columns(v, 8)[0],
                        _columns(x.fill_null(0), 4)[0],
                        _columns(x, 4)[1],
                    )
                    counts["inserted"] += inserted
                    counts["duplicate"] += duplicates
                    counts["invalid_value"] += rejected.get("non_finite", 0)
                    counts["bad_time"] += rejected.get("timestamp_too_old", 0) + rejected.get("far_future_timestamp", 0)
        finally:
            if writer is not None:
                writer.close()
    report.datapoints = counts
    return report


def _usable(part: Part, counts: dict[str, int]) -> Part:
    """(times, events, values, experiments) without the rows that cannot be written, each counted once: no
    known event (already counted), no time, no value."""
    import pyarrow.compute as pc

    t, e, v, x = part
    known = pc.is_valid(e)
    t, e, v, x = (a.filter(known) for a in (t, e, v, x))
    counts["bad_time"] += t.null_count
    timed = pc.is_valid(t)
    t, e, v, x = (a.filter(timed) for a in (t, e, v, x))
    counts["invalid_value"] += v.null_count
    valued = pc.is_valid(v)
    return t.filter(valued), e.filter(valued), v.filter(valued), x.filter(valued)


def _extend(seen: dict[str, Any], key: str, value: Any, pick: Any) -> None:
    if value is not None:
        seen[key] = value if seen.get(key) is None else pick(seen[key], value)


def _create_missing(
    conn: psycopg.Connection,
    path: Path,
    fmt: FileFormat,
    layout: Layout,
    batch_rows: int,
    report: Report,
    *,
    dry_run: bool,
) -> None:
    """Create the events and experiments a long-layout file names but the database lacks: an event from the
    file's `event_name` and `unit` (else its public id and ""), type sensor, min/max the span of its
    values; an experiment named `imported <public id>`, started and stopped at its first and last datapoint."""
    import pyarrow as pa

    assert layout.event_column and layout.value_column
    extra = tuple(c for c in ("event_name", "unit") if c in column_names(path, fmt))
    events: dict[str, dict[str, Any]] = {}
    experiments: dict[str, dict[str, Any]] = {}
    for batch in _batches(path, fmt, layout, batch_rows, extra):
        columns: dict[str, pa.Array] = {
            "event": batch.column(layout.event_column).cast(pa.string()),
            "value": batch.column(layout.value_column).cast(pa.float64()),
        }
        columns.update((c, batch.column(c).cast(pa.string())) for c in extra)
        table = pa.table(columns)
        grouped = table.group_by("event", use_threads=False).aggregate(
            [("value", "min"), ("value", "max"), *((c, "first") for c in extra)]
        )
        for row in grouped.to_pylist():
            if row["event"] is not None:
                seen = events.setdefault(row["event"], {})
                _extend(seen, "min", row["value_min"], min)
                _extend(seen, "max", row["value_max"], max)
                for c in extra:
                    _extend(seen, c, row[f"{c}_first"], lambda a, _b: a)
        if layout.experiment_column:
            times = _times(batch.column(layout.time), None)
            named = batch.column(layout.experiment_column).cast(pa.string())
            span = (
                pa.table({"x": named, "t": times})
                .group_by("x", use_threads=False)
                .aggregate([("t", "min"), ("t", "max")])
            )
            for row in span.to_pylist():
                if row["x"] is not None:
                    seen = experiments.setdefault(row["x"], {})
                    _extend(seen, "first", row["t_min"], min)
                    _extend(seen, "last", row["t_max"], max)
    known = {p for (p,) in conn.execute("SELECT public_id FROM events WHERE public_id = ANY(%s)", (list(events),))}
    new_events = {p: e for p, e in events.items() if p not in known}
    known = {
        p for (p,) in conn.execute("SELECT public_id FROM experiments WHERE public_id = ANY(%s)", (list(experiments),))
    }
    new_experiments = {p: x for p, x in experiments.items() if p not in known}
    verb = "would create" if dry_run else "created"
    if new_events:
        report.notes.append(f"{verb} {len(new_events)} events: " + ", ".join(list(new_events)[:5]))
    if new_experiments:
        report.notes.append(f"{verb} {len(new_experiments)} experiments: " + ", ".join(list(new_experiments)[:5]))
    if dry_run:
        return
    from webmacs.epoch import from_micros

    with conn.transaction():
        for public_id, e in new_events.items():
            conn.execute(
                "INSERT INTO events (public_id, name, min_value, max_value, unit, type)"
                " VALUES (%s, %s, %s, %s, %s, 'sensor')",
                (
                    public_id,
                    e.get("event_name") or public_id,
                    e.get("min", 0.0),
                    e.get("max", 0.0),
                    e.get("unit") or "",
                ),
            )
        for public_id, x in new_experiments.items():
            conn.execute(
                "INSERT INTO experiments (public_id, name, started_on, stopped_on) VALUES (%s, %s, %s, %s)",
                (public_id, f"imported {public_id}", from_micros(x["first"]), from_micros(x["last"])),
            )
