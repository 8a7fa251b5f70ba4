"""Webhooks API (spec §4.5): admin CRUD, secret never returned, SSRF refusal at create/update, deliveries list."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import unique


def hook_url() -> str:
    # Does not resolve in the test environment: accepted at configuration time, re-checked before sending.
    return f"https://hooks.example.com/{unique('h')}"


@pytest.fixture
def make_hook(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> Any:
    made: list[str] = []

    def make(**over: Any) -> tuple[str, dict[str, Any]]:
        # Subscribed to a type nothing emits, so other tests' experiments queue nothing for it.
        body: dict[str, Any] = {"url": hook_url(), "secret": "shh", "events": ["system.health_changed"]}
        body.update(over)
        r = client.post("/api/v1/webhooks", headers=admin, json=body)
        assert r.status_code == 201, r.text
        row = db.execute("SELECT public_id FROM webhooks WHERE url = %s", (body["url"],)).fetchone()
        assert row is not None
        made.append(row[0])
        return str(row[0]), body

    yield make
    for pid in made:
        client.delete(f"/api/v1/webhooks/{pid}", headers=admin)


def test_create_get_round_trip_without_secret(
    client: httpx.Client, admin: dict[str, str], make_hook: Any, db: psycopg.Connection
) -> None:
    events = ["system.health_changed", "experiment.stopped"]
    pid, body = make_hook(events=events, enabled=False)
    r = client.get(f"/api/v1/webhooks/{pid}", headers=admin)
    assert r.status_code == 200
    got = r.json()
    assert set(got) == {"public_id", "url", "events", "enabled", "created_on", "user_public_id"}
    assert got["url"] == body["url"] and got["events"] == events and got["enabled"] is False
    assert got["user_public_id"]
    stored = db.execute("SELECT secret, events FROM webhooks WHERE public_id = %s", (pid,)).fetchone()
    assert stored is not None and stored[0] == "shh" and json.loads(stored[1]) == events


def test_create_message_and_duplicate(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    url = hook_url()
    try:
        r = client.post("/api/v1/webhooks", headers=admin, json={"url": url, "events": ["system.health_changed"]})
        assert r.status_code == 201 and r.json() == {"status": "success", "message": "Webhook successfully created."}
        r = client.post("/api/v1/webhooks", headers=admin, json={"url": url, "events": ["sensor.reading"]})
        assert r.status_code == 409 and r.json() == {"detail": "Webhook already exists."}
        assert db.execute("SELECT count(*) FROM webhooks WHERE url = %s", (url,)).fetchone() == (1,)
    finally:
        db.execute("DELETE FROM webhooks WHERE url = %s", (url,))


@pytest.mark.parametrize(
    "body",
    [
        {"url": "ftp://example.com/x", "events": ["sensor.reading"]},
        {"url": "example.com", "events": ["sensor.reading"]},
        {"url": "https://example.com/" + "a" * 2048, "events": ["sensor.reading"]},
        {"url": "https://example.com/x", "events": []},
        {"url": "https://example.com/x", "events": ["sensor.bogus"]},
        {"url": "https://example.com/x"},
        {"url": "https://example.com/x", "events": ["sensor.reading"], "secret": "s" * 256},
    ],
)
def test_invalid_bodies_are_422(client: httpx.Client, admin: dict[str, str], body: dict[str, Any]) -> None:
    r = client.post("/api/v1/webhooks", headers=admin, json=body)
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], list)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://127.1.2.3:8080/x",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/x",
        "http://localhost:9000/x",
        "http://LOCALHOST./x",
        "http://[::ffff:127.0.0.1]/x",
        "http://[fd00::1]/x",
        "http://[fe80::1]/x",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://2130706433/",
    ],
)
def test_private_targets_refused_at_create(client: httpx.Client, admin: dict[str, str], url: str) -> None:
    r = client.post("/api/v1/webhooks", headers=admin, json={"url": url, "events": ["sensor.reading"]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail.startswith("Webhook URL refused: ")
    assert "WEBMACS_WEBHOOK_ALLOW_HOSTS" in detail


def test_update_fields_and_url_check(
    client: httpx.Client, admin: dict[str, str], make_hook: Any, db: psycopg.Connection
) -> None:
    pid, _body = make_hook()
    new_url = hook_url()
    r = client.put(
        f"/api/v1/webhooks/{pid}", headers=admin, json={"url": new_url, "enabled": False, "secret": "new", "events": []}
    )
    assert r.status_code == 200 and r.json() == {"status": "success", "message": "Webhook successfully updated."}
    got = client.get(f"/api/v1/webhooks/{pid}", headers=admin).json()
    assert (got["url"], got["enabled"], got["events"]) == (new_url, False, [])
    assert db.execute("SELECT secret FROM webhooks WHERE public_id = %s", (pid,)).fetchone() == ("new",)
    # No duplicate check on update (as the reference), but the SSRF check applies.
    r = client.put(f"/api/v1/webhooks/{pid}", headers=admin, json={"url": "http://192.168.0.10/x"})
    assert r.status_code == 422 and r.json()["detail"].startswith("Webhook URL refused: ")
    assert client.put(f"/api/v1/webhooks/{pid}", headers=admin, json={"url": "gopher://x"}).status_code == 422
    assert client.get(f"/api/v1/webhooks/{pid}", headers=admin).json()["url"] == new_url
    # Explicit nulls on NOT NULL fields leave them as they are.
    assert client.put(f"/api/v1/webhooks/{pid}", headers=admin, json={"url": None, "events": None}).status_code == 200
    assert client.get(f"/api/v1/webhooks/{pid}", headers=admin).json()["url"] == new_url


def test_list_paginated_in_creation_order(client: httpx.Client, admin: dict[str, str], make_hook: Any) -> None:
    a, _ = make_hook()
    b, _ = make_hook()
    first = client.get("/api/v1/webhooks", headers=admin, params={"page_size": 1}).json()
    total = first["total"]
    assert first["page_size"] == 1 and len(first["data"]) == 1 and total >= 2
    pages = [
        client.get("/api/v1/webhooks", headers=admin, params={"page": p, "page_size": 100}).json()["data"]
        for p in range(1, total // 100 + 2)
    ]
    everything = [d["public_id"] for page in pages for d in page]
    assert len(everything) == total and everything.index(a) + 1 == everything.index(b)
    assert all("secret" not in d for page in pages for d in page)


def test_unknown_webhook_404(client: httpx.Client, admin: dict[str, str]) -> None:
    detail = {"detail": "Webhook 'nope' not found."}
    for method, url in [
        ("GET", "/api/v1/webhooks/nope"),
        ("PUT", "/api/v1/webhooks/nope"),
        ("DELETE", "/api/v1/webhooks/nope"),
        ("GET", "/api/v1/webhooks/nope/deliveries"),
    ]:
        r = client.request(method, url, headers=admin, json={} if method == "PUT" else None)
        assert r.status_code == 404 and r.json() == detail, (method, url)


def test_deliveries_list_newest_first_filtered(
    client: httpx.Client, admin: dict[str, str], make_hook: Any, db: psycopg.Connection
) -> None:
    pid, _ = make_hook()
    assert client.get(f"/api/v1/webhooks/{pid}/deliveries", headers=admin).json() == {
        "page": 1,
        "page_size": 25,
        "total": 0,
        "data": [],
    }
    # Final states written directly, so the dispatcher leaves them alone.
    db.execute(
        "INSERT INTO webhook_deliveries (webhook_id, event_type, payload, status, attempts, last_error, response_code,"
        " created_on, next_attempt_at) SELECT id, 'sensor.reading', '{}', s, 3, e, c, now() - make_interval(secs => o),"
        " NULL FROM webhooks, (VALUES ('dead_letter', 'HTTP 500', 500, 30), ('delivered', NULL, 200, 20),"
        " ('dead_letter', 'Timeout', NULL, 10)) AS v(s, e, c, o) WHERE public_id = %s",
        (pid,),
    )
    page = client.get(f"/api/v1/webhooks/{pid}/deliveries", headers=admin).json()
    assert page["total"] == 3
    assert [d["last_error"] for d in page["data"]] == ["Timeout", None, "HTTP 500"]
    assert set(page["data"][0]) == {
        "public_id",
        "event_type",
        "status",
        "attempts",
        "last_error",
        "response_code",
        "created_on",
        "delivered_on",
    }
    dead = client.get(f"/api/v1/webhooks/{pid}/deliveries", headers=admin, params={"status": "dead_letter"}).json()
    assert dead["total"] == 2 and {d["status"] for d in dead["data"]} == {"dead_letter"}
    one = client.get(f"/api/v1/webhooks/{pid}/deliveries", headers=admin, params={"page_size": 1, "page": 3}).json()
    assert one["total"] == 3 and one["data"][0]["last_error"] == "HTTP 500"
    r = client.get(f"/api/v1/webhooks/{pid}/deliveries", headers=admin, params={"status": "bogus"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "status"]


def test_unparseable_events_row_is_skipped_not_fatal(server: Any, db: psycopg.Connection) -> None:
    from webmacs.services import webhooks

    url = hook_url()
    db.execute("INSERT INTO webhooks (url, events) VALUES (%s, 'not json')", (url,))
    try:

        async def go() -> int:
            async with server.rt.pool.connection() as conn:
                return await webhooks.enqueue(conn, event_type="system.health_changed")

        # Only well-formed subscriptions count; the broken row neither matches nor raises.
        queued = server.call(go())
        assert db.execute(
            "SELECT count(*) FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE w.url = %s", (url,)
        ).fetchone() == (0,)
        assert isinstance(queued, int)
    finally:
        db.execute("DELETE FROM webhooks WHERE url = %s", (url,))


def test_access_matrix(
    client: httpx.Client,
    admin: dict[str, str],
    operator: dict[str, str],
    viewer: dict[str, str],
    make_hook: Any,
    db: psycopg.Connection,
) -> None:
    pid, _ = make_hook()
    calls: list[tuple[str, str, Any]] = [
        ("GET", "/api/v1/webhooks", None),
        ("GET", f"/api/v1/webhooks/{pid}", None),
        ("PUT", f"/api/v1/webhooks/{pid}", {"enabled": True}),
        ("GET", f"/api/v1/webhooks/{pid}/deliveries", None),
        ("POST", "/api/v1/webhooks", {"url": hook_url(), "events": ["system.health_changed"]}),
        ("DELETE", f"/api/v1/webhooks/{pid}", None),
    ]
    for method, url, body in calls:
        assert client.request(method, url, json=body).status_code == 401, (method, url)
        for who in (viewer, operator):
            r = client.request(method, url, headers=who, json=body)
            assert r.status_code == 403 and r.json() == {"detail": "Admin privileges required."}, (method, url)
    for method, url, body in calls:
        assert client.request(method, url, headers=admin, json=body).status_code in (200, 201), (method, url)
    db.execute("DELETE FROM webhooks WHERE url = %s", (calls[4][2]["url"],))


def test_nul_input_is_422_or_404_never_500(client: httpx.Client, admin: dict[str, str]) -> None:
    for body in (
        {"url": "https://example.com/a\x00b", "events": ["sensor.reading"]},
        {"url": hook_url(), "secret": "s\x00", "events": ["sensor.reading"]},
    ):
        assert client.post("/api/v1/webhooks", headers=admin, json=body).status_code == 422
    for method, path in [
        ("GET", "/api/v1/webhooks/x%00"),
        ("PUT", "/api/v1/webhooks/x%00"),
        ("DELETE", "/api/v1/webhooks/x%00"),
        ("GET", "/api/v1/webhooks/x%00/deliveries"),
    ]:
        r = client.request(method, path, headers=admin, json={} if method == "PUT" else None)
        assert r.status_code == 404, path
