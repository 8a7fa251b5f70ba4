"""Rules fired by ingest reach a real webhook receiver (spec §8, §9), with cooldown and hysteresis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Server, make_settings, start_server, unique
from tests.services.receiver import Receiver
from tests.services.support import admin_headers, fresh_database


@dataclass
class Rig:
    server: Server
    db_url: str
    api: httpx.Client
    receiver: Receiver


@pytest.fixture(scope="module")
def rig(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    url = fresh_database(db_url)
    s = start_server(
        make_settings(
            url,
            tmp_path_factory.mktemp("rulehooks"),
            webmacs_webhook_allow_hosts=["127.0.0.1"],
            webmacs_webhook_retry_delays_s=[0.2, 0.4],
        )
    )
    try:
        with Receiver() as receiver, httpx.Client(base_url=s.url, headers=admin_headers(s), timeout=30) as api:
            r = api.post(
                "/api/v1/webhooks",
                json={
                    "url": f"{receiver.url}/rules",
                    "secret": "k",
                    "events": ["sensor.threshold_exceeded", "experiment.stopped"],
                },
            )
            assert r.status_code == 201, r.text
            yield Rig(s, url, api, receiver)
    finally:
        s.stop()


@pytest.fixture
def active_event(rig: Rig) -> str:
    """An event mapped to an enabled plugin instance (writable, spec §6)."""
    with psycopg.connect(rig.db_url, autocommit=True) as conn:
        ev = conn.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type)"
            " VALUES (%s, 0, 100, 'C', 'sensor') RETURNING public_id",
            (unique("ev"),),
        ).fetchone()
        pi = conn.execute(
            "INSERT INTO plugin_instances (plugin_id, instance_name) VALUES ('simulated', %s) RETURNING id",
            (unique("inst"),),
        ).fetchone()
        assert ev is not None and pi is not None
        conn.execute(
            "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
            " event_public_id) VALUES (%s, 'ch', 'Channel', 'input', 'C', %s)",
            (pi[0], ev[0]),
        )
    rig.server.refresh_catalog()
    return str(ev[0])


def post_value(rig: Rig, event: str, value: float) -> None:
    r = rig.api.post("/api/v1/datapoints", json={"event_public_id": event, "value": value})
    assert r.status_code == 201, r.text


def bodies_for(rig: Rig, rule: str, n: int, settle: float = 1.0) -> list[dict[str, Any]]:
    """The receiver's payloads for `rule`: waits (bounded) for `n`, then a little longer so that an extra,
    unexpected delivery would be seen too."""
    deadline = time.monotonic() + 15
    while True:
        got = [json.loads(q.body) for q in rig.receiver.requests]
        got = [b for b in got if b.get("rule") == rule]
        if len(got) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(settle)
    return [b for b in (json.loads(q.body) for q in rig.receiver.requests) if b.get("rule") == rule]


def test_rule_fires_once_within_cooldown(rig: Rig, active_event: str) -> None:
    name = unique("hot")
    r = rig.api.post(
        "/api/v1/rules",
        json={
            "name": name,
            "event_public_id": active_event,
            "operator": "gt",
            "threshold": 50,
            "action_type": "webhook",
            "cooldown_seconds": 3600,
        },
    )
    assert r.status_code == 201, r.text
    post_value(rig, active_event, 42)  # does not match
    post_value(rig, active_event, 60)
    post_value(rig, active_event, 70)  # matches, but within the cooldown
    [body] = bodies_for(rig, name, 1)
    assert body["type"] == "sensor.threshold_exceeded" and body["sensor"] == active_event
    assert (body["value"], body["operator"], body["threshold"]) == (60.0, "gt", 50.0)
    assert "threshold_high" not in body


def test_hysteresis_rearms_only_after_clearing(rig: Rig, active_event: str) -> None:
    name = unique("hyst")
    r = rig.api.post(
        "/api/v1/rules",
        json={
            "name": name,
            "event_public_id": active_event,
            "operator": "gt",
            "threshold": 50,
            "clear_threshold": 40,
            "action_type": "webhook",
            "webhook_event_type": "experiment.stopped",
            "cooldown_seconds": 0,
        },
    )
    assert r.status_code == 201, r.text
    for v in (60, 55, 45, 39, 61):  # fire; still high; not yet clear; clears (no firing); fires again
        post_value(rig, active_event, v)
    got = bodies_for(rig, name, 2)
    assert [b["value"] for b in got] == [60.0, 61.0]
    assert {b["type"] for b in got} == {"experiment.stopped"}


def test_without_hysteresis_every_match_fires_with_zero_cooldown(rig: Rig, active_event: str) -> None:
    name = unique("plain")
    r = rig.api.post(
        "/api/v1/rules",
        json={
            "name": name,
            "event_public_id": active_event,
            "operator": "gt",
            "threshold": 50,
            "action_type": "webhook",
            "cooldown_seconds": 0,
        },
    )
    assert r.status_code == 201, r.text
    for v in (60, 55):
        post_value(rig, active_event, v)
    assert sorted(b["value"] for b in bodies_for(rig, name, 2)) == [55.0, 60.0]
