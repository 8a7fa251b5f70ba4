"""Rules evaluated in-line by the engine (spec §8): log entries, webhooks, cooldown across processes, hysteresis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest

from tests.conftest import ActiveEvent, Server, make_settings, start_server, unique


def add_rule(
    db: psycopg.Connection,
    server: Server,
    event: ActiveEvent,
    op: str,
    threshold: float,
    *,
    high: float | None = None,
    cooldown: int = 60,
    action: str = "log",
    webhook_event_type: str | None = None,
    clear_threshold: float | None = None,
    rearm_on_clear: bool = False,
) -> str:
    name = unique("rule")
    db.execute(
        "INSERT INTO rules (name, event_public_id, operator, threshold, threshold_high, action_type,"
        " webhook_event_type, cooldown_seconds, clear_threshold, rearm_on_clear)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            name,
            event.public_id,
            op,
            threshold,
            high,
            action,
            webhook_event_type,
            cooldown,
            clear_threshold,
            rearm_on_clear,
        ),
    )
    server.refresh_catalog()
    return name


def firings(db: psycopg.Connection, rule: str) -> list[str]:
    return [
        r[0]
        for r in db.execute(
            "SELECT content FROM log_entries WHERE content LIKE %s ORDER BY id", (f"Rule '{rule}' triggered:%",)
        ).fetchall()
    ]


def wait_for_firings(db: psycopg.Connection, rule: str, n: int, timeout: float = 20.0) -> None:
    """Firings are handled after the commit, asynchronously; a sentinel rule tells when a value was handled."""
    deadline = time.monotonic() + timeout
    while len(firings(db, rule)) < n:
        assert time.monotonic() < deadline, f"{rule}: {len(firings(db, rule))} of {n} firings"
        time.sleep(0.05)


def send(client: httpx.Client, headers: dict[str, str], event: ActiveEvent, *values: float) -> None:
    r = client.post(
        "/api/v1/datapoints/batch",
        headers=headers,
        json={"datapoints": [{"value": v, "event_public_id": event.public_id} for v in values]},
    )
    assert r.status_code == 201, r.text
    assert r.json()["message"] == f"{len(values)} datapoints successfully created."


@pytest.fixture
def sentinel(db: psycopg.Connection, server: Server) -> Callable[[ActiveEvent], str]:
    # Created after the rule under test (higher id, evaluated after it), firing on every value: once it has
    # fired n times, the rule under test has been handled for the same n values.
    return lambda ev: add_rule(db, server, ev, "gte", -1e300, cooldown=0)


def test_firing_writes_a_log_entry_and_claims_the_cooldown(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
    sentinel: Callable[[ActiveEvent], str],
) -> None:
    ev = make_active_event()
    rule = add_rule(db, server, ev, "gt", 10.0, cooldown=60)
    s = sentinel(ev)
    send(client, operator, ev, 5.0)
    wait_for_firings(db, s, 1)
    assert firings(db, rule) == []
    # Every value is evaluated (not only the batch's last): 11 fires although 3 comes last.
    send(client, operator, ev, 11.0, 12.0, 3.0)
    wait_for_firings(db, s, 4)
    assert firings(db, rule) == [f"Rule '{rule}' triggered: 11.0 > 10.0"]
    row = db.execute("SELECT last_triggered_at FROM rules WHERE name = %s", (rule,)).fetchone()
    assert row is not None and row[0] is not None
    # Within the cooldown: no second firing.
    send(client, operator, ev, 50.0)
    wait_for_firings(db, s, 5)
    assert len(firings(db, rule)) == 1


def test_zero_cooldown_fires_on_every_match(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
    sentinel: Callable[[ActiveEvent], str],
) -> None:
    ev = make_active_event()
    rule = add_rule(db, server, ev, "between", 1.0, high=2.0, cooldown=0)
    s = sentinel(ev)
    send(client, operator, ev, 1.0, 2.5, 2.0, 1.5)
    wait_for_firings(db, s, 4)
    assert firings(db, rule) == [f"Rule '{rule}' triggered: {v} between 1.0..2.0" for v in (1.0, 2.0, 1.5)]


def test_hysteresis_rearms_only_after_clearing(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
    sentinel: Callable[[ActiveEvent], str],
) -> None:
    ev = make_active_event()
    rule = add_rule(db, server, ev, "gt", 80.0, cooldown=0, clear_threshold=70.0)
    s = sentinel(ev)
    send(client, operator, ev, 85.0, 90.0, 75.0, 85.0, 65.0, 81.0)
    wait_for_firings(db, s, 6)
    assert [c.split(": ")[1] for c in firings(db, rule)] == ["85.0 > 80.0", "81.0 > 80.0"]


def test_webhook_action_and_sensor_reading_are_enqueued(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
    sentinel: Callable[[ActiveEvent], str],
) -> None:
    ev = make_active_event()
    hook = db.execute(
        "INSERT INTO webhooks (url, events, enabled) VALUES (%s, %s, true) RETURNING id",
        (f"http://127.0.0.1:9/{unique('hook')}", '["sensor.threshold_exceeded", "sensor.reading"]'),
    ).fetchone()
    assert hook is not None
    try:
        rule = add_rule(db, server, ev, "lt", 0.0, cooldown=0, action="webhook")
        s = sentinel(ev)
        send(client, operator, ev, -1.0, -2.0)
        wait_for_firings(db, s, 2)
        rows = db.execute(
            "SELECT event_type, payload FROM webhook_deliveries WHERE webhook_id = %s AND payload LIKE %s ORDER BY id",
            (hook[0], f"%{ev.public_id}%"),
        ).fetchall()
        payloads = [(t, orjson.loads(p)) for t, p in rows]
        exceeded = [p for t, p in payloads if t == "sensor.threshold_exceeded"]
        assert [(p["rule"], p["value"], p["operator"], p["threshold"], p["sensor"]) for p in exceeded] == [
            (rule, -1.0, "lt", 0.0, ev.public_id),
            (rule, -2.0, "lt", 0.0, ev.public_id),
        ]
        # sensor.reading is throttled to one per event per 5 s.
        readings = [p for t, p in payloads if t == "sensor.reading"]
        assert [(p["sensor"], p["value"]) for p in readings] == [(ev.public_id, -1.0)]
        assert len(firings(db, rule)) == 2  # a log entry in any case
    finally:
        db.execute("DELETE FROM webhooks WHERE id = %s", (hook[0],))


@pytest.fixture
def second_server(db_url: str, tmp_path: Path) -> Iterator[Server]:
    s = start_server(make_settings(db_url, tmp_path))
    try:
        yield s
    finally:
        s.stop()


def test_cooldown_is_claimed_once_across_processes(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    second_server: Server,
    make_active_event: Callable[..., ActiveEvent],
    sentinel: Callable[[ActiveEvent], str],
) -> None:
    ev = make_active_event()
    rule = add_rule(db, server, ev, "gt", 0.0, cooldown=3600)
    s = sentinel(ev)
    second_server.refresh_catalog()
    send(client, operator, ev, 1.0)
    with httpx.Client(base_url=second_server.url, timeout=30) as other:
        send(other, operator, ev, 2.0)
    wait_for_firings(db, s, 2)
    assert len(firings(db, rule)) == 1


def test_rule_changes_reach_the_engine(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    server: Server,
    make_active_event: Callable[..., ActiveEvent],
    sentinel: Callable[[ActiveEvent], str],
) -> None:
    ev = make_active_event()
    rule = add_rule(db, server, ev, "gt", 0.0, cooldown=0)
    s = sentinel(ev)
    db.execute("UPDATE rules SET enabled = false WHERE name = %s", (rule,))
    server.refresh_catalog()
    send(client, operator, ev, 1.0)
    wait_for_firings(db, s, 1)
    assert firings(db, rule) == []
