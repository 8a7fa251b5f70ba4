"""Datapoint cells (sql/0041): the writers keep them exact, deletions refresh them, and long-range series read
from them give the answer every row gives."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.analyst.conftest import LONG_START, long_range, series_points, whole_downsample
from tests.conftest import ActiveEvent, unique
from webmacs.repositories import retention as retention_repo
from webmacs.repositories import series as series_repo
from webmacs.repositories.datapoints import datapoint_public_id
from webmacs.services import series as series_service

T0 = LONG_START
DAYS = 30
CELL_COLUMNS = "cell, n, first_time, first_value, min_time, min_value, max_time, max_value, last_time, last_value"


def _rows(seed: int, n: int) -> list[tuple[datetime, float]]:
    """Irregular datapoints over most of DAYS: bursts a millisecond apart, a gap of two days, values from a
    small set (many equal extremes) plus one global minimum and maximum."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    t = T0 + timedelta(minutes=7)
    rows = []
    for i in range(n):
        t += timedelta(milliseconds=1) if i % 41 < 3 else timedelta(seconds=rng.randrange(1, 400))
        if i == n // 3:
            t += timedelta(days=2)
        rows.append((t, float(rng.randrange(10, 19))))
    rows[n // 2] = (rows[n // 2][0], 0.0)
    rows[n // 5] = (rows[n // 5][0], 100.0)
    return rows


def _post(client: httpx.Client, headers: dict[str, str], ev: ActiveEvent, rows: list[tuple[datetime, float]]) -> None:
    for i in range(0, len(rows), 500):
        points = [
            {"value": v, "event_public_id": ev.public_id, "timestamp": t.isoformat()} for t, v in rows[i : i + 500]
        ]
        r = client.post("/api/v1/datapoints/batch", headers=headers, json={"datapoints": points})
        assert r.status_code == 201, r.text


@pytest.fixture
def ingested(
    client: httpx.Client, operator: dict[str, str], make_active_event: Callable[..., ActiveEvent]
) -> tuple[ActiveEvent, list[tuple[datetime, float]]]:
    """An event's datapoints written through the engine in batches, some of them sent twice and one half-new
    (the duplicate-tolerant insert's path), in shuffled order (late data into cells already written)."""
    ev = make_active_event()
    rows = _rows(7, 12_000)
    batches = [rows[i : i + 1500] for i in range(0, len(rows), 1500)]
    random.Random(3).shuffle(batches)  # noqa: S311 - reproducible order
    for b in batches:
        _post(client, operator, ev, b)
    _post(client, operator, ev, batches[0])  # all duplicates
    _post(client, operator, ev, batches[1][700:] + batches[2][:300])  # resent, mixed
    return ev, rows


def _cells(db: psycopg.Connection, event_id: int) -> list[tuple[Any, ...]]:
    """The event's cell rows, each with its packed rows as a sorted list of 16-byte rows (their order is the
    writers')."""
    rows = db.execute(
        f"SELECT {CELL_COLUMNS}, packed FROM datapoint_cells WHERE event_id = %s ORDER BY cell",
        (event_id,),
    ).fetchall()
    return [(*r[:-1], sorted(bytes(r[-1])[i : i + 16] for i in range(0, len(r[-1]), 16))) for r in rows]


def _recomputed(db: psycopg.Connection, event_id: int) -> list[tuple[Any, ...]]:
    """The cells as a recompute from the rows gives them, seen inside a transaction that is rolled back."""
    with db.transaction(force_rollback=True):
        db.execute(series_repo.REFRESH_CELLS_SQL, ([event_id], T0 - timedelta(days=1), T0 + timedelta(days=DAYS + 1)))
        return _cells(db, event_id)


def _compact(db: psycopg.Connection) -> None:
    db.execute(series_repo.COMPACT_CELLS_SQL, ("-infinity", 1_000_000))


def _count(db: psycopg.Connection, event_id: int) -> tuple[int, int]:
    """(datapoints of the event, the sum of its cells' counts)."""
    row = db.execute(
        "SELECT (SELECT count(*) FROM datapoints WHERE event_id = %(e)s),"
        " (SELECT coalesce(sum(n), 0) FROM datapoint_cells WHERE event_id = %(e)s)",
        {"e": event_id},
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_the_engine_writes_each_row_into_the_cells_once(
    db: psycopg.Connection, ingested: tuple[ActiveEvent, list[tuple[datetime, float]]]
) -> None:
    ev, rows = ingested
    assert _count(db, ev.id) == (len(rows), len(rows))  # the resent rows were not counted again
    partial = _cells(db, ev.id)
    _compact(db)
    merged = _cells(db, ev.id)
    assert len(merged) < len(partial)  # shuffled batches left several partial rows in some cells
    assert merged == _recomputed(db, ev.id)
    assert len({c[0] for c in merged}) == len(merged)


@pytest.mark.parametrize("mode", ["m4", "minmax"])
@pytest.mark.parametrize("max_points", [40, 41, 1000])
def test_long_ranges_from_the_cells_are_the_downsample_of_every_row(
    client: httpx.Client,
    viewer: dict[str, str],
    db: psycopg.Connection,
    db_url: str,
    ingested: tuple[ActiveEvent, list[tuple[datetime, float]]],
    mode: series_service.Mode,
    max_points: int,
) -> None:
    ev, rows = ingested
    if max_points == 1000:
        _compact(db)  # answers do not depend on how the cells are split
    picked = long_range(db_url, series_service.from_cells, ev.id, max_points, mode)
    assert picked is not None  # the cells' path, not a fallback
    got = series_points(client, viewer, ev.public_id, mode=mode, max_points=max_points)
    assert got == [(p.time, p.value) for p in picked] == whole_downsample(db, ev.id, max_points, mode)
    assert len(got) <= max_points
    assert got[0] == rows[0] and got[-1] == rows[-1]
    assert {v for _, v in got} >= {0.0, 100.0}


def test_lttb_from_the_cells_keeps_the_ends_and_picks_datapoints(
    client: httpx.Client,
    viewer: dict[str, str],
    db_url: str,
    ingested: tuple[ActiveEvent, list[tuple[datetime, float]]],
) -> None:
    ev, rows = ingested
    assert long_range(db_url, series_service.from_cells, ev.id, 40, "lttb") is not None
    got = series_points(client, viewer, ev.public_id, mode="lttb", max_points=40)
    assert len(got) == 40 and got[0] == rows[0] and got[-1] == rows[-1]
    assert [t for t, _ in got] == sorted({t for t, _ in got})
    assert set(got) <= set(rows)


def test_short_or_sparse_ranges_are_not_read_from_the_cells(
    client: httpx.Client,
    operator: dict[str, str],
    db_url: str,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    # 41 datapoints: at most max_points once the range is known.
    _post(client, operator, ev, [(T0 + timedelta(days=i / 2), float(i)) for i in range(41)])
    assert long_range(db_url, series_service.from_cells, ev.id, 41, "m4") is None
    # Slices narrower than CELLS_PER_SLICE cells (one hour of data, 250 slices).
    dense = make_active_event()
    _post(client, operator, dense, [(T0 + timedelta(seconds=i), float(i % 7)) for i in range(3600)])
    assert long_range(db_url, series_service.from_cells, dense.id, 1000, "m4") is None


def test_deleting_an_experiment_or_a_datapoint_refreshes_the_cells(
    client: httpx.Client,
    admin: dict[str, str],
    viewer: dict[str, str],
    db: psycopg.Connection,
    ingested: tuple[ActiveEvent, list[tuple[datetime, float]]],
) -> None:
    ev, rows = ingested
    exp = db.execute(
        "INSERT INTO experiments (name, public_id) VALUES (%s, %s) RETURNING public_id, id",
        (unique("exp"), unique("exp")),
    ).fetchone()
    assert exp is not None
    # Every third datapoint and the global maximum belong to the experiment; deleting it removes them.
    doomed = [t for i, (t, v) in enumerate(rows) if i % 3 == 1 or v == 100.0]
    db.execute(
        "UPDATE datapoints SET experiment_id = %s WHERE event_id = %s AND time = ANY(%s)", (exp[1], ev.id, doomed)
    )
    r = client.delete(f"/api/v1/experiments/{exp[0]}", headers=admin)
    assert r.status_code == 200, r.text
    kept = [row for row in rows if row[0] not in set(doomed)]
    assert _count(db, ev.id) == (len(kept), len(kept))
    _compact(db)
    assert _cells(db, ev.id) == _recomputed(db, ev.id)
    got = series_points(client, viewer, ev.public_id, mode="m4", max_points=40)
    assert got == whole_downsample(db, ev.id, 40, "m4") and 100.0 not in {v for _, v in got}
    # The global minimum, deleted on its own.
    t_min = next(t for t, v in kept if v == 0.0)
    r = client.delete(f"/api/v1/datapoints/{datapoint_public_id(ev.public_id, t_min)}", headers=admin)
    assert r.status_code == 200, r.text
    assert _count(db, ev.id) == (len(kept) - 1, len(kept) - 1)
    got = series_points(client, viewer, ev.public_id, mode="minmax", max_points=40)
    assert got == whole_downsample(db, ev.id, 40, "minmax") and 0.0 not in {v for _, v in got}


def test_deleting_the_event_deletes_its_cells(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, ingested: Any
) -> None:
    ev, _ = ingested
    r = client.delete(f"/api/v1/events/{ev.public_id}", headers=admin)
    assert r.status_code == 200, r.text
    assert _count(db, ev.id) == (0, 0)


def test_chunks_dropped_under_the_cells_do_not_reach_the_answer(
    client: httpx.Client,
    viewer: dict[str, str],
    db: psycopg.Connection,
    db_url: str,
    make_active_event: Callable[..., ActiveEvent],
    operator: dict[str, str],
) -> None:
    """A retention policy drops chunks in the database, without telling the cells: the answer is still that of
    the rows left (the cells outside the range's first and last datapoints are never read)."""
    ev = make_active_event()
    rows = [(T0 + timedelta(days=d, minutes=7 * i), float(i % 11)) for d in range(6) for i in range(200)]
    rows = [(t - timedelta(days=400), v) for t, v in rows[:600]] + rows[600:]  # the oldest are a year older
    _post(client, operator, ev, rows)
    before = _count(db, ev.id)
    db.execute("SELECT drop_chunks('datapoints', older_than => %s::timestamptz)", (T0 - timedelta(days=300),))
    after = _count(db, ev.id)
    assert after[0] < before[0] and after[1] == before[1]  # rows gone, their cells still there
    span = {"start": T0 - timedelta(days=500), "end": T0 + timedelta(days=DAYS)}
    for mode in ("m4", "minmax"):
        got = series_points(client, viewer, ev.public_id, mode=mode, max_points=40, **span)
        assert min(t for t, _ in got) >= T0
        assert got == whole_downsample(db, ev.id, 40, mode, **span)

    async def drop_stale() -> int:
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            width = timedelta(microseconds=series_service.CELL_US)
            return await retention_repo.drop_cells_without_chunks(conn, width=width)

    # The upkeep job's hourly pass drops the cells the dropped chunks left behind.
    assert asyncio.run(drop_stale()) > 0
    assert _count(db, ev.id) == (after[0], after[0])


def test_compactions_beside_ingest_count_every_row_once(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    db_url: str,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    rows = _rows(11, 8_000)
    done = threading.Event()
    errors: list[BaseException] = []

    def compact() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                while not done.is_set():
                    _compact(conn)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=compact) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        for i in range(0, len(rows), 400):
            _post(client, operator, ev, rows[i : i + 400] + rows[max(0, i - 100) : i])  # each resends 100
    finally:
        done.set()
        for th in threads:
            th.join(timeout=60)
    assert not errors
    assert _count(db, ev.id) == (len(rows), len(rows))
    _compact(db)
    assert _cells(db, ev.id) == _recomputed(db, ev.id)
