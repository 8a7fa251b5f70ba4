"""SSO / OIDC login (spec §3.10, §14, §20) against a real fake identity provider on loopback."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import psycopg
import pytest

from tests.conftest import SECRET, Server, bearer, make_settings, start_server, unique
from webmacs.services import sso

BASE = "/api/v1/auth/sso"
PROVIDER = "ACME"
CLIENT_ID = "webmacs-client"
CLIENT_SECRET = "s3cr:et/+"
FRONTEND = "http://front.example/app"


class FakeIdP:
    """A minimal OpenID provider: discovery, token and userinfo endpoints with per-test responses."""

    def __init__(self) -> None:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: Any) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/.well-known/openid-configuration":
                    idp.discovery_hits += 1
                    self._send(200, idp.discovery_doc())
                elif path == "/userinfo":
                    idp.userinfo_auth.append(self.headers.get("Authorization", ""))
                    self._send(idp.userinfo_status, idp.userinfo)
                else:
                    self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                idp.token_requests.append({"form": form, "authorization": self.headers.get("Authorization", "")})
                if urlsplit(self.path).path != "/token":
                    self._send(404, {"error": "not_found"})
                    return
                self._send(idp.token_status, idp.token_body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fake-idp", daemon=True)
        self.thread.start()
        self.reset()

    def reset(self) -> None:
        self.discovery_hits = 0
        self.with_userinfo = True
        self.token_status = 200
        self.token_body: Any = {"access_token": "idp-access-token", "token_type": "Bearer"}
        self.userinfo_status = 200
        self.userinfo: Any = {}
        self.token_requests: list[dict[str, Any]] = []
        self.userinfo_auth: list[str] = []

    def discovery_doc(self) -> dict[str, Any]:
        doc = {
            "issuer": self.url,
            "authorization_endpoint": f"{self.url}/authorize?tenant=t1",
            "token_endpoint": f"{self.url}/token",
        }
        if self.with_userinfo:
            doc["userinfo_endpoint"] = f"{self.url}/userinfo"
        return doc

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def idp() -> Iterator[FakeIdP]:
    fake = FakeIdP()
    try:
        yield fake
    finally:
        fake.close()


def oidc_settings(db_url: str, tmp: Path, idp: FakeIdP, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "oidc_enabled": True,
        "oidc_provider_name": PROVIDER,
        "oidc_issuer_url": idp.url + "/",
        "oidc_client_id": CLIENT_ID,
        "oidc_client_secret": CLIENT_SECRET,
        "oidc_frontend_url": FRONTEND + "/",
        "oidc_default_role": "operator",
        "oidc_redirect_uri": "http://api.example/api/v1/auth/sso/callback",
    }
    values.update(overrides)
    return make_settings(db_url, tmp, **values)


@pytest.fixture(scope="module")
def sso_server(db_url: str, tmp_path_factory: pytest.TempPathFactory, idp: FakeIdP) -> Iterator[Server]:
    s = start_server(oidc_settings(db_url, tmp_path_factory.mktemp("sso"), idp))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def api(sso_server: Server, idp: FakeIdP) -> Iterator[httpx.Client]:
    idp.reset()
    with httpx.Client(base_url=sso_server.url, timeout=30, follow_redirects=False) as c:
        yield c


def authorize(api: httpx.Client) -> dict[str, str]:
    r = api.get(f"{BASE}/authorize")
    assert r.status_code == 307, r.text
    query = parse_qs(urlsplit(r.headers["location"]).query)
    assert all(len(v) == 1 for v in query.values()), query
    return {k: v[0] for k, v in query.items()}


def callback(
    api: httpx.Client, idp: FakeIdP, userinfo: dict[str, Any] | None, code: str = "idp-code"
) -> httpx.Response:
    """Walk authorize → (the IdP authenticates the user) → callback; returns the callback response."""
    state = authorize(api)["state"]
    if userinfo is not None:
        idp.userinfo = userinfo
    return api.get(f"{BASE}/callback", params={"code": code, "state": state})


def one_time_code(r: httpx.Response) -> str:
    assert r.status_code == 307, r.text
    location = r.headers["location"]
    assert location.startswith(f"{FRONTEND}/sso-callback?code="), location
    return parse_qs(urlsplit(location).query)["code"][0]


def login(api: httpx.Client, idp: FakeIdP, userinfo: dict[str, Any]) -> dict[str, Any]:
    """A complete SSO login; returns the /auth/me body of the user it resolved to."""
    r = api.post(f"{BASE}/exchange", json={"code": one_time_code(callback(api, idp, userinfo))})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"access_token"}
    me = api.get("/api/v1/auth/me", headers=bearer(r.json()["access_token"]))
    assert me.status_code == 200, me.text
    return dict(me.json())


def person(**claims: Any) -> dict[str, Any]:
    base = {"sub": unique("sub"), "email": f"{unique('p')}@example.com", "email_verified": True}
    base.update(claims)
    return {k: v for k, v in base.items() if v is not None}


def assert_detail(r: httpx.Response, status: int, contains: str) -> None:
    assert r.status_code == status, r.text
    assert contains in r.json()["detail"], r.json()


# --- config ---


def test_config_disabled_by_default(client: httpx.Client) -> None:
    r = client.get(f"{BASE}/config")
    assert r.status_code == 200
    assert r.json() == {"enabled": False, "provider_name": "", "authorize_url": ""}


def test_disabled_sso_endpoints_are_404(client: httpx.Client) -> None:
    assert client.get(f"{BASE}/authorize").json() == {"detail": "SSO is not enabled."}
    r = client.get(f"{BASE}/callback", params={"code": "c", "state": "s"})
    assert r.status_code == 404 and r.json() == {"detail": "SSO is not enabled."}
    # Both parameters are required (validated before anything else).
    assert client.get(f"{BASE}/callback", params={"code": "c"}).status_code == 422


def test_config_enabled(api: httpx.Client) -> None:
    r = api.get(f"{BASE}/config")
    assert r.json() == {"enabled": True, "provider_name": PROVIDER, "authorize_url": f"{BASE}/authorize"}


# --- authorize ---


def test_authorize_redirects_with_pkce_and_a_signed_state(api: httpx.Client, idp: FakeIdP) -> None:
    r = api.get(f"{BASE}/authorize")
    assert r.status_code == 307
    location = urlsplit(r.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{idp.url}/authorize"
    q = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert q.keys() == {
        "tenant",
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    }
    assert q["tenant"] == "t1"  # the endpoint's own query survives
    assert q["response_type"] == "code"
    assert q["client_id"] == CLIENT_ID
    assert q["redirect_uri"] == "http://api.example/api/v1/auth/sso/callback"
    assert q["scope"] == "openid email profile"
    assert q["code_challenge_method"] == "S256"
    claims = jwt.decode(q["state"], SECRET, algorithms=["HS256"], issuer="webmacs-sso")
    assert {"iss", "nonce", "cv", "iat", "exp"} <= claims.keys()
    assert claims["exp"] - claims["iat"] == 600
    verifier = claims["cv"]
    assert 43 <= len(verifier) <= 128
    expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert q["code_challenge"] == expected
    # A fresh state and verifier every time.
    assert authorize(api)["state"] != q["state"]


def test_discovery_is_cached(api: httpx.Client, idp: FakeIdP, sso_server: Server) -> None:
    sso_server.rt.sso.discovery.clear()
    for _ in range(3):
        authorize(api)
    assert idp.discovery_hits == 1


# --- callback: the user ---


def test_new_user_is_created_with_the_default_role(api: httpx.Client, idp: FakeIdP, db: psycopg.Connection) -> None:
    name = unique("newbie")
    claims = person(preferred_username=name)
    me = login(api, idp, claims)
    assert me["username"] == name
    assert me["email"] == claims["email"]
    assert me["role"] == "operator" and me["admin"] is False  # OIDC_DEFAULT_ROLE, not a hard-coded viewer
    assert me["sso_provider"] == PROVIDER
    row = db.execute(
        "SELECT sso_provider, sso_subject_id FROM users WHERE public_id = %s", (me["public_id"],)
    ).fetchone()
    assert row == (PROVIDER, claims["sub"])
    # The audit log records the SSO login (spec §14).
    log = db.execute(
        "SELECT logging_type, status_type FROM log_entries WHERE content = %s AND user_public_id = %s",
        (f"User '{name}' logged in via SSO ({PROVIDER}).", me["public_id"]),
    ).fetchall()
    assert log == [("info", "unread")]
    # Logging in again resolves to the same user by (provider, subject), even with a changed email.
    again = login(api, idp, {**claims, "email": f"{unique('changed')}@example.com"})
    assert again["public_id"] == me["public_id"]


def test_callback_exchanges_the_code_with_pkce_and_client_credentials(api: httpx.Client, idp: FakeIdP) -> None:
    state = authorize(api)["state"]
    verifier = jwt.decode(state, SECRET, algorithms=["HS256"])["cv"]
    idp.userinfo = person()
    r = api.get(f"{BASE}/callback", params={"code": "the-idp-code", "state": state})
    one_time_code(r)
    assert r.headers["cache-control"] == "no-store"
    [req] = idp.token_requests
    assert req["form"] == {
        "grant_type": "authorization_code",
        "code": "the-idp-code",
        "client_id": CLIENT_ID,
        "redirect_uri": "http://api.example/api/v1/auth/sso/callback",
        "code_verifier": verifier,
    }
    user, _, secret = base64.b64decode(req["authorization"].removeprefix("Basic ")).decode().partition(":")
    assert (user, secret) == (CLIENT_ID, "s3cr%3Aet%2F%2B")  # RFC 6749 §2.3.1: form-encoded, then Basic
    assert idp.userinfo_auth == ["Bearer idp-access-token"]


@pytest.mark.parametrize(("preferred", "expected"), [("j@hn / d<>e", "jhnde"), ("ünïcödé", "ncd")])
def test_username_is_sanitised(api: httpx.Client, idp: FakeIdP, preferred: str, expected: str) -> None:
    me = login(api, idp, person(preferred_username=preferred))
    assert me["username"] == expected
    # A second person with the same name gets a suffix instead of a conflict.
    other = login(api, idp, person(preferred_username=preferred))
    assert re.fullmatch(rf"{re.escape(expected)}_[0-9a-f]{{6}}", other["username"]), other["username"]


def test_username_falls_back_to_name_then_email_local_part(api: httpx.Client, idp: FakeIdP) -> None:
    name = unique("Full Name").replace(" ", "")
    assert login(api, idp, person(name=name))["username"] == name
    local = unique("local")
    assert login(api, idp, person(email=f"{local}@example.com"))["username"] == local
    assert re.fullmatch(r"sso_user_[0-9a-f]{6}", login(api, idp, person(preferred_username="@@@ !"))["username"])


def test_sanitise_username_rules() -> None:
    assert sso.sanitise_username("a" * 80) == "a" * 50
    assert sso.sanitise_username("ok.name_-1") == "ok.name_-1"
    assert re.fullmatch(r"sso_user_[0-9a-f]{6}", sso.sanitise_username("ü"))
    assert sso.identity({"sub": 42, "email": "x@Example.COM", "email_verified": "true"}) == sso.Identity(
        subject="42", email="x@example.com", email_verified=True, username_hint="x"
    )
    assert sso.identity({"sub": "s", "email": "x@e.com", "email_verified": "false"}).email_verified is False


def test_existing_verified_user_is_linked_by_email(
    api: httpx.Client, idp: FakeIdP, client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    email, username = f"{unique('local')}@example.com", unique("local")
    r = client.post(
        "/api/v1/users",
        headers=admin,
        json={"email": email, "username": username, "password": "password123", "role": "viewer"},
    )
    assert r.status_code == 201, r.text
    claims = person(email=email, preferred_username="ignored-for-existing-users")
    me = login(api, idp, claims)
    assert (me["email"], me["username"], me["role"], me["sso_provider"]) == (email, username, "viewer", PROVIDER)
    row = db.execute("SELECT sso_subject_id FROM users WHERE email = %s", (email,)).fetchone()
    assert row == (claims["sub"],)


def test_unverified_email_is_not_linked(
    api: httpx.Client, idp: FakeIdP, client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    email = f"{unique('unv')}@example.com"
    r = client.post(
        "/api/v1/users", headers=admin, json={"email": email, "username": unique("unv"), "password": "password123"}
    )
    assert r.status_code == 201
    for verified in (False, None):  # explicitly false, or no claim at all
        assert_detail(callback(api, idp, person(email=email, email_verified=verified)), 403, "verified")
    assert db.execute("SELECT sso_provider FROM users WHERE email = %s", (email,)).fetchone() == (None,)


def test_admin_account_is_never_linked_by_email(api: httpx.Client, idp: FakeIdP, db: psycopg.Connection) -> None:
    assert_detail(callback(api, idp, person(email="admin@webmacs.io")), 403, "admin")
    assert db.execute("SELECT sso_provider FROM users WHERE email = 'admin@webmacs.io'").fetchone() == (None,)


def test_unverified_email_creates_no_user(api: httpx.Client, idp: FakeIdP, db: psycopg.Connection) -> None:
    claims = person(email_verified=False)
    assert_detail(callback(api, idp, claims), 403, "verified")
    assert db.execute("SELECT 1 FROM users WHERE email = %s", (claims["email"],)).fetchone() is None


def test_auto_create_disabled(db_url: str, tmp_path: Path, idp: FakeIdP, db: psycopg.Connection) -> None:
    idp.reset()
    server = start_server(oidc_settings(db_url, tmp_path, idp, oidc_auto_create_users=False))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            claims = person()
            assert_detail(callback(c, idp, claims), 403, "automatic user creation")
            assert db.execute("SELECT 1 FROM users WHERE email = %s", (claims["email"],)).fetchone() is None
    finally:
        server.stop()


# --- callback: failures ---


def test_bad_or_expired_state(api: httpx.Client, idp: FakeIdP) -> None:
    now = datetime.now(UTC)
    good = {"iss": "webmacs-sso", "nonce": "n", "cv": "v" * 86, "iat": now, "exp": now + timedelta(minutes=10)}
    states = [
        "garbage",
        jwt.encode({**good, "iat": now - timedelta(hours=1), "exp": now - timedelta(seconds=5)}, SECRET),
        jwt.encode(good, "another-secret-that-is-long-enough-0123456789"),
        jwt.encode({**good, "iss": "someone-else"}, SECRET),
        jwt.encode({k: v for k, v in good.items() if k != "cv"}, SECRET),
    ]
    for state in states:
        r = api.get(f"{BASE}/callback", params={"code": "c", "state": state})
        assert r.status_code == 400, (state, r.text)
        assert r.json() == {"detail": "Invalid or expired SSO state."}
    assert idp.token_requests == []  # the IdP is never asked with a bad state
    # The same claims correctly signed are accepted (so the cases above fail for their one defect).
    idp.userinfo = person()
    one_time_code(api.get(f"{BASE}/callback", params={"code": "c", "state": jwt.encode(good, SECRET)}))


@pytest.mark.parametrize("body", [{"error": "invalid_grant"}, {"token_type": "Bearer"}])
def test_token_endpoint_failure_is_502(api: httpx.Client, idp: FakeIdP, body: dict[str, Any]) -> None:
    idp.token_status, idp.token_body = (500 if "error" in body else 200), body
    r = callback(api, idp, person())
    assert r.status_code == 502
    assert r.json() == {"detail": "Failed to exchange authorization code with identity provider."}


def test_userinfo_failure_is_502(api: httpx.Client, idp: FakeIdP, sso_server: Server) -> None:
    idp.userinfo_status = 401
    assert_detail(callback(api, idp, {"error": "invalid_token"}), 502, "user information")
    idp.userinfo_status = 200
    assert_detail(callback(api, idp, ["not", "an", "object"]), 502, "user information")  # type: ignore[arg-type]  # on purpose
    # A provider without a userinfo endpoint.
    idp.with_userinfo = False
    sso_server.rt.sso.discovery.clear()
    try:
        assert_detail(callback(api, idp, person()), 502, "userinfo endpoint")
    finally:
        sso_server.rt.sso.discovery.clear()


def test_missing_email_or_subject_is_400(api: httpx.Client, idp: FakeIdP) -> None:
    for claims in (person(email=None), person(email="")):
        assert_detail(callback(api, idp, claims), 400, "email")
    for claims in (person(sub=None), person(sub="")):
        r = callback(api, idp, claims)
        assert r.status_code == 400
        assert r.json() == {"detail": "Identity provider did not return a subject identifier."}


# --- exchange ---


def test_exchange_is_single_use(api: httpx.Client, idp: FakeIdP) -> None:
    code = one_time_code(callback(api, idp, person()))
    assert api.post(f"{BASE}/exchange", json={"code": code}).status_code == 200
    r = api.post(f"{BASE}/exchange", json={"code": code})
    assert r.status_code == 400
    assert r.json() == {"detail": "Invalid or expired SSO authorization code."}


def test_exchange_unknown_or_expired_code(api: httpx.Client, idp: FakeIdP, sso_server: Server) -> None:
    r = api.post(f"{BASE}/exchange", json={"code": "never-issued"})
    assert r.status_code == 400 and r.json() == {"detail": "Invalid or expired SSO authorization code."}
    assert api.post(f"{BASE}/exchange", json={}).status_code == 422
    state = sso_server.rt.sso
    state.code_ttl_s = 0.0
    try:
        code = one_time_code(callback(api, idp, person()))
    finally:
        state.code_ttl_s = sso.CODE_TTL_S
    assert api.post(f"{BASE}/exchange", json={"code": code}).status_code == 400


# --- configuration ---


def test_misconfigured_and_unreachable_issuer(db_url: str, tmp_path: Path, idp: FakeIdP) -> None:
    server = start_server(oidc_settings(db_url, tmp_path, idp, oidc_issuer_url=""))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            expected = {"detail": "SSO is enabled but OIDC_ISSUER_URL or OIDC_CLIENT_ID is missing."}
            for r in (c.get(f"{BASE}/authorize"), c.get(f"{BASE}/callback", params={"code": "c", "state": "s"})):
                assert r.status_code == 500 and r.json() == expected
            # Only `enabled` matters to /config.
            assert c.get(f"{BASE}/config").json()["enabled"] is True
    finally:
        server.stop()
    # An issuer that does not answer: a gateway error, not a crash.
    dead = f"http://127.0.0.1:{_closed_port()}"
    server = start_server(oidc_settings(db_url, tmp_path, idp, oidc_issuer_url=dead))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert_detail(c.get(f"{BASE}/authorize"), 502, "OpenID configuration")
    finally:
        server.stop()


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()


def test_redirect_uri_and_frontend_defaults(db_url: str, tmp_path: Path) -> None:
    s = make_settings(db_url, tmp_path)
    assert sso.redirect_uri(s) == "http://localhost:8000/api/v1/auth/sso/callback"
    s = make_settings(db_url, tmp_path, backend_host="api.example", backend_port=9000, env="production")
    assert sso.redirect_uri(s) == "https://api.example:9000/api/v1/auth/sso/callback"
    assert sso.frontend_url(make_settings(db_url, tmp_path, cors_origins=["http://ui.example/"])) == "http://ui.example"
    assert sso.frontend_url(make_settings(db_url, tmp_path, cors_origins=[])) == "http://localhost:5173"
    assert (
        sso.frontend_url(make_settings(db_url, tmp_path, oidc_frontend_url="https://f.example/")) == "https://f.example"
    )
