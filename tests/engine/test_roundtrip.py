"""Round trip frame → binary COPY → query: values and client timestamps come back bit for bit (hypothesis)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server, unique

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Client timestamps between 1990 and now (µs); far-future ones are rejected by design.
MICROS = st.integers(631_152_000_000_000, 1_700_000_000_000_000)


@pytest.fixture(scope="module")
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True, options="-c timezone=UTC") as c:
        yield c


def new_event(conn: psycopg.Connection, server: Server) -> tuple[int, str]:
    ev = conn.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'u', 'sensor')"
        " RETURNING id, public_id",
        (unique("rt"),),
    ).fetchone()
    pi = conn.execute(
        "INSERT INTO plugin_instances (plugin_id, instance_name, enabled) VALUES ('simulated', %s, true) RETURNING id",
        (unique("inst"),),
    ).fetchone()
    assert ev is not None and pi is not None
    conn.execute(
        "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
        " event_public_id) VALUES (%s, 'ch', 'Channel', 'input', 'u', %s)",
        (pi[0], ev[1]),
    )
    server.refresh_catalog()
    return ev[0], ev[1]


@given(
    points=st.lists(
        st.tuples(
            MICROS, st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(["iso", "iso_offset", "epoch_ms"])
        ),
        min_size=1,
        max_size=60,
        unique_by=lambda p: p[0] // 1000,
    )
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_values_and_client_timestamps_round_trip(
    points: list[tuple[int, float, str]], server: Server, conn: psycopg.Connection
) -> None:
    event_id, event = new_event(conn, server)
    entries = []
    expected = []
    for us, value, form in points:
        t = EPOCH + timedelta(microseconds=us)
        if form == "iso":
            stamp: str | int = t.isoformat().replace("+00:00", "Z")
        elif form == "iso_offset":
            stamp = t.astimezone(timezone(timedelta(hours=-5, minutes=-30))).isoformat()
        else:
            stamp = us // 1000
            t = EPOCH + timedelta(milliseconds=us // 1000)
        entries.append({"value": value, "event_public_id": event, "timestamp": stamp})
        expected.append((t, value))
    engine = server.rt.ingest.engine
    receipt = engine.submit(orjson.dumps({"datapoints": entries}))
    assert (receipt.accepted, receipt.rejected) == (len(points), 0)
    deadline = time.monotonic() + 30
    while engine.committed_ticket() < receipt.ticket:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    rows = conn.execute("SELECT time, value FROM datapoints WHERE event_id = %s ORDER BY time", (event_id,)).fetchall()
    assert [tuple(r) for r in rows] == sorted(expected)
