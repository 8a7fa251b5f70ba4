"""`/ws/controller/telemetry` (spec §7.2): silence on success, exact error frames, acks after commit, drops."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import orjson
import psycopg
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ActiveEvent, Server, unique


def ws_url(server: Server, path: str, token: str) -> str:
    return f"{server.url.replace('http://', 'ws://')}{path}?token={token}"


@contextmanager
def telemetry(server: Server, token: str) -> Iterator[ClientConnection]:
    with connect(ws_url(server, "/ws/controller/telemetry", token), max_size=None, open_timeout=10) as ws:
        yield ws


def recv_json(ws: ClientConnection) -> dict:
    return orjson.loads(ws.recv(timeout=20))


def count(db: psycopg.Connection, event_id: int) -> int:
    row = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (event_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_success_is_silent_and_ack_follows_commit(
    server: Server, admin_token: str, db: psycopg.Connection, make_active_event: Callable[..., ActiveEvent]
) -> None:
    ev = make_active_event()
    with telemetry(server, admin_token) as ws:
        ws.send(orjson.dumps({"datapoints": [{"value": 1.0, "event_public_id": ev.public_id}]}))
        ws.send(
            orjson.dumps(
                {
                    "seq": 7,
                    "datapoints": [
                        {"value": 2.0, "event_public_id": ev.public_id},
                        {"value": "x", "event_public_id": ev.public_id},
                        {"value": 3.0, "event_public_id": ev.public_id, "extra": True},
                    ],
                }
            )
        )
        # The first frame (no seq) produced nothing; the first message is the second frame's ack…
        assert recv_json(ws) == {"type": "ack", "seq": 7, "accepted": 2, "rejected": 1}
        # …sent only once the rows of both frames were committed.
        assert count(db, ev.id) == 3


def test_error_frames_are_exact(
    server: Server, admin_token: str, db: psycopg.Connection, make_active_event: Callable[..., ActiveEvent]
) -> None:
    ev = make_active_event()
    with telemetry(server, admin_token) as ws:
        ws.send(orjson.dumps({"datapoints": [{"value": 1, "event_public_id": ev.public_id}] * 501}))
        assert recv_json(ws) == {"type": "error", "message": "Batch too large (501), max 500"}
        ws.send(orjson.dumps({"datapoints": [{"value": None, "event_public_id": ev.public_id}, 5, {"value": 1}]}))
        assert recv_json(ws) == {"type": "error", "message": "No valid datapoints in batch"}
        # Missing or empty `datapoints` is ignored silently; the connection stays usable.
        ws.send(b"{}")
        ws.send(orjson.dumps({"datapoints": []}))
        ws.send(orjson.dumps({"seq": 1, "datapoints": [{"value": 1, "event_public_id": ev.public_id}]}))
        assert recv_json(ws) == {"type": "ack", "seq": 1, "accepted": 1, "rejected": 0}
    assert count(db, ev.id) == 1


def test_unlinked_and_unknown_events_are_dropped_silently(
    server: Server, admin_token: str, db: psycopg.Connection, make_active_event: Callable[..., ActiveEvent]
) -> None:
    off = make_active_event(enabled=False)
    with telemetry(server, admin_token) as ws:
        ws.send(
            orjson.dumps(
                {
                    "seq": 3,
                    "datapoints": [
                        {"value": 1, "event_public_id": off.public_id},
                        {"value": 1, "event_public_id": unique("ghost")},
                    ],
                }
            )
        )
        # No error frame: the entries were valid, their events just do not take data.
        assert recv_json(ws) == {"type": "ack", "seq": 3, "accepted": 0, "rejected": 2}
    assert count(db, off.id) == 0


def test_binary_frames_and_documented_edge_values(
    server: Server, admin_token: str, db: psycopg.Connection, make_active_event: Callable[..., ActiveEvent]
) -> None:
    ev = make_active_event()
    with telemetry(server, admin_token) as ws:
        # Python's json writes NaN/Infinity bare: each is one rejected entry, not a broken frame.
        ws.send(
            b'{"seq": 1, "datapoints": [{"value": NaN, "event_public_id": "%s"},'
            b' {"value": -Infinity, "event_public_id": "%s"}, {"value": 1e308, "event_public_id": "%s"}]}'
            % ((ev.public_id.encode(),) * 3)
        )
        assert recv_json(ws) == {"type": "ack", "seq": 1, "accepted": 1, "rejected": 2}
        ws.send(
            orjson.dumps(
                {
                    "seq": 2,
                    "datapoints": [
                        {"value": 1, "event_public_id": ev.public_id, "timestamp": "2030-99-99"},
                        {"value": 1, "event_public_id": ev.public_id, "timestamp": 4102444800000},  # 2100: far future
                        {"value": 1, "event_public_id": ev.public_id, "timestamp": "2024-01-01T00:00:00Z"},
                    ],
                }
            )
        )
        assert recv_json(ws) == {"type": "ack", "seq": 2, "accepted": 1, "rejected": 2}
        # A 10 MB frame exceeds the engine's byte limit: an error frame, the connection stays.
        ws.send(b'{"datapoints": [], "pad": "' + b"x" * (10 << 20) + b'"}')
        message = recv_json(ws)
        assert message["type"] == "error" and message["message"].startswith("Frame too large")
        ws.send(orjson.dumps({"seq": 3, "datapoints": []}))
        assert recv_json(ws) == {"type": "ack", "seq": 3, "accepted": 0, "rejected": 0}
    assert count(db, ev.id) == 2


@pytest.mark.parametrize("frame", [b"not json", b"[1, 2]", b'"text"', b"{" * 100_000])
def test_non_object_frames_close_the_connection(server: Server, admin_token: str, frame: bytes) -> None:
    with telemetry(server, admin_token) as ws:
        ws.send(frame.decode())
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=20)


def test_viewer_may_push_telemetry(
    server: Server, viewer: dict[str, str], db: psycopg.Connection, make_active_event: Callable[..., ActiveEvent]
) -> None:
    ev = make_active_event()
    token = viewer["Authorization"].removeprefix("Bearer ")
    with telemetry(server, token) as ws:
        ws.send(orjson.dumps({"seq": 1, "datapoints": [{"value": 1, "event_public_id": ev.public_id}]}))
        assert recv_json(ws)["accepted"] == 1
    assert count(db, ev.id) == 1


def test_unauthenticated_is_closed_1008(server: Server) -> None:
    with (
        connect(ws_url(server, "/ws/controller/telemetry", ""), open_timeout=10) as ws,
        pytest.raises(ConnectionClosed) as e,
    ):
        ws.recv(timeout=20)
    assert e.value.rcvd is not None and e.value.rcvd.code == 1008
