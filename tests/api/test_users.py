"""Users (spec §3.8) and who may do what with them (access matrix, spec §5)."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server, bearer, unique

USERS = "/api/v1/users"
USER_FIELDS = {"public_id", "email", "username", "role", "admin", "registered_on", "sso_provider"}
ADMIN_ONLY = {"detail": "Admin privileges required."}


def user_body(role: str = "viewer", **overrides: Any) -> dict[str, Any]:
    return {
        "email": f"{unique('usr')}@example.com",
        "username": unique("usr"),
        "password": "password123",
        "role": role,
        **overrides,
    }


def create(client: httpx.Client, admin: dict[str, str], role: str = "viewer", **overrides: Any) -> dict[str, Any]:
    """Create a user through the API, log in, and return what a test needs to act as or on them."""
    body = user_body(role, **overrides)
    r = client.post(USERS, headers=admin, json=body)
    assert r.status_code == 201, r.text
    login = client.post("/api/v1/auth/login", json={"email": body["email"], "password": body["password"]})
    assert login.status_code == 200, login.text
    return {**body, "public_id": login.json()["public_id"], "headers": bearer(login.json()["access_token"])}


def stored(db: psycopg.Connection, public_id: str) -> tuple[Any, ...] | None:
    return db.execute(
        "SELECT email, username, role, password_hash FROM users WHERE public_id = %s", (public_id,)
    ).fetchone()


# --- admin CRUD ---


def test_admin_creates_a_user(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    body = user_body("operator")
    r = client.post(USERS, headers=admin, json=body)
    assert r.status_code == 201
    assert r.json() == {"status": "success", "message": "User successfully created."}
    row = db.execute("SELECT role, password_hash FROM users WHERE email = %s", (body["email"],)).fetchone()
    assert row is not None and row[0] == "operator"
    assert row[1].startswith("$2") and "password123" not in row[1]  # bcrypt, never the plaintext


def test_role_defaults_to_viewer(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    body = user_body()
    del body["role"]
    assert client.post(USERS, headers=admin, json=body).status_code == 201
    assert db.execute("SELECT role FROM users WHERE email = %s", (body["email"],)).fetchone() == ("viewer",)


def test_created_email_is_stored_normalised(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    local = unique("Mixed")
    body = user_body(email=f"{local}@EXAMPLE.COM")
    assert client.post(USERS, headers=admin, json=body).status_code == 201
    assert db.execute("SELECT email FROM users WHERE username = %s", (body["username"],)).fetchone() == (
        f"{local}@example.com",
    )
    r = client.post("/api/v1/auth/login", json={"email": f"{local}@Example.Com", "password": body["password"]})
    assert r.status_code == 200


def test_admin_lists_users_in_creation_order(client: httpx.Client, admin: dict[str, str]) -> None:
    a, b = create(client, admin), create(client, admin)
    r = client.get(USERS, headers=admin, params={"page_size": 100})
    assert r.status_code == 200
    page = r.json()
    assert set(page) == {"page", "page_size", "total", "data"}
    assert (page["page"], page["page_size"]) == (1, 100)
    ids = [u["public_id"] for u in page["data"]]
    assert ids.index(a["public_id"]) < ids.index(b["public_id"])
    assert page["data"][0]["username"] == "admin"  # the seeded admin is the first user
    for u in page["data"]:
        assert set(u) == USER_FIELDS
        assert u["admin"] == (u["role"] == "admin")


def test_get_user_by_public_id(client: httpx.Client, admin: dict[str, str]) -> None:
    user = create(client, admin, "operator")
    r = client.get(f"{USERS}/{user['public_id']}", headers=admin)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == USER_FIELDS
    assert (body["email"], body["username"], body["role"], body["admin"]) == (
        user["email"],
        user["username"],
        "operator",
        False,
    )


def test_admin_updates_another_user(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    user = create(client, admin)
    new_name, new_email = unique("renamed"), f"{unique('new')}@example.com"
    r = client.put(
        f"{USERS}/{user['public_id']}",
        headers=admin,
        json={"username": new_name, "email": new_email, "role": "operator"},
    )
    assert r.status_code == 200
    assert r.json() == {"status": "success", "message": "User successfully updated."}
    row = stored(db, user["public_id"])
    assert row is not None and row[:3] == (new_email, new_name, "operator")


def test_explicit_nulls_leave_fields_unchanged(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    user = create(client, admin)
    before = stored(db, user["public_id"])
    r = client.put(
        f"{USERS}/{user['public_id']}",
        headers=admin,
        json={"email": None, "username": None, "password": None, "role": None},
    )
    assert r.status_code == 200
    assert stored(db, user["public_id"]) == before


def test_admin_deletes_a_user(client: httpx.Client, admin: dict[str, str]) -> None:
    user = create(client, admin)
    r = client.delete(f"{USERS}/{user['public_id']}", headers=admin)
    assert r.status_code == 200
    assert r.json() == {"status": "success", "message": "User successfully deleted."}
    r = client.get(f"{USERS}/{user['public_id']}", headers=admin)
    assert r.status_code == 404 and r.json() == {"detail": f"User '{user['public_id']}' not found."}


def test_deleting_a_user_deletes_their_api_tokens_and_log_entries(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    user = create(client, admin)
    token = client.post("/api/v1/tokens", headers=user["headers"], json={"name": "device"}).json()["token"]
    uid = db.execute("SELECT id FROM users WHERE public_id = %s", (user["public_id"],)).fetchall()[0][0]
    assert db.execute("SELECT count(*) FROM api_tokens WHERE user_id = %s", (uid,)).fetchone() == (1,)
    assert client.delete(f"{USERS}/{user['public_id']}", headers=admin).status_code == 200
    assert db.execute("SELECT count(*) FROM api_tokens WHERE user_id = %s", (uid,)).fetchone() == (0,)
    assert db.execute(
        "SELECT count(*) FROM log_entries WHERE user_public_id = %s", (user["public_id"],)
    ).fetchone() == (0,)
    r = client.get("/api/v1/auth/me", headers=bearer(token))
    assert r.status_code == 401 and r.json() == {"detail": "Invalid API token."}


# --- conflicts: committed before responding, so a duplicate is a 409, never a false 201 ---


def test_duplicate_email_is_409(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    user = create(client, admin)
    r = client.post(USERS, headers=admin, json=user_body(email=user["email"]))
    assert r.status_code == 409 and r.json() == {"detail": "User already exists."}
    assert db.execute("SELECT count(*) FROM users WHERE email = %s", (user["email"],)).fetchone() == (1,)


def test_duplicate_username_is_409_and_not_stored(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    user = create(client, admin)
    body = user_body(username=user["username"])
    r = client.post(USERS, headers=admin, json=body)
    assert r.status_code == 409 and r.json() == {"detail": "User already exists."}
    assert db.execute("SELECT count(*) FROM users WHERE email = %s", (body["email"],)).fetchone() == (0,)


def test_update_into_a_taken_username_or_email_is_409(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    a, b = create(client, admin), create(client, admin)
    before = stored(db, b["public_id"])
    for change in ({"username": a["username"]}, {"email": a["email"]}):
        r = client.put(f"{USERS}/{b['public_id']}", headers=admin, json=change)
        assert r.status_code == 409 and r.json() == {"detail": "User already exists."}
    assert stored(db, b["public_id"]) == before


def test_connection_stays_usable_after_a_conflict(client: httpx.Client, admin: dict[str, str]) -> None:
    # The reference drops keep-alive connections after a failed commit; we answer and keep serving.
    user = create(client, admin)
    assert client.post(USERS, headers=admin, json=user_body(email=user["email"])).status_code == 409
    assert client.get(f"{USERS}/{user['public_id']}", headers=admin).status_code == 200


# --- validation ---


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"password": "short"}, "password"),
        ({"password": "1234567"}, "password"),
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@"}, "email"),
        ({"username": "x"}, "username"),
        ({"username": "x" * 51}, "username"),
        ({"role": "superuser"}, "role"),
        ({"role": "Admin"}, "role"),
    ],
)
def test_create_rejects_invalid_fields(
    client: httpx.Client, admin: dict[str, str], override: dict[str, Any], field: str
) -> None:
    r = client.post(USERS, headers=admin, json=user_body(**override))
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", field]]


def test_boundary_lengths_are_accepted(client: httpx.Client, admin: dict[str, str]) -> None:
    assert (
        client.post(USERS, headers=admin, json=user_body(username=unique("")[:2], password="12345678")).status_code
        == 201
    )
    assert client.post(USERS, headers=admin, json=user_body(username=unique("u").ljust(50, "x"))).status_code == 201


@pytest.mark.parametrize("change", [{"password": "short"}, {"username": "x"}, {"email": "nope"}, {"role": "root"}])
def test_update_rejects_invalid_fields(client: httpx.Client, admin: dict[str, str], change: dict[str, Any]) -> None:
    user = create(client, admin)
    assert client.put(f"{USERS}/{user['public_id']}", headers=admin, json=change).status_code == 422


@pytest.mark.parametrize(
    "override",
    [
        {"username": "nul\x00name"},
        {"password": "nul\x00password"},
        {"username": "名前-ünïcödé"},
        {"username": "'; DROP TABLE users; --"},
        {"email": "robert'); DROP TABLE users;--@example.com"},
        {"password": "p" * 5000},
    ],
)
def test_hostile_user_input_is_never_a_server_error(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, override: dict[str, Any]
) -> None:
    r = client.post(USERS, headers=admin, json=user_body(**override))
    assert r.status_code in (201, 422), r.text
    assert db.execute("SELECT count(*) FROM users WHERE username = 'admin'").fetchone() == (1,)


def test_unicode_username_round_trips(client: httpx.Client, admin: dict[str, str]) -> None:
    name = "名前-" + unique("ü")
    user = create(client, admin, username=name)
    assert client.get(f"{USERS}/{user['public_id']}", headers=admin).json()["username"] == name


# --- access matrix (spec §5) ---


@pytest.mark.parametrize("who", ["viewer", "operator"])
def test_non_admins_cannot_list_create_or_delete(
    client: httpx.Client, admin: dict[str, str], who: str, request: pytest.FixtureRequest
) -> None:
    headers = request.getfixturevalue(who)
    target = create(client, admin)
    for r in (
        client.get(USERS, headers=headers),
        client.post(USERS, headers=headers, json=user_body()),
        # Role is checked before the body (spec §3.2): an invalid body is still a 403.
        client.post(USERS, headers=headers, json={}),
        client.delete(f"{USERS}/{target['public_id']}", headers=headers),
        client.delete(f"{USERS}/no-such-user", headers=headers),
    ):
        assert r.status_code == 403 and r.json() == ADMIN_ONLY
    assert client.get(f"{USERS}/{target['public_id']}", headers=admin).status_code == 200


def test_unauthenticated_requests_are_401(client: httpx.Client) -> None:
    for r in (
        client.get(USERS),
        client.post(USERS, json={}),
        client.get(f"{USERS}/x"),
        client.put(f"{USERS}/x", json={}),
        client.delete(f"{USERS}/x"),
    ):
        assert r.status_code == 401 and r.json() == {"detail": "Authentication required."}


def test_any_authenticated_user_may_read_a_user(
    client: httpx.Client, admin: dict[str, str], viewer: dict[str, str]
) -> None:
    other = create(client, admin, "operator")
    r = client.get(f"{USERS}/{other['public_id']}", headers=viewer)
    assert r.status_code == 200 and r.json()["username"] == other["username"]


def test_user_updates_own_profile(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    user = create(client, admin)
    new_name = unique("self")
    r = client.put(f"{USERS}/{user['public_id']}", headers=user["headers"], json={"username": new_name})
    assert r.status_code == 200 and r.json()["message"] == "User successfully updated."
    row = stored(db, user["public_id"])
    assert row is not None and row[1] == new_name and row[2] == "viewer"


def test_user_cannot_update_someone_else(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    user, other = create(client, admin, "operator"), create(client, admin)
    before = stored(db, other["public_id"])
    forbidden = {"detail": "You can only update your own profile."}
    r = client.put(f"{USERS}/{other['public_id']}", headers=user["headers"], json={"username": unique("x")})
    assert r.status_code == 403 and r.json() == forbidden
    # Checked before existence: an unknown id is also 403 for a non-admin, revealing nothing.
    r = client.put(f"{USERS}/no-such-user", headers=user["headers"], json={"username": unique("x")})
    assert r.status_code == 403 and r.json() == forbidden
    assert stored(db, other["public_id"]) == before


@pytest.mark.parametrize("role", ["admin", "operator", "viewer"])
def test_non_admin_cannot_change_a_role_and_nothing_changes(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, role: str
) -> None:
    user = create(client, admin)
    before = stored(db, user["public_id"])
    r = client.put(
        f"{USERS}/{user['public_id']}",
        headers=user["headers"],
        json={"username": unique("sneaky"), "password": "newpassword1", "role": role},
    )
    assert r.status_code == 403 and r.json() == {"detail": "Only admins can change user roles."}
    assert stored(db, user["public_id"]) == before


def test_null_role_from_a_non_admin_is_no_role_change(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    user = create(client, admin)
    new_name = unique("nullrole")
    r = client.put(f"{USERS}/{user['public_id']}", headers=user["headers"], json={"username": new_name, "role": None})
    assert r.status_code == 200
    row = stored(db, user["public_id"])
    assert row is not None and row[1:3] == (new_name, "viewer")


def test_password_update_allows_re_login(client: httpx.Client, admin: dict[str, str]) -> None:
    user = create(client, admin)
    r = client.put(f"{USERS}/{user['public_id']}", headers=user["headers"], json={"password": "brand-new-pass"})
    assert r.status_code == 200
    login = "/api/v1/auth/login"
    assert client.post(login, json={"email": user["email"], "password": "brand-new-pass"}).status_code == 200
    old = client.post(login, json={"email": user["email"], "password": user["password"]})
    assert old.status_code == 401 and old.json() == {"detail": "Invalid email or password."}


def test_admin_changes_a_role(client: httpx.Client, admin: dict[str, str]) -> None:
    user = create(client, admin)
    assert client.put(f"{USERS}/{user['public_id']}", headers=admin, json={"role": "operator"}).status_code == 200
    assert client.get("/api/v1/auth/me", headers=user["headers"]).json()["role"] == "operator"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize(
    "public_id", ["no-such-user", "00000000-0000-0000-0000-000000000000", "x" * 300, "%27%20OR%201%3D1", "nul%00id"]
)
def test_unknown_user_is_404(client: httpx.Client, admin: dict[str, str], method: str, public_id: str) -> None:
    r = client.request(method, f"{USERS}/{public_id}", headers=admin, json={} if method == "PUT" else None)
    assert r.status_code == 404
    decoded = httpx.URL(f"/{public_id}").path[1:]
    assert r.json() == {"detail": f"User '{decoded}' not found."}


# --- paths and pagination (spec §0, §0.1) ---


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_trailing_slash_redirects_preserving_the_method(
    client: httpx.Client, admin: dict[str, str], server: Server, method: str
) -> None:
    # The bundled frontend calls GET/POST /api/v1/users/ and relies on this redirect (spec §0).
    r = client.request(method, f"{USERS}/", headers=admin, json={} if method == "POST" else None)
    assert r.status_code == 307
    assert r.headers["location"] == f"{server.url}{USERS}"


def test_redirected_list_is_served(client: httpx.Client, admin: dict[str, str]) -> None:
    r = client.get(f"{USERS}/", headers=admin, follow_redirects=True)
    assert r.status_code == 200 and "total" in r.json()


def test_pagination_envelope(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    create(client, admin)
    create(client, admin)
    total = db.execute("SELECT count(*) FROM users").fetchall()[0][0]
    first = client.get(USERS, headers=admin, params={"page": 1, "page_size": 1}).json()
    assert (first["page"], first["page_size"], first["total"], len(first["data"])) == (1, 1, total, 1)
    second = client.get(USERS, headers=admin, params={"page": 2, "page_size": 1}).json()
    assert second["data"][0]["public_id"] != first["data"][0]["public_id"]
    last = client.get(USERS, headers=admin, params={"page": total, "page_size": 1}).json()
    assert len(last["data"]) == 1
    past = client.get(USERS, headers=admin, params={"page": total + 1, "page_size": 1}).json()
    assert past == {"page": total + 1, "page_size": 1, "total": total, "data": []}
    default = client.get(USERS, headers=admin, params={"_t": "1700000000000"}).json()  # cache-buster ignored
    assert (default["page"], default["page_size"]) == (1, 25)
    assert len(client.get(USERS, headers=admin, params={"page_size": 100}).json()["data"]) == min(total, 100)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"page": 0}, "page"),
        ({"page": -1}, "page"),
        ({"page": "abc"}, "page"),
        ({"page": 1.5}, "page"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": 101}, "page_size"),
        ({"page_size": "x"}, "page_size"),
    ],
)
def test_out_of_range_paging_is_422(
    client: httpx.Client, admin: dict[str, str], params: dict[str, Any], field: str
) -> None:
    r = client.get(USERS, headers=admin, params=params)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", field]


@pytest.mark.parametrize("page", [10**17, 10**30])
def test_a_page_far_past_the_end_is_empty(client: httpx.Client, admin: dict[str, str], page: int) -> None:
    r = client.get(USERS, headers=admin, params={"page": page})
    assert r.status_code == 200
    assert r.json()["data"] == [] and r.json()["page"] == page and r.json()["total"] >= 1


def test_deleting_a_user_refreshes_the_ingest_catalog(
    client: httpx.Client, admin: dict[str, str], server: Server
) -> None:
    # The user's events, plugin instances and rules cascade away; the engine must stop accepting them.
    refreshed = []
    original = server.rt.catalog_refresh

    async def spy() -> None:
        refreshed.append(True)
        await original()

    # Not monkeypatch: Starlette's State keeps attributes outside __dict__, and monkeypatch's undo would
    # delete the engine's hook instead of restoring it.
    server.rt.catalog_refresh = spy
    try:
        user = create(client, admin)
        assert refreshed == []
        assert client.delete(f"{USERS}/{user['public_id']}", headers=admin).status_code == 200
        assert refreshed == [True]
    finally:
        server.rt.catalog_refresh = original
