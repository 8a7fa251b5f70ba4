"""Fixtures of the analyst tests: events and experiments made with SQL, datapoints loaded with COPY."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server, unique
from webmacs.repositories import series as series_repo
from webmacs.services import series as series_service


@dataclass
class Event:
    id: int
    public_id: str
    name: str
    unit: str


@pytest.fixture
def make_event(db: psycopg.Connection, server: Server) -> Any:
    """Factory of events (the `server` fixture has applied the migrations)."""

    def make(name: str | None = None, unit: str = "°C") -> Event:
        name = name or unique("series-ev")
        row = db.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 100, %s, 'sensor')"
            " RETURNING id, public_id",
            (name, unit),
        ).fetchone()
        assert row is not None
        return Event(row[0], row[1], name, unit)

    return make


@pytest.fixture
def make_experiment(db: psycopg.Connection) -> Any:
    def make(started_on: datetime, stopped_on: datetime | None = None) -> tuple[int, str]:
        row = db.execute(
            "INSERT INTO experiments (name, started_on, stopped_on) VALUES (%s, %s, %s) RETURNING id, public_id",
            (unique("series-x"), started_on, stopped_on),
        ).fetchone()
        assert row is not None
        return row[0], row[1]

    return make


def load(db: psycopg.Connection, rows: Iterable[tuple[datetime, int, int | None, float]]) -> None:
    """COPY (time, event_id, experiment_id, value) rows into the hypertable, and refresh the cells of what was
    written, as every writer that bypasses the engine must (sql/0041)."""
    spans: dict[int, tuple[datetime, datetime]] = {}
    with db.cursor() as cur, cur.copy("COPY datapoints (time, event_id, experiment_id, value) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            lo, hi = spans.get(row[1], (row[0], row[0]))
            spans[row[1]] = (min(lo, row[0]), max(hi, row[0]))
    for event_id, (lo, hi) in spans.items():
        db.execute(series_repo.REFRESH_CELLS_SQL, ([event_id], lo, hi))


# --- long ranges: the API's answer, the downsample of every row, and a long-range path called directly ------

#: The range the long-range tests use.
LONG_START = datetime(2026, 7, 1, tzinfo=UTC)
LONG_END = LONG_START + timedelta(days=30)


def series_points(
    client: httpx.Client,
    headers: dict[str, str],
    public_id: str,
    *,
    start: datetime = LONG_START,
    end: datetime = LONG_END,
    **params: Any,
) -> list[tuple[datetime, float]]:
    """GET /api/v1/series of one event over [start, end) as (time, value) pairs."""
    query = {"events": public_id, "start": start.isoformat(), "end": end.isoformat()} | params
    r = client.get("/api/v1/series", headers=headers, params=query)
    assert r.status_code == 200, r.text
    return [(datetime.fromisoformat(t), v) for t, v in r.json()["events"][public_id]["points"]]


def whole_downsample(
    db: psycopg.Connection,
    event_id: int,
    max_points: int,
    mode: series_service.Mode,
    *,
    start: datetime = LONG_START,
    end: datetime = LONG_END,
) -> list[tuple[datetime, float]]:
    """The downsample of every datapoint of [start, end), read with the plain range query."""
    row = db.cursor(binary=True).execute(series_repo.RANGE_SQL, (event_id, start, end)).fetchone()
    assert row is not None
    packed = series_service.from_pg((bytes(row[0] or b""), bytes(row[1] or b""), None))
    return [(p.time, p.value) for p in series_service.downsample(packed, max_points, mode)]


LongRange = Callable[..., Awaitable[list[series_service.Point] | None]]


def long_range(db_url: str, select: LongRange, event_id: int, max_points: int, mode: series_service.Mode) -> Any:
    """A long-range path (`series_service.preselected`, `from_cells`) called directly over the long range."""

    async def run() -> Any:
        async with await psycopg.AsyncConnection.connect(db_url, options="-c timezone=UTC") as conn:
            return await select(
                conn, event_id=event_id, start=LONG_START, end=LONG_END, max_points=max_points, mode=mode
            )

    return asyncio.run(run())
