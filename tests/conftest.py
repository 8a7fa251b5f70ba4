"""Shared fixtures: a throwaway TimescaleDB cluster per test session and a real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn

from webmacs import runtime
from webmacs.app import create_app
from webmacs.db.cluster import Cluster
from webmacs.runtime import Runtime
from webmacs.server import uvicorn_config
from webmacs.settings import Settings

SECRET = "test-secret-key-that-is-long-enough-0123456789"
ADMIN_EMAIL = "admin@webmacs.io"
ADMIN_PASSWORD = "admin123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_cluster(prefix: str) -> Iterator[Cluster]:
    """A TimescaleDB cluster of its own, started on a free port and destroyed afterwards."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    home.chmod(0o755)  # the postgres user must be able to enter it when tests run as root
    c = Cluster(home, free_port())
    c.up()
    try:
        yield c
    finally:
        c.destroy()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with throwaway_cluster("webmacs-test-") as c:
        yield c


@pytest.fixture(scope="session")
def db_url(cluster: Cluster) -> str:
    return cluster.url()


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection]:
    """A direct autocommit connection for arranging and asserting database state."""
    with psycopg.connect(db_url, autocommit=True, options="-c timezone=UTC") as conn:
        yield conn


@dataclass
class Server:
    url: str
    app: Any
    settings: Settings
    thread: threading.Thread
    server: uvicorn.Server

    @property
    def rt(self) -> Runtime:
        """The running app's state (pool, engine, settings…)."""
        return runtime.of(self.app)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's event loop from the test thread and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.rt.loop).result(timeout)

    def refresh_catalog(self) -> None:
        """Make the ingest engine see rows a test inserted directly with SQL."""
        self.call(self.rt.catalog_refresh())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(settings: Settings, app: Any = None, port: int | None = None) -> Server:
    """Run the app (by default `create_app(settings)`) under uvicorn in a thread on a loopback port (`port`, or a
    free one); returns once it accepts requests. Pass `app` to serve an app a test has extended with probe routes."""
    port = port or free_port()
    app = app if app is not None else create_app(settings)
    config = uvicorn_config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server failed to start")
        time.sleep(0.05)
    return Server(f"http://127.0.0.1:{port}", app, settings, thread, server)


def server_env(url: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a `webmacs serve` process of a test's own: this database, the test key, cheap bcrypt,
    its files below `home` (created); `extra` adds or overrides variables."""
    for d in ("home", "updates", "plugins"):
        (home / d).mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "DATABASE_URL": url,
        "SECRET_KEY": SECRET,
        "ENV": "test",
        "WEBMACS_BCRYPT_ROUNDS": "4",
        "WEBMACS_HOME": str(home / "home"),
        "WEBMACS_UPDATE_DIR": str(home / "updates"),
        "WEBMACS_PLUGIN_DIR": str(home / "plugins"),
        **extra,
    }


def make_settings(db_url: str, tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "secret_key": SECRET,
        "env": "test",
        "webmacs_bcrypt_rounds": 4,
        "webmacs_update_dir": tmp / "updates",
        "webmacs_plugin_dir": tmp / "plugins",
        "webmacs_home": tmp / "home",
        # The session's tests log in with wrong passwords on purpose, many times over from 127.0.0.1: the login
        # throttle is tested with its own limits (tests/api/test_abuse.py).
        "webmacs_login_max_failures_account": 100_000,
        "webmacs_login_max_failures_peer": 100_000,
    }
    values.update(overrides)
    (tmp / "updates").mkdir(parents=True, exist_ok=True)
    (tmp / "plugins").mkdir(parents=True, exist_ok=True)
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
def server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(make_settings(db_url, tmp_path_factory.mktemp("server")))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def login(client: httpx.Client, email: str, password: str) -> str:
    r = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def admin_token(server: Server) -> str:
    with httpx.Client(base_url=server.url) as c:
        return login(c, ADMIN_EMAIL, ADMIN_PASSWORD)


@pytest.fixture(scope="session")
def admin(admin_token: str) -> dict[str, str]:
    return bearer(admin_token)


def user_with_role(server: Server, admin_headers: dict[str, str], role: str) -> dict[str, str]:
    email = f"{unique(role)}@example.com"
    with httpx.Client(base_url=server.url) as c:
        r = c.post(
            "/api/v1/users",
            headers=admin_headers,
            json={"email": email, "username": unique(role), "password": "password123", "role": role},
        )
        assert r.status_code == 201, r.text
        return bearer(login(c, email, "password123"))


@pytest.fixture(scope="session")
def operator(server: Server, admin: dict[str, str]) -> dict[str, str]:
    return user_with_role(server, admin, "operator")


@pytest.fixture(scope="session")
def viewer(server: Server, admin: dict[str, str]) -> dict[str, str]:
    return user_with_role(server, admin, "viewer")


@pytest.fixture(scope="session", autouse=True)
def _no_proxy() -> None:
    # Tests talk to loopback only; never route them through a proxy from the environment.
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"


@dataclass
class ActiveEvent:
    id: int
    public_id: str
    name: str
    plugin_instance_id: int


@pytest.fixture
def make_active_event(db: psycopg.Connection, server: Server) -> Any:
    """Factory: an event mapped to an enabled plugin instance (writable per the phantom-data guard, spec §6),
    created with SQL so engine and rule tests do not depend on the plugins API."""

    def make(
        name: str | None = None,
        *,
        min_value: float = 0.0,
        max_value: float = 100.0,
        unit: str = "u",
        enabled: bool = True,
    ) -> ActiveEvent:
        name = name or unique("ev")
        ev = db.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, %s, %s, %s, 'sensor')"
            " RETURNING id, public_id",
            (name, min_value, max_value, unit),
        ).fetchone()
        assert ev is not None
        pi = db.execute(
            "INSERT INTO plugin_instances (plugin_id, instance_name, enabled) VALUES ('simulated', %s, %s)"
            " RETURNING id",
            (unique("inst"), enabled),
        ).fetchone()
        assert pi is not None
        db.execute(
            "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
            " event_public_id) VALUES (%s, 'ch', 'Channel', 'input', %s, %s)",
            (pi[0], unit, ev[1]),
        )
        server.refresh_catalog()
        return ActiveEvent(ev[0], ev[1], name, pi[0])

    return make
