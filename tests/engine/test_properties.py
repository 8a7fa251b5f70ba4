"""Property tests over frames: the parser and the engine never crash, and every entry is accounted for."""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ActiveEvent, Server, unique
from webmacs import _core
from webmacs.exceptions import CoreException, FrameTooLargeError, InvalidFrameError

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text()
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def entries(event_ids: list[str]) -> st.SearchStrategy[Any]:
    value = (
        st.floats(allow_nan=True, allow_infinity=True)
        | st.integers(-(10**20), 10**20)
        | st.from_regex(r"-?[0-9]{1,6}(\.[0-9]{1,3})?", fullmatch=True)
        | JSON
    )
    event = st.sampled_from(event_ids) | JSON
    timestamp = (
        st.none()
        | st.integers(-(10**15), 10**15)
        | st.floats()
        | st.text(max_size=30)
        | st.datetimes().map(lambda d: d.isoformat())
    )
    entry = st.fixed_dictionaries(
        {"value": value, "event_public_id": event}, optional={"timestamp": timestamp, "extra": JSON}
    )
    return entry | JSON


def frames(event_ids: list[str]) -> st.SearchStrategy[bytes]:
    frame = st.fixed_dictionaries(
        {"datapoints": st.lists(entries(event_ids), max_size=30)}, optional={"seq": st.integers(-5, 2**64 + 5)}
    )
    # Python's json, as the WebMACS controller uses it: NaN and Infinity are written bare.
    return (
        frame.map(lambda f: json.dumps(f).encode())
        | st.binary(max_size=200)
        | JSON.map(lambda j: json.dumps(j).encode())
    )


@given(frames(["a", "b"]))
@settings(max_examples=300, deadline=None)
def test_parser_accounts_for_every_entry(frame: bytes) -> None:
    try:
        points, rejects, total = _core.validate_frame(frame)
    except (InvalidFrameError, FrameTooLargeError):
        return
    assert len(points) + len(rejects) == total
    assert sorted({i for i, _ in rejects}) == sorted(i for i, _ in rejects)  # one reason per entry


@pytest.fixture(scope="module")
def events(server: Server, db_url: str) -> list[ActiveEvent]:
    # Module-scoped: hypothesis re-runs the test body many times within one fixture instance.
    made = []
    with psycopg.connect(db_url, autocommit=True) as db:
        for enabled in (True, False):
            ev = db.execute(
                "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'u', 'sensor')"
                " RETURNING id, public_id",
                (unique("prop"),),
            ).fetchone()
            pi = db.execute(
                "INSERT INTO plugin_instances (plugin_id, instance_name, enabled) VALUES ('simulated', %s, %s)"
                " RETURNING id",
                (unique("inst"), enabled),
            ).fetchone()
            assert ev is not None and pi is not None
            db.execute(
                "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
                " event_public_id) VALUES (%s, 'ch', 'Channel', 'input', 'u', %s)",
                (pi[0], ev[1]),
            )
            made.append(ActiveEvent(ev[0], ev[1], "prop", pi[0]))
    server.refresh_catalog()
    return made


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_engine_never_crashes_and_counts_every_entry(
    data: st.DataObject, server: Server, events: list[ActiveEvent]
) -> None:
    engine = server.rt.ingest.engine
    frame = data.draw(frames([events[0].public_id, events[1].public_id, "ghost"]))
    try:
        receipt = engine.submit(frame)
    except (InvalidFrameError, FrameTooLargeError):
        return
    except CoreException as e:  # pragma: no cover - anything else is a failure with a readable message
        raise AssertionError(f"unexpected engine error {e!r} for {frame[:200]!r}") from e
    assert receipt.accepted + receipt.rejected == receipt.total
    assert sum(receipt.reasons.values()) == receipt.rejected


def test_property_rows_landed(server: Server, events: list[ActiveEvent], db: psycopg.Connection) -> None:
    """Round trip: what the engine accepted for the active event is what the table holds (after a commit)."""
    ingest = server.rt.ingest
    before = ingest.engine.stats()["accepted"]
    receipt = ingest.engine.submit(
        json.dumps({"datapoints": [{"value": i, "event_public_id": events[0].public_id} for i in range(10)]}).encode()
    )
    assert receipt.accepted == 10 and ingest.engine.stats()["accepted"] == before + 10
    deadline = time.monotonic() + 20
    while ingest.engine.committed_ticket() < receipt.ticket:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    n = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (events[0].id,)).fetchone()
    inactive = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (events[1].id,)).fetchone()
    assert n is not None and n[0] >= 10
    assert inactive == (0,)
