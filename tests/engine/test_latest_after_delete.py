"""`GET /datapoints/latest` (served from the engine's cache) forgets values deleted through the API."""

from __future__ import annotations

from typing import Any

import httpx


def _latest_of(client: httpx.Client, headers: dict[str, str], event_public_id: str) -> list[float]:
    r = client.get("/api/v1/datapoints/latest", headers=headers)
    assert r.status_code == 200
    return [d["value"] for d in r.json() if d["event_public_id"] == event_public_id]


def test_deleting_the_latest_datapoint_falls_back_to_the_previous(
    client: httpx.Client, operator: dict[str, str], make_active_event: Any
) -> None:
    ev = make_active_event()
    for value in (1.0, 2.0):
        r = client.post("/api/v1/datapoints", headers=operator, json={"value": value, "event_public_id": ev.public_id})
        assert r.status_code == 201
    assert _latest_of(client, operator, ev.public_id) == [2.0]
    page = client.get("/api/v1/datapoints", headers=operator, params={"page_size": 100}).json()["data"]
    newest = next(d for d in page if d["event_public_id"] == ev.public_id and d["value"] == 2.0)
    assert client.delete(f"/api/v1/datapoints/{newest['public_id']}", headers=operator).status_code == 200
    assert _latest_of(client, operator, ev.public_id) == [1.0]


def test_deleting_an_experiment_removes_its_values_from_latest(
    client: httpx.Client, operator: dict[str, str], make_active_event: Any, db: Any, server: Any
) -> None:
    # Ingest tags the oldest running experiment: stop those other tests left running so ours is the one.
    db.execute("UPDATE experiments SET stopped_on = now() WHERE stopped_on IS NULL")
    server.refresh_catalog()
    ev = make_active_event()
    name = f"exp-{ev.public_id[:8]}"
    assert client.post("/api/v1/experiments", headers=operator, json={"name": name}).status_code == 201
    r = client.post("/api/v1/datapoints", headers=operator, json={"value": 7.0, "event_public_id": ev.public_id})
    assert r.status_code == 201
    assert _latest_of(client, operator, ev.public_id) == [7.0]
    exp = db.execute("SELECT public_id FROM experiments WHERE name = %s", (name,)).fetchone()
    assert client.delete(f"/api/v1/experiments/{exp[0]}", headers=operator).status_code == 200
    assert _latest_of(client, operator, ev.public_id) == []
