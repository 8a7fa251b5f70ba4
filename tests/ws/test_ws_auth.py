"""WebSocket authentication (spec §7): accept, then the `token` query parameter, or close 1008 with a reason."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from fastapi import WebSocket
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

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
from webmacs.app import create_app
from webmacs.ws.auth import authenticate_websocket


async def probe(websocket: WebSocket) -> None:
    """Echo who the socket authenticated as; the real endpoints belong to the ingest module."""
    user = await authenticate_websocket(websocket)
    if user is None:
        return
    await websocket.send_json({"public_id": user.public_id, "username": user.username, "role": user.role})
    await websocket.close()


@pytest.fixture(scope="module")
def probe_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = make_settings(db_url, tmp_path_factory.mktemp("ws-auth"))
    app = create_app(settings)
    app.add_api_websocket_route("/ws/probe", probe)
    server = start_server(settings, app=app)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(probe_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=probe_server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def admin_headers(probe_server: Server) -> dict[str, str]:
    with httpx.Client(base_url=probe_server.url) as c:
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


def ws_url(server: Server, query: str | None) -> str:
    base = server.url.replace("http://", "ws://") + "/ws/probe"
    return base if query is None else f"{base}?{query}"


def identify(server: Server, query: str) -> dict[str, Any]:
    """Connect and return the probe's answer for an accepted credential."""
    import json

    with connect(ws_url(server, query), proxy=None, open_timeout=10) as ws:
        return dict(json.loads(ws.recv(timeout=10)))


def refused(server: Server, query: str | None) -> tuple[int, str]:
    """Connect (the upgrade is accepted first) and return the close code and reason the server sent."""
    with connect(ws_url(server, query), proxy=None, open_timeout=10) as ws, pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    rcvd = closed.value.rcvd
    assert rcvd is not None, "connection dropped without a close frame"
    return rcvd.code, rcvd.reason


def expired_jwt(user_id: int) -> str:
    past = datetime.now(UTC) - timedelta(minutes=5)
    return jwt.encode({"sub": str(user_id), "exp": past, "iat": past - timedelta(hours=1)}, SECRET, algorithm="HS256")


def internal_id(db: psycopg.Connection, public_id: str) -> int:
    row = db.execute("SELECT id FROM users WHERE public_id = %s", (public_id,)).fetchone()
    assert row is not None
    return int(row[0])


# --- accepted ---


def test_valid_jwt_is_accepted(probe_server: Server, admin_headers: dict[str, str]) -> None:
    token = admin_headers["Authorization"].removeprefix("Bearer ")
    assert identify(probe_server, f"token={token}")["username"] == "admin"


def test_any_role_may_connect(probe_server: Server, http: httpx.Client, admin_headers: dict[str, str]) -> None:
    user = new_user(http, admin_headers, role="viewer")
    answer = identify(probe_server, f"token={user['token']}")
    assert answer == {"public_id": user["public_id"], "username": answer["username"], "role": "viewer"}


def test_percent_encoded_api_token_is_accepted_and_use_recorded(
    probe_server: Server, http: httpx.Client, admin_headers: dict[str, str], db: psycopg.Connection
) -> None:
    user = new_user(http, admin_headers, role="operator")
    created = http.post("/api/v1/tokens", headers=user["headers"], json={"name": "controller"}).json()
    # Every byte percent-encoded: the helper must see the decoded token.
    encoded = "".join(f"%{b:02X}" for b in created["token"].encode())
    answer = identify(probe_server, f"token={encoded}&_t=1")
    assert (answer["public_id"], answer["role"]) == (user["public_id"], "operator")
    row = db.execute("SELECT last_used_at FROM api_tokens WHERE public_id = %s", (created["public_id"],)).fetchone()
    assert row is not None and row[0] is not None


# --- refused: close 1008 with the spec's reason ---


@pytest.mark.parametrize("query", MISSING_TOKEN_QUERIES)
def test_missing_token(probe_server: Server, query: str | None) -> None:
    assert refused(probe_server, query) == (1008, "Authentication required")


@pytest.mark.parametrize("token", FORGED_TOKENS)
def test_undecodable_or_forged_jwt(probe_server: Server, token: str) -> None:
    assert refused(probe_server, f"token={token}") == (1008, "Invalid or expired token")


def test_expired_jwt(probe_server: Server, db: psycopg.Connection) -> None:
    admin_id = db.execute("SELECT id FROM users WHERE email = %s", (ADMIN_EMAIL,)).fetchall()[0][0]
    assert refused(probe_server, f"token={expired_jwt(admin_id)}") == (1008, "Invalid or expired token")


def test_logged_out_jwt(probe_server: Server, http: httpx.Client, admin_headers: dict[str, str]) -> None:
    user = new_user(http, admin_headers)
    assert identify(probe_server, f"token={user['token']}")["public_id"] == user["public_id"]
    assert http.post("/api/v1/auth/logout", headers=user["headers"]).status_code == 200
    assert refused(probe_server, f"token={user['token']}") == (1008, "Token has been revoked")


def test_jwt_is_decoded_before_the_blacklist_is_consulted(
    probe_server: Server, http: httpx.Client, admin_headers: dict[str, str], db: psycopg.Connection
) -> None:
    # Spec §7: on WebSockets an expired token that was also logged out reads as expired (HTTP says revoked).
    user = new_user(http, admin_headers)
    token = expired_jwt(internal_id(db, user["public_id"]))
    db.execute("INSERT INTO blacklist_tokens (token) VALUES (%s)", (token,))
    assert refused(probe_server, f"token={token}") == (1008, "Invalid or expired token")
    r = http.get("/api/v1/auth/me", headers=bearer(token))
    assert r.status_code == 401 and r.json() == {"detail": "Token has been revoked."}


@pytest.mark.parametrize("token", ["wm_" + "A" * 64, "wm_", "wm_%27%20OR%201%3D1", "wm_%00"])
def test_unknown_api_token(probe_server: Server, token: str) -> None:
    assert refused(probe_server, f"token={token}") == (1008, "Invalid API token")


def test_expired_api_token(probe_server: Server, http: httpx.Client, admin_headers: dict[str, str]) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    created = http.post("/api/v1/tokens", headers=admin_headers, json={"name": "old", "expires_at": past}).json()
    assert refused(probe_server, f"token={created['token']}") == (1008, "API token expired")


def test_user_deleted_after_login(probe_server: Server, http: httpx.Client, admin_headers: dict[str, str]) -> None:
    user = new_user(http, admin_headers)
    assert http.delete(f"/api/v1/users/{user['public_id']}", headers=admin_headers).status_code == 200
    assert refused(probe_server, f"token={user['token']}") == (1008, "User not found")


def test_token_for_a_user_that_never_existed(probe_server: Server) -> None:
    token = jwt.encode({"sub": "987654321", "exp": datetime.now(UTC) + timedelta(minutes=5)}, SECRET, algorithm="HS256")
    assert refused(probe_server, f"token={token}") == (1008, "User not found")
