"""Several real server processes (`webmacs serve` subprocesses) on one database, and a private NATS server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, free_port, server_env, throwaway_cluster, unique
from webmacs.db import migrate
from webmacs.db.cluster import Cluster


@dataclass
class Proc:
    """One server process."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}?token={token}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def spawn(url: str, home: Path, env: dict[str, str] | None = None, args: list[str] | None = None) -> Proc:
    """`webmacs serve` on a free port against `url`; returns once /health answers."""
    port = free_port()
    full_env = server_env(
        url,
        home,
        WEBMACS_LOGIN_MAX_FAILURES_ACCOUNT="100000",
        WEBMACS_LOGIN_MAX_FAILURES_PEER="100000",
        **(env or {}),
    )
    log = home / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "webmacs.cli",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
                *(args or []),
            ],
            env=full_env,
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    p = Proc(proc, port, log)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(p.url + "/health", timeout=5).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            p.stop()
            raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def scale_cluster() -> Iterator[Cluster]:
    with throwaway_cluster("webmacs-scale-") as c:
        migrate.apply(c.url())
        yield c


@pytest.fixture
def processes(scale_cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., list[Proc]]]:
    """Factory: `n` server processes on the scale cluster (stopped after the test)."""
    started: list[Proc] = []

    def make(n: int, env: dict[str, str] | None = None) -> list[Proc]:
        procs = [spawn(scale_cluster.url(), tmp_path / f"p{len(started) + i}", env) for i in range(n)]
        started.extend(procs)
        return procs

    yield make
    for p in started:
        p.stop()


def admin_token(p: Proc) -> str:
    with httpx.Client(base_url=p.url, timeout=30) as c:
        r = c.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])


def active_events(url: str, n: int) -> list[tuple[int, str]]:
    with psycopg.connect(url, autocommit=True) as db:
        pi = db.execute(
            "INSERT INTO plugin_instances (plugin_id, instance_name, enabled) VALUES ('simulated', %s, true)"
            " RETURNING id",
            (unique("inst"),),
        ).fetchone()
        assert pi is not None
        out = []
        for _ in range(n):
            ev = db.execute(
                "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'u', 'sensor')"
                " RETURNING id, public_id",
                (unique("scale"),),
            ).fetchone()
            assert ev is not None
            db.execute(
                "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
                " event_public_id) VALUES (%s, %s, 'c', 'input', 'u', %s)",
                (pi[0], unique("ch"), ev[1]),
            )
            out.append((ev[0], ev[1]))
        return out


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """A NATS server of our own on a private port (the Debian package installed if missing)."""
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(binary).exists():
        subprocess.run(["apt-get", "install", "-y", "-qq", "nats-server"], check=True, capture_output=True)
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    port = free_port()
    store = Path(tempfile.mkdtemp(prefix="webmacs-nats-"))
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        import socket

        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.1)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(store, ignore_errors=True)
