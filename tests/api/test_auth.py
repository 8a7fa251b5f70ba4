"""Login, logout, the current user and how a bearer credential is resolved (spec §3.1–§3.6)."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, SECRET, bearer, login, unique

ME = "/api/v1/auth/me"
LOGIN = "/api/v1/auth/login"
LOGOUT = "/api/v1/auth/logout"
USER_FIELDS = {"public_id", "email", "username", "role", "admin", "registered_on", "sso_provider"}


def new_user(client: httpx.Client, admin: dict[str, str], role: str = "viewer") -> dict[str, Any]:
    """Create a user of its own for a test that changes it (logs out, demotes, deletes)."""
    email, username, password = f"{unique('u')}@example.com", unique("u"), "password123"
    r = client.post(
        "/api/v1/users", headers=admin, json={"email": email, "username": username, "password": password, "role": role}
    )
    assert r.status_code == 201, r.text
    body = client.post(LOGIN, json={"email": email, "password": password}).json()
    return {
        "email": email,
        "username": username,
        "password": password,
        "public_id": body["public_id"],
        "token": body["access_token"],
        "headers": bearer(body["access_token"]),
    }


def signed(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def user_id(db: psycopg.Connection, public_id: str) -> int:
    row = db.execute("SELECT id FROM users WHERE public_id = %s", (public_id,)).fetchone()
    assert row is not None
    return int(row[0])


def assert_unauthorized(r: httpx.Response, detail: str) -> None:
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": detail}
    # Only a missing credential invites the client to authenticate.
    assert ("www-authenticate" in r.headers) == (detail == "Authentication required.")


# --- login (§3.4) ---


def test_login_returns_exactly_the_spec_body(client: httpx.Client, db: psycopg.Connection) -> None:
    r = client.post(LOGIN, json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"status", "message", "access_token", "public_id", "username"}
    assert body["status"] == "success"
    assert body["message"] == "Successfully logged in."
    assert body["username"] == "admin"
    row = db.execute("SELECT id, public_id FROM users WHERE email = %s", (ADMIN_EMAIL,)).fetchone()
    assert row is not None and body["public_id"] == row[1]
    header = jwt.get_unverified_header(body["access_token"])
    assert header == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(body["access_token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == str(row[0])
    assert claims["role"] == "admin"
    assert isinstance(claims["iat"], int) and claims["exp"] - claims["iat"] == 1440 * 60
    assert {"sub", "exp", "iat", "role"} <= set(claims)


def test_login_normalises_the_domain_but_not_the_local_part(client: httpx.Client) -> None:
    ok = client.post(LOGIN, json={"email": "admin@WEBMACS.IO", "password": ADMIN_PASSWORD})
    assert ok.status_code == 200 and ok.json()["username"] == "admin"
    wrong_case = client.post(LOGIN, json={"email": "ADMIN@webmacs.io", "password": ADMIN_PASSWORD})
    assert_unauthorized(wrong_case, "Invalid email or password.")


@pytest.mark.parametrize(
    ("email", "password"),
    [
        (ADMIN_EMAIL, "wrong-password"),
        ("nobody@webmacs.io", ADMIN_PASSWORD),
        (ADMIN_EMAIL, ADMIN_PASSWORD + " "),
    ],
)
def test_login_rejects_bad_credentials_without_saying_which(client: httpx.Client, email: str, password: str) -> None:
    assert_unauthorized(client.post(LOGIN, json={"email": email, "password": password}), "Invalid email or password.")


def test_login_with_empty_body_lists_missing_fields(client: httpx.Client) -> None:
    r = client.post(LOGIN, json={})
    assert r.status_code == 422
    missing = {tuple(e["loc"]) for e in r.json()["detail"] if e["type"] == "missing"}
    assert missing == {("body", "email"), ("body", "password")}


def test_login_with_empty_password_is_invalid(client: httpx.Client) -> None:
    r = client.post(LOGIN, json={"email": ADMIN_EMAIL, "password": ""})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "password"]


@pytest.mark.parametrize("path", [LOGIN, "/api/v1/users", "/api/v1/tokens"])
def test_malformed_json_is_422_before_authentication(client: httpx.Client, path: str) -> None:
    # Spec §3.2 precedence (1): a syntactically broken body is rejected before credentials are looked at.
    r = client.post(path, content=b'{"email": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"


def test_login_writes_a_log_entry(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    user = new_user(client, admin)
    rows = db.execute(
        "SELECT content, logging_type, status_type FROM log_entries WHERE user_public_id = %s",
        (user["public_id"],),
    ).fetchall()
    assert rows == [(f"User '{user['username']}' logged in.", "info", "unread")]


@pytest.mark.parametrize(
    "body",
    [
        {"email": "a" * 10_000 + "@example.com", "password": "x"},
        {"email": ADMIN_EMAIL, "password": "x" * 100_000},
        {"email": ADMIN_EMAIL, "password": "x" * 4096},
        {"email": "ü@exämple.com", "password": "pässwörd🔑"},
        {"email": "' OR '1'='1@example.com", "password": "x"},
        {"email": ADMIN_EMAIL, "password": "' OR '1'='1' --"},
        {"email": ADMIN_EMAIL + "'; DROP TABLE users; --", "password": "x"},
        {"email": ADMIN_EMAIL, "password": "nul\x00byte"},
        {"email": "nul\x00@example.com", "password": "x"},
        {"email": 42, "password": ["x"]},
        {"email": None, "password": None},
    ],
)
def test_hostile_login_input_is_refused_never_a_server_error(client: httpx.Client, body: dict[str, Any]) -> None:
    r = client.post(LOGIN, json=body)
    assert r.status_code in (401, 422), r.text
    if r.status_code == 401:
        assert r.json() == {"detail": "Invalid email or password."}
    # The admin account is still there and usable afterwards.
    assert client.post(LOGIN, json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).status_code == 200


def test_login_ignores_unknown_fields(client: httpx.Client) -> None:
    r = client.post(LOGIN, json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "remember_me": True})
    assert r.status_code == 200


# --- logout (§3.5) ---


def test_logout_revokes_the_token(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    user = new_user(client, admin)
    assert client.get(ME, headers=user["headers"]).status_code == 200
    r = client.post(LOGOUT, headers=user["headers"])
    assert r.status_code == 200
    assert r.json() == {"status": "success", "message": "Successfully logged out."}
    # Revoked by its id; the token itself is not kept.
    jti = jwt.decode(user["token"], options={"verify_signature": False})["jti"]
    assert db.execute("SELECT count(*) FROM blacklist_tokens WHERE jti = %s", (jti,)).fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM blacklist_tokens WHERE token = %s", (user["token"],)).fetchone() == (0,)
    assert_unauthorized(client.get(ME, headers=user["headers"]), "Token has been revoked.")
    # Logging out again with the revoked token is itself refused.
    assert_unauthorized(client.post(LOGOUT, headers=user["headers"]), "Token has been revoked.")


@pytest.mark.parametrize("suffix", ["=", "==", "%3D", ".", "A"])
def test_a_respelled_revoked_token_is_not_a_new_token(client: httpx.Client, admin: dict[str, str], suffix: str) -> None:
    """The bypass this guards against: after logout, the JWT with `=` appended decoded to the same claims and
    was not on the blacklist (which compared strings)."""
    user = new_user(client, admin)
    assert client.post(LOGOUT, headers=user["headers"]).status_code == 200
    r = client.get(ME, headers=bearer(user["token"] + suffix))
    assert r.status_code == 401, (suffix, r.text)
    # The last signature character carries two spare bits: flipping one respells the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = user["token"][-1]
    twin = alphabet[alphabet.index(last) ^ 1]
    assert client.get(ME, headers=bearer(user["token"][:-1] + twin)).status_code == 401


def test_tokens_from_before_revocation_by_id_stay_revoked(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    """A blacklist row holding the token text (written before the jti migration, or by WebMACS) still revokes."""
    user = new_user(client, admin)
    db.execute("INSERT INTO blacklist_tokens (token) VALUES (%s)", (user["token"],))
    assert_unauthorized(client.get(ME, headers=user["headers"]), "Token has been revoked.")


def test_logging_out_one_session_leaves_another_session_of_the_same_user(
    client: httpx.Client, admin: dict[str, str]
) -> None:
    # Two logins in quick succession (same second) must still be separate sessions.
    user = new_user(client, admin)
    other = login(client, user["email"], user["password"])
    assert other != user["token"]
    assert client.post(LOGOUT, headers=user["headers"]).status_code == 200
    assert client.get(ME, headers=bearer(other)).status_code == 200


def test_logout_requires_authentication(client: httpx.Client) -> None:
    assert_unauthorized(client.post(LOGOUT), "Authentication required.")


def test_revoked_token_is_reported_as_revoked_even_when_also_expired(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    # HTTP consults the blacklist before verifying the signature (spec §3.1).
    user = new_user(client, admin)
    past = datetime.now(UTC) - timedelta(hours=1)
    token = signed({"sub": str(user_id(db, user["public_id"])), "exp": past, "iat": past - timedelta(hours=1)})
    db.execute("INSERT INTO blacklist_tokens (token) VALUES (%s)", (token,))
    assert_unauthorized(client.get(ME, headers=bearer(token)), "Token has been revoked.")


# --- /me (§3.6) ---


def test_me_returns_the_user_response(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    r = client.get(ME, headers=admin)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == USER_FIELDS
    row = db.execute("SELECT public_id FROM users WHERE email = %s", (ADMIN_EMAIL,)).fetchone()
    assert row is not None
    assert body["public_id"] == row[0]
    assert (body["email"], body["username"], body["role"], body["admin"]) == (ADMIN_EMAIL, "admin", "admin", True)
    assert body["sso_provider"] is None
    # Aware UTC timestamps serialise with a Z suffix (spec §0).
    assert body["registered_on"].endswith("Z")
    datetime.fromisoformat(body["registered_on"])


def test_me_for_a_viewer_is_not_admin(client: httpx.Client, viewer: dict[str, str]) -> None:
    body = client.get(ME, headers=viewer).json()
    assert (body["role"], body["admin"]) == ("viewer", False)


# --- credential resolution (§3.1, §3.3) ---


def test_missing_credentials_ask_for_bearer_auth(client: httpx.Client) -> None:
    r = client.get(ME)
    assert_unauthorized(r, "Authentication required.")
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Basic YWRtaW46YWRtaW4xMjM=", "Bearer", "", "Token abc", "bearer"])
def test_non_bearer_or_empty_credentials_are_missing_credentials(client: httpx.Client, header: str) -> None:
    assert_unauthorized(client.get(ME, headers={"Authorization": header}), "Authentication required.")


def test_bearer_scheme_is_case_insensitive(client: httpx.Client, admin_token: str) -> None:
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert client.get(ME, headers={"Authorization": f"{scheme} {admin_token}"}).status_code == 200


def test_forged_and_malformed_jwts_are_invalid(client: httpx.Client, db: psycopg.Connection) -> None:
    admin_id = db.execute("SELECT id FROM users WHERE email = %s", (ADMIN_EMAIL,)).fetchall()[0][0]
    later = datetime.now(UTC) + timedelta(hours=1)
    good_claims = {"sub": str(admin_id), "exp": later, "role": "admin"}
    unsigned = jwt.encode(good_claims, "", algorithm="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)  # our key is sized for HS256
        hs512 = signed(good_claims, algorithm="HS512")
    tokens = {
        "garbage": "not-a-jwt",
        "three dots": "a.b.c",
        "wrong key": signed(good_claims, key="another-secret-key-of-sufficient-length-123"),
        "alg none": unsigned,
        "alg none, no signature": unsigned.rstrip("."),
        "HS512 with the right key": hs512,
        "expired": signed({**good_claims, "exp": datetime.now(UTC) - timedelta(seconds=5)}),
        "no exp": signed({"sub": str(admin_id)}),
        "no sub": signed({"exp": later}),
        "non-numeric sub": signed({**good_claims, "sub": "admin"}),
        "integer sub": signed({**good_claims, "sub": admin_id}),
        "tampered payload": signed(good_claims)[:-4] + "AAAA",
    }
    for name, token in tokens.items():
        r = client.get(ME, headers=bearer(token))
        assert r.status_code == 401, name
        assert r.json() == {"detail": "Invalid or expired token."}, name
        assert "www-authenticate" not in r.headers, name


def test_self_made_token_with_the_right_key_works(client: httpx.Client, db: psycopg.Connection) -> None:
    # The positive control for the forgeries above: the same claims signed properly are accepted.
    row = db.execute("SELECT id FROM users WHERE email = %s", (ADMIN_EMAIL,)).fetchone()
    assert row is not None
    token = signed({"sub": str(row[0]), "exp": datetime.now(UTC) + timedelta(minutes=5)})
    assert client.get(ME, headers=bearer(token)).json()["email"] == ADMIN_EMAIL


def test_token_of_a_deleted_user_is_user_not_found(client: httpx.Client, admin: dict[str, str]) -> None:
    user = new_user(client, admin)
    assert client.delete(f"/api/v1/users/{user['public_id']}", headers=admin).status_code == 200
    assert_unauthorized(client.get(ME, headers=user["headers"]), "User not found.")


def test_token_for_an_id_that_never_existed_is_user_not_found(client: httpx.Client) -> None:
    # Larger than int4: must be a clean 401, not a database error.
    for sub in ("999999999", "99999999999"):
        token = signed({"sub": sub, "exp": datetime.now(UTC) + timedelta(minutes=5)})
        assert_unauthorized(client.get(ME, headers=bearer(token)), "User not found.")


def test_role_comes_from_the_database_not_the_token(client: httpx.Client, admin: dict[str, str]) -> None:
    user = new_user(client, admin, role="admin")
    assert client.get("/api/v1/users", headers=user["headers"]).status_code == 200
    r = client.put(f"/api/v1/users/{user['public_id']}", headers=admin, json={"role": "viewer"})
    assert r.status_code == 200
    # The old token still says role=admin; the server must not believe it.
    assert jwt.decode(user["token"], SECRET, algorithms=["HS256"])["role"] == "admin"
    r = client.get("/api/v1/users", headers=user["headers"])
    assert r.status_code == 403 and r.json() == {"detail": "Admin privileges required."}
    assert client.get(ME, headers=user["headers"]).json()["role"] == "viewer"


def test_a_role_claim_cannot_promote_a_viewer(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    user = new_user(client, admin)
    token = signed(
        {"sub": str(user_id(db, user["public_id"])), "role": "admin", "exp": datetime.now(UTC) + timedelta(minutes=5)}
    )
    assert client.get(ME, headers=bearer(token)).json()["role"] == "viewer"
    assert client.get("/api/v1/users", headers=bearer(token)).status_code == 403
