"""API tokens (spec §3.7): `wm_` credentials shown once, stored hashed, scoped to their owner."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import bearer, unique

TOKENS = "/api/v1/tokens"
ME = "/api/v1/auth/me"
LISTED_FIELDS = {
    "public_id",
    "name",
    "last_used_at",
    "expires_at",
    "created_at",
    "user_public_id",
    "scope",
    "plugin_instance_public_id",
}


def new_user(client: httpx.Client, admin: dict[str, str], role: str = "viewer") -> dict[str, Any]:
    email, password = f"{unique('tok')}@example.com", "password123"
    r = client.post(
        "/api/v1/users",
        headers=admin,
        json={"email": email, "username": unique("tok"), "password": password, "role": role},
    )
    assert r.status_code == 201, r.text
    body = client.post("/api/v1/auth/login", json={"email": email, "password": password}).json()
    return {"public_id": body["public_id"], "headers": bearer(body["access_token"]), "token": body["access_token"]}


def create_token(client: httpx.Client, headers: dict[str, str], **extra: Any) -> dict[str, Any]:
    r = client.post(TOKENS, headers=headers, json={"name": unique("token"), **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_create_returns_the_token_once(client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection) -> None:
    r = client.post(TOKENS, headers=viewer, json={"name": "controller"})
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"public_id", "name", "token", "expires_at", "created_at", "scope", "plugin_instance_public_id"}
    assert body["name"] == "controller" and body["expires_at"] is None
    token = body["token"]
    assert len(token) == 67 and re.fullmatch(r"wm_[A-Za-z0-9_-]{64}", token)
    # Stored as the hex SHA-256 of the whole plaintext, never the plaintext itself.
    row = db.execute("SELECT token_hash FROM api_tokens WHERE public_id = %s", (body["public_id"],)).fetchone()
    assert row == (hashlib.sha256(token.encode()).hexdigest(),)
    assert db.execute("SELECT count(*) FROM api_tokens WHERE token_hash = %s", (token,)).fetchone() == (0,)


def test_two_tokens_differ(client: httpx.Client, viewer: dict[str, str]) -> None:
    assert create_token(client, viewer)["token"] != create_token(client, viewer)["token"]


def test_token_authenticates_as_its_owner_and_records_use(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    user = new_user(client, admin, role="operator")
    created = create_token(client, user["headers"])
    listed = client.get(TOKENS, headers=user["headers"]).json()["data"]
    assert [t["last_used_at"] for t in listed] == [None]
    me = client.get(ME, headers=bearer(created["token"]))
    assert me.status_code == 200 and me.json()["public_id"] == user["public_id"]
    assert me.json()["role"] == "operator"
    # last_used_at was committed by the request that used the token.
    row = db.execute("SELECT last_used_at FROM api_tokens WHERE public_id = %s", (created["public_id"],)).fetchone()
    assert row is not None and row[0] is not None
    listed = client.get(TOKENS, headers=user["headers"]).json()["data"]
    assert listed[0]["last_used_at"] is not None and listed[0]["last_used_at"].endswith("Z")


def test_token_acts_with_its_owners_current_role(client: httpx.Client, admin: dict[str, str]) -> None:
    user = new_user(client, admin, role="admin")
    token = create_token(client, user["headers"])["token"]
    assert client.get("/api/v1/users", headers=bearer(token)).status_code == 200
    assert client.put(f"/api/v1/users/{user['public_id']}", headers=admin, json={"role": "viewer"}).status_code == 200
    r = client.get("/api/v1/users", headers=bearer(token))
    assert r.status_code == 403 and r.json() == {"detail": "Admin privileges required."}


def test_list_shows_only_own_tokens_newest_first_without_secrets(client: httpx.Client, admin: dict[str, str]) -> None:
    alice, bob = new_user(client, admin), new_user(client, admin)
    first = create_token(client, alice["headers"])
    second = create_token(client, alice["headers"])
    create_token(client, bob["headers"])
    r = client.get(TOKENS, headers=alice["headers"])
    assert r.status_code == 200
    page = r.json()
    assert (page["page"], page["page_size"], page["total"]) == (1, 25, 2)
    assert [t["public_id"] for t in page["data"]] == [second["public_id"], first["public_id"]]
    for t in page["data"]:
        assert set(t) == LISTED_FIELDS
        assert t["user_public_id"] == alice["public_id"]
        assert t["created_at"].endswith("Z")


def test_admin_lists_every_users_tokens(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    alice = new_user(client, admin)
    mine = create_token(client, admin)
    theirs = create_token(client, alice["headers"])
    page = client.get(TOKENS, headers=admin, params={"page_size": 100}).json()
    assert page["total"] == db.execute("SELECT count(*) FROM api_tokens").fetchall()[0][0]
    ids = [t["public_id"] for t in page["data"]]
    # Newest first: the two just created lead the list, theirs (later) before mine.
    assert ids[:2] == [theirs["public_id"], mine["public_id"]]
    admin_public_id = client.get(ME, headers=admin).json()["public_id"]
    assert [t["user_public_id"] for t in page["data"][:2]] == [alice["public_id"], admin_public_id]


def test_list_paging(client: httpx.Client, admin: dict[str, str]) -> None:
    user = new_user(client, admin)
    created = [create_token(client, user["headers"]) for _ in range(3)]
    page2 = client.get(TOKENS, headers=user["headers"], params={"page": 2, "page_size": 2}).json()
    assert page2["total"] == 3 and [t["public_id"] for t in page2["data"]] == [created[0]["public_id"]]
    past_end = client.get(TOKENS, headers=user["headers"], params={"page": 9}).json()
    assert past_end["total"] == 3 and past_end["data"] == []
    assert client.get(TOKENS, headers=user["headers"], params={"page_size": 101}).status_code == 422


@pytest.mark.parametrize(
    "body", [{}, {"name": ""}, {"name": "x" * 256}, {"name": "ok", "expires_at": "soon"}, {"name": "nul\x00name"}]
)
def test_create_validates_the_body(client: httpx.Client, viewer: dict[str, str], body: dict[str, Any]) -> None:
    assert client.post(TOKENS, headers=viewer, json=body).status_code == 422


def test_create_and_list_require_authentication(client: httpx.Client) -> None:
    for r in (client.get(TOKENS), client.post(TOKENS, json={"name": "x"}), client.delete(f"{TOKENS}/x")):
        assert r.status_code == 401 and r.json() == {"detail": "Authentication required."}


def test_delete_own_token_stops_it_working(client: httpx.Client, viewer: dict[str, str]) -> None:
    created = create_token(client, viewer)
    r = client.delete(f"{TOKENS}/{created['public_id']}", headers=viewer)
    assert r.status_code == 200
    assert r.json() == {"status": "success", "message": "API token deleted."}
    r = client.get(ME, headers=bearer(created["token"]))
    assert r.status_code == 401 and r.json() == {"detail": "Invalid API token."}
    r = client.delete(f"{TOKENS}/{created['public_id']}", headers=viewer)
    assert r.status_code == 404 and r.json() == {"detail": "API token not found."}


def test_non_admin_cannot_delete_another_users_token(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    owner, other = new_user(client, admin), new_user(client, admin, role="operator")
    created = create_token(client, owner["headers"])
    r = client.delete(f"{TOKENS}/{created['public_id']}", headers=other["headers"])
    assert r.status_code == 403 and r.json() == {"detail": "Cannot delete another user's token."}
    assert client.get(ME, headers=bearer(created["token"])).status_code == 200
    # An admin may delete anyone's.
    assert client.delete(f"{TOKENS}/{created['public_id']}", headers=admin).status_code == 200
    assert db.execute("SELECT count(*) FROM api_tokens WHERE public_id = %s", (created["public_id"],)).fetchone() == (
        0,
    )


@pytest.mark.parametrize(
    "public_id", ["no-such-token", "00000000-0000-0000-0000-000000000000", "' OR 1=1 --", "nul%00id"]
)
def test_delete_unknown_token_is_404(client: httpx.Client, viewer: dict[str, str], public_id: str) -> None:
    r = client.delete(f"{TOKENS}/{public_id}", headers=viewer)
    assert r.status_code == 404 and r.json() == {"detail": "API token not found."}


@pytest.mark.parametrize(
    "expires_at",
    [
        (datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
        # A naive timestamp is taken as UTC by the session and must not crash the comparison (spec §21.9).
        (datetime.now(UTC) - timedelta(days=1)).replace(tzinfo=None).isoformat(),
    ],
)
def test_expired_token_is_refused(client: httpx.Client, viewer: dict[str, str], expires_at: str) -> None:
    created = create_token(client, viewer, expires_at=expires_at)
    # Echoed as given: a naive value stays naive (spec §0), an aware one keeps its instant.
    echoed, given = datetime.fromisoformat(created["expires_at"]), datetime.fromisoformat(expires_at)
    assert echoed == given and (echoed.tzinfo is None) == (given.tzinfo is None)
    r = client.get(ME, headers=bearer(created["token"]))
    assert r.status_code == 401 and r.json() == {"detail": "API token has expired."}
    assert "www-authenticate" not in r.headers


@pytest.mark.parametrize(
    ("expires_at", "status"),
    [
        ("9999-12-31T23:59:59-05:00", 422),  # year 10000 in UTC: unrepresentable when read back
        ("0001-01-01T00:00:00+01:00", 422),  # year 0 in UTC
        ("9999-12-31T23:59:59", 201),
        ("0001-01-01T00:00:00", 201),
        (1e15, 422),
    ],
)
def test_expiry_at_the_edges_of_time_is_never_a_server_error(
    client: httpx.Client, viewer: dict[str, str], expires_at: Any, status: int
) -> None:
    r = client.post(TOKENS, headers=viewer, json={"name": "edge", "expires_at": expires_at})
    assert r.status_code == status, r.text
    assert client.get(TOKENS, headers=viewer, params={"page_size": 100}).status_code == 200


def test_token_with_future_expiry_works(client: httpx.Client, viewer: dict[str, str]) -> None:
    created = create_token(client, viewer, expires_at=(datetime.now(UTC) + timedelta(days=1)).isoformat())
    assert client.get(ME, headers=bearer(created["token"])).status_code == 200


@pytest.mark.parametrize("token", ["wm_" + "A" * 64, "wm_", "wm_' OR '1'='1", "wm_" + "x" * 5000])
def test_fabricated_api_token_is_invalid(client: httpx.Client, token: str) -> None:
    r = client.get(ME, headers=bearer(token))
    assert r.status_code == 401 and r.json() == {"detail": "Invalid API token."}


def test_logout_with_an_api_token_does_not_revoke_it(
    client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection
) -> None:
    token = create_token(client, viewer)["token"]
    r = client.post("/api/v1/auth/logout", headers=bearer(token))
    assert r.status_code == 200 and r.json() == {"status": "success", "message": "Successfully logged out."}
    assert client.get(ME, headers=bearer(token)).status_code == 200
    assert db.execute("SELECT count(*) FROM blacklist_tokens WHERE token = %s", (token,)).fetchone() == (0,)


def test_logging_out_the_jwt_leaves_api_tokens_working(client: httpx.Client, admin: dict[str, str]) -> None:
    user = new_user(client, admin)
    token = create_token(client, user["headers"])["token"]
    assert client.post("/api/v1/auth/logout", headers=user["headers"]).status_code == 200
    assert client.get(ME, headers=user["headers"]).status_code == 401
    assert client.get(ME, headers=bearer(token)).status_code == 200


def test_token_in_use_elsewhere_does_not_block_a_request(
    client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection
) -> None:
    # Parallel requests with one token (a controller posting batches) must not queue behind each other's
    # last_used_at update: hold the row lock as a concurrent request would, and the request still completes.
    created = create_token(client, viewer)
    with db.transaction():
        db.execute("SELECT 1 FROM api_tokens WHERE public_id = %s FOR UPDATE", (created["public_id"],))
        r = client.get(ME, headers=bearer(created["token"]), timeout=15)
        assert r.status_code == 200
    assert client.get(ME, headers=bearer(created["token"])).status_code == 200
    row = db.execute("SELECT last_used_at FROM api_tokens WHERE public_id = %s", (created["public_id"],)).fetchone()
    assert row is not None and row[0] is not None
