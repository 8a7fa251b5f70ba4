"""WebSocket authentication (spec §7) on both endpoints and the API's own port: accept, then the `token`
query parameter, or close 1008 with the spec's reason; open sessions end when their credential stops holding."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import orjson
import psycopg
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    SECRET,
    Server,
    bearer,
    login,
    make_settings,
    start_server,
    unique,
)
from tests.ws.auth_cases import FORGED_TOKENS, MISSING_TOKEN_QUERIES

PATHS = ["/ws/controller/telemetry", "/ws/datapoints/stream"]


@pytest.fixture(scope="module")
def ws_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Sessions are re-checked every 0.3 s here so that revocation tests stay short.
    settings = make_settings(db_url, tmp_path_factory.mktemp("ws-auth"), webmacs_ws_recheck_s=0.3)
    server = start_server(settings)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(ws_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ws_server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def admin_headers(ws_server: Server) -> dict[str, str]:
    with httpx.Client(base_url=ws_server.url) as c:
        return bearer(login(c, ADMIN_EMAIL, ADMIN_PASSWORD))


def new_user(http: httpx.Client, admin_headers: dict[str, str], role: str = "viewer") -> dict[str, Any]:
    email, password = f"{unique('ws')}@example.com", "password123"
    r = http.post(
        "/api/v1/users",
        headers=admin_headers,
        json={"email": email, "username": unique("ws"), "password": password, "role": role},
    )
    assert r.status_code == 201, r.text
    body = http.post("/api/v1/auth/login", json={"email": email, "password": password}).json()
    return {"public_id": body["public_id"], "token": body["access_token"], "headers": bearer(body["access_token"])}


def ws_url(server: Server, path: str, query: str | None) -> str:
    base = server.url.replace("http://", "ws://") + path
    return base if query is None else f"{base}?{query}"


def accepted(ws: ClientConnection, path: str) -> None:
    """Prove the session is open: the stream greets, telemetry acknowledges a frame."""
    if path.endswith("stream"):
        assert orjson.loads(ws.recv(timeout=10))["type"] == "connected"
    else:
        ws.send(orjson.dumps({"seq": 1, "datapoints": []}))
        assert orjson.loads(ws.recv(timeout=10)) == {"type": "ack", "seq": 1, "accepted": 0, "rejected": 0}


def accepts(server: Server, path: str, query: str) -> bool:
    with connect(ws_url(server, path, query), proxy=None, open_timeout=10) as ws:
        accepted(ws, path)
    return True


def _drain(ws: ClientConnection, timeout: float) -> None:
    while True:
        ws.recv(timeout=timeout)


def closed_with(ws: ClientConnection, timeout: float = 10) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        _drain(ws, timeout)
    rcvd = closed.value.rcvd
    assert rcvd is not None, "connection dropped without a close frame"
    return rcvd.code, rcvd.reason


def refused(server: Server, path: str, query: str | None) -> tuple[int, str]:
    """Connect (the upgrade is accepted first) and return the close code and reason the server sent."""
    with connect(ws_url(server, path, query), proxy=None, open_timeout=10) as ws:
        return closed_with(ws)


def expired_jwt(user_id: int) -> str:
    past = datetime.now(UTC) - timedelta(minutes=5)
    return jwt.encode({"sub": str(user_id), "exp": past, "iat": past - timedelta(hours=1)}, SECRET, algorithm="HS256")


def internal_id(db: psycopg.Connection, public_id: str) -> int:
    row = db.execute("SELECT id FROM users WHERE public_id = %s", (public_id,)).fetchone()
    assert row is not None
    return int(row[0])


# --- accepted ---


@pytest.mark.parametrize("path", PATHS)
def test_valid_jwt_is_accepted_for_any_role(
    ws_server: Server, http: httpx.Client, admin_headers: dict[str, str], path: str
) -> None:
    user = new_user(http, admin_headers, role="viewer")
    assert accepts(ws_server, path, f"token={user['token']}")


@pytest.mark.parametrize("path", PATHS)
def test_percent_encoded_api_token_is_accepted_and_use_recorded(
    ws_server: Server, http: httpx.Client, admin_headers: dict[str, str], db: psycopg.Connection, path: str
) -> None:
    user = new_user(http, admin_headers, role="operator")
    created = http.post("/api/v1/tokens", headers=user["headers"], json={"name": "controller"}).json()
    # Every byte percent-encoded: the server must see the decoded token.
    encoded = "".join(f"%{b:02X}" for b in created["token"].encode())
    assert accepts(ws_server, path, f"token={encoded}&_t=1")
    row = db.execute("SELECT last_used_at FROM api_tokens WHERE public_id = %s", (created["public_id"],)).fetchone()
    assert row is not None and row[0] is not None


# --- refused: close 1008 with the spec's reason ---


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("query", MISSING_TOKEN_QUERIES)
def test_missing_token(ws_server: Server, query: str | None, path: str) -> None:
    assert refused(ws_server, path, query) == (1008, "Authentication required")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("token", FORGED_TOKENS)
def test_undecodable_or_forged_jwt(ws_server: Server, token: str, path: str) -> None:
    assert refused(ws_server, path, f"token={token}") == (1008, "Invalid or expired token")


@pytest.mark.parametrize("path", PATHS)
def test_expired_jwt(ws_server: Server, db: psycopg.Connection, path: str) -> None:
    admin_id = db.execute("SELECT id FROM users WHERE email = %s", (ADMIN_EMAIL,)).fetchall()[0][0]
    assert refused(ws_server, path, f"token={expired_jwt(admin_id)}") == (1008, "Invalid or expired token")


@pytest.mark.parametrize("path", PATHS)
def test_logged_out_jwt_and_its_respellings(
    ws_server: Server, http: httpx.Client, admin_headers: dict[str, str], path: str
) -> None:
    user = new_user(http, admin_headers)
    assert accepts(ws_server, path, f"token={user['token']}")
    assert http.post("/api/v1/auth/logout", headers=user["headers"]).status_code == 200
    assert refused(ws_server, path, f"token={user['token']}") == (1008, "Token has been revoked")
    # The same bytes spelled otherwise (padding appended) are not a second, unrevoked token.
    for respelled in (user["token"] + "=", user["token"] + "%3D%3D"):
        assert refused(ws_server, path, f"token={respelled}") == (1008, "Invalid or expired token")


def test_jwt_is_decoded_before_the_blacklist_is_consulted(
    ws_server: Server, http: httpx.Client, admin_headers: dict[str, str], db: psycopg.Connection
) -> None:
    # Spec §7: on WebSockets an expired token that was also logged out reads as expired (HTTP says revoked).
    user = new_user(http, admin_headers)
    token = expired_jwt(internal_id(db, user["public_id"]))
    db.execute("INSERT INTO blacklist_tokens (token) VALUES (%s)", (token,))
    for path in PATHS:
        assert refused(ws_server, path, f"token={token}") == (1008, "Invalid or expired token")
    r = http.get("/api/v1/auth/me", headers=bearer(token))
    assert r.status_code == 401 and r.json() == {"detail": "Token has been revoked."}


@pytest.mark.parametrize("token", ["wm_" + "A" * 64, "wm_", "wm_%27%20OR%201%3D1", "wm_%00"])
def test_unknown_api_token(ws_server: Server, token: str) -> None:
    for path in PATHS:
        assert refused(ws_server, path, f"token={token}") == (1008, "Invalid API token")


def test_expired_api_token(ws_server: Server, http: httpx.Client, admin_headers: dict[str, str]) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    created = http.post("/api/v1/tokens", headers=admin_headers, json={"name": "old", "expires_at": past}).json()
    for path in PATHS:
        assert refused(ws_server, path, f"token={created['token']}") == (1008, "API token expired")


def test_user_deleted_after_login(ws_server: Server, http: httpx.Client, admin_headers: dict[str, str]) -> None:
    user = new_user(http, admin_headers)
    assert http.delete(f"/api/v1/users/{user['public_id']}", headers=admin_headers).status_code == 200
    for path in PATHS:
        assert refused(ws_server, path, f"token={user['token']}") == (1008, "User not found")


def test_token_for_a_user_that_never_existed(ws_server: Server) -> None:
    token = jwt.encode({"sub": "987654321", "exp": datetime.now(UTC) + timedelta(minutes=5)}, SECRET, algorithm="HS256")
    for path in PATHS:
        assert refused(ws_server, path, f"token={token}") == (1008, "User not found")


# --- open sessions end when their credential stops holding (issue: revocation cannot be side-stepped) ---


def _ended_after(ws: ClientConnection, started: float) -> tuple[tuple[int, str], float]:
    code = closed_with(ws, timeout=15)
    return code, time.monotonic() - started


@pytest.mark.parametrize("path", PATHS)
def test_logout_ends_open_sessions(
    ws_server: Server, http: httpx.Client, admin_headers: dict[str, str], path: str
) -> None:
    user = new_user(http, admin_headers)
    with connect(ws_url(ws_server, path, f"token={user['token']}"), proxy=None, open_timeout=10) as ws:
        accepted(ws, path)
        started = time.monotonic()
        assert http.post("/api/v1/auth/logout", headers=user["headers"]).status_code == 200
        code, _ = _ended_after(ws, started)
    assert code == (1008, "Token has been revoked")


@pytest.mark.parametrize("path", PATHS)
def test_deleting_an_api_token_ends_its_sessions(
    ws_server: Server, http: httpx.Client, admin_headers: dict[str, str], path: str
) -> None:
    created = http.post("/api/v1/tokens", headers=admin_headers, json={"name": unique("tok")}).json()
    with connect(ws_url(ws_server, path, f"token={created['token']}"), proxy=None, open_timeout=10) as ws:
        accepted(ws, path)
        assert http.delete(f"/api/v1/tokens/{created['public_id']}", headers=admin_headers).status_code == 200
        code, _ = _ended_after(ws, time.monotonic())
    assert code == (1008, "Invalid API token")


@pytest.mark.parametrize("path", PATHS)
def test_role_change_and_user_deletion_end_sessions(
    ws_server: Server, http: httpx.Client, admin_headers: dict[str, str], path: str
) -> None:
    user = new_user(http, admin_headers, role="operator")
    with connect(ws_url(ws_server, path, f"token={user['token']}"), proxy=None, open_timeout=10) as ws:
        accepted(ws, path)
        r = http.put(f"/api/v1/users/{user['public_id']}", headers=admin_headers, json={"role": "viewer"})
        assert r.status_code == 200, r.text
        assert _ended_after(ws, time.monotonic())[0] == (1008, "Role changed")
    other = new_user(http, admin_headers)
    with connect(ws_url(ws_server, path, f"token={other['token']}"), proxy=None, open_timeout=10) as ws:
        accepted(ws, path)
        assert http.delete(f"/api/v1/users/{other['public_id']}", headers=admin_headers).status_code == 200
        assert _ended_after(ws, time.monotonic())[0] == (1008, "User not found")


def test_expiry_ends_an_open_session(ws_server: Server, db: psycopg.Connection) -> None:
    admin_id = db.execute("SELECT id FROM users WHERE email = %s", (ADMIN_EMAIL,)).fetchall()[0][0]
    soon = jwt.encode(
        {"sub": str(admin_id), "exp": datetime.now(UTC) + timedelta(seconds=2), "jti": unique("j")},
        SECRET,
        algorithm="HS256",
    )
    with connect(ws_url(ws_server, PATHS[1], f"token={soon}"), proxy=None, open_timeout=10) as ws:
        accepted(ws, PATHS[1])
        assert closed_with(ws, timeout=15) == (1008, "Invalid or expired token")


def test_unaffected_sessions_stay_open(ws_server: Server, http: httpx.Client, admin_headers: dict[str, str]) -> None:
    """Re-checks end only the sessions whose credential changed."""
    a, b = new_user(http, admin_headers), new_user(http, admin_headers)
    with (
        connect(ws_url(ws_server, PATHS[1], f"token={a['token']}"), proxy=None, open_timeout=10) as wa,
        connect(ws_url(ws_server, PATHS[1], f"token={b['token']}"), proxy=None, open_timeout=10) as wb,
    ):
        accepted(wa, PATHS[1])
        accepted(wb, PATHS[1])
        assert http.post("/api/v1/auth/logout", headers=a["headers"]).status_code == 200
        assert closed_with(wa, timeout=15) == (1008, "Token has been revoked")
        # Several re-check rounds later, b still answers pings.
        time.sleep(1.0)
        wb.send(orjson.dumps({"type": "ping"}))
        assert orjson.loads(wb.recv(timeout=10)) == {"type": "pong"}
