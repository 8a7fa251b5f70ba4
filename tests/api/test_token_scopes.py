"""Scoped device tokens: `scope: "write"` tokens only ingest; plugin-bound tokens only feed their instance's events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import ActiveEvent, Server, bearer, unique

TOKENS = "/api/v1/tokens"


def create_token(client: httpx.Client, headers: dict[str, str], **extra: Any) -> dict[str, Any]:
    r = client.post(TOKENS, headers=headers, json={"name": unique("dev"), **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def instance_public_id(db: psycopg.Connection, instance_id: int) -> str:
    row = db.execute("SELECT public_id FROM plugin_instances WHERE id = %s", (instance_id,)).fetchone()
    assert row is not None
    return str(row[0])


def stored(db: psycopg.Connection, event_id: int) -> int:
    row = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (event_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_scope_and_instance_are_stored_and_listed(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    inst = instance_public_id(db, ev.plugin_instance_id)
    body = create_token(client, operator, scope="write", plugin_instance_public_id=inst)
    assert body["scope"] == "write" and body["plugin_instance_public_id"] == inst
    row = db.execute(
        "SELECT scope, plugin_instance_id FROM api_tokens WHERE public_id = %s", (body["public_id"],)
    ).fetchone()
    assert row == ("write", ev.plugin_instance_id)
    listed = client.get(TOKENS, headers=operator, params={"page_size": 100}).json()["data"]
    mine = next(t for t in listed if t["public_id"] == body["public_id"])
    assert mine["scope"] == "write" and mine["plugin_instance_public_id"] == inst
    # The default stays WebMACS's: a full token, bound to nothing.
    plain = create_token(client, operator)
    assert plain["scope"] == "full" and plain["plugin_instance_public_id"] is None


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"scope": "admin"}, 422),
        ({"scope": ""}, 422),
        ({"plugin_instance_public_id": "no-such-instance"}, 404),
        ({"plugin_instance_public_id": "x\x00"}, 422),
        ({"plugin_instance_public_id": "x" * 101}, 422),
    ],
)
def test_invalid_scope_or_instance_is_refused(
    client: httpx.Client, operator: dict[str, str], extra: dict[str, Any], status: int
) -> None:
    r = client.post(TOKENS, headers=operator, json={"name": unique("dev"), **extra})
    assert r.status_code == status, r.text


def test_write_token_ingests_and_is_refused_everywhere_else(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    ev = make_active_event()
    device = bearer(create_token(client, operator, scope="write")["token"])
    r = client.post("/api/v1/datapoints", headers=device, json={"value": 1.5, "event_public_id": ev.public_id})
    assert r.status_code == 201, r.text
    r = client.post(
        "/api/v1/datapoints/batch", headers=device, json={"datapoints": [{"value": 2, "event_public_id": ev.public_id}]}
    )
    assert r.status_code == 201, r.text
    assert stored(db, ev.id) == 2
    for method, path in [
        ("GET", "/api/v1/auth/me"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/datapoints/latest"),
        ("GET", TOKENS),
        ("POST", TOKENS),
        ("GET", "/api/v1/users"),
        ("GET", "/api/v1/plugins"),
    ]:
        r = client.request(method, path, headers=device, json={"name": "x"} if method == "POST" else None)
        assert r.status_code == 403, (method, path, r.status_code)
    # A full token of the same user still works.
    full = bearer(create_token(client, operator)["token"])
    assert client.get("/api/v1/events", headers=full).status_code == 200


def test_plugin_bound_token_feeds_only_its_instance(
    client: httpx.Client,
    server: Server,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
) -> None:
    mine, other = make_active_event(), make_active_event()
    token = create_token(
        client, operator, scope="write", plugin_instance_public_id=instance_public_id(db, mine.plugin_instance_id)
    )["token"]
    before = server.rt.ingest.engine.stats()["rejected"]["not_permitted"]
    r = client.post(
        "/api/v1/datapoints/batch",
        headers=bearer(token),
        json={
            "datapoints": [
                {"value": 1, "event_public_id": mine.public_id},
                {"value": 2, "event_public_id": other.public_id},
                {"value": 3, "event_public_id": mine.public_id},
            ]
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["message"] == "2 datapoints successfully created."
    r = client.post("/api/v1/datapoints", headers=bearer(token), json={"value": 4, "event_public_id": other.public_id})
    assert r.status_code == 403, r.text
    assert (stored(db, mine.id), stored(db, other.id)) == (2, 0)
    assert server.rt.ingest.engine.stats()["rejected"]["not_permitted"] == before + 2

    # The engine's own WebSocket endpoint applies the same binding per point.
    url = server.url.replace("http://", "ws://")
    with connect(f"{url}/ws/controller/telemetry?token={token}", open_timeout=10) as ws:
        frame = {
            "seq": 1,
            "datapoints": [
                {"value": 5, "event_public_id": mine.public_id},
                {"value": 6, "event_public_id": other.public_id},
            ],
        }
        ws.send(orjson.dumps(frame))
        assert orjson.loads(ws.recv(timeout=20)) == {"type": "ack", "seq": 1, "accepted": 1, "rejected": 1}
    assert (stored(db, mine.id), stored(db, other.id)) == (3, 0)


def test_write_token_cannot_watch_the_live_stream(
    client: httpx.Client, server: Server, operator: dict[str, str]
) -> None:
    token = create_token(client, operator, scope="write")["token"]
    url = server.url.replace("http://", "ws://")
    with (
        connect(f"{url}/ws/datapoints/stream?token={token}", open_timeout=10) as ws,
        pytest.raises(ConnectionClosed) as e,
    ):
        ws.recv(timeout=10)
    assert e.value.rcvd is not None
    assert e.value.rcvd.code == 1008 and e.value.rcvd.reason == "This API token may only write datapoints"
