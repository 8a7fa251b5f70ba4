"""Engine lifecycle: latest values survive a restart, shutdown flushes the queue, the API documents ingest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import psycopg

from tests.conftest import ActiveEvent, Server, make_settings, start_server


def test_latest_is_initialised_from_the_database(
    client: httpx.Client,
    operator: dict[str, str],
    db_url: str,
    tmp_path: Path,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    r = client.post(
        "/api/v1/datapoints/batch",
        headers=operator,
        json={"datapoints": [{"value": 7.5, "event_public_id": ev.public_id}]},
    )
    assert r.status_code == 201
    fresh = start_server(make_settings(db_url, tmp_path))
    try:
        with httpx.Client(base_url=fresh.url, timeout=30) as c:
            latest = c.get("/api/v1/datapoints/latest", headers=operator).json()
    finally:
        fresh.stop()
    assert [d["value"] for d in latest if d["event_public_id"] == ev.public_id] == [7.5]


def test_shutdown_writes_everything_queued(
    db_url: str, tmp_path: Path, make_active_event: Callable[..., ActiveEvent]
) -> None:
    ev = make_active_event()
    server = start_server(make_settings(db_url, tmp_path))
    accepted = 0
    try:
        server.refresh_catalog()
        engine = server.rt.ingest.engine
        frame = orjson.dumps({"datapoints": [{"value": i, "event_public_id": ev.public_id} for i in range(500)]})
        for _ in range(20):
            accepted += engine.submit(frame).accepted
    finally:
        server.stop()  # the lifespan closes the engine: queued rows are written before it returns
    assert accepted == 10_000
    with psycopg.connect(db_url) as db:
        row = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (ev.id,)).fetchone()
    assert row == (10_000,)


def test_openapi_documents_the_ingest_bodies(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    batch = paths["/api/v1/datapoints/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "datapoints" in batch["properties"] and batch["properties"]["datapoints"]["maxItems"] == 500
    item_ref = batch["properties"]["datapoints"]["items"]["$ref"]
    assert item_ref.removeprefix("#/components/schemas/") in doc["components"]["schemas"]
    single = paths["/api/v1/datapoints"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert single["$ref"].endswith("DatapointCreate")
    assert "/api/v1/datapoints/latest" in paths


def test_engine_after_close_refuses_data(db_url: str, tmp_path: Path, server: Server) -> None:
    from webmacs._core import Engine
    from webmacs.exceptions import EngineClosedError

    engine = Engine(db_url)
    assert engine.close(5.0) == 0
    for call in (lambda: engine.submit(b"{}"), engine.refresh_catalog):
        try:
            call()
        except EngineClosedError:
            continue
        raise AssertionError("a closed engine took a call")


def test_latest_follows_deletions_outside_the_engine(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    for v in (1.0, 2.0):
        r = client.post("/api/v1/datapoints", headers=operator, json={"value": v, "event_public_id": ev.public_id})
        assert r.status_code == 201

    def latest() -> list[float]:
        rows = client.get("/api/v1/datapoints/latest", headers=operator).json()
        return [d["value"] for d in rows if d["event_public_id"] == ev.public_id]

    assert latest() == [2.0]
    db.execute("DELETE FROM datapoints WHERE event_id = %s AND value = 2", (ev.id,))
    server.call(server.rt.ingest.datapoints_deleted([ev.public_id]))
    assert latest() == [1.0]
    db.execute("DELETE FROM datapoints WHERE event_id = %s", (ev.id,))
    server.call(server.rt.ingest.datapoints_deleted())
    assert latest() == []


def test_single_create_honours_a_client_timestamp(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    from datetime import UTC, datetime

    ev = make_active_event()
    for ts in ("2025-05-05T05:05:05.123456Z", 1746421505124):
        r = client.post(
            "/api/v1/datapoints", headers=operator, json={"value": 1, "event_public_id": ev.public_id, "timestamp": ts}
        )
        assert r.status_code == 201, r.text
    times = [
        r[0] for r in db.execute("SELECT time FROM datapoints WHERE event_id = %s ORDER BY time", (ev.id,)).fetchall()
    ]
    assert times == [
        datetime(2025, 5, 5, 5, 5, 5, 123456, tzinfo=UTC),
        datetime(2025, 5, 5, 5, 5, 5, 124000, tzinfo=UTC),
    ]
