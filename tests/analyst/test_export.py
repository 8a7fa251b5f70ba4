"""CSV/Parquet/Arrow exports: round trips through polars, empty ranges, 404s, and bounded server memory."""

from __future__ import annotations

import io
import math
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import psycopg
import pytest

from tests.analyst.conftest import load
from tests.conftest import free_port, server_env, unique
from webmacs.services import export as export_service

EXPORT = "/api/v1/export"
T0 = datetime(2026, 6, 1, 22, 0, tzinfo=UTC)


@pytest.fixture
def two_events(db: psycopg.Connection, make_event: Any, make_experiment: Any) -> dict[str, Any]:
    """Two events over two days (three hypertable chunks), the first hours of `a` in an experiment."""
    a, b = make_event(unit="V"), make_event(name=unique('quote "and", comma'), unit="m/s")
    x_id, x_public = make_experiment(T0, T0 + timedelta(hours=3))
    rows = []
    for i in range(300):
        t = T0 + timedelta(minutes=10 * i, microseconds=(i * 7919) % 1_000_000 if i % 3 else 0)
        rows.append((t, a.id, x_id if i < 18 else None, i / 7))
        if i % 2 == 0:
            rows.append((t, b.id, None, -i * 1e-5))
    load(db, rows)
    return {"a": a, "b": b, "rows": rows, "experiment": (x_id, x_public)}


def _expected(
    rows: list[tuple[datetime, int, int | None, float]], events: dict[int, Any], experiment: tuple[int, str]
) -> list[tuple[datetime, str, str, str, float, str | None]]:
    """The rows as the export gives them: by time, then event (internal id)."""
    return [
        (t, events[e].public_id, events[e].name, events[e].unit, v, experiment[1] if x == experiment[0] else None)
        for t, e, x, v in sorted(rows, key=lambda r: (r[0], r[1]))
    ]


def test_parquet_round_trip(client: httpx.Client, viewer: dict[str, str], two_events: dict[str, Any]) -> None:
    a, b = two_events["a"], two_events["b"]
    r = client.get(EXPORT, headers=viewer, params={"events": [a.public_id, b.public_id], "format": "parquet"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/vnd.apache.parquet"
    assert r.headers["content-disposition"] == 'attachment; filename="datapoints.parquet"'
    frame = pl.read_parquet(io.BytesIO(r.content))
    assert frame.columns == list(export_service.COLUMNS)
    assert frame.schema["time"] == pl.Datetime("us", "UTC")
    assert frame.schema["value"] == pl.Float64
    expected = _expected(two_events["rows"], {a.id: a, b.id: b}, two_events["experiment"])
    assert frame.rows() == expected


def test_arrow_stream_equals_a_direct_sql_read(
    client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection, two_events: dict[str, Any]
) -> None:
    import pyarrow as pa

    a, b = two_events["a"], two_events["b"]
    r = client.get(EXPORT, headers=viewer, params={"events": [a.public_id, b.public_id], "format": "arrow"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/vnd.apache.arrow.stream"
    assert r.headers["content-disposition"] == 'attachment; filename="datapoints.arrows"'
    table = pa.ipc.open_stream(r.content).read_all()
    assert table.schema == export_service.frame_schema()  # strings stay dictionary-encoded
    direct = db.execute(
        "SELECT d.time, e.public_id, e.name, e.unit, d.value, x.public_id FROM datapoints d"
        " JOIN events e ON e.id = d.event_id LEFT JOIN experiments x ON x.id = d.experiment_id"
        " WHERE d.event_id = ANY(%s) ORDER BY d.time, d.event_id",
        ([a.id, b.id],),
    ).fetchall()
    assert len(direct) == len(two_events["rows"])
    assert [tuple(row.values()) for row in table.to_pylist()] == direct
    frame = pl.read_ipc_stream(io.BytesIO(r.content))
    assert frame.columns == list(export_service.COLUMNS) and frame.height == len(direct)


def test_csv_round_trip_in_a_time_zone(
    client: httpx.Client, viewer: dict[str, str], two_events: dict[str, Any]
) -> None:
    a, b = two_events["a"], two_events["b"]
    start, end = T0 + timedelta(hours=1), T0 + timedelta(days=1, hours=3)
    r = client.get(
        EXPORT,
        headers=viewer,
        params={
            "events": [b.public_id, a.public_id],
            "format": "csv",
            "tz": "Europe/Berlin",
            "start": start.isoformat(),
            "end": end.isoformat(),
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers["content-disposition"] == (
        'attachment; filename="datapoints_20260601T230000Z_20260603T010000Z.csv"'
    )
    text = r.content.decode()
    assert text.startswith("time,event_public_id,event_name,unit,value,experiment_public_id\r\n")
    frame = pl.read_csv(io.BytesIO(r.content), schema_overrides={"time": pl.String})
    assert all(t.endswith("+02:00") for t in frame["time"])  # CEST in June
    assert any("." not in t for t in frame["time"]) and any("." in t for t in frame["time"])  # as isoformat()
    times = [datetime.fromisoformat(t) for t in frame["time"]]
    expected = [
        row
        for row in _expected(two_events["rows"], {b.id: b, a.id: a}, two_events["experiment"])
        if start <= row[0] < end
    ]
    assert times == [row[0] for row in expected]
    assert frame.drop("time").rows() == [row[1:] for row in expected]


def test_experiment_parquet(
    client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection, two_events: dict[str, Any]
) -> None:
    a, b = two_events["a"], two_events["b"]
    x_id, x_public = two_events["experiment"]
    # Selected by the tag, as the experiment CSV: also rows timed outside the experiment's span (client
    # timestamps), before and long after it, in other chunks.
    outside = [(T0 - timedelta(days=3), b.id, x_id, 1.5), (T0 + timedelta(days=9), a.id, x_id, 2.5)]
    load(db, outside)
    r = client.get(f"/api/v1/experiments/{x_public}/export/parquet", headers=viewer)
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].startswith('attachment; filename="experiment_series-x-')
    frame = pl.read_parquet(io.BytesIO(r.content))
    assert frame.height == 18 + 2
    assert frame["time"][0] == outside[0][0] and frame["time"][-1] == outside[1][0]
    assert set(frame["event_public_id"]) == {a.public_id, b.public_id}
    assert set(frame["experiment_public_id"]) == {x_public}
    assert frame["time"].is_sorted()
    r = client.get(f"/api/v1/experiments/{x_public}/export/arrow", headers=viewer)
    assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.apache.arrow.stream"
    assert pl.read_ipc_stream(io.BytesIO(r.content)).with_columns(pl.col(pl.Categorical).cast(pl.String)).equals(frame)
    for fmt in ("parquet", "arrow"):
        r = client.get(f"/api/v1/experiments/no-such-experiment/export/{fmt}", headers=viewer)
        assert r.status_code == 404 and r.json() == {"detail": "Experiment 'no-such-experiment' not found."}


@pytest.mark.parametrize("fmt", ["csv", "parquet", "arrow"])
def test_empty_range(client: httpx.Client, viewer: dict[str, str], make_event: Any, fmt: str) -> None:
    ev = make_event()
    r = client.get(
        EXPORT,
        headers=viewer,
        params={"events": ev.public_id, "format": fmt, "start": "2031-01-01T00:00:00Z", "end": "2031-02-01T00:00:00Z"},
    )
    assert r.status_code == 200
    if fmt == "csv":
        assert r.content == b"time,event_public_id,event_name,unit,value,experiment_public_id\r\n"
    else:
        read = pl.read_parquet if fmt == "parquet" else pl.read_ipc_stream
        frame = read(io.BytesIO(r.content))
        assert frame.height == 0 and frame.columns == list(export_service.COLUMNS)


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"events": "no-such-event"}, 404),
        ({"format": "xlsx"}, 422),
        ({"tz": "Nowhere/Atlantis"}, 422),
        ({"start": "2026-06-02T00:00:00Z", "end": "2026-06-01T00:00:00Z"}, 422),
    ],
)
def test_export_errors(
    client: httpx.Client, viewer: dict[str, str], make_event: Any, params: dict[str, str], status: int
) -> None:
    query = {"events": make_event().public_id} | params
    r = client.get(EXPORT, headers=viewer, params=query)
    assert r.status_code == status, r.text
    if status == 404:
        assert r.json() == {"detail": "Event 'no-such-event' not found."}


def test_export_needs_authentication(client: httpx.Client) -> None:
    assert client.get(EXPORT, params={"events": "x"}).status_code == 401


@pytest.mark.parametrize("fmt", ["csv", "parquet", "arrow"])
def test_small_frames_give_the_same_rows(db_url: str, two_events: dict[str, Any], fmt: export_service.Format) -> None:
    """Frames cut at any size (here 7 rows, so cuts fall inside chunks) concatenate to the whole export."""
    a, b = two_events["a"], two_events["b"]
    sel = export_service.Selection(event_ids=(a.id, b.id))
    with export_service.connect(db_url) as conn:
        small = b"".join(export_service.export(conn, sel, fmt, dsn=db_url, chunk_rows=7))
        whole = b"".join(export_service.export(conn, sel, fmt, dsn=db_url, chunk_rows=10**6))
    readers: dict[str, Callable[[io.BytesIO], pl.DataFrame]] = {
        "csv": pl.read_csv,
        "parquet": pl.read_parquet,
        "arrow": pl.read_ipc_stream,
    }
    read = readers[fmt]
    assert read(io.BytesIO(small)).rows() == read(io.BytesIO(whole)).rows()
    assert read(io.BytesIO(small)).height == len(two_events["rows"])


_DIRECT = (
    "SELECT d.time, e.public_id, e.name, e.unit, d.value, x.public_id FROM datapoints d"
    " JOIN events e ON e.id = d.event_id LEFT JOIN experiments x ON x.id = d.experiment_id"
    " WHERE d.event_id = ANY(%s) ORDER BY d.time, d.event_id"
)


def _comparable(rows: list[Any]) -> list[tuple[Any, ...]]:
    """Rows with each float as its bits: NaN equals NaN and -0.0 differs from 0.0."""
    return [tuple(struct.pack("<d", v) if isinstance(v, float) else v for v in row) for row in rows]


def test_parquet_in_many_row_groups_equals_a_direct_sql_read(
    db: psycopg.Connection, db_url: str, make_event: Any, two_events: dict[str, Any]
) -> None:
    """The Rust writer cuts row groups inside and across COPY frames and chunks; reading the file back gives
    the rows a direct SQL read gives, hostile values and unicode names included, in the export's schema."""
    import pyarrow.parquet as pq

    a, b = two_events["a"], two_events["b"]
    odd = make_event(name=unique('Température 🌡 "q", ✓'), unit="µS/cm")
    hostile = [math.nan, math.inf, -math.inf, -0.0, 1.7976931348623157e308, 5e-324, -1e-300]
    load(db, [(T0 + timedelta(hours=i, microseconds=1), odd.id, None, v) for i, v in enumerate(hostile)])
    ids = [a.id, b.id, odd.id]
    sel = export_service.Selection(event_ids=tuple(ids))
    with export_service.connect(db_url) as conn:
        body = b"".join(export_service.encode_parquet(conn, sel, dsn=db_url, chunk_rows=5, row_group_rows=7))
        direct = conn.execute(_DIRECT, (ids,)).fetchall()
    file = pq.ParquetFile(io.BytesIO(body))
    assert file.schema_arrow == export_service.parquet_schema()
    expected_rows = len(two_events["rows"]) + len(hostile)
    assert len(direct) == expected_rows
    assert file.metadata.num_row_groups == -(-expected_rows // 7)
    assert all(file.metadata.row_group(i).num_rows == 7 for i in range(file.metadata.num_row_groups - 1))
    table = file.read()
    assert table.column("event_name").to_pylist().count(odd.name) == len(hostile)
    assert _comparable([tuple(r.values()) for r in table.to_pylist()]) == _comparable(direct)


@pytest.mark.parametrize("start", [None, datetime(2031, 1, 1, tzinfo=UTC)])
def test_empty_parquet_export_has_the_schema_and_no_row_group(
    db: psycopg.Connection, db_url: str, make_event: Any, start: datetime | None
) -> None:
    import pyarrow.parquet as pq

    ev, other = make_event(), make_event()
    load(db, [(T0, other.id, None, 1.0)])
    # From 2031 no chunk holds the range and no COPY runs; without a start the COPYs run and find no row.
    sel = export_service.Selection(event_ids=(ev.id,), start=start)
    with export_service.connect(db_url) as conn:
        pieces = list(export_service.encode_parquet(conn, sel, dsn=db_url, chunk_rows=5))
    file = pq.ParquetFile(io.BytesIO(b"".join(pieces)))
    assert file.schema_arrow == export_service.parquet_schema()
    assert file.metadata.num_rows == 0 and file.metadata.num_row_groups == 0


# --- memory bound --------------------------------------------------------------------------------------------

LARGE_ROWS = 1_500_000


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} missing")


@pytest.fixture
def subprocess_server(db_url: str, tmp_path: Path) -> Any:
    """The app in a process of its own, so its memory is measured apart from the test's."""
    port = free_port()
    env = server_env(db_url, tmp_path, WEBMACS_EXPORT_CHUNK_ROWS="50000")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "webmacs.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server died"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.stderr:
                proc.stderr.close()


def test_large_export_streams_with_bounded_memory(
    db: psycopg.Connection, make_event: Any, subprocess_server: tuple[str, int], admin: dict[str, str]
) -> None:
    url, pid = subprocess_server
    events = [make_event() for _ in range(3)]
    # All in one hypertable chunk (one day): memory must be bounded inside a chunk too, not only across them.
    start = datetime(2025, 1, 1, tzinfo=UTC)
    per_event = LARGE_ROWS // len(events)
    for ev in events:
        db.execute(
            "INSERT INTO datapoints (time, event_id, value)"
            " SELECT %s + make_interval(secs => i * 0.05), %s, i * 0.001 FROM generate_series(0, %s - 1) i",
            (start, ev.id, per_event),
        )
    params: dict[str, Any] = {"events": [e.public_id for e in events]}
    with httpx.Client(base_url=url, headers=admin, timeout=120) as client:
        # Warm up each format on a small slice (the CSV encoder's first use imports polars and starts its thread
        # pool, which Parquet, encoded in Rust, never does), then measure peak RSS from here on.
        for fmt in ("csv", "parquet"):
            small = client.get(EXPORT, params=params | {"end": "2025-01-01T00:01:00Z", "format": fmt})
            assert small.status_code == 200, small.text
        for fmt in ("csv", "parquet"):
            baseline = _status_kib(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
            received = 0
            tail = b""
            with client.stream("GET", EXPORT, params=params | {"format": fmt}) as r:
                assert r.status_code == 200
                for piece in r.iter_bytes():
                    received += len(piece)
                    if fmt == "csv":
                        tail = piece[-200:]
            growth_mib = (_status_kib(pid, "VmHWM") - baseline) / 1024
            if fmt == "csv":
                # ~110 bytes a row: holding the body would take well over the cap.
                assert received > 100 * 1024 * 1024
                last = datetime.fromisoformat(tail.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1].split(b",")[0].decode())
                assert last == start + timedelta(seconds=0.05 * (per_event - 1))
            assert growth_mib < 100, f"{fmt}: peak RSS grew by {growth_mib:.0f} MiB"
