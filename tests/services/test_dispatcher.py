"""The webhook dispatcher (spec §9) against real receivers on 127.0.0.1: bodies, signatures, retries, outbox."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server, make_settings, start_server, unique
from tests.services.receiver import Receiver, Reply
from tests.services.support import admin_headers, fresh_database, wait_until
from webmacs.services import webhooks

DELAYS = [0.3, 0.6]


def hook_settings(db_url: str, tmp: Path, **over: Any) -> Any:
    values: dict[str, Any] = {
        "webmacs_webhook_allow_hosts": ["127.0.0.1"],
        "webmacs_webhook_retry_delays_s": DELAYS,
        "webmacs_webhook_timeout_s": 1.0,
        "webmacs_webhook_concurrency": 3,
        # Long on purpose: deliveries must be picked up by the NOTIFY wake-up and the due-time
        # computation, not by the backstop poll.
        "webmacs_webhook_poll_s": 30.0,
    }
    values.update(over)
    return make_settings(db_url, tmp, **values)


@dataclass
class Hooks:
    server: Server
    db_url: str
    admin: dict[str, str]


@pytest.fixture(scope="module")
def hooks(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooks]:
    url = fresh_database(db_url)
    s = start_server(hook_settings(url, tmp_path_factory.mktemp("hooks")))
    try:
        yield Hooks(s, url, admin_headers(s))
    finally:
        s.stop()


@pytest.fixture
def hdb(hooks: Hooks) -> Iterator[psycopg.Connection]:
    with psycopg.connect(hooks.db_url, autocommit=True, options="-c timezone=UTC") as conn:
        yield conn


@pytest.fixture
def hclient(hooks: Hooks) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hooks.server.url, headers=hooks.admin, timeout=30) as c:
        yield c


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def make_hook(hclient: httpx.Client, hdb: psycopg.Connection) -> Iterator[Any]:
    """Factory: a webhook created through the API (returns public_id); deleted after the test so its
    deliveries never reach later tests' receivers."""
    made: list[str] = []

    def make(url: str, *, secret: str | None = None, events: list[str] | None = None) -> str:
        r = hclient.post(
            "/api/v1/webhooks", json={"url": url, "secret": secret, "events": events or ["experiment.started"]}
        )
        assert r.status_code == 201, r.text
        got = hdb.execute("SELECT public_id FROM webhooks WHERE url = %s", (url,)).fetchone()
        assert got is not None
        made.append(got[0])
        return str(got[0])

    yield make
    for pid in made:
        hclient.delete(f"/api/v1/webhooks/{pid}")


def enqueue(server: Server, event_type: str = "experiment.started", **extras: Any) -> int:
    async def go() -> int:
        async with server.rt.pool.connection() as conn:
            return await webhooks.enqueue(conn, event_type=event_type, **extras)

    return int(server.call(go()))


def delivery(conn: psycopg.Connection, hook_pid: str) -> dict[str, Any] | None:
    cur = conn.execute(
        "SELECT d.status, d.attempts, d.response_code, d.last_error, d.delivered_on, d.payload, d.next_attempt_at,"
        " d.public_id FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE w.public_id = %s",
        (hook_pid,),
    )
    r = cur.fetchone()
    if r is None:
        return None
    return dict(
        zip(
            [
                "status",
                "attempts",
                "response_code",
                "last_error",
                "delivered_on",
                "payload",
                "next_attempt_at",
                "public_id",
            ],
            r,
            strict=True,
        )
    )


def final_delivery(conn: psycopg.Connection, hook_pid: str, timeout: float = 15) -> dict[str, Any]:
    return wait_until(
        lambda: (d := delivery(conn, hook_pid)) and d["status"] != "pending" and d,
        timeout=timeout,
        what="a final delivery state",
    )


def test_delivered_with_signature_and_exact_body(
    hooks: Hooks, hdb: psycopg.Connection, hclient: httpx.Client, receiver: Receiver, make_hook: Any
) -> None:
    pid = make_hook(f"{receiver.url}/hook", secret="s3cret")
    assert enqueue(hooks.server, experiment="Run 1") == 1
    [req] = receiver.wait(1)
    d = final_delivery(hdb, pid)
    assert req.method == "POST" and req.path == "/hook"
    assert req.body.decode() == d["payload"]
    payload = json.loads(d["payload"])
    assert payload["type"] == "experiment.started" and payload["experiment"] == "Run 1"
    assert payload["time"].endswith("+00:00")
    assert req.headers["Content-Type"] == "application/json"
    ts = req.headers["X-Webhook-Timestamp"]
    assert ts.isdigit() and abs(int(ts) - time.time()) < 300
    expected = hmac.new(b"s3cret", f"{ts}.{d['payload']}".encode(), hashlib.sha256).hexdigest()
    assert req.headers["X-Webhook-Signature"] == expected
    assert (d["status"], d["attempts"], d["response_code"], d["last_error"]) == ("delivered", 1, 200, None)
    assert d["delivered_on"] is not None and d["next_attempt_at"] is None
    page = hclient.get(f"/api/v1/webhooks/{pid}/deliveries").json()
    assert page["total"] == 1
    [api_d] = page["data"]
    assert api_d["public_id"] == d["public_id"] and api_d["status"] == "delivered" and api_d["attempts"] == 1
    assert api_d["response_code"] == 200 and api_d["delivered_on"] and api_d["event_type"] == "experiment.started"
    assert "payload" not in api_d


def test_no_secret_no_signature(hooks: Hooks, hdb: psycopg.Connection, receiver: Receiver, make_hook: Any) -> None:
    pid = make_hook(f"{receiver.url}/plain", secret="")
    enqueue(hooks.server)
    [req] = receiver.wait(1)
    assert "X-Webhook-Signature" not in req.headers and "X-Webhook-Timestamp" in req.headers
    assert final_delivery(hdb, pid)["status"] == "delivered"


def test_fan_out_only_to_enabled_subscribers(
    hooks: Hooks, hdb: psycopg.Connection, hclient: httpx.Client, receiver: Receiver, make_hook: Any
) -> None:
    subscribed = make_hook(f"{receiver.url}/a", events=["experiment.stopped", "sensor.reading"])
    other = make_hook(f"{receiver.url}/b", events=["experiment.started"])
    disabled = make_hook(f"{receiver.url}/c", events=["experiment.stopped"])
    assert hclient.put(f"/api/v1/webhooks/{disabled}", json={"enabled": False}).status_code == 200
    assert enqueue(hooks.server, "experiment.stopped", experiment="X") == 1
    [req] = receiver.wait(1)
    assert req.path == "/a"
    assert final_delivery(hdb, subscribed)["status"] == "delivered"
    assert delivery(hdb, other) is None and delivery(hdb, disabled) is None


def test_retries_with_backoff_then_delivered(
    hooks: Hooks, hdb: psycopg.Connection, receiver: Receiver, make_hook: Any
) -> None:
    receiver.script(Reply(500), Reply(503))
    pid = make_hook(f"{receiver.url}/flaky", secret="k")
    enqueue(hooks.server)
    reqs = receiver.wait(3)
    d = final_delivery(hdb, pid)
    assert (d["status"], d["attempts"], d["response_code"], d["last_error"]) == ("delivered", 3, 200, None)
    # Never earlier than the configured backoff (2 s then 4 s by default; small here).
    assert reqs[1].at - reqs[0].at >= DELAYS[0] - 0.05
    assert reqs[2].at - reqs[1].at >= DELAYS[1] - 0.05
    # The body is the same on every attempt; the timestamp (and so the signature) is per attempt.
    assert len({r.body for r in reqs}) == 1
    for r in reqs:
        ts = r.headers["X-Webhook-Timestamp"]
        expected = hmac.new(b"k", f"{ts}.".encode() + r.body, hashlib.sha256).hexdigest()
        assert r.headers["X-Webhook-Signature"] == expected


def test_dead_letter_after_three_failures(
    hooks: Hooks, hdb: psycopg.Connection, hclient: httpx.Client, receiver: Receiver, make_hook: Any
) -> None:
    receiver.default = Reply(500, b"nope")
    pid = make_hook(f"{receiver.url}/down")
    enqueue(hooks.server)
    d = final_delivery(hdb, pid)
    assert (d["status"], d["attempts"], d["response_code"], d["last_error"]) == ("dead_letter", 3, 500, "HTTP 500")
    assert d["delivered_on"] is None and d["next_attempt_at"] is None
    time.sleep(DELAYS[-1] * 2)  # bounded: nothing further is sent once dead-lettered
    assert len(receiver.requests) == 3
    page = hclient.get(f"/api/v1/webhooks/{pid}/deliveries", params={"status": "dead_letter"}).json()
    assert page["total"] == 1 and page["data"][0]["last_error"] == "HTTP 500"
    assert hclient.get(f"/api/v1/webhooks/{pid}/deliveries", params={"status": "delivered"}).json()["total"] == 0


def test_timeout_is_recorded(hooks: Hooks, hdb: psycopg.Connection, receiver: Receiver, make_hook: Any) -> None:
    receiver.default = Reply(200, delay=1.5)  # longer than the 1 s timeout of this server
    pid = make_hook(f"{receiver.url}/slow")
    enqueue(hooks.server)
    d = final_delivery(hdb, pid, timeout=20)
    assert (d["status"], d["attempts"], d["response_code"], d["last_error"]) == ("dead_letter", 3, None, "Timeout")


def test_connection_refused_is_a_transport_error(hooks: Hooks, hdb: psycopg.Connection, make_hook: Any) -> None:
    with Receiver() as gone:
        url = f"{gone.url}/closed"
    pid = make_hook(url)  # the port is closed now
    enqueue(hooks.server)
    d = final_delivery(hdb, pid)
    assert d["status"] == "dead_letter" and d["attempts"] == 3 and d["response_code"] is None
    assert d["last_error"].startswith("Transport error: ")


def test_redirects_are_not_followed(hooks: Hooks, hdb: psycopg.Connection, receiver: Receiver, make_hook: Any) -> None:
    with Receiver() as elsewhere:
        receiver.default = Reply(302, headers={"Location": f"{elsewhere.url}/stolen"})
        pid = make_hook(f"{receiver.url}/redirecting")
        enqueue(hooks.server)
        d = final_delivery(hdb, pid)
        assert (d["status"], d["response_code"], d["last_error"]) == ("dead_letter", 302, "HTTP 302")
        assert elsewhere.requests == []


def test_large_response_bodies_are_capped(
    hooks: Hooks, hdb: psycopg.Connection, receiver: Receiver, make_hook: Any
) -> None:
    receiver.default = Reply(200, b"x" * (4 * 1024 * 1024))
    pid = make_hook(f"{receiver.url}/big")
    enqueue(hooks.server)
    assert final_delivery(hdb, pid)["status"] == "delivered"


def test_concurrency_is_bounded(hooks: Hooks, hdb: psycopg.Connection, receiver: Receiver, make_hook: Any) -> None:
    receiver.default = Reply(200, delay=0.4)
    pids = [make_hook(f"{receiver.url}/c{i}") for i in range(6)]
    assert enqueue(hooks.server) == 6
    receiver.wait(6)
    for pid in pids:
        assert final_delivery(hdb, pid)["status"] == "delivered"
    assert receiver.max_inflight == 3  # webmacs_webhook_concurrency of this server


def test_delete_webhook_deletes_deliveries(
    hooks: Hooks, hdb: psycopg.Connection, hclient: httpx.Client, receiver: Receiver, make_hook: Any
) -> None:
    pid = make_hook(f"{receiver.url}/gone")
    enqueue(hooks.server)
    final_delivery(hdb, pid)
    assert hclient.delete(f"/api/v1/webhooks/{pid}").status_code == 200
    assert delivery(hdb, pid) is None
    assert hclient.get(f"/api/v1/webhooks/{pid}/deliveries").status_code == 404


def test_restart_mid_retry_resumes_and_delivers_once(
    db_url: str, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> None:
    url = fresh_database(db_url)
    tmp = tmp_path_factory.mktemp("restart")
    receiver.script(Reply(500))
    first = start_server(hook_settings(url, tmp, webmacs_webhook_retry_delays_s=[2.0]))
    try:
        with httpx.Client(base_url=first.url, headers=admin_headers(first)) as c:
            r = c.post("/api/v1/webhooks", json={"url": f"{receiver.url}/r", "events": ["experiment.started"]})
            assert r.status_code == 201
        enqueue(first)
        receiver.wait(1)
        with psycopg.connect(url, autocommit=True) as conn:
            wait_until(
                lambda: conn.execute(
                    "SELECT 1 FROM webhook_deliveries WHERE attempts = 1 AND last_error = 'HTTP 500'"
                ).fetchone(),
                what="first failure recorded",
            )
    finally:
        first.stop()
    with psycopg.connect(url, autocommit=True) as conn:
        status, attempts, in_future = conn.execute(
            "SELECT status, attempts, next_attempt_at > now() FROM webhook_deliveries"
        ).fetchone() or (None, 0, False)
        assert (status, attempts, in_future) == ("pending", 1, True)
        second = start_server(hook_settings(url, tmp))
        try:
            wait_until(
                lambda: conn.execute("SELECT 1 FROM webhook_deliveries WHERE status = 'delivered'").fetchone(),
                what="delivery after restart",
            )
            time.sleep(0.5)  # bounded: make sure no duplicate follows
            assert conn.execute("SELECT attempts, response_code FROM webhook_deliveries").fetchone() == (2, 200)
        finally:
            second.stop()
    assert [r.path for r in receiver.requests] == ["/r", "/r"]  # one failure, then delivered exactly once


def test_send_time_guard_dead_letters_private_targets(
    server: Server, db: psycopg.Connection, receiver: Receiver
) -> None:
    """A row written behind the API's back (or a DNS change after creation) is still refused when sending."""
    etype = "system.health_changed"  # never emitted by anything else, so only this test's row is queued
    db.execute("INSERT INTO webhooks (url, events) VALUES (%s, %s)", (f"{receiver.url}/ssrf", json.dumps([etype])))
    try:
        assert enqueue(server, etype) >= 1  # other webhooks on the shared database may subscribe too
        d = wait_until(
            lambda: db.execute(
                "SELECT d.status, d.attempts, d.last_error FROM webhook_deliveries d"
                " JOIN webhooks w ON w.id = d.webhook_id WHERE w.url = %s AND d.status <> 'pending'",
                (f"{receiver.url}/ssrf",),
            ).fetchone(),
            what="refusal",
        )
        assert d[0] == "dead_letter" and d[1] == 1
        assert d[2].startswith("Refused by SSRF guard: ") and "loopback" in d[2]
        assert receiver.requests == []
    finally:
        db.execute("DELETE FROM webhooks WHERE url = %s", (f"{receiver.url}/ssrf",))


def test_allow_listed_network_pins_the_vetted_address(
    db_url: str, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> None:
    """A name allowed through a network entry is resolved, vetted and dialled at that address; the request
    keeps the name in its Host header."""
    url = fresh_database(db_url)
    s = start_server(hook_settings(url, tmp_path_factory.mktemp("bynet"), webmacs_webhook_allow_hosts=["127.0.0.0/8"]))
    try:
        port = receiver.url.rsplit(":", 1)[1]
        with httpx.Client(base_url=s.url, headers=admin_headers(s)) as c:
            assert (
                c.post(
                    "/api/v1/webhooks", json={"url": f"http://localhost:{port}/n", "events": ["experiment.started"]}
                ).status_code
                == 201
            )
            # Outside the allowed network: still refused.
            r = c.post("/api/v1/webhooks", json={"url": "http://10.1.1.1/ip", "events": ["experiment.started"]})
            assert r.status_code == 422
        enqueue(s)
        [req] = receiver.wait(1)
        assert req.path == "/n" and req.headers["Host"] == f"localhost:{port}"
    finally:
        s.stop()


def test_two_processes_never_send_one_delivery_twice(
    db_url: str, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver
) -> None:
    url = fresh_database(db_url)
    tmp = tmp_path_factory.mktemp("pair")
    a = start_server(hook_settings(url, tmp))
    b = start_server(hook_settings(url, tmp))
    try:
        with httpx.Client(base_url=a.url, headers=admin_headers(a)) as c:
            for i in range(20):
                assert (
                    c.post(
                        "/api/v1/webhooks", json={"url": f"{receiver.url}/p{i}", "events": ["experiment.started"]}
                    ).status_code
                    == 201
                )
        assert enqueue(a) == 20
        receiver.wait(20)
        with psycopg.connect(url, autocommit=True) as conn:
            wait_until(
                lambda: (
                    conn.execute("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'").fetchone()
                    == (20,)
                ),
                what="all delivered",
            )
        time.sleep(0.5)  # bounded: a duplicate would arrive now
        paths = sorted(r.path for r in receiver.requests)
        assert paths == sorted(f"/p{i}" for i in range(20))
    finally:
        a.stop()
        b.stop()


def test_experiment_start_and_stop_are_delivered(
    hooks: Hooks, hdb: psycopg.Connection, hclient: httpx.Client, receiver: Receiver, make_hook: Any
) -> None:
    make_hook(f"{receiver.url}/exp", events=["experiment.started", "experiment.stopped"])
    name = unique("exp")
    assert hclient.post("/api/v1/experiments", json={"name": name}).status_code == 201
    [started] = receiver.wait(1)
    exp = hdb.execute("SELECT public_id FROM experiments WHERE name = %s", (name,)).fetchone()
    assert exp is not None
    assert hclient.put(f"/api/v1/experiments/{exp[0]}/stop").status_code == 200
    stopped = receiver.wait(2)[1]
    assert [json.loads(r.body)["type"] for r in (started, stopped)] == ["experiment.started", "experiment.stopped"]
    assert {json.loads(r.body)["experiment"] for r in (started, stopped)} == {name}
