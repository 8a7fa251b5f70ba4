"""Several server processes on one database behave as one: the live stream and "latest" cross processes
(PostgreSQL NOTIFY and NATS), ingest spread over all of them is stored exactly once, the rate limit and SSO codes
are shared, a rule fires once per cooldown across processes, a killed process loses nothing acknowledged, and
`webmacs serve --workers N` shares one port (and one development key)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import bearer, free_port, unique
from tests.scale.conftest import Proc, active_events, admin_token
from webmacs.db.cluster import Cluster

TELEMETRY = "/ws/controller/telemetry"
STREAM = "/ws/datapoints/stream"
_values = itertools.count(1)


def client_times(n: int) -> list[str]:
    """n distinct, increasing client timestamps in the recent past."""
    start = datetime.now(UTC) - timedelta(seconds=30)
    return [(start + timedelta(microseconds=7 * i)).isoformat() for i in range(n)]


def stream_batches(ws: Any, want: int, timeout: float = 20) -> list[dict[str, Any]]:
    """Stream messages' datapoints until `want` have arrived."""
    points: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(points) < want:
        message = orjson.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if message.get("type") == "datapoints_batch":
            points.extend(message["datapoints"])
    return points


def send_frame(p: Proc, token: str, event: str, values: list[float], times: list[str]) -> None:
    with connect(p.ws(TELEMETRY, token), open_timeout=10, proxy=None) as ws:
        ws.send(
            orjson.dumps(
                {
                    "seq": 1,
                    "datapoints": [
                        {"value": v, "event_public_id": event, "timestamp": t}
                        for v, t in zip(values, times, strict=True)
                    ],
                }
            )
        )
        assert orjson.loads(ws.recv(timeout=30))["type"] == "ack"


@pytest.mark.parametrize("transport", ["postgres", "nats"])
def test_a_subscriber_on_one_process_sees_what_the_others_ingest(
    transport: str, processes: Callable[..., list[Proc]], scale_cluster: Cluster, request: pytest.FixtureRequest
) -> None:
    env = {"WEBMACS_NATS_URL": request.getfixturevalue("nats_url")} if transport == "nats" else {}
    a, b, c = processes(3, env)
    token = admin_token(a)
    (_, e1), (_, e2) = active_events(scale_cluster.url(), 2)
    for p in (a, b, c):  # each process's catalog learns the events by NOTIFY; make sure before sending
        httpx.post(
            p.url + "/api/v1/events",
            headers=bearer(token),
            json={"name": unique("x"), "min_value": 0, "max_value": 1, "unit": "u", "type": "sensor"},
        )
    time.sleep(1.0)
    with connect(a.ws(STREAM, token), open_timeout=10, proxy=None) as sub:
        assert orjson.loads(sub.recv(timeout=10))["type"] == "connected"
        v1 = [float(next(_values)) for _ in range(50)]
        v2 = [float(next(_values)) for _ in range(50)]
        send_frame(b, token, e1, v1, client_times(50))
        send_frame(c, token, e2, v2, client_times(50))
        points = stream_batches(sub, 100)
    by_event: dict[str, list[float]] = {}
    for point in points:
        by_event.setdefault(point["event_public_id"], []).append(point["value"])
    # Every point of both frames, each event's in the order it was sent.
    assert by_event == {e1: v1, e2: v2}
    assert set(points[0]) == {"value", "event_public_id", "timestamp", "experiment_public_id"}
    # "latest" on A follows what B and C stored.
    deadline = time.monotonic() + 10
    while True:
        latest = {
            d["event_public_id"]: d["value"]
            for d in httpx.get(a.url + "/api/v1/datapoints/latest", headers=bearer(token)).json()
        }
        if latest.get(e1) == v1[-1] and latest.get(e2) == v2[-1]:
            break
        assert time.monotonic() < deadline, latest
        time.sleep(0.1)


def test_latest_follows_a_deletion_made_on_another_process(
    processes: Callable[..., list[Proc]], scale_cluster: Cluster
) -> None:
    a, b = processes(2)
    token = admin_token(a)
    ((_, event),) = active_events(scale_cluster.url(), 1)
    time.sleep(1.0)
    times = client_times(2)
    send_frame(a, token, event, [1.0, 2.0], times)

    def latest(p: Proc) -> float | None:
        rows = httpx.get(p.url + "/api/v1/datapoints/latest", headers=bearer(token)).json()
        return next((d["value"] for d in rows if d["event_public_id"] == event), None)

    deadline = time.monotonic() + 10
    while latest(b) != 2.0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # Delete the newest datapoint through A: B's cache must not keep serving it.
    newest = httpx.get(a.url + "/api/v1/datapoints", headers=bearer(token), params={"page_size": 100}).json()["data"]
    ours = [d for d in newest if d["event_public_id"] == event and d["value"] == 2.0]
    assert httpx.delete(f"{a.url}/api/v1/datapoints/{ours[0]['public_id']}", headers=bearer(token)).status_code == 200
    deadline = time.monotonic() + 10
    while latest(b) != 1.0:
        assert time.monotonic() < deadline, latest(b)
        time.sleep(0.1)


def test_ingest_spread_over_processes_is_stored_exactly_once_and_survives_a_sigkill(
    processes: Callable[..., list[Proc]], scale_cluster: Cluster
) -> None:
    procs = processes(3)
    token = admin_token(procs[0])
    ((event_id, event),) = active_events(scale_cluster.url(), 1)
    time.sleep(1.0)
    acked: list[float] = []
    sent: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def ws_client(first: int) -> None:
        # Reconnects to the next process when its own goes away.
        i = first
        while not stop.is_set():
            p = procs[i % 3]
            i += 1
            try:
                with connect(p.ws(TELEMETRY, token), open_timeout=5, proxy=None) as ws:
                    seq = 0
                    while not stop.is_set():
                        seq += 1
                        values = [float(next(_values)) for _ in range(10)]
                        with lock:
                            sent.extend(values)
                        ws.send(
                            orjson.dumps(
                                {"seq": seq, "datapoints": [{"value": v, "event_public_id": event} for v in values]}
                            )
                        )
                        reply = orjson.loads(ws.recv(timeout=30))
                        assert reply["type"] == "ack" and reply["accepted"] == 10
                        with lock:
                            acked.extend(values)
            except (ConnectionClosed, OSError, TimeoutError):
                time.sleep(0.1)

    def rest_client(first: int) -> None:
        i = first
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                p = procs[i % 3]
                i += 1
                values = [float(next(_values)) for _ in range(5)]
                with lock:
                    sent.extend(values)
                try:
                    r = c.post(
                        p.url + "/api/v1/datapoints/batch",
                        headers=bearer(token),
                        json={"datapoints": [{"value": v, "event_public_id": event} for v in values]},
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 201:
                    with lock:
                        acked.extend(values)

    threads = [threading.Thread(target=ws_client, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=rest_client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)
    procs[2].proc.send_signal(signal.SIGKILL)  # one process dies; its clients go to the others
    procs[2].proc.wait(10)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(60)
    with psycopg.connect(scale_cluster.url()) as db:
        stored = [r[0] for r in db.execute("SELECT value FROM datapoints WHERE event_id = %s", (event_id,))]
        in_cells = db.execute("SELECT sum(n) FROM datapoint_cells WHERE event_id = %s", (event_id,)).fetchone()
    # The datapoint cells count every stored row once: rows moved off another process's microsecond too.
    assert in_cells is not None and in_cells[0] == len(stored)
    counts: dict[float, int] = {}
    for v in stored:
        counts[v] = counts.get(v, 0) + 1
    assert acked, "nothing was acknowledged"
    assert [v for v in acked if v not in counts] == []  # 0 acknowledged rows lost
    assert [v for v, n in counts.items() if n > 1] == []  # 0 duplicated
    assert set(counts) <= set(sent)


def test_the_rate_limit_is_counted_across_processes(processes: Callable[..., list[Proc]]) -> None:
    a, b, c = processes(3, {"RATE_LIMIT_PER_MINUTE": "5"})
    client = {"X-Forwarded-For": f"203.0.113.{int(time.time()) % 200 + 20}"}
    with httpx.Client(timeout=30) as h:
        # One after the other (a comprehension, in order): the window counts them as they come.
        codes = [h.get(p.url + "/api/v1/auth/me", headers=client).status_code for p in (a, b, c, a, b, c, a)]
    # Five accepted (401: no credentials) in the window, wherever they went; then 429 everywhere.
    assert codes == [401] * 5 + [429] * 2


def test_an_sso_code_issued_by_one_process_is_redeemed_once_by_another(
    processes: Callable[..., list[Proc]], scale_cluster: Cluster
) -> None:
    import asyncio

    from webmacs.repositories import sso as sso_repo
    from webmacs.services.sso import _digest

    a, b, c = processes(
        3,
        {
            "OIDC_ENABLED": "true",
            "OIDC_ISSUER_URL": "http://127.0.0.1:9/x",
            "OIDC_CLIENT_ID": "x",
            "OIDC_CLIENT_SECRET": "y",
        },
    )
    with psycopg.connect(scale_cluster.url(), autocommit=True) as db:
        admin_id = db.execute("SELECT id FROM users WHERE email = 'admin@webmacs.io'").fetchone()[0]  # type: ignore[index]

    code = "one-time-" + unique("c")

    async def issue() -> None:
        async with await psycopg.AsyncConnection.connect(scale_cluster.url(), autocommit=True) as conn:
            # What process A's callback does once the identity provider answered.
            await sso_repo.store_code(conn, code_hash=_digest(code), user_id=admin_id, role="admin", ttl_s=60)

    asyncio.run(issue())
    r = httpx.post(b.url + "/api/v1/auth/sso/exchange", json={"code": code}, timeout=30)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert httpx.get(a.url + "/api/v1/auth/me", headers=bearer(token)).json()["role"] == "admin"
    again = httpx.post(c.url + "/api/v1/auth/sso/exchange", json={"code": code}, timeout=30)
    assert again.status_code == 400


def test_a_rule_fires_once_per_cooldown_across_processes(
    processes: Callable[..., list[Proc]], scale_cluster: Cluster
) -> None:
    procs = processes(3)
    token = admin_token(procs[0])
    ((_, event),) = active_events(scale_cluster.url(), 1)
    name = unique("cooldown")
    r = httpx.post(
        procs[0].url + "/api/v1/rules",
        headers=bearer(token),
        json={
            "name": name,
            "event_public_id": event,
            "operator": "gt",
            "threshold": 0.5,
            "action_type": "log",
            "cooldown_seconds": 5,
        },
    )
    assert r.status_code == 201, r.text
    time.sleep(1.0)
    stop = threading.Event()

    def pump(p: Proc) -> None:
        with connect(p.ws(TELEMETRY, token), open_timeout=10, proxy=None) as ws:
            while not stop.is_set():
                ws.send(orjson.dumps({"datapoints": [{"value": 1.0, "event_public_id": event}]}))
                time.sleep(0.02)

    threads = [threading.Thread(target=pump, args=(p,)) for p in procs]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(11.5)
    stop.set()
    for t in threads:
        t.join(30)
    duration = time.monotonic() - started
    time.sleep(1.0)
    with psycopg.connect(scale_cluster.url()) as db:
        times = [
            r[0]
            for r in db.execute(
                "SELECT created_on FROM log_entries WHERE content LIKE %s ORDER BY created_on", (f"Rule '{name}'%",)
            )
        ]
    assert 1 <= len(times) <= int(duration // 5) + 1, times
    # Claimed by a conditional UPDATE in the database: never two firings within one cooldown, whichever process.
    assert all(later - earlier >= timedelta(seconds=5) for earlier, later in itertools.pairwise(times)), times


def test_workers_share_one_port_and_one_development_key(scale_cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "home"
    env = {
        **os.environ,
        "DATABASE_URL": scale_cluster.url(),
        "SECRET_KEY": "",  # development: a key generated once in WEBMACS_HOME, shared by the workers
        "ENV": "development",
        "WEBMACS_BCRYPT_ROUNDS": "4",
        "WEBMACS_HOME": str(home),
        "WEBMACS_UPDATE_DIR": str(tmp_path),
        "WEBMACS_PLUGIN_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "webmacs.cli", "serve", "--port", str(port), "--workers", "2", "--log-level", "warning"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) >= 2, workers
        token = admin_token(Proc(proc, port, tmp_path / "log"))
        # New connections land on either worker: every one accepts the token the other issued.
        for _ in range(12):
            with httpx.Client(base_url=base) as c:
                assert c.get("/api/v1/auth/me", headers=bearer(token)).status_code == 200
            with connect(f"ws://127.0.0.1:{port}{STREAM}?token={token}", open_timeout=10, proxy=None) as ws:
                assert orjson.loads(ws.recv(timeout=10))["type"] == "connected"
        assert ((home / "secret-key").stat().st_mode & 0o777) == 0o600
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
