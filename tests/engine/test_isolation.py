"""A bad row hurts only its sender: rows the database refuses are isolated and reported, the rest commits;
REST waits have deadlines and hold no pooled connection; one sender cannot take the queue from the others."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest
from websockets.sync.client import connect

from tests.conftest import ActiveEvent, Server, bearer, make_settings, start_server, unique
from webmacs.app import create_app
from webmacs.exceptions import QueueFullError

POISON = -123456.789  # refused by the CHECK constraint the fixture adds


@pytest.fixture
def poison_check(db: psycopg.Connection) -> Iterator[None]:
    """A constraint the engine does not know about: the database refuses rows with the POISON value."""
    name = unique("no_poison").replace("-", "_")
    db.execute(f"ALTER TABLE datapoints ADD CONSTRAINT {name} CHECK (value <> {POISON})")
    try:
        yield
    finally:
        db.execute(f"ALTER TABLE datapoints DROP CONSTRAINT {name}")


def values_of(db: psycopg.Connection, event_id: int) -> list[float]:
    rows = db.execute("SELECT value FROM datapoints WHERE event_id = %s ORDER BY time", (event_id,)).fetchall()
    return [r[0] for r in rows]


def test_rest_batch_commits_the_rest_and_counts_the_refused(
    poison_check: None,
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    engine = server.rt.ingest.engine
    before = engine.stats()
    body = {"datapoints": [{"value": v, "event_public_id": ev.public_id} for v in (1.0, POISON, 3.0, POISON, 5.0)]}
    r = client.post("/api/v1/datapoints/batch", headers=operator, json=body)
    # Never a 4xx once other rows committed: the spec's answer, with the refused rows counted.
    assert r.status_code == 201, r.text
    assert r.json() == {"status": "success", "message": "3 datapoints successfully created.", "rejected": 2}
    assert values_of(db, ev.id) == [1.0, 3.0, 5.0]
    after = engine.stats()
    assert after["rejected"]["database_refused"] - before["rejected"]["database_refused"] == 2
    assert after["bisections"] > before["bisections"]
    # "latest" does not keep a value the database refused.
    latest = client.get("/api/v1/datapoints/latest", headers=operator).json()
    assert [d["value"] for d in latest if d["event_public_id"] == ev.public_id] == [5.0]


def test_rest_single_refused_by_the_database_is_a_422_naming_it(
    poison_check: None,
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": POISON, "event_public_id": ev.public_id})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["type"] == "database_refused" and error["ctx"] == {"sqlstate": "23514"}
    assert "check constraint" in error["msg"]
    assert values_of(db, ev.id) == []
    # The sender's next, valid datapoint goes through.
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": 2.0, "event_public_id": ev.public_id})
    assert r.status_code == 201
    assert values_of(db, ev.id) == [2.0]


def test_websocket_gets_an_error_frame_and_a_corrected_ack_while_others_go_on(
    poison_check: None,
    server: Server,
    admin_token: str,
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev, other = make_active_event(), make_active_event()
    url = f"{server.url.replace('http://', 'ws://')}/ws/controller/telemetry?token={admin_token}"
    with connect(url, open_timeout=10, proxy=None) as bad, connect(url, open_timeout=10, proxy=None) as good:
        bad.send(
            orjson.dumps(
                {
                    "seq": 1,
                    "datapoints": [
                        {"value": 1.0, "event_public_id": ev.public_id},
                        {"value": "x", "event_public_id": ev.public_id},
                        {"value": POISON, "event_public_id": ev.public_id},
                    ],
                }
            )
        )
        for seq in range(1, 21):
            good.send(orjson.dumps({"seq": seq, "datapoints": [{"value": seq, "event_public_id": other.public_id}]}))
        error = orjson.loads(bad.recv(timeout=20))
        assert error["type"] == "error"
        assert [(e["index"], e["reason"], e["sqlstate"]) for e in error["refused"]] == [
            (2, "database_refused", "23514")
        ]
        # The ack counts the refused entry as rejected: accepted 1 (index 0), rejected 2 (index 1 and 2).
        assert orjson.loads(bad.recv(timeout=20)) == {"type": "ack", "seq": 1, "accepted": 1, "rejected": 2}
        assert [orjson.loads(good.recv(timeout=20))["seq"] for _ in range(20)] == list(range(1, 21))
        # The connection with the poison row keeps working.
        bad.send(orjson.dumps({"seq": 2, "datapoints": [{"value": 2.0, "event_public_id": ev.public_id}]}))
        assert orjson.loads(bad.recv(timeout=20)) == {"type": "ack", "seq": 2, "accepted": 1, "rejected": 0}
    assert values_of(db, ev.id) == [1.0, 2.0]
    assert values_of(db, other.id) == [float(s) for s in range(1, 21)]


def test_many_poison_rows_in_one_large_batch(
    poison_check: None, server: Server, db: psycopg.Connection, make_active_event: Callable[..., ActiveEvent]
) -> None:
    """Bisection finds every refused row of a 500-point frame; the other 490 commit once each."""
    ev = make_active_event()
    engine = server.rt.ingest.engine
    poison_at = {3, 77, 78, 150, 299, 300, 301, 420, 498, 499}
    values = [POISON if i in poison_at else float(i) for i in range(500)]
    receipt = engine.submit(
        orjson.dumps({"datapoints": [{"value": v, "event_public_id": ev.public_id} for v in values]})
    )
    server.call(server.rt.ingest.wait_committed(receipt.ticket))
    assert sorted(i for i, _, _ in receipt.refused()) == sorted(poison_at)
    assert values_of(db, ev.id) == [v for i, v in enumerate(values) if i not in poison_at]


@pytest.fixture
def stalled_server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    """A server with a 1 s REST ack deadline and a pool of two connections."""
    settings = make_settings(db_url, tmp_path, webmacs_ingest_ack_timeout_s=1.0, webmacs_pool_size=2)
    s = start_server(settings, app=create_app(settings))
    try:
        yield s
    finally:
        s.stop()


def test_a_write_stall_answers_503_in_time_and_never_starves_login(
    stalled_server: Server,
    operator: dict[str, str],
    db_url: str,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    server = stalled_server
    ev = make_active_event()
    server.refresh_catalog()
    results: list[tuple[int, dict[str, object], float]] = []

    def post(value: float) -> None:
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"datapoints": [{"value": value, "event_public_id": ev.public_id}]}
            r = c.post("/api/v1/datapoints/batch", headers=operator, json=body)
        results.append((r.status_code, r.json(), time.monotonic() - started))

    with psycopg.connect(db_url) as locker:
        locker.execute("LOCK TABLE datapoints IN ACCESS EXCLUSIVE MODE")  # the writers' COPY now waits
        # More waiting ingest requests than the pool has connections.
        posters = [threading.Thread(target=post, args=(float(i),)) for i in range(6)]
        for p in posters:
            p.start()
        time.sleep(0.3)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.post("/api/v1/auth/login", json={"email": "admin@webmacs.io", "password": "admin123"})
            assert r.status_code == 200  # the pool is not held by the waiting ingest requests
            assert c.get("/api/v1/auth/me", headers=bearer(r.json()["access_token"])).status_code == 200
        for p in posters:
            p.join(timeout=30)
        health = httpx.get(server.url + "/health", timeout=10).json()
        locker.rollback()
    assert len(results) == 6
    for status, body, took in results:
        assert status == 503, body
        assert str(body["detail"]).startswith("Datapoints not written within 1 s")
        assert took < 15
    assert health["ingest"]["oldest_unacked_s"] > 0
    # Un-acknowledged, not lost: once the lock is gone the queued rows are written (at least once).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with psycopg.connect(db_url) as db:
            row = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (ev.id,)).fetchone()
        if row == (6,):
            break
        time.sleep(0.1)
    assert row == (6,)


def test_one_flooding_sender_cannot_take_the_queue(
    db_url: str,
    tmp_path: Path,
    make_active_event: Callable[..., ActiveEvent],
    operator: dict[str, str],
    admin: dict[str, str],
) -> None:
    settings = make_settings(
        db_url,
        tmp_path,
        webmacs_ingest_queue_capacity=100,
        webmacs_ingest_source_share=0.1,
        webmacs_ingest_ack_timeout_s=0.5,
    )
    server = start_server(settings)
    try:
        ev = make_active_event()
        server.refresh_catalog()
        engine = server.rt.ingest.engine
        frame = orjson.dumps({"datapoints": [{"value": 1, "event_public_id": ev.public_id}] * 5})
        with psycopg.connect(db_url) as locker:
            locker.execute("LOCK TABLE datapoints IN ACCESS EXCLUSIVE MODE")
            # Writers take a batch each and block on the lock; what follows stays queued.
            # Raw sources far from REST's (a REST request counts as its user's id or token id).
            # Until both writers hold a batch (a writer still filling one would take the flood's rows too):
            # frames from other sources, one at a time (two may share a batch).
            for source in range(10**9 + 99, 10**9 + 90, -1):
                if engine.health()["batches_in_flight"] >= 2:
                    break
                engine.submit(frame, False, source)
                time.sleep(0.2)
            assert engine.health()["batches_in_flight"] == 2, engine.health()
            flood = 0
            refusal: QueueFullError | None = None
            for _ in range(100):
                try:
                    engine.submit(frame, False, 10**9 + 1)
                except QueueFullError as e:
                    refusal = e
                    break
                flood += 1
            assert refusal is not None and refusal.share and flood == 2  # a tenth of 100 rows
            # Everyone else still gets in while the flood is throttled.
            for source in range(2, 8):
                assert engine.submit(frame, False, 10**9 + source).accepted == 5
            # Over REST the share is per token: the operator's token is throttled, the admin's is not.
            with httpx.Client(base_url=server.url, timeout=30) as c:
                details = [
                    c.post("/api/v1/datapoints/batch", headers=operator, content=frame).json()["detail"]
                    for _ in range(3)
                ]
                admin_detail = c.post("/api/v1/datapoints/batch", headers=admin, content=frame).json()["detail"]
            locker.rollback()
        # Admitted but not written within 0.5 s (the lock), twice; then the token's share is used up.
        assert [d.split(":")[0] for d in details[:2]] == ["Datapoints not written within 0.5 s"] * 2
        assert details[2] == "Ingest queue is full for this sender; retry later."
        assert admin_detail.startswith("Datapoints not written within 0.5 s")
        assert engine.stats()["queue_full_share"] >= 2
    finally:
        server.stop()


def test_health_shows_a_stuck_writer_within_seconds(
    db_url: str, tmp_path: Path, make_active_event: Callable[..., ActiveEvent]
) -> None:
    settings = make_settings(db_url, tmp_path, webmacs_health_max_unacked_s=1.0)
    server = start_server(settings)
    try:
        ev = make_active_event()
        server.refresh_catalog()
        engine = server.rt.ingest.engine
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/health/ready").status_code == 200
            with psycopg.connect(db_url) as locker:
                # SHARE: writes (COPY) wait, reads (the health probe's) do not.
                locker.execute("LOCK TABLE datapoints IN SHARE MODE")
                engine.submit(orjson.dumps({"datapoints": [{"value": 1, "event_public_id": ev.public_id}]}))
                started = time.monotonic()
                while c.get("/health").json()["status"] == "ok":
                    assert time.monotonic() - started < 10, "a stuck writer never showed"
                    time.sleep(0.1)
                body = c.get("/health").json()
                assert body["status"] == "degraded" and body["database"] == "ok"
                assert body["ingest"]["status"] == "degraded" and body["ingest"]["oldest_unacked_s"] >= 1.0
                ready = c.get("/health/ready")
                assert ready.status_code == 503 and ready.json()["ingest"]["batches_in_flight"] >= 1
                locker.rollback()
            deadline = time.monotonic() + 10
            while c.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        server.stop()
