"""`GET /health` reports the newest datapoint of any event (spec §17)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import psycopg

from tests.conftest import unique


def test_last_datapoint_is_the_newest_across_events(client: httpx.Client, db: psycopg.Connection) -> None:
    # Far in the future so that no datapoint another test wrote is newer.
    newest = datetime(2100, 1, 1, 12, 30, 15, 123456, tzinfo=UTC)
    events = [
        db.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'u', 'sensor') RETURNING id",
            (unique("hl"),),
        ).fetchall()[0][0]
        for _ in range(2)
    ]
    try:
        db.execute(
            "INSERT INTO datapoints (time, event_id, value) VALUES (%s, %s, 1), (%s, %s, 2), (%s, %s, 3)",
            (newest - timedelta(days=1), events[0], newest, events[1], newest - timedelta(hours=1), events[1]),
        )
        assert client.get("/health").json()["last_datapoint"] == "2100-01-01T12:30:15.123456Z"
    finally:
        db.execute("DELETE FROM datapoints WHERE event_id = ANY(%s)", (events,))
        db.execute("DELETE FROM events WHERE id = ANY(%s)", (events,))
        # Leave no empty far-future chunk behind for chunk-counting tests (retention) to trip over.
        db.execute("SELECT drop_chunks('datapoints', newer_than => '2099-01-01'::timestamptz)")
    body = client.get("/health").json()
    assert body["last_datapoint"] is None or body["last_datapoint"] < "2100"
