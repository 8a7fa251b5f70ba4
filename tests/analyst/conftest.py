"""Fixtures of the analyst tests: events and experiments made with SQL, datapoints loaded with COPY."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import pytest

from tests.conftest import Server, unique
from webmacs.repositories import series as series_repo


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
