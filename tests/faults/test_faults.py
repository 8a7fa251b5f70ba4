"""Fault injection: a TCP fault proxy between the server (API pool and engine) and TimescaleDB.

Each run reconciles what was acknowledged against what is stored: 0 acknowledged rows lost, 0 duplicated.
Unrelated endpoints are timed while the fault lasts (printed, not asserted: timings are not a test's business).
`WEBMACS_FAULT_SECONDS` sets the blackhole's length (default 30, as the reliability issue asks)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
    unique,
)
from tests.faults.proxy import FaultProxy
from webmacs.db import migrate
from webmacs.db.cluster import Cluster

FAULT_SECONDS = float(os.environ.get("WEBMACS_FAULT_SECONDS", "30"))
_values = itertools.count(1)


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[Cluster]:
    home = Path(tempfile.mkdtemp(prefix="webmacs-faults-"))
    home.chmod(0o755)
    c = Cluster(home, free_port())
    migrate.apply(c.up())
    try:
        yield c
    finally:
        c.destroy()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def proxy(own_cluster: Cluster) -> Iterator[FaultProxy]:
    p = FaultProxy(own_cluster.port).start()
    try:
        yield p
    finally:
        p.stop()


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


def stored(url: str, event_id: int) -> list[float]:
    with psycopg.connect(url) as db:
        return [r[0] for r in db.execute("SELECT value FROM datapoints WHERE event_id = %s", (event_id,)).fetchall()]


@dataclass
class Load:
    """WebSocket and REST ingest running in threads; remembers what was acknowledged and what was sent."""

    server_url: str
    token: str
    event: str
    acked: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    rest_errors: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self.threads = [
            threading.Thread(target=self._ws, daemon=True),
            threading.Thread(target=self._rest, daemon=True),
        ]
        for t in self.threads:
            t.start()
        return self

    def finish(self, timeout: float = 120) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)

    def _ws(self) -> None:
        url = f"{self.server_url.replace('http://', 'ws://')}/ws/controller/telemetry?token={self.token}"
        pending: dict[int, list[float]] = {}
        lock = threading.Lock()
        try:
            with connect(url, open_timeout=10, proxy=None) as ws:
                done = threading.Event()

                def receive() -> None:
                    # Until every frame sent is acknowledged, or 180 s without a reply. Short waits: the last
                    # ack may arrive before the sender says it is done, and then no message would end a long one.
                    quiet_until = time.monotonic() + 180
                    try:
                        while not (done.is_set() and not pending):
                            try:
                                msg = orjson.loads(ws.recv(timeout=0.5))
                            except TimeoutError:
                                if time.monotonic() > quiet_until:
                                    raise
                                continue
                            quiet_until = time.monotonic() + 180
                            if msg.get("type") == "ack":
                                with lock:
                                    values = pending.pop(msg["seq"])
                                assert msg["accepted"] == len(values), msg
                                self.acked.extend(values)
                    except (ConnectionClosed, TimeoutError):
                        pass

                receiver = threading.Thread(target=receive, daemon=True)
                receiver.start()
                for seq in itertools.count(1):
                    if self.stop.is_set():
                        break
                    values = [float(next(_values)) for _ in range(20)]
                    with lock:
                        pending[seq] = values
                        # 64 frames in flight at most: the client waits for acks like a controller does.
                        while len(pending) > 64 and not self.stop.is_set():
                            lock.release()
                            time.sleep(0.01)
                            lock.acquire()
                    self.sent.extend(values)
                    ws.send(
                        orjson.dumps(
                            {"seq": seq, "datapoints": [{"value": v, "event_public_id": self.event} for v in values]}
                        )
                    )
                    time.sleep(0.005)
                done.set()
                receiver.join(180)
        except (ConnectionClosed, OSError):
            pass

    def _rest(self) -> None:
        with httpx.Client(base_url=self.server_url, timeout=60) as c:
            while not self.stop.is_set():
                values = [float(next(_values)) for _ in range(10)]
                self.sent.extend(values)
                try:
                    r = c.post(
                        "/api/v1/datapoints/batch",
                        headers=bearer(self.token),
                        json={"datapoints": [{"value": v, "event_public_id": self.event} for v in values]},
                    )
                except httpx.HTTPError:
                    self.rest_errors.append(0)
                    continue
                if r.status_code == 201:
                    self.acked.extend(values)
                else:
                    self.rest_errors.append(r.status_code)
                time.sleep(0.02)


def reconcile(url: str, event_id: int, load: Load) -> dict[str, int]:
    values = stored(url, event_id)
    counts: dict[float, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    lost = [v for v in load.acked if v not in counts]
    duplicated = [v for v, n in counts.items() if n > 1]
    sent = set(load.sent)
    unknown = [v for v in counts if v not in sent]
    assert not lost, f"{len(lost)} acknowledged rows lost, e.g. {lost[:5]}"
    assert not duplicated, f"{len(duplicated)} rows stored twice, e.g. {duplicated[:5]}"
    assert not unknown
    # Retried and deduplicated batches put each stored row into the datapoint cells once (sql/0041).
    with psycopg.connect(url) as db:
        in_cells = db.execute("SELECT sum(n) FROM datapoint_cells WHERE event_id = %s", (event_id,)).fetchone()
    assert in_cells is not None and (in_cells[0] or 0) == len(values)
    return {"acked": len(load.acked), "stored": len(values), "sent": len(load.sent)}


def probe_unrelated(server: Server, token: str, until: float) -> list[tuple[str, int, float]]:
    """Login and /auth/me, timed, while the fault lasts."""
    out: list[tuple[str, int, float]] = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        while time.monotonic() < until:
            for name, call in (
                (
                    "login",
                    lambda: c.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
                ),
                ("me", lambda: c.get("/api/v1/auth/me", headers=bearer(token))),
            ):
                started = time.monotonic()
                try:
                    status = call().status_code
                except httpx.HTTPError:
                    status = 0
                out.append((name, status, time.monotonic() - started))
            time.sleep(0.5)
    return out


def report(what: str, probes: list[tuple[str, int, float]], numbers: dict[str, int]) -> None:
    """The suite reports (prints, `pytest -s`) the latencies seen during a fault; timings are never asserted."""
    for name in ("login", "me"):
        ms = sorted(t * 1000 for n, _, t in probes if n == name)
        statuses = sorted({s for n, s, _ in probes if n == name})
        if ms:
            sys.stdout.write(
                f"\n[{what}] {name}: {len(ms)} calls, statuses {statuses}, median {ms[len(ms) // 2]:.0f} ms,"
                f" max {ms[-1]:.0f} ms"
            )
    sys.stdout.write(f"\n[{what}] {numbers}\n")


def fault_server(proxy: FaultProxy, own_cluster: Cluster, tmp_path: Path, **overrides: object) -> Server:
    settings = make_settings(
        proxy.url(own_cluster.url()),
        tmp_path,
        webmacs_ingest_write_timeout_s=3.0,
        webmacs_ingest_ack_timeout_s=5.0,
        rate_limit_per_minute=1_000_000,
        **overrides,
    )
    return start_server(settings)


def test_engine_blackhole_loses_nothing_and_login_keeps_answering(
    own_cluster: Cluster, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = own_cluster.url()
    event_id, event = active_event(url)
    server = fault_server(proxy, own_cluster, tmp_path)
    try:
        server.refresh_catalog()
        with httpx.Client(base_url=server.url) as c:
            token = login(c, ADMIN_EMAIL, ADMIN_PASSWORD)
        load = Load(server.url, token, event).start()
        time.sleep(2)
        proxy.set("blackhole", "engine")
        probes = probe_unrelated(server, token, time.monotonic() + FAULT_SECONDS)
        health = httpx.get(server.url + "/health", timeout=30).json()
        proxy.set("pass", "engine")
        time.sleep(3)
        load.finish()
        numbers = reconcile(url, event_id, load)
    finally:
        server.stop()
    report("engine blackhole", probes, numbers)
    # The API's own connections were not affected: login and /auth/me answered all along.
    assert {s for _, s, _ in probes} == {200}
    assert health["ingest"]["status"] == "degraded"
    assert numbers["acked"] > 0
    assert load.rest_errors, "REST ingest should have answered 503 during the fault"
    assert set(load.rest_errors) <= {503}


def test_total_blackhole_answers_in_bounded_time_and_recovers(
    own_cluster: Cluster, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = own_cluster.url()
    event_id, event = active_event(url)
    server = fault_server(proxy, own_cluster, tmp_path, webmacs_db_timeout_s=5.0, webmacs_request_timeout_s=8.0)
    try:
        server.refresh_catalog()
        with httpx.Client(base_url=server.url) as c:
            token = login(c, ADMIN_EMAIL, ADMIN_PASSWORD)
        load = Load(server.url, token, event).start()
        time.sleep(2)
        proxy.set("blackhole")
        probes = probe_unrelated(server, token, time.monotonic() + min(FAULT_SECONDS, 15))
        proxy.set("pass")
        time.sleep(3)
        after = probe_unrelated(server, token, time.monotonic() + 2)
        load.finish()
        numbers = reconcile(url, event_id, load)
    finally:
        server.stop()
    report("total blackhole", probes, numbers)
    # Nothing hangs: every call answered (an error while the database is gone) within the request deadline.
    assert all(t < 30 for _, _, t in probes)
    assert {s for _, s, _ in probes} <= {200, 503}
    assert {s for _, s, _ in after} == {200}


def test_connection_resets_mid_copy_keep_every_row_once(
    own_cluster: Cluster, proxy: FaultProxy, tmp_path: Path
) -> None:
    url = own_cluster.url()
    event_id, event = active_event(url)
    server = fault_server(proxy, own_cluster, tmp_path)
    try:
        server.refresh_catalog()
        with httpx.Client(base_url=server.url) as c:
            token = login(c, ADMIN_EMAIL, ADMIN_PASSWORD)
        load = Load(server.url, token, event).start()
        resets = 0
        until = time.monotonic() + 8
        while time.monotonic() < until:
            time.sleep(0.15)
            resets += proxy.reset("engine")
        time.sleep(3)
        load.finish()
        numbers = reconcile(url, event_id, load)
        stats = server.rt.ingest.engine.stats()
    finally:
        server.stop()
    report("resets", [], {**numbers, "resets": resets, "reconnects": stats["reconnects"]})
    assert resets >= 5 and stats["reconnects"] >= 1


def test_added_latency_slows_but_loses_nothing(own_cluster: Cluster, proxy: FaultProxy, tmp_path: Path) -> None:
    url = own_cluster.url()
    event_id, event = active_event(url)
    server = fault_server(proxy, own_cluster, tmp_path)
    try:
        server.refresh_catalog()
        with httpx.Client(base_url=server.url) as c:
            token = login(c, ADMIN_EMAIL, ADMIN_PASSWORD)
        proxy.set("pass", "engine", delay_s=0.05)
        load = Load(server.url, token, event).start()
        time.sleep(5)
        load.finish()
        proxy.set("pass", "engine", delay_s=0.0)
        numbers = reconcile(url, event_id, load)
    finally:
        server.stop()
    report("latency 50 ms", [], numbers)
    assert numbers["acked"] > 0


def test_sigkill_during_websocket_ingest_keeps_every_acknowledged_frame(own_cluster: Cluster, tmp_path: Path) -> None:
    url = own_cluster.url()
    event_id, event = active_event(url)
    port = free_port()
    env = server_env(url, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "webmacs.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with httpx.Client(base_url=base, timeout=5) as c:
                    token = login(c, ADMIN_EMAIL, ADMIN_PASSWORD)
                break
            except (httpx.HTTPError, AssertionError):
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        load = Load(base, token, event).start()
        time.sleep(3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        load.finish(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    numbers = reconcile(url, event_id, load)
    report("SIGKILL", [], numbers)
    assert numbers["acked"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs for the tablespace needs root")
def test_a_full_disk_refuses_clearly_and_resumes_when_space_returns(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="webmacs-disk-"))
    home.chmod(0o755)
    cluster = Cluster(home, free_port())
    space = Path(tempfile.mkdtemp(prefix="webmacs-tblspc-"))
    space.chmod(0o755)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(space)], check=True)
    try:
        url = cluster.up()
        migrate.apply(url)
        server = start_server(make_settings(url, tmp_path, webmacs_ingest_ack_timeout_s=3.0))
        try:
            subprocess.run(["chown", "postgres:postgres", str(space)], check=True)
            event_id, event = active_event(url)
            with psycopg.connect(url, autocommit=True) as db:
                db.execute(f"CREATE TABLESPACE small LOCATION '{space}'")
                # New chunks (there are none yet in this fresh database) go to the small tablespace.
                db.execute("SELECT attach_tablespace('small', 'datapoints')")
            server.refresh_catalog()
            filler = space / "filler"
            subprocess.run(["fallocate", "-l", "22M", str(filler)], check=True)
            with httpx.Client(base_url=server.url, timeout=60) as c:
                token = login(c, ADMIN_EMAIL, ADMIN_PASSWORD)
                acked: list[float] = []
                refused: list[str] = []
                for _ in range(400):
                    values = [float(next(_values)) for _ in range(500)]
                    r = c.post(
                        "/api/v1/datapoints/batch",
                        headers=bearer(token),
                        json={"datapoints": [{"value": v, "event_public_id": event} for v in values]},
                    )
                    if r.status_code == 201:
                        acked.extend(values)
                        continue
                    assert r.status_code == 503, r.text
                    refused.append(r.json()["detail"])
                    # The first refusal may come before the writer's first failed attempt was seen; by now the
                    # writer knows why it cannot write, and says so.
                    if "out of disk space" in refused[-1] or len(refused) >= 10:
                        break
                assert refused, "the disk never filled"
                assert "out of disk space" in refused[-1], refused
                health = c.get("/health").json()
                assert health["ingest"]["status"] == "degraded"
                # Space returns: the queued rows are written and new ones acknowledged.
                filler.unlink()
                later = [float(next(_values)) for _ in range(10)]
                deadline = time.monotonic() + 60
                while True:
                    r = c.post(
                        "/api/v1/datapoints/batch",
                        headers=bearer(token),
                        json={"datapoints": [{"value": v, "event_public_id": event} for v in later]},
                    )
                    if r.status_code == 201:
                        break
                    assert time.monotonic() < deadline, r.text
                    time.sleep(0.5)
            kept = set(stored(url, event_id))
            assert set(acked) <= kept and set(later) <= kept
        finally:
            server.stop()
    finally:
        cluster.destroy()
        subprocess.run(["umount", "-l", str(space)], check=False)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(space, ignore_errors=True)
