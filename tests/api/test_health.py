"""`GET /health` (spec §17) and the middleware every response passes through (spec §15)."""

from __future__ import annotations

import httpx


def test_health_is_public_and_reports_database(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["version"] == "2.0.0"
    assert body["database"] == "ok"
    assert isinstance(body["uptime_seconds"], float)
    assert "last_datapoint" in body


def test_health_trailing_slash_redirects(client: httpx.Client) -> None:
    r = client.get("/health/")
    assert r.status_code == 307
    assert r.headers["location"].endswith("/health")


def test_every_response_has_a_fresh_request_id(client: httpx.Client) -> None:
    a = client.get("/health", headers={"X-Request-ID": "client-chosen"})
    b = client.get("/nope")
    assert b.status_code == 404 and b.json() == {"detail": "Not Found"}
    ids = {a.headers["x-request-id"], b.headers["x-request-id"]}
    assert len(ids) == 2 and "client-chosen" not in ids
