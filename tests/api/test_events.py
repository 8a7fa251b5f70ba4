"""Events (spec §4.1): CRUD, validation, messages, ordering, delete cascade."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import httpx
import psycopg
import pytest

from tests.conftest import Server, unique

EVENT_FIELDS = {"public_id", "name", "min_value", "max_value", "unit", "type", "user_public_id"}


def new_event(client: httpx.Client, headers: dict[str, str], db: psycopg.Connection, **fields: object) -> str:
    body = {"name": unique("ev"), "min_value": 0, "max_value": 100, "unit": "V", "type": "sensor", **fields}
    r = client.post("/api/v1/events", json=body, headers=headers)
    assert r.status_code == 201, r.text
    row = db.execute("SELECT public_id FROM events WHERE name = %s", (body["name"],)).fetchone()
    assert row is not None
    return str(row[0])


def test_create_returns_status_envelope_and_owner_is_caller(
    client: httpx.Client, operator: dict[str, str], db: psycopg.Connection
) -> None:
    name = unique("Temperature")
    r = client.post(
        "/api/v1/events",
        headers=operator,
        json={"name": name, "min_value": "1.5", "max_value": 10, "unit": "°C", "type": "actuator"},
    )
    assert r.status_code == 201
    assert r.json() == {"status": "success", "message": "Event successfully created."}
    me = client.get("/api/v1/auth/me", headers=operator).json()
    pid = db.execute("SELECT public_id FROM events WHERE name = %s", (name,)).fetchone()[0]  # type: ignore[index]
    got = client.get(f"/api/v1/events/{pid}", headers=operator).json()
    assert got == {
        "public_id": pid,
        "name": name,
        "min_value": 1.5,
        "max_value": 10.0,
        "unit": "°C",
        "type": "actuator",
        "user_public_id": me["public_id"],
    }


def test_duplicate_name_conflicts(client: httpx.Client, operator: dict[str, str], db: psycopg.Connection) -> None:
    name = unique("dup")
    new_event(client, operator, db, name=name)
    r = client.post(
        "/api/v1/events",
        headers=operator,
        json={"name": name, "min_value": 0, "max_value": 1, "unit": "V", "type": "sensor"},
    )
    assert r.status_code == 409
    assert r.json() == {"detail": "Event already exists."}


def test_concurrent_creates_of_one_name_give_one_201(
    server: Server, operator: dict[str, str], db: psycopg.Connection
) -> None:
    name = unique("race")
    codes: list[int] = []

    def create() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            codes.append(
                c.post(
                    "/api/v1/events",
                    headers=operator,
                    json={"name": name, "min_value": 0, "max_value": 1, "unit": "V", "type": "sensor"},
                ).status_code
            )

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] + [409] * 7
    assert db.execute("SELECT count(*) FROM events WHERE name = %s", (name,)).fetchone() == (1,)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "min_value": 0, "max_value": 1, "unit": "V", "type": "sensor"},
        {"name": "x" * 256, "min_value": 0, "max_value": 1, "unit": "V", "type": "sensor"},
        {"name": "ok", "min_value": "abc", "max_value": 1, "unit": "V", "type": "sensor"},
        {"name": "ok", "min_value": 0, "max_value": 1, "unit": "", "type": "sensor"},
        {"name": "ok", "min_value": 0, "max_value": 1, "unit": "V", "type": "thermometer"},
        {"name": "ok", "min_value": 0, "max_value": 1, "unit": "V"},
        {"name": "nul\x00byte", "min_value": 0, "max_value": 1, "unit": "V", "type": "sensor"},
        {"name": ["list"], "min_value": 0, "max_value": 1, "unit": "V", "type": "sensor"},
    ],
)
def test_invalid_create_bodies_are_422(client: httpx.Client, operator: dict[str, str], body: dict) -> None:
    r = client.post("/api/v1/events", headers=operator, json=body)
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], list)


def test_non_finite_bounds_are_422(client: httpx.Client, operator: dict[str, str]) -> None:
    # Python's JSON parser accepts NaN/Infinity literals; they must not reach a float8 column.
    for literal in ("NaN", "Infinity", "1e999"):
        name = unique("nf")
        content = f'{{"name": "{name}", "min_value": {literal}, "max_value": 1, "unit": "V", "type": "sensor"}}'
        r = client.post("/api/v1/events", headers={**operator, "Content-Type": "application/json"}, content=content)
        assert r.status_code == 422, literal


def test_unicode_and_sql_looking_names_round_trip(
    client: httpx.Client, operator: dict[str, str], db: psycopg.Connection
) -> None:
    for name in (unique("Température – ünïcødé 温度 🌡"), unique("x'); DROP TABLE events; --")):
        pid = new_event(client, operator, db, name=name)
        assert client.get(f"/api/v1/events/{pid}", headers=operator).json()["name"] == name


def test_list_is_paginated_in_creation_order(
    client: httpx.Client, viewer: dict[str, str], operator: dict[str, str], db: psycopg.Connection
) -> None:
    ids = [new_event(client, operator, db) for _ in range(3)]
    total = db.execute("SELECT count(*) FROM events").fetchone()[0]  # type: ignore[index]
    r = client.get("/api/v1/events", headers=viewer, params={"page": 1, "page_size": 100, "_t": 123})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"page", "page_size", "total", "data"}
    assert (body["page"], body["page_size"], body["total"]) == (1, 100, total)
    assert all(set(e) == EVENT_FIELDS for e in body["data"])
    all_ids = [
        e["public_id"]
        for p in range(1, total // 100 + 2)
        for e in client.get("/api/v1/events", headers=viewer, params={"page": p, "page_size": 100}).json()["data"]
    ]
    order = [all_ids.index(i) for i in ids]
    assert order == sorted(order)
    past = client.get("/api/v1/events", headers=viewer, params={"page": 10_000, "page_size": 1}).json()
    assert past["data"] == [] and past["total"] == total


@pytest.mark.parametrize("params", [{"page": 0}, {"page_size": 0}, {"page_size": 101}, {"page": "x"}])
def test_bad_paging_is_422(client: httpx.Client, viewer: dict[str, str], params: dict) -> None:
    assert client.get("/api/v1/events", headers=viewer, params=params).status_code == 422


def test_update_partial_and_conflict(client: httpx.Client, operator: dict[str, str], db: psycopg.Connection) -> None:
    a = new_event(client, operator, db)
    b_name = unique("b")
    new_event(client, operator, db, name=b_name)
    r = client.put(f"/api/v1/events/{a}", headers=operator, json={"type": "actuator", "max_value": 7})
    assert r.json() == {"status": "success", "message": "Event successfully updated."}
    got = client.get(f"/api/v1/events/{a}", headers=operator).json()
    assert (got["type"], got["max_value"], got["min_value"]) == ("actuator", 7.0, 0.0)
    r = client.put(f"/api/v1/events/{a}", headers=operator, json={"name": b_name})
    assert r.status_code == 409 and r.json() == {"detail": "Event already exists."}
    r = client.put(f"/api/v1/events/{a}", headers=operator, json={"name": ""})  # spec: may be ""
    assert r.status_code == 200
    assert client.get(f"/api/v1/events/{a}", headers=operator).json()["name"] == ""
    client.put(f"/api/v1/events/{a}", headers=operator, json={"name": unique("back")})


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize(
    ("path", "pid"),
    [
        ("no-such-event", "no-such-event"),
        ("evt-temp-001", "evt-temp-001"),
        ("x%00y", "x\x00y"),
        ("%25", "%"),
        ("1%27%20OR%201=1", "1' OR 1=1"),
    ],
)
def test_unknown_id_is_404(client: httpx.Client, operator: dict[str, str], method: str, path: str, pid: str) -> None:
    r = client.request(method, f"/api/v1/events/{path}", headers=operator, json={} if method == "PUT" else None)
    assert r.status_code == 404
    assert r.json() == {"detail": f"Event '{pid}' not found."}


def test_delete_removes_datapoints_rules_and_links(
    client: httpx.Client, operator: dict[str, str], admin: dict, db: psycopg.Connection
) -> None:
    pid = new_event(client, operator, db)
    eid = db.execute("SELECT id FROM events WHERE public_id = %s", (pid,)).fetchone()[0]  # type: ignore[index]
    other = new_event(client, operator, db)
    oid = db.execute("SELECT id FROM events WHERE public_id = %s", (other,)).fetchone()[0]  # type: ignore[index]
    t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    db.execute("INSERT INTO datapoints (time, event_id, value) VALUES (%s, %s, 1), (%s, %s, 2)", (t, eid, t, oid))
    db.execute(
        "INSERT INTO rules (name, event_public_id, operator, threshold, action_type) VALUES (%s, %s, 'gt', 1, 'log')",
        (unique("rule"), pid),
    )
    dash = client.post("/api/v1/dashboards", headers=operator, json={"name": "d"}).json()
    w = client.post(
        f"/api/v1/dashboards/{dash['public_id']}/widgets",
        headers=operator,
        json={"widget_type": "gauge", "title": "g", "event_public_id": pid},
    ).json()
    inst = db.execute(
        "INSERT INTO plugin_instances (plugin_id, instance_name) VALUES ('x', %s) RETURNING id", (unique("i"),)
    ).fetchone()[0]  # type: ignore[index]
    db.execute(
        "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
        " event_public_id) VALUES (%s, 'c', 'C', 'input', 'V', %s)",
        (inst, pid),
    )

    r = client.delete(f"/api/v1/events/{pid}", headers=operator)
    assert r.status_code == 200
    assert r.json() == {"status": "success", "message": "Event successfully deleted."}
    assert client.get(f"/api/v1/events/{pid}", headers=operator).status_code == 404
    assert db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (eid,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (oid,)).fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM rules WHERE event_public_id = %s", (pid,)).fetchone() == (0,)
    got = client.get(f"/api/v1/dashboards/{dash['public_id']}", headers=operator).json()
    assert got["widgets"][0]["public_id"] == w["public_id"] and got["widgets"][0]["event_public_id"] is None
    assert db.execute(
        "SELECT event_public_id FROM channel_mappings WHERE plugin_instance_id = %s", (inst,)
    ).fetchone() == (None,)


def test_roles(client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection, operator: dict) -> None:
    body = {"name": unique("v"), "min_value": 0, "max_value": 1, "unit": "V", "type": "sensor"}
    r = client.post("/api/v1/events", headers=viewer, json=body)
    assert r.status_code == 403 and r.json() == {"detail": "Operator privileges required."}
    r = client.post("/api/v1/events", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    # Role is checked before the body is validated (spec §3.2).
    assert client.post("/api/v1/events", headers=viewer, json={}).status_code == 403
    pid = new_event(client, operator, db)
    assert client.delete(f"/api/v1/events/{pid}", headers=viewer).status_code == 403
