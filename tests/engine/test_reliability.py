"""Fault injection: a database restart under WS ingest and a SIGKILLed server under REST ingest lose no
acknowledged datapoint. Runs on its own cluster so the restart cannot disturb the session's other tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    Server,
    bearer,
    free_port,
    login,
    make_settings,
    server_env,
    start_server,
    throwaway_cluster,
    unique,
)
from webmacs.db import migrate
from webmacs.db.cluster import Cluster


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[Cluster]:
    with throwaway_cluster("webmacs-fault-") as c:
        # Migrated here, not by whichever test's server starts first: each test must run on its own too.
        migrate.apply(c.url())
        yield c


def active_event(url: str) -> tuple[int, str]:
    with psycopg.connect(url, autocommit=True) as db:
        ev = db.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'u', 'sensor')"
            " RETURNING id, public_id",
            (unique("fault"),),
        ).fetchone()
        pi = db.execute(
            "INSERT INTO plugin_instances (plugin_id, instance_name, enabled) VALUES ('simulated', %s, true)"
            " RETURNING id",
            (unique("inst"),),
        ).fetchone()
        assert ev is not None and pi is not None
        db.execute(
            "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
            " event_public_id) VALUES (%s, 'ch', 'Channel', 'input', 'u', %s)",
            (pi[0], ev[1]),
        )
        return ev[0], ev[1]


def stored_values(url: str, event_id: int) -> list[float]:
    with psycopg.connect(url) as db:
        return [r[0] for r in db.execute("SELECT value FROM datapoints WHERE event_id = %s", (event_id,)).fetchall()]


@pytest.fixture
def fault_server(own_cluster: Cluster, tmp_path: Path) -> Iterator[Server]:
    s = start_server(make_settings(own_cluster.url(), tmp_path))
    try:
        yield s
    finally:
        s.stop()


def test_database_restart_during_ws_ingest_loses_no_acked_datapoint(own_cluster: Cluster, fault_server: Server) -> None:
    url = own_cluster.url()
    event_id, event = active_event(url)
    fault_server.refresh_catalog()
    with httpx.Client(base_url=fault_server.url) as c:
        token = login(c, ADMIN_EMAIL, ADMIN_PASSWORD)
    per_frame = 50
    acked: dict[int, int] = {}
    sent: list[int] = []
    with connect(
        f"{fault_server.url.replace('http://', 'ws://')}/ws/controller/telemetry?token={token}", open_timeout=10
    ) as ws:

        def receive() -> None:
            try:
                while True:
                    msg = orjson.loads(ws.recv(timeout=120))
                    assert msg["type"] == "ack", msg
                    acked[msg["seq"]] = msg["accepted"]
            except (ConnectionClosed, TimeoutError):
                pass

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        restart: threading.Thread | None = None
        started = time.monotonic()
        seq = 0
        # ~10 s of ingest (bounded by count too), with a fast restart of PostgreSQL after ~3 s.
        while time.monotonic() - started < 10 and seq < 2000:
            seq += 1
            ws.send(
                orjson.dumps(
                    {
                        "seq": seq,
                        "datapoints": [{"value": seq * 1000 + i, "event_public_id": event} for i in range(per_frame)],
                    }
                )
            )
            sent.append(seq)
            if restart is None and time.monotonic() - started > 3:
                restart = threading.Thread(target=own_cluster.restart, daemon=True)
                restart.start()
            time.sleep(0.01)
        assert restart is not None
        restart.join(timeout=90)
        # One more frame after the restart surely completed: the writer must have reconnected for it.
        seq += 1
        ws.send(
            orjson.dumps(
                {
                    "seq": seq,
                    "datapoints": [{"value": seq * 1000 + i, "event_public_id": event} for i in range(per_frame)],
                }
            )
        )
        sent.append(seq)
        deadline = time.monotonic() + 90
        while len(acked) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
    receiver.join(timeout=5)
    # Nothing sent was refused: every frame is acknowledged, once the database is back.
    assert sorted(acked) == sent
    assert all(n == per_frame for n in acked.values())
    values = stored_values(url, event_id)
    expected = {s * 1000 + i for s in acked for i in range(per_frame)}
    assert len(values) == len(expected) and set(values) == expected  # each acknowledged datapoint exactly once
    assert fault_server.rt.ingest.engine.stats()["reconnects"] >= 1


def test_sigkill_during_rest_ingest_keeps_every_acknowledged_batch(own_cluster: Cluster, tmp_path: Path) -> None:
    url = own_cluster.url()
    event_id, event = active_event(url)
    port = free_port()
    env = server_env(url, tmp_path, RATE_LIMIT_PER_MINUTE="1000000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "webmacs.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    acked: list[list[int]] = []
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=base, timeout=10) as c:
            while True:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.1)
            headers = bearer(login(c, ADMIN_EMAIL, ADMIN_PASSWORD))
        stop = threading.Event()

        def post(worker: int) -> None:
            n = 0
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set() and n < 5000:
                    n += 1
                    values = [(worker * 10_000_000) + n * 1000 + i for i in range(100)]
                    try:
                        r = c.post(
                            "/api/v1/datapoints/batch",
                            headers=headers,
                            json={"datapoints": [{"value": v, "event_public_id": event} for v in values]},
                        )
                    except httpx.TransportError:
                        return
                    if r.status_code == 201:
                        assert r.json()["message"] == "100 datapoints successfully created."
                        acked.append(values)
                    elif r.status_code != 404:  # 404 until the catalog saw the event (NOTIFY)
                        assert r.status_code == 503, r.text

        workers = [threading.Thread(target=post, args=(w,), daemon=True) for w in range(4)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while len(acked) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        stop.set()
        for w in workers:
            w.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert acked, "no batch was acknowledged before the kill"
    stored = stored_values(url, event_id)
    assert len(stored) == len(set(stored))
    missing = {v for batch in acked for v in batch} - set(stored)
    assert not missing, f"{len(missing)} acknowledged datapoints lost"
