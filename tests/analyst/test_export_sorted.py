"""Exports whose chunks are read unordered and sorted by the Rust reader (`WEBMACS_EXPORT_SORT_ROWS`) give the
same rows, in the same order, as those PostgreSQL sorts and as a direct SQL read."""

from __future__ import annotations

import io
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import psycopg
import pytest

from tests.analyst.conftest import load
from tests.conftest import unique
from webmacs.services import export as export_service

T0 = datetime(2026, 8, 3, 21, 30, tzinfo=UTC)
#: Chunks of at most this many rows are sorted by the reader in these tests; 0: PostgreSQL sorts them all.
ALWAYS, NEVER = 10**9, 0
NAMES = ["Température ☀", "压力 / 圧力", "עומק", "e\u0301\u0301 combining", "😀 \U0001f9ea", 'tab\tquote"comma,']


@pytest.fixture
def shuffled(db: psycopg.Connection, make_event: Any, make_experiment: Any) -> dict[str, Any]:
    """Six events with unicode names over three days (three or four chunks), written in random order so the
    heap is not in time order; equal times across events; some rows in an experiment; hostile values."""
    events = [make_event(name=f"{name} {unique()}", unit=name[:3]) for name in NAMES]
    x_id, x_public = make_experiment(T0, T0 + timedelta(hours=5))
    rng = random.Random(21)  # noqa: S311 - reproducible test data, not secrets
    specials = [math.nan, math.inf, -math.inf, 5e-324, -1.7976931348623157e308, -0.0]
    rows = []
    for i in range(3000):
        t = T0 + timedelta(seconds=rng.randrange(0, 3 * 86400), microseconds=rng.choice([0, 1, 999_999]))
        for ev in rng.sample(events, rng.randrange(1, 4)):  # equal times across events
            value = specials[i % 6] if i % 50 == 0 else rng.uniform(-1e6, 1e6)
            rows.append((t, ev.id, x_id if i % 7 == 0 else None, value))
    rows = list({(t, e): (t, e, x, v) for t, e, x, v in rows}.values())  # one row per (time, event)
    rng.shuffle(rows)
    for k in range(0, len(rows), 500):
        load(db, rows[k : k + 500])
    return {"events": events, "rows": rows, "experiment": (x_id, x_public)}


def _export(db_url: str, sel: export_service.Selection, fmt: export_service.Format, **kw: Any) -> bytes:
    with export_service.connect(db_url) as conn:
        return b"".join(export_service.export(conn, sel, fmt, dsn=db_url, **kw))


_DIRECT = (
    "SELECT d.time, e.public_id, e.name, e.unit, d.value, x.public_id FROM datapoints d"
    " JOIN events e ON e.id = d.event_id LEFT JOIN experiments x ON x.id = d.experiment_id"
)
DIRECT_EVENTS = _DIRECT + " WHERE d.event_id = ANY(%s) ORDER BY d.time, d.event_id"
DIRECT_EXPERIMENT = _DIRECT + " WHERE d.experiment_id = %s ORDER BY d.time, d.event_id"


def _direct(db: psycopg.Connection, sel: export_service.Selection) -> list[tuple[Any, ...]]:
    """The export's rows read with one plain SQL query."""
    if sel.experiment_id is not None:
        rows = db.execute(DIRECT_EXPERIMENT, (sel.experiment_id,)).fetchall()
    else:
        rows = db.execute(DIRECT_EVENTS, (list(sel.event_ids),)).fetchall()
    return [tuple(r) for r in rows]


def _same(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    def key(row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple("nan" if isinstance(c, float) and math.isnan(c) else c for c in row)

    return [key(r) for r in a] == [key(r) for r in b]


@pytest.mark.parametrize("chunk_rows", [7, 100_000])
def test_parquet_rows_equal_a_direct_sql_read(
    db: psycopg.Connection, db_url: str, shuffled: dict[str, Any], chunk_rows: int
) -> None:
    sel = export_service.Selection(event_ids=tuple(sorted(e.id for e in shuffled["events"])))
    with export_service.connect(db_url) as conn:
        bounds = export_service._bounds(conn, sel)
    assert len(bounds) >= 3
    sorted_here = _export(db_url, sel, "parquet", chunk_rows=chunk_rows, sort_rows=ALWAYS)
    sorted_by_db = _export(db_url, sel, "parquet", chunk_rows=chunk_rows, sort_rows=NEVER)
    here = pl.read_parquet(io.BytesIO(sorted_here)).rows()
    assert len(here) == len(shuffled["rows"])
    assert _same(here, pl.read_parquet(io.BytesIO(sorted_by_db)).rows())
    assert _same(here, _direct(db, sel))


def test_csv_in_a_time_zone_is_the_same_either_way(db_url: str, shuffled: dict[str, Any]) -> None:
    sel = export_service.Selection(
        event_ids=tuple(e.id for e in shuffled["events"]), start=T0 + timedelta(hours=20), end=T0 + timedelta(days=2)
    )
    here = _export(db_url, sel, "csv", tz="America/St_Johns", chunk_rows=13, sort_rows=ALWAYS)
    by_db = _export(db_url, sel, "csv", tz="America/St_Johns", chunk_rows=13, sort_rows=NEVER)
    assert here == by_db
    text = here.decode()
    first = text.split("\r\n")[1]
    assert first.split(",")[0].endswith("-02:30")  # Newfoundland daylight time
    times = [datetime.fromisoformat(line.split(",")[0]) for line in text.split("\r\n")[1:] if line]
    assert times == sorted(times) and all(T0 + timedelta(hours=20) <= t < T0 + timedelta(days=2) for t in times)


def test_experiment_export_sorted_here(db: psycopg.Connection, db_url: str, shuffled: dict[str, Any]) -> None:
    x_id, x_public = shuffled["experiment"]
    sel = export_service.Selection(experiment_id=x_id)
    frame = pl.read_parquet(io.BytesIO(_export(db_url, sel, "parquet", chunk_rows=11, sort_rows=ALWAYS)))
    assert frame.height == sum(1 for r in shuffled["rows"] if r[2] == x_id) > 0
    assert set(frame["experiment_public_id"]) == {x_public}
    assert _same(frame.rows(), _direct(db, sel))


def test_empty_experiment(db_url: str, make_experiment: Any, shuffled: dict[str, Any]) -> None:
    """An experiment without datapoints (chunks exist, none of their rows match) is an empty file."""
    x_id, _ = make_experiment(T0)
    for fmt in ("parquet", "csv"):
        body = _export(db_url, export_service.Selection(experiment_id=x_id), fmt, sort_rows=ALWAYS)
        read = pl.read_parquet if fmt == "parquet" else pl.read_csv
        frame = read(io.BytesIO(body))
        assert frame.height == 0 and frame.columns == list(export_service.COLUMNS)


def test_the_size_bound_covers_every_chunk(db: psycopg.Connection, db_url: str, shuffled: dict[str, Any]) -> None:
    """A chunk's size / MIN_ROW_BYTES is never below its row count, so the sort limit holds (the rows of
    chunks above it are sorted by PostgreSQL and streamed in frames)."""
    sel = export_service.Selection(event_ids=tuple(e.id for e in shuffled["events"]))
    with export_service.connect(db_url) as conn:
        bounds = export_service._bounds(conn, sel)
    for lo, hi, most in bounds:
        row = db.execute("SELECT count(*) FROM datapoints WHERE time >= %s AND time < %s", (lo, hi)).fetchone()
        assert row is not None
        assert most >= row[0]


def test_a_compressed_chunk_is_sorted_by_postgresql(db: psycopg.Connection, db_url: str, make_event: Any) -> None:
    """Its heap is empty, so its size bounds nothing: it must not be collected whole by the reader."""
    license_row = db.execute("SELECT coalesce(current_setting('timescaledb.license', true), 'apache')").fetchone()
    if license_row is None or license_row[0] != "timescale":
        pytest.skip("compression needs the Timescale license")
    ev = make_event()
    day = datetime(2019, 3, 5, tzinfo=UTC)
    load(db, [(day + timedelta(seconds=i), ev.id, None, float(i)) for i in range(2000)])
    db.execute("ALTER TABLE datapoints SET (timescaledb.compress)")
    try:
        db.execute(
            "SELECT compress_chunk(c) FROM show_chunks('datapoints', older_than => %s::timestamptz) c",
            (day + timedelta(days=1),),
        )
        sel = export_service.Selection(event_ids=(ev.id,), start=day, end=day + timedelta(days=1))
        with export_service.connect(db_url) as conn:
            bounds = export_service._bounds(conn, sel)
        assert [b[2] for b in bounds] == [export_service.UNBOUNDED]
        frame = pl.read_parquet(io.BytesIO(_export(db_url, sel, "parquet", sort_rows=ALWAYS)))
        assert frame["value"].to_list() == [float(i) for i in range(2000)]
    finally:  # the session's other tests share the hypertable
        db.execute("SELECT decompress_chunk(c, true) FROM show_chunks('datapoints') c")
        db.execute("ALTER TABLE datapoints SET (timescaledb.compress = false)")
