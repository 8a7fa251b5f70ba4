"""`WEBMACS_LOG_FORMAT=json`: one JSON object per line with the request's context, and no secrets in any line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, SECRET, free_port
from webmacs import logs


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("webmacs.test", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_formatter_fields_and_redaction() -> None:
    token = logs.request_id.set("rid-1")
    try:
        line = logs.JsonFormatter().format(_record("GET %s", "/ws?token=eyJsecret.part&x=1", status=200))
    finally:
        logs.request_id.reset(token)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "WARNING" and out["logger"] == "webmacs.test" and out["request_id"] == "rid-1"
    assert out["status"] == 200
    assert out["msg"] == "GET /ws?token=[redacted]&x=1"
    assert "eyJsecret" not in line
    assert out["ts"].endswith("+00:00")


@pytest.mark.parametrize(
    "hostile",
    ["\x00\x01\udcff", "x" * 100_000, '\u202e{"level":"ERROR"}\n{', float("nan"), float("inf"), 10**400],
)
def test_json_formatter_hostile_content_stays_one_valid_line(hostile: object) -> None:
    line = logs.JsonFormatter().format(_record("value %s", hostile, duration_ms=hostile))
    assert "\n" not in line
    out = json.loads(line)
    assert out["logger"] == "webmacs.test"


def test_json_formatter_exception_is_redacted() -> None:
    try:
        raise ValueError("bad url /x?secret=hunter2")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    out = json.loads(logs.JsonFormatter().format(record))
    assert "ValueError" in out["exc"] and "hunter2" not in out["exc"]


@pytest.fixture
def json_server(db_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`webmacs serve` in a process of its own with JSON logs on stderr (written to a file)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("WEBMACS_", "DATABASE_URL", "SECRET"))}
    env.update(
        DATABASE_URL=db_url,
        SECRET_KEY=SECRET,
        WEBMACS_LOG_FORMAT="json",
        WEBMACS_BCRYPT_ROUNDS="4",
        WEBMACS_HOME=str(tmp_path / "home"),
        WEBMACS_UPDATE_DIR=str(tmp_path),
        WEBMACS_PLUGIN_DIR=str(tmp_path),
    )
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "webmacs.cli", "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code in (200, 503):
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start:\n" + log_path.read_text(errors="replace"))
                time.sleep(0.2)
            yield url, log_path
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def test_request_log_line_is_json_with_context_and_no_token(json_server: tuple[str, Path]) -> None:
    url, log_path = json_server
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        assert r.status_code == 200, r.text
        jwt = r.json()["access_token"]
        me = c.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {jwt}"})
        assert me.status_code == 200
        # A credential in the query string (as WebSocket clients send it) must not reach the log either.
        events = c.get(f"/api/v1/events?token={jwt}", headers={"Authorization": f"Bearer {jwt}"})
        assert events.status_code == 200
        missing = c.get("/no/such/route?access_token=wm_notlogged0123456789")
        assert missing.status_code == 404
    deadline = time.monotonic() + 10
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        text = log_path.read_text(encoding="utf-8")
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        logged = {x.get("request_id") for x in lines if x.get("logger") == "webmacs.access"}
        if {r.headers["x-request-id"], events.headers["x-request-id"], missing.headers["x-request-id"]} <= logged:
            break
        time.sleep(0.1)
    raw = log_path.read_text(encoding="utf-8")
    assert jwt not in raw and jwt.split(".")[2] not in raw
    assert "wm_notlogged" not in raw and ADMIN_PASSWORD not in raw
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= line.keys()
    access = {x["request_id"]: x for x in lines if x.get("logger") == "webmacs.access"}
    line = access[events.headers["x-request-id"]]
    assert line["route"] == "/api/v1/events"
    assert line["status"] == 200 and line["method"] == "GET"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["user_id"] == me.json()["public_id"]
    assert "[redacted]" in str(line["path"])
    anonymous = access[missing.headers["x-request-id"]]
    assert anonymous["status"] == 404 and "user_id" not in anonymous and "route" not in anonymous
    login = next(x for x in access.values() if x.get("route") == "/api/v1/auth/login")
    assert login["status"] == 200 and "user_id" not in login
