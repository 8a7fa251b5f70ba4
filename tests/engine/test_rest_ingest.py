"""REST ingest through the engine (spec §4.2, §6): single and batch create, drops, 4xx shapes, latest, duplicates."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg

from tests.conftest import ActiveEvent, Server, unique
from webmacs import _core


def rows_of(db: psycopg.Connection, event_id: int) -> list[tuple[datetime, float]]:
    return [
        (r[0], r[1])
        for r in db.execute(
            "SELECT time, value FROM datapoints WHERE event_id = %s ORDER BY time", (event_id,)
        ).fetchall()
    ]


def post_batch(client: httpx.Client, headers: dict[str, str], points: list[dict[str, Any]]) -> httpx.Response:
    return client.post("/api/v1/datapoints/batch", headers=headers, json={"datapoints": points})


def raw_batch(client: httpx.Client, headers: dict[str, str], body: bytes) -> httpx.Response:
    return client.post(
        "/api/v1/datapoints/batch", headers={**headers, "Content-Type": "application/json"}, content=body
    )


def test_single_create_is_committed_before_201(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": "21.5", "event_public_id": ev.public_id})
    assert r.status_code == 201, r.text
    assert r.json() == {"status": "success", "message": "1 datapoint successfully created."}
    assert [v for _, v in rows_of(db, ev.id)] == [21.5]


def test_single_unknown_inactive_and_roles(
    client: httpx.Client,
    operator: dict[str, str],
    viewer: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": 1, "event_public_id": unique("nope")})
    assert (r.status_code, r.json()) == (404, {"detail": "Event not found."})
    off = make_active_event(enabled=False)
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": 1, "event_public_id": off.public_id})
    assert (r.status_code, r.json()) == (409, {"detail": "Event is not linked to an enabled plugin instance."})
    ev = make_active_event()
    r = client.post("/api/v1/datapoints", headers=viewer, json={"value": 1, "event_public_id": ev.public_id})
    assert r.status_code == 403
    assert rows_of(db, ev.id) == [] and rows_of(db, off.id) == []


def test_single_validation_is_list_shaped(client: httpx.Client, operator: dict[str, str]) -> None:
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": 1})
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "missing" and r.json()["detail"][0]["loc"] == ["body", "event_public_id"]
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": "abc", "event_public_id": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "value"]
    r = client.post(
        "/api/v1/datapoints",
        headers={**operator, "Content-Type": "application/json"},
        content=b'{"value": NaN, "event_public_id": "x"}',
    )
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "finite_number"
    r = client.post("/api/v1/datapoints", headers={**operator, "Content-Type": "application/json"}, content=b"{nope")
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_batch_counts_accepted_and_drops_unknown_and_inactive(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    off = make_active_event(enabled=False)
    points: list[dict[str, Any]] = [
        {"value": 1, "event_public_id": ev.public_id},
        {"value": 2, "event_public_id": unique("ghost")},
        {"value": 3, "event_public_id": off.public_id},
        {"value": "4", "event_public_id": ev.public_id},
    ]
    r = post_batch(client, operator, points)
    assert r.status_code == 201, r.text
    assert r.json() == {"status": "success", "message": "2 datapoints successfully created."}
    assert [v for _, v in rows_of(db, ev.id)] == [1.0, 4.0]
    assert rows_of(db, off.id) == []


def test_batch_limits(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    r = post_batch(client, operator, [])
    assert r.status_code == 201 and r.json()["message"] == "0 datapoints successfully created."
    r = post_batch(client, operator, [{"value": i, "event_public_id": ev.public_id} for i in range(500)])
    assert r.status_code == 201 and r.json()["message"] == "500 datapoints successfully created."
    # Server timestamps of one event are distinct even within one batch.
    assert len({t for t, _ in rows_of(db, ev.id)}) == 500
    r = post_batch(client, operator, [{"value": i, "event_public_id": ev.public_id} for i in range(501)])
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"] == ["body", "datapoints"] and detail[0]["type"] == "too_long"
    assert len(rows_of(db, ev.id)) == 500


def test_batch_malformed_input(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    good = {"value": 1, "event_public_id": ev.public_id}
    cases: list[tuple[bytes, int, str]] = [
        (b"{nope", 422, "json_invalid"),
        (b"[1, 2]", 422, "model_attributes_type"),
        (b'{"points": []}', 422, "missing"),
        (b'{"datapoints": [{"value": NaN, "event_public_id": "x"}]}', 422, "finite_number"),
        (b'{"datapoints": [{"value": Infinity, "event_public_id": "x"}]}', 422, "finite_number"),
        (b'{"datapoints": [{"value": "inf", "event_public_id": "x"}]}', 422, "finite_number"),
        (b'{"datapoints": [{"value": [1], "event_public_id": "x"}]}', 422, "float_parsing"),
        (b'{"datapoints": [{"value": 1, "event_public_id": {"a": 1}}]}', 422, "missing"),
        (b'{"datapoints": [7]}', 422, "model_type"),
        # A number beyond f64 is not representable JSON for us: the body is refused as a whole.
        (b'{"datapoints": [{"value": 1e400, "event_public_id": "x"}]}', 422, "json_invalid"),
        (b'{"datapoints": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 422, "json_invalid"),
    ]
    for body, status, typ in cases:
        r = raw_batch(client, operator, body)
        assert r.status_code == status, (body[:60], r.text)
        assert r.json()["detail"][0]["type"] == typ, (body[:60], r.text)
    # One malformed entry fails the whole request: the good entry beside it is not stored either.
    r = post_batch(client, operator, [good, {"value": None, "event_public_id": ev.public_id}])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "datapoints", 1, "value"]
    assert rows_of(db, ev.id) == []


def test_batch_body_byte_limit(client: httpx.Client, operator: dict[str, str]) -> None:
    body = b'{"datapoints": [], "pad": "' + b"x" * (10 << 20) + b'"}'
    r = raw_batch(client, operator, body)
    assert (r.status_code, r.json()) == (413, {"detail": "Request body too large."})


def test_client_timestamps_duplicates_and_order(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    engine = server.rt.ingest.engine
    t1 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    t0 = datetime(2025, 3, 1, 11, 59, 0, 123000, tzinfo=UTC)  # epoch ms carry milliseconds
    points = [
        {"value": 2, "event_public_id": ev.public_id, "timestamp": t1.isoformat()},
        # Out of order and as epoch milliseconds: honoured as given.
        {"value": 1, "event_public_id": ev.public_id, "timestamp": int(t0.timestamp() * 1000)},
    ]
    assert post_batch(client, operator, points).status_code == 201
    dup_before = engine.stats()["duplicates"]
    # A client retry with the same timestamps: 201, stored once, counted as duplicates.
    r = post_batch(client, operator, points)
    assert r.status_code == 201, r.text
    assert rows_of(db, ev.id) == [(t0, 1.0), (t1, 2.0)]
    assert engine.stats()["duplicates"] - dup_before == 2
    future = datetime.now(UTC) + timedelta(minutes=30)
    r = post_batch(client, operator, [{"value": 3, "event_public_id": ev.public_id, "timestamp": future.isoformat()}])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "datapoints", 0, "timestamp"]
    r = post_batch(client, operator, [{"value": 3, "event_public_id": ev.public_id, "timestamp": "soon"}])
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "datetime_parsing"
    assert len(rows_of(db, ev.id)) == 2


def test_latest_one_row_per_event_last_value_wins(
    client: httpx.Client,
    operator: dict[str, str],
    viewer: dict[str, str],
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    a, b = make_active_event(), make_active_event()
    assert (
        post_batch(
            client,
            operator,
            [
                {"value": 10, "event_public_id": a.public_id},
                {"value": 20, "event_public_id": a.public_id},
                {"value": 5, "event_public_id": b.public_id},
            ],
        ).status_code
        == 201
    )
    r = client.get("/api/v1/datapoints/latest", headers=viewer)
    assert r.status_code == 200
    mine = {d["event_public_id"]: d for d in r.json() if d["event_public_id"] in (a.public_id, b.public_id)}
    assert {k: d["value"] for k, d in mine.items()} == {a.public_id: 20.0, b.public_id: 5.0}
    assert len([d for d in r.json() if d["event_public_id"] == a.public_id]) == 1
    latest_a = mine[a.public_id]
    assert latest_a["timestamp"].endswith("Z")
    assert latest_a["public_id"].startswith(f"{a.public_id}@")
    assert set(latest_a) == {"public_id", "value", "timestamp", "event_public_id", "experiment_public_id"}


def test_running_experiment_is_assigned(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    row = db.execute("INSERT INTO experiments (name) VALUES (%s) RETURNING id", (unique("exp"),)).fetchone()
    assert row is not None
    server.refresh_catalog()
    try:
        assert post_batch(client, operator, [{"value": 1, "event_public_id": ev.public_id}]).status_code == 201
        got = db.execute("SELECT experiment_id FROM datapoints WHERE event_id = %s", (ev.id,)).fetchone()
        # Another running experiment with a lower id (from other tests) would win; ours or lower.
        assert got is not None and got[0] is not None and got[0] <= row[0]
    finally:
        db.execute("UPDATE experiments SET stopped_on = now() WHERE id = %s", (row[0],))
        server.refresh_catalog()


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_catalog_follows_notify_from_another_connection(
    client: httpx.Client, operator: dict[str, str], db: psycopg.Connection
) -> None:
    name = unique("ev")
    # One transaction: a reload between the inserts would see the event unmapped (409, not 404/201).
    with db.transaction():
        ev = db.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type)"
            " VALUES (%s, 0, 1, 'u', 'sensor') RETURNING id, public_id",
            (name,),
        ).fetchone()
        assert ev is not None
        pi = db.execute(
            "INSERT INTO plugin_instances (plugin_id, instance_name, enabled)"
            " VALUES ('simulated', %s, true) RETURNING id",
            (unique("inst"),),
        ).fetchone()
        assert pi is not None
        db.execute(
            "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
            " event_public_id) VALUES (%s, 'ch', 'Channel', 'input', 'u', %s)",
            (pi[0], ev[1]),
        )

    # No explicit refresh: the engine learns of the mapping through LISTEN webmacs_catalog.
    def accepted() -> bool:
        r = client.post("/api/v1/datapoints", headers=operator, json={"value": 1, "event_public_id": ev[1]})
        assert r.status_code in (201, 404), r.text
        return r.status_code == 201

    assert wait_until(accepted)

    # Phantom-data guard: disabling the plugin instance stops ingestion for the event.
    db.execute("UPDATE plugin_instances SET enabled = false WHERE id = %s", (pi[0],))

    def refused() -> bool:
        r = post_batch(client, operator, [{"value": 2, "event_public_id": ev[1]}])
        assert r.status_code == 201
        return bool(r.json()["message"] == "0 datapoints successfully created.")

    assert wait_until(refused)
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": 1, "event_public_id": ev[1]})
    assert r.status_code == 409


def test_column_types_match_the_schema(db: psycopg.Connection) -> None:
    rows = db.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = 'datapoints' ORDER BY ordinal_position"
    ).fetchall()
    assert [tuple(r) for r in rows] == [tuple(c) for c in _core.DATAPOINT_COLUMNS]


def test_stats_count_reasons(server: Server) -> None:
    stats = server.rt.ingest.engine.stats()
    for key in ("accepted", "written", "duplicates", "batches", "queue_depth", "flush_us_avg"):
        assert isinstance(stats[key], int)
    assert set(stats["rejected"]) == {
        "not_object",
        "missing_value",
        "invalid_value",
        "non_finite",
        "missing_event",
        "unknown_event",
        "inactive_event",
        "bad_timestamp",
        "far_future_timestamp",
        "timestamp_too_old",
        "database_refused",
        "not_permitted",
        "string_field",
    }
