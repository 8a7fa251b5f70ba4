"""`GET /metrics`: a real scrape parsed with prometheus_client's parser; counters move by exactly what was sent."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ActiveEvent, Server, make_settings, start_server


def scrape(client: httpx.Client, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_engine_counters_move_by_exactly_the_points_sent_and_rejected(
    client: httpx.Client, operator: dict[str, str], make_active_event: Callable[..., ActiveEvent]
) -> None:
    ev = make_active_event()
    before = scrape(client)
    points = [{"value": float(i), "event_public_id": ev.public_id} for i in range(7)]
    unknown = [{"value": 1.0, "event_public_id": "no-such-event"}] * 3
    r = client.post("/api/v1/datapoints/batch", headers=operator, json={"datapoints": points + unknown})
    assert r.status_code == 201, r.text
    after = scrape(client)
    assert value(after, "webmacs_engine_accepted_total") - value(before, "webmacs_engine_accepted_total") == 7
    assert value(after, "webmacs_engine_written_total") - value(before, "webmacs_engine_written_total") == 7
    delta = value(after, "webmacs_engine_rejected_total", reason="unknown_event") - value(
        before, "webmacs_engine_rejected_total", reason="unknown_event"
    )
    assert delta == 3
    # The same frame, by the path it came in on.
    rest = {"protocol": "rest"}
    assert (
        value(after, "webmacs_ingest_frames_total", **rest) - value(before, "webmacs_ingest_frames_total", **rest) == 1
    )
    for outcome, n in (("accepted", 7), ("rejected", 3)):
        key = {"protocol": "rest", "outcome": outcome}
        moved = value(after, "webmacs_ingest_datapoints_total", **key) - value(
            before, "webmacs_ingest_datapoints_total", **key
        )
        assert moved == n
    ws = {"protocol": "websocket", "outcome": "accepted"}
    assert value(after, "webmacs_ingest_datapoints_total", **ws) == value(
        before, "webmacs_ingest_datapoints_total", **ws
    )
    assert value(after, "webmacs_engine_copy_seconds_count") > value(before, "webmacs_engine_copy_seconds_count")
    assert value(after, "webmacs_engine_queue_depth") == 0
    assert ("webmacs_db_pool_connections", (("state", "size"),)) in after
    assert ("webmacs_webhook_deliveries", (("state", "dead_letter"),)) in after
    assert ("webmacs_live_subscribers", ()) in after


def test_requests_are_counted_by_route_template(client: httpx.Client, admin: dict[str, str]) -> None:
    before = scrape(client)
    for _ in range(3):
        assert client.get("/api/v1/events/does-not-exist", headers=admin).status_code == 404
    after = scrape(client)
    key = {"method": "GET", "route": "/api/v1/events/{public_id}", "status": "404"}
    assert value(after, "webmacs_http_requests_total", **key) - value(before, "webmacs_http_requests_total", **key) == 3
    # Raw paths never become labels (the label set stays bounded).
    assert not any("does-not-exist" in str(labels) for _, labels in after)
    hist = {"method": "GET", "route": "/api/v1/events/{public_id}"}
    assert value(after, "webmacs_http_request_duration_seconds_count", **hist) >= 3


def test_openmetrics_when_asked(client: httpx.Client) -> None:
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")
    names = {f.name for f in parse_openmetrics(r.text)}
    assert {"webmacs_engine_accepted", "webmacs_http_requests"} <= names


@pytest.fixture(scope="module")
def guarded(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("metrics")
    s = start_server(make_settings(db_url, tmp, webmacs_metrics_token="scrape-secret", rate_limit_per_minute=1))
    try:
        yield s
    finally:
        s.stop()


def test_bearer_token_and_no_rate_limit(guarded: Server) -> None:
    with httpx.Client(base_url=guarded.url, timeout=30) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # Scraped far more often than the (tiny) rate limit allows: never a 429.
        for _ in range(5):
            r = c.get("/metrics", headers={"Authorization": "Bearer scrape-secret", "X-Forwarded-For": "8.8.8.8"})
            assert r.status_code == 200


def test_websocket_frames_are_counted_as_websocket(
    server: Server, client: httpx.Client, operator: dict[str, str], make_active_event: Callable[..., ActiveEvent]
) -> None:
    import orjson
    from websockets.sync.client import connect

    ev = make_active_event()
    token = operator["Authorization"].split(" ", 1)[1]
    before = scrape(client)
    url = server.url.replace("http://", "ws://") + f"/ws/controller/telemetry?token={token}"
    with connect(url, open_timeout=10, proxy=None) as ws:
        points = [{"value": 1.0, "event_public_id": ev.public_id}] * 4 + [{"value": 1.0, "event_public_id": "nope"}]
        ws.send(orjson.dumps({"seq": 1, "datapoints": points}))
        while True:
            reply = orjson.loads(ws.recv(timeout=30))
            if reply.get("seq") == 1:
                break
    after = scrape(client)
    for outcome, n in (("accepted", 4), ("rejected", 1)):
        key = {"protocol": "websocket", "outcome": outcome}
        moved = value(after, "webmacs_ingest_datapoints_total", **key) - value(
            before, "webmacs_ingest_datapoints_total", **key
        )
        assert moved == n
