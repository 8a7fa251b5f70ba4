"""A full ingest queue: REST answers 503 with Retry-After, WS waits for room; nothing queued is lost.
The writer is held up deterministically by a table lock, not by timing."""

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

from tests.conftest import ActiveEvent, Server, make_settings, start_server
from webmacs import runtime
from webmacs.app import create_app


@pytest.fixture
def tiny_queue_server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    settings = make_settings(db_url, tmp_path)
    app = create_app(settings)
    runtime.of(app).ingest_options = {"queue_capacity": 1, "max_age_ms": 0}
    s = start_server(settings, app=app)
    try:
        yield s
    finally:
        s.stop()


def poll(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_full_queue_rest_503_and_ws_waits(
    tiny_queue_server: Server,
    operator: dict[str, str],
    admin_token: str,
    db_url: str,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    server = tiny_queue_server
    ev = make_active_event()
    server.refresh_catalog()
    engine = server.rt.ingest.engine
    body = {"datapoints": [{"value": 1, "event_public_id": ev.public_id}]}
    results: list[int] = []

    def post() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results.append(c.post("/api/v1/datapoints/batch", headers=operator, json=body).status_code)

    with psycopg.connect(db_url) as locker, httpx.Client(base_url=server.url, timeout=60) as client:
        locker.execute("LOCK TABLE datapoints IN ACCESS EXCLUSIVE MODE")  # the writer's COPY now waits
        posters = []
        # Two writers (the default): each takes one frame and waits on the lock; the third frame stays queued.
        for n in (1, 2, 3):
            posters.append(threading.Thread(target=post))
            posters[-1].start()
            # Frames 1 and 2 are taken by a writer each before the next is sent; frame 3 finds none free.
            depth = 1 if n == 3 else 0

            def taken(n: int = n, depth: int = depth) -> bool:
                return engine.stats()["accepted"] == n and engine.stats()["queue_depth"] == depth

            poll(taken, f"frame {n} accepted, queue depth {depth}")
        assert engine.stats()["batches"] == 0
        r = client.post("/api/v1/datapoints/batch", headers=operator, json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"detail": "Ingest queue is full; retry later."}
        with connect(
            f"{server.url.replace('http://', 'ws://')}/ws/controller/telemetry?token={admin_token}", open_timeout=10
        ) as ws:
            ws.send(orjson.dumps({"seq": 9, **body}))
            poll(lambda: engine.stats()["queue_full"] >= 2, "WS frame refused by the full queue")
            locker.rollback()  # release the lock: the queue drains, the WS frame gets in and is acknowledged
            assert orjson.loads(ws.recv(timeout=30)) == {"type": "ack", "seq": 9, "accepted": 1, "rejected": 0}
        for p in posters:
            p.join(timeout=30)
    assert results == [201, 201, 201]
    with psycopg.connect(db_url) as db:
        row = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (ev.id,)).fetchone()
    assert row == (4,)
