"""The engine's native `/ws/controller/telemetry` listener (WEBMACS_TELEMETRY_LISTEN): the Python endpoint's
semantics (spec §7 auth and close reasons, §7.2 frames), served by Rust on a port of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import orjson
import psycopg
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import (
    ADMIN_EMAIL,
    SECRET,
    ActiveEvent,
    Server,
    bearer,
    free_port,
    make_settings,
    start_server,
    unique,
)
from tests.ws.auth_cases import FORGED_TOKENS, MISSING_TOKEN_QUERIES

PATH = "/ws/controller/telemetry"


@pytest.fixture(scope="module")
def native(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    listen = f"127.0.0.1:{free_port()}"
    s = start_server(make_settings(db_url, tmp_path_factory.mktemp("native"), webmacs_telemetry_listen=listen))
    try:
        assert s.rt.telemetry_listen == listen
        yield s
    finally:
        s.stop()


def base(native: Server) -> str:
    return f"ws://{native.rt.telemetry_listen}"


@pytest.fixture
def active_event(native: Server, make_active_event: Callable[..., ActiveEvent]) -> ActiveEvent:
    ev = make_active_event()
    native.refresh_catalog()  # the fixture refreshes the session server's engine; this is another one
    return ev


@contextmanager
def telemetry(native: Server, query: str | None) -> Iterator[ClientConnection]:
    url = base(native) + PATH + ("" if query is None else f"?{query}")
    with connect(url, max_size=None, open_timeout=10, proxy=None) as ws:
        yield ws


def recv_json(ws: ClientConnection) -> dict:
    return orjson.loads(ws.recv(timeout=20))


def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    rcvd = closed.value.rcvd
    assert rcvd is not None, "connection dropped without a close frame"
    return rcvd.code, rcvd.reason


def refused(native: Server, query: str | None) -> tuple[int, str]:
    with telemetry(native, query) as ws:
        return closed_with(ws)


def count(db: psycopg.Connection, event_id: int) -> int:
    row = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (event_id,)).fetchone()
    assert row is not None
    return int(row[0])


def admin_id(db: psycopg.Connection) -> int:
    row = db.execute("SELECT id FROM users WHERE email = %s", (ADMIN_EMAIL,)).fetchone()
    assert row is not None
    return int(row[0])


def frame(ev: ActiveEvent, *values: float, seq: int | None = None) -> bytes:
    body: dict = {"datapoints": [{"value": v, "event_public_id": ev.public_id} for v in values]}
    if seq is not None:
        body["seq"] = seq
    return orjson.dumps(body)


def new_user(client: httpx.Client, admin: dict[str, str]) -> dict[str, str]:
    email = f"{unique('nat')}@example.com"
    r = client.post(
        "/api/v1/users",
        headers=admin,
        json={"email": email, "username": unique("nat"), "password": "password123", "role": "viewer"},
    )
    assert r.status_code == 201, r.text
    token = client.post("/api/v1/auth/login", json={"email": email, "password": "password123"}).json()["access_token"]
    return {"token": token, **bearer(token)}


# --- authentication: accepted first, then close 1008 with the spec's reason ---


@pytest.mark.parametrize("query", MISSING_TOKEN_QUERIES)
def test_missing_token(native: Server, query: str | None) -> None:
    assert refused(native, query) == (1008, "Authentication required")


@pytest.mark.parametrize("token", FORGED_TOKENS)
def test_garbage_or_forged_jwt(native: Server, token: str) -> None:
    assert refused(native, f"token={token}") == (1008, "Invalid or expired token")


def test_expired_jwt(native: Server, db: psycopg.Connection) -> None:
    past = datetime.now(UTC) - timedelta(minutes=5)
    token = jwt.encode(
        {"sub": str(admin_id(db)), "exp": past, "iat": past - timedelta(hours=1)}, SECRET, algorithm="HS256"
    )
    assert refused(native, f"token={token}") == (1008, "Invalid or expired token")


def test_revoked_jwt_after_logout(
    native: Server, client: httpx.Client, admin: dict[str, str], active_event: ActiveEvent
) -> None:
    user = new_user(client, admin)
    with telemetry(native, f"token={user['token']}") as ws:
        ws.send(frame(active_event, 1.0, seq=1))
        assert recv_json(ws)["type"] == "ack"
    assert client.post("/api/v1/auth/logout", headers=bearer(user["token"])).status_code == 200
    assert refused(native, f"token={user['token']}") == (1008, "Token has been revoked")


def test_user_not_found(native: Server) -> None:
    token = jwt.encode({"sub": "987654321", "exp": datetime.now(UTC) + timedelta(minutes=5)}, SECRET, algorithm="HS256")
    assert refused(native, f"token={token}") == (1008, "User not found")


@pytest.mark.parametrize("token", ["wm_" + "A" * 64, "wm_", "wm_%27%20OR%201%3D1", "wm_%00"])
def test_unknown_api_token(native: Server, token: str) -> None:
    assert refused(native, f"token={token}") == (1008, "Invalid API token")


def test_expired_api_token(native: Server, client: httpx.Client, admin: dict[str, str]) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    created = client.post("/api/v1/tokens", headers=admin, json={"name": "old", "expires_at": past}).json()
    assert refused(native, f"token={created['token']}") == (1008, "API token expired")


def test_valid_jwt_is_accepted(
    native: Server, admin_token: str, db: psycopg.Connection, active_event: ActiveEvent
) -> None:
    with telemetry(native, f"token={admin_token}") as ws:
        ws.send(frame(active_event, 1.5, seq=1))
        assert recv_json(ws) == {"type": "ack", "seq": 1, "accepted": 1, "rejected": 0}
    assert count(db, active_event.id) == 1


def test_percent_encoded_api_token_is_accepted_and_use_recorded(
    native: Server, client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, active_event: ActiveEvent
) -> None:
    created = client.post("/api/v1/tokens", headers=admin, json={"name": "controller"}).json()
    encoded = "".join(f"%{b:02X}" for b in created["token"].encode())
    with telemetry(native, f"token={encoded}&_t=1") as ws:
        ws.send(frame(active_event, 2.5, seq=9))
        assert recv_json(ws) == {"type": "ack", "seq": 9, "accepted": 1, "rejected": 0}
    row = db.execute("SELECT last_used_at FROM api_tokens WHERE public_id = %s", (created["public_id"],)).fetchone()
    assert row is not None and row[0] is not None


# --- frames (spec §7.2) ---


def test_rows_are_visible_once_acked(
    native: Server, admin_token: str, db: psycopg.Connection, active_event: ActiveEvent
) -> None:
    ev = active_event
    with telemetry(native, f"token={admin_token}") as ws:
        ws.send(frame(ev, 1.0))  # no seq: silence
        ws.send(
            orjson.dumps(
                {
                    "seq": 7,
                    "datapoints": [
                        {"value": 2.0, "event_public_id": ev.public_id},
                        {"value": "x", "event_public_id": ev.public_id},
                        {"value": "3.5", "event_public_id": ev.public_id, "extra": True},
                    ],
                }
            )
        )
        assert recv_json(ws) == {"type": "ack", "seq": 7, "accepted": 2, "rejected": 1}
        assert count(db, ev.id) == 3
        # Binary frames are frames too.
        ws.send(frame(ev, 4.0, seq=8))
        assert recv_json(ws) == {"type": "ack", "seq": 8, "accepted": 1, "rejected": 0}
        assert count(db, ev.id) == 4
    values = [
        r[0] for r in db.execute("SELECT value FROM datapoints WHERE event_id = %s ORDER BY time", (ev.id,)).fetchall()
    ]
    assert values == [1.0, 2.0, 3.5, 4.0]


def test_error_frames_are_exact(
    native: Server, admin_token: str, db: psycopg.Connection, active_event: ActiveEvent
) -> None:
    ev = active_event
    with telemetry(native, f"token={admin_token}") as ws:
        ws.send(frame(ev, *([1.0] * 501)))
        assert recv_json(ws) == {"type": "error", "message": "Batch too large (501), max 500"}
        ws.send(orjson.dumps({"datapoints": [{"value": None, "event_public_id": ev.public_id}, 5, {"value": 1}]}))
        assert recv_json(ws) == {"type": "error", "message": "No valid datapoints in batch"}
        # Missing or empty `datapoints` is ignored; unknown events are dropped silently; the socket stays usable.
        ws.send(b"{}")
        ws.send(orjson.dumps({"datapoints": []}))
        ws.send(orjson.dumps({"seq": 3, "datapoints": [{"value": 1.0, "event_public_id": "no-such-event"}]}))
        assert recv_json(ws) == {"type": "ack", "seq": 3, "accepted": 0, "rejected": 1}
        ws.send(frame(ev, 5.0, seq=4))
        assert recv_json(ws) == {"type": "ack", "seq": 4, "accepted": 1, "rejected": 0}
    assert count(db, ev.id) == 1


@pytest.mark.parametrize("payload", ["not json", "[1, 2]", "42"])
def test_non_json_or_non_object_closes(native: Server, admin_token: str, payload: str) -> None:
    with telemetry(native, f"token={admin_token}") as ws:
        ws.send(payload)
        assert closed_with(ws) == (1007, "Frame is not a JSON object")


def test_other_paths_are_not_found(native: Server, admin_token: str) -> None:
    http_base = f"http://{native.rt.telemetry_listen}"
    with httpx.Client(timeout=10) as c:
        assert c.get(http_base + "/api/v1/events").status_code == 404
        # The path without an upgrade is not a WebSocket request: 404, as Starlette answers.
        assert c.get(http_base + PATH).status_code == 404
    with pytest.raises(InvalidStatus) as e, connect(base(native) + "/ws/other?token=x", open_timeout=10, proxy=None):
        pass
    assert e.value.response.status_code == 404
    # The live stream is the other route the engine serves on its own port.
    with connect(f"{base(native)}/ws/datapoints/stream?token={admin_token}", open_timeout=10, proxy=None) as ws:
        assert recv_json(ws)["type"] == "connected"


def test_full_queue_pauses_reads_and_shutdown_closes_1001(
    db_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    admin_token: str,
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    s = start_server(
        make_settings(
            db_url,
            tmp_path_factory.mktemp("native-bp"),
            webmacs_telemetry_listen=listen,
            webmacs_ingest_queue_capacity=1,
        )
    )
    try:
        ev = make_active_event()
        s.refresh_catalog()
        with telemetry(s, f"token={admin_token}") as ws:
            # A queue of one row: most frames wait for a commit before they are read; none is lost or reordered.
            for seq in range(1, 201):
                ws.send(frame(ev, float(seq), seq=seq))
            assert [recv_json(ws)["seq"] for _ in range(200)] == list(range(1, 201))
        assert count(db, ev.id) == 200
        assert s.rt.ingest.engine.stats()["queue_full"] > 0
        with telemetry(s, f"token={admin_token}") as ws:
            ws.send(frame(ev, 1.0, seq=1))
            assert recv_json(ws)["seq"] == 1
            s.stop()
            assert closed_with(ws) == (1001, "Server shutting down")
    finally:
        s.stop()
