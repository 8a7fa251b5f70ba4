"""`/ws/datapoints/stream` (spec §7.1): connected greeting, ping/pong, live datapoint broadcasts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ActiveEvent, Server


def stream(server: Server, token: str) -> ClientConnection:
    return connect(f"{server.url.replace('http://', 'ws://')}/ws/datapoints/stream?token={token}", open_timeout=10)


def recv_json(ws: ClientConnection) -> dict:
    return orjson.loads(ws.recv(timeout=20))


def test_connected_then_ping_pong_and_other_objects_ignored(server: Server, admin_token: str) -> None:
    with stream(server, admin_token) as ws:
        assert recv_json(ws) == {"type": "connected", "message": "Subscribed to live datapoint stream."}
        ws.send('{"type": "subscribe", "events": ["x"]}')
        ws.send('{"type": "ping"}')
        assert recv_json(ws) == {"type": "pong"}


@pytest.mark.parametrize("message", ["nope", "[1]", "42"])
def test_non_object_closes(server: Server, admin_token: str, message: str) -> None:
    with stream(server, admin_token) as ws:
        recv_json(ws)
        ws.send(message)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=20)


def test_invalid_token_is_closed(server: Server) -> None:
    with stream(server, "garbage") as ws, pytest.raises(ConnectionClosed) as e:
        ws.recv(timeout=20)
    assert e.value.rcvd is not None and (e.value.rcvd.code, e.value.rcvd.reason) == (1008, "Invalid or expired token")


def test_subscribers_receive_datapoint_batches(
    server: Server,
    admin_token: str,
    client: httpx.Client,
    operator: dict[str, str],
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    with stream(server, admin_token) as a, stream(server, admin_token) as b:
        recv_json(a)
        recv_json(b)
        r = client.post(
            "/api/v1/datapoints/batch",
            headers=operator,
            json={
                "datapoints": [
                    {"value": 1.5, "event_public_id": ev.public_id},
                    {"value": 2.5, "event_public_id": ev.public_id},
                ]
            },
        )
        assert r.status_code == 201
        for ws in (a, b):
            while True:
                msg = recv_json(ws)
                assert msg["type"] == "datapoints_batch"
                mine = [d for d in msg["datapoints"] if d["event_public_id"] == ev.public_id]
                if mine:
                    break
            # An event passing the throttle contributes all its points of the frame.
            assert [d["value"] for d in mine] == [1.5, 2.5]
            assert set(mine[0]) == {"value", "event_public_id", "timestamp", "experiment_public_id"}
            assert mine[0]["timestamp"].endswith("+00:00")
            datetime.fromisoformat(mine[0]["timestamp"])
