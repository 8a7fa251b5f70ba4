"""Abuse resistance: bounded request bodies (before auth), bounded error echoes, failed-login throttling per
account and per client (X-Forwarded-For only from trusted proxies), secrets out of logs, production refusing the
default admin password and a `trust` local cluster, spreadsheet-safe CSV, and a cap on concurrent exports."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    SECRET,
    ActiveEvent,
    Server,
    bearer,
    free_port,
    make_settings,
    start_server,
    unique,
)
from webmacs.app import create_app
from webmacs.db.cluster import Cluster
from webmacs.server import RedactSecrets, redact

LOGIN = "/api/v1/auth/login"
ME = "/api/v1/auth/me"

# --- request bodies: limited while reading, before parsing and authentication ---


def raw_request(url: str, head: bytes, body_chunks: list[bytes] | None = None) -> tuple[bytes, int]:
    """Send a request head (and optionally body chunks) over a raw socket; return the response's first bytes and
    how many body bytes had been sent when the answer arrived."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        sent = 0
        for chunk in body_chunks or []:
            s.setblocking(False)
            try:
                early = s.recv(64)
            except BlockingIOError:
                early = b""
            s.setblocking(True)
            if early:
                return early, sent
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        s.settimeout(10)
        return s.recv(64), sent


def test_a_declared_huge_anonymous_body_is_refused_before_it_is_read(server: Server) -> None:
    head = (
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 268435456\r\n\r\n"
    )
    answer, _ = raw_request(server.url, head)
    assert answer.startswith(b"HTTP/1.1 413")


def test_a_chunked_anonymous_body_is_cut_off_at_the_limit(server: Server) -> None:
    head = (
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    answer, sent = raw_request(server.url, head, [chunk] * 4096)  # 256 MiB if it were all read
    assert answer.startswith(b"HTTP/1.1 413")
    assert sent < 64 * 1024 * 1024  # answered long before the whole body


def test_limits_depend_on_credentials_and_route(client: httpx.Client, operator: dict[str, str]) -> None:
    two_mib = b'{"email": "' + b"a" * (2 << 20) + b'", "password": "x"}'
    # Without credentials: 1 MiB.
    assert client.post(LOGIN, content=two_mib, headers={"content-type": "application/json"}).status_code == 413
    # Authenticated JSON routes: 4 MiB (the body is read, then validated: 422).
    r = client.post("/api/v1/events", content=two_mib, headers={**operator, "content-type": "application/json"})
    assert r.status_code == 422
    five_mib = b'{"name": "' + b"a" * (5 << 20) + b'"}'
    r = client.post("/api/v1/events", content=five_mib, headers={**operator, "content-type": "application/json"})
    assert r.status_code == 413 and r.json() == {"detail": "Request body too large."}
    # Ingest: the engine's frame cap (4 MiB).
    r = client.post("/api/v1/datapoints/batch", content=five_mib, headers=operator)
    assert r.status_code == 413


def test_error_bodies_echo_only_an_excerpt(client: httpx.Client, operator: dict[str, str]) -> None:
    huge = "é" * 300_000
    r = client.post(LOGIN, json={"email": huge, "password": "x"})
    assert r.status_code == 422 and len(r.content) < 2000
    r = client.post("/api/v1/events", headers=operator, json={"name": [huge] * 3, "unit": {"a": [[[[huge]]]]}})
    assert r.status_code == 422 and len(r.content) < 4000
    # Small inputs are still echoed as they are (what clients show to users).
    r = client.post(LOGIN, json={"email": "not-an-email", "password": "x"})
    assert r.json()["detail"][0]["input"] == "not-an-email"


# --- failed logins ---


@pytest.fixture(scope="module")
def throttled(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = make_settings(
        db_url,
        tmp_path_factory.mktemp("throttle"),
        webmacs_login_max_failures_account=3,
        webmacs_login_max_failures_peer=8,
        webmacs_login_window_s=60,
    )
    s = start_server(settings)
    try:
        yield s
    finally:
        s.stop()


def new_account(server: Server, admin: dict[str, str]) -> tuple[str, str]:
    email, password = f"{unique('thr')}@example.com", "password123"
    with httpx.Client(base_url=server.url) as c:
        r = c.post(
            "/api/v1/users",
            headers=admin,
            json={"email": email, "username": unique("thr"), "password": password, "role": "viewer"},
        )
        assert r.status_code == 201, r.text
    return email, password


def attempt(c: httpx.Client, email: str, password: str, client_ip: str) -> httpx.Response:
    return c.post(LOGIN, json={"email": email, "password": password}, headers={"X-Forwarded-For": client_ip})


def test_failed_logins_are_throttled_per_account(throttled: Server, admin: dict[str, str]) -> None:
    email, password = new_account(throttled, admin)
    with httpx.Client(base_url=throttled.url, timeout=30) as c:
        for i in range(3):
            assert attempt(c, email, "wrong", f"198.51.100.{i}").status_code == 401
        # Over the account's limit, even the right password from a new address is not checked.
        r = attempt(c, email, password, "198.51.100.99")
        assert r.status_code == 429 and r.json() == {"detail": "Too many failed logins; try again later."}
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # Another account is not affected.
        other, other_pw = new_account(throttled, admin)
        assert attempt(c, other, other_pw, "198.51.100.99").status_code == 200


def test_failed_logins_are_throttled_per_client_and_counted_by_every_process(
    throttled: Server, admin: dict[str, str], db_url: str, tmp_path: Path
) -> None:
    peer = f"192.0.2.{int(time.time()) % 200 + 1}"
    second = start_server(
        make_settings(db_url, tmp_path, webmacs_login_max_failures_account=3, webmacs_login_max_failures_peer=8)
    )
    try:
        with httpx.Client(timeout=30) as c:
            # Eight failures for eight different accounts from one client, spread over two processes.
            for i in range(8):
                base = (throttled if i % 2 else second).url
                r = c.post(
                    base + LOGIN,
                    json={"email": f"{unique('nobody')}@example.com", "password": "wrong"},
                    headers={"X-Forwarded-For": peer},
                )
                assert r.status_code == 401
            email, password = new_account(throttled, admin)
            r = c.post(
                second.url + LOGIN, json={"email": email, "password": password}, headers={"X-Forwarded-For": peer}
            )
            assert r.status_code == 429
            r = c.post(
                second.url + LOGIN,
                json={"email": email, "password": password},
                headers={"X-Forwarded-For": "192.0.2.250"},
            )
            assert r.status_code == 200
    finally:
        second.stop()


def test_forwarded_for_is_ignored_from_untrusted_peers(db_url: str, tmp_path: Path, admin: dict[str, str]) -> None:
    # The test client connects from 127.0.0.1; here only 10.9.9.9 may speak for clients.
    s = start_server(
        make_settings(
            db_url,
            tmp_path,
            webmacs_trusted_proxies=["10.9.9.9/32"],
            webmacs_login_max_failures_account=100,
            webmacs_login_max_failures_peer=4,
            rate_limit_per_minute=1000,
        )
    )
    try:
        email, password = new_account(s, admin)
        with httpx.Client(base_url=s.url, timeout=30) as c:
            # Each failure names another client: all of them are 127.0.0.1 all the same.
            for i in range(4):
                assert attempt(c, email, "wrong", f"203.0.113.{i}").status_code == 401
            assert attempt(c, email, password, "203.0.113.200").status_code == 429
    finally:
        s.stop()
        with psycopg.connect(db_url, autocommit=True) as db:
            db.execute("DELETE FROM login_failures WHERE peer = '127.0.0.1'")


def test_a_successful_login_clears_the_accounts_failures(throttled: Server, admin: dict[str, str]) -> None:
    email, password = new_account(throttled, admin)
    with httpx.Client(base_url=throttled.url, timeout=30) as c:
        for _ in range(2):
            assert attempt(c, email, "wrong", "198.51.100.7").status_code == 401
        assert attempt(c, email, password, "198.51.100.8").status_code == 200
        for _ in range(2):
            assert attempt(c, email, "wrong", "198.51.100.9").status_code == 401
        assert attempt(c, email, password, "198.51.100.10").status_code == 200


# --- secrets never reach the logs ---


def test_access_log_lines_are_redacted() -> None:
    assert (
        redact("/ws/controller/telemetry?token=eyJabc.def.ghi&x=1") == "/ws/controller/telemetry?token=[redacted]&x=1"
    )
    assert (
        redact("/api/v1/auth/sso/callback?state=s1&code=c2")
        == "/api/v1/auth/sso/callback?state=[redacted]&code=[redacted]"
    )
    assert redact("/api/v1/events?page=2") == "/api/v1/events?page=2"
    # uvicorn's access record: (client, method, path, http version, status).
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/api/v1/auth/sso/callback?code=SECRETCODE&state=STATE", "1.1", 307),
        None,
    )
    RedactSecrets().filter(record)
    assert "SECRETCODE" not in record.getMessage() and "STATE" not in record.getMessage()


def test_the_running_server_redacts_its_access_log(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("uvicorn.access")
    assert any(isinstance(f, RedactSecrets) for f in logger.filters)


# --- production ---


def test_production_refuses_to_seed_the_default_admin_password(db_url: str, tmp_path: Path) -> None:
    name = unique("prod").replace("-", "_")
    with psycopg.connect(db_url, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    url = db_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        settings = make_settings(url, tmp_path, env="production", secret_key="x" * 40)
        app = create_app(settings)

        async def start() -> None:
            async with app.router.lifespan_context(app):
                pass

        with pytest.raises(RuntimeError, match="default password"):
            asyncio.run(start())
        # With a password of its own, the same (still empty) database starts.
        s = start_server(
            make_settings(
                url, tmp_path, env="production", secret_key="x" * 40, initial_admin_password="a-real-password-1"
            )
        )
        s.stop()
    finally:
        with psycopg.connect(db_url, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_secure_local_cluster_requires_its_password() -> None:
    home = Path(tempfile.mkdtemp(prefix="webmacs-secure-"))
    home.chmod(0o755)
    cluster = Cluster(home, free_port(), secure=True)
    try:
        url = cluster.up()
        assert ":" in url.split("@")[0].removeprefix("postgresql://")  # user:password@
        assert (cluster.password_file.stat().st_mode & 0o777) == 0o600
        with psycopg.connect(url) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://webmacs@127.0.0.1:{cluster.port}/webmacs", connect_timeout=5)
        hba = (cluster.data_dir / "pg_hba.conf").read_text()
        assert not [
            ln for ln in hba.splitlines() if ln.strip() and not ln.startswith("#") and ln.split()[-1] == "trust"
        ]
    finally:
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)


# --- CSV that spreadsheets do not execute ---


def new_experiment(client: httpx.Client, headers: dict[str, str], db: psycopg.Connection) -> dict[str, Any]:
    name = unique("-csv")
    assert client.post("/api/v1/experiments", headers=headers, json={"name": name}).status_code == 201
    row = db.execute("SELECT id, public_id FROM experiments WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return {"id": row[0], "public_id": row[1]}


def test_csv_exports_neutralise_formula_cells(
    client: httpx.Client, operator: dict[str, str], db: psycopg.Connection, server: Server
) -> None:
    name = '=HYPERLINK("http://evil","x")' + unique("")
    ev = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, '+1 V', 'sensor')"
        " RETURNING id, public_id",
        (name,),
    ).fetchone()
    assert ev is not None
    exp = new_experiment(client, operator, db)
    xid = exp["id"]
    t = datetime(2025, 1, 1, tzinfo=UTC)
    db.execute("INSERT INTO datapoints (time, event_id, experiment_id, value) VALUES (%s, %s, %s, -5)", (t, ev[0], xid))
    client.put(f"/api/v1/experiments/{exp['public_id']}/stop", headers=operator)
    body = client.get(f"/api/v1/experiments/{exp['public_id']}/export/csv", headers=operator).text
    row = body.splitlines()[1]
    assert "\"'=HYPERLINK(" in row and ",'+1 V," in row and ",-5.0," in row  # numbers untouched
    r = client.get(
        "/api/v1/export",
        headers=operator,
        params={"events": ev[1], "start": "2024-12-31T00:00:00Z", "end": "2025-01-02T00:00:00Z", "format": "csv"},
    )
    assert r.status_code == 200, r.text
    line = r.text.splitlines()[1]
    assert "'=HYPERLINK(" in line and ",'+1 V," in line and ",-5.0" in line


def test_csv_formula_guard_off_is_byte_exact(
    db_url: str, tmp_path: Path, operator: dict[str, str], db: psycopg.Connection
) -> None:
    s = start_server(make_settings(db_url, tmp_path, webmacs_csv_formula_guard=False))
    try:
        ev = db.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type)"
            " VALUES (%s, 0, 1, '=u', 'sensor') RETURNING id",
            ("@" + unique("raw"),),
        ).fetchone()
        assert ev is not None
        with httpx.Client(base_url=s.url, timeout=30) as c:
            exp = new_experiment(c, operator, db)
            xid = exp["id"]
            db.execute(
                "INSERT INTO datapoints (time, event_id, experiment_id, value) VALUES (now(), %s, %s, 1)", (ev[0], xid)
            )
            row = c.get(f"/api/v1/experiments/{exp['public_id']}/export/csv", headers=operator).text.splitlines()[1]
            c.put(f"/api/v1/experiments/{exp['public_id']}/stop", headers=operator)
        assert ",@raw-" in row and ",=u," in row
    finally:
        s.stop()


# --- exports are capped ---


def test_concurrent_exports_are_capped(
    db_url: str, tmp_path: Path, operator: dict[str, str], make_active_event: Callable[..., ActiveEvent]
) -> None:
    s = start_server(make_settings(db_url, tmp_path, webmacs_export_concurrency=1))
    ev = make_active_event()
    params: dict[str, Any] = {"events": ev.public_id, "start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            with c.stream("GET", "/api/v1/export", params={**params, "format": "csv"}, headers=operator) as first:
                assert first.status_code == 200
                busy = c.get("/api/v1/export", params={**params, "format": "parquet"}, headers=operator)
                assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
                first.read()
            # The slot is free again once the first export has ended.
            deadline = time.monotonic() + 10
            while (
                r := c.get("/api/v1/export", params={**params, "format": "csv"}, headers=operator)
            ).status_code == 503:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert r.status_code == 200
            assert s.rt.export_slots.refused >= 1
    finally:
        s.stop()


def test_login_and_me_still_work_with_default_settings(client: httpx.Client) -> None:
    token = client.post(LOGIN, json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).json()["access_token"]
    assert client.get(ME, headers=bearer(token)).status_code == 200
    assert SECRET  # the session server signs with the shared test secret
