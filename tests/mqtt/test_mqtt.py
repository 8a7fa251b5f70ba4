"""MQTT ingest against a real Mosquitto: PUBACK after commit, persistent sessions, shared subscriptions, rules,
hostile payloads and scoped tokens (README "MQTT")."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from tests.conftest import ActiveEvent, Server, make_settings, start_server, unique
from tests.mqtt.conftest import Broker, Publisher, Subscriber, wait_until
from webmacs._core import Engine
from webmacs.exceptions import ConfigError

T0_MS = 1_700_000_000_000


@contextlib.contextmanager
def mqtt_engine(db_url: str, broker: Broker, token: str, root: str, **options: Any) -> Iterator[Engine]:
    """An engine taking `<root>/#` from the broker; returns once its subscription is granted."""
    options.setdefault("mqtt_client_id", unique("wm"))
    options.setdefault("mqtt_topics", [f"{root}/#"])
    e = Engine(db_url, mqtt_url=broker.url, mqtt_token=token, fanout="off", **options)
    try:
        wait_until(lambda: e.stats()["mqtt"]["subscribed"] >= 1, 20, "the MQTT subscription")
        yield e
    finally:
        e.close(30)


def stored(db: psycopg.Connection, event: ActiveEvent) -> list[tuple[int, float]]:
    rows = db.execute(
        "SELECT (extract(epoch FROM time) * 1000)::int8, value FROM datapoints WHERE event_id = %s ORDER BY time",
        (event.id,),
    ).fetchall()
    return [(int(t), float(v)) for t, v in rows]


def count(db: psycopg.Connection, *events: ActiveEvent) -> int:
    row = db.execute("SELECT count(*) FROM datapoints WHERE event_id = ANY(%s)", ([e.id for e in events],)).fetchone()
    assert row is not None
    return int(row[0])


def frame(points: list[tuple[str, float, int]]) -> bytes:
    return orjson.dumps({"datapoints": [{"value": v, "event_public_id": e, "timestamp": t} for e, v, t in points]})


def test_50k_points_at_qos1_are_all_stored_exactly(
    db: psycopg.Connection,
    db_url: str,
    broker: Broker,
    publisher: Publisher,
    make_active_event: Callable[..., ActiveEvent],
    make_token: Callable[..., str],
) -> None:
    a, b = make_active_event(), make_active_event()
    root = unique("tele")
    expected: dict[str, list[tuple[int, float]]] = {a.public_id: [], b.public_id: []}
    with mqtt_engine(db_url, broker, make_token(), root) as e:
        # 40,000 points in 400 frames of the WebSocket shape, on the collective topic…
        for f in range(400):
            pts = []
            for i in range(100):
                n = f * 100 + i
                ev = a if n % 2 else b
                pts.append((ev.public_id, n * 0.5 + 0.1, T0_MS + n))
                expected[ev.public_id].append((T0_MS + n, n * 0.5 + 0.1))
            publisher.publish(f"{root}/frames", frame(pts))
        # …and 10,000 one-value messages on per-event topics: bare numbers and {"value", "timestamp"}.
        for n in range(40_000, 50_000):
            t = T0_MS + n
            if n % 2:
                publisher.publish(f"{root}/{a.public_id}", orjson.dumps({"value": n + 0.25, "timestamp": t}))
                expected[a.public_id].append((t, n + 0.25))
            else:
                # A bare number has no timestamp: the server's clock; checked by count and value below.
                publisher.publish(f"{root}/{b.public_id}", str(n + 0.75))
        publisher.flush()
        wait_until(lambda: e.stats()["mqtt"]["acked"] == 10_400, 180, "every message acknowledged")
        s = e.stats()["mqtt"]
        assert (s["received"], s["points"], s["accepted"], s["malformed"]) == (10_400, 50_000, 50_000, 0)
        assert sum(s["rejected"].values()) == 0
    assert count(db, a, b) == 50_000
    assert stored(db, a) == sorted(expected[a.public_id])
    got_b = stored(db, b)
    timed_b = [p for p in got_b if p[0] < T0_MS + 40_000]
    assert timed_b == sorted(expected[b.public_id])
    assert sorted(v for t, v in got_b if t >= T0_MS + 40_000) == [n + 0.75 for n in range(40_000, 50_000, 2)]


def test_a_server_restarted_mid_stream_loses_nothing(
    db: psycopg.Connection,
    db_url: str,
    broker: Broker,
    publisher: Publisher,
    make_active_event: Callable[..., ActiveEvent],
    make_token: Callable[..., str],
) -> None:
    ev = make_active_event()
    root = unique("restart")
    token = make_token()
    client_id = unique("wm-restart")
    total = 20_000
    done = threading.Event()

    def publish() -> None:
        for n in range(0, total, 10):
            pts = [(ev.public_id, float(i), T0_MS + i) for i in range(n, n + 10)]
            publisher.publish(f"{root}/x", frame(pts))
            if n % 500 == 0:
                time.sleep(0.01)  # a steady stream, so the restart falls in the middle of it
        publisher.flush()
        done.set()

    thread = threading.Thread(target=publish)
    with mqtt_engine(db_url, broker, token, root, mqtt_client_id=client_id) as first:
        thread.start()
        wait_until(lambda: first.stats()["mqtt"]["acked"] >= 100, 60, "the first server taking messages")
    first_took = first.stats()["mqtt"]["acked"]
    assert first_took < total // 10, "the restart did not happen mid-stream"
    # Everything the first server acknowledged is stored; the broker holds the rest for the session.
    assert count(db, ev) >= first_took * 10
    with mqtt_engine(db_url, broker, token, root, mqtt_client_id=client_id) as second:
        thread.join(120)
        wait_until(lambda: count(db, ev) >= total, 120, "every point stored")
        time.sleep(0.5)  # a late redelivery would show as a duplicate below (absorbed by the key)
        assert second.stats()["mqtt"]["received"] >= total // 10 - first_took
    assert stored(db, ev) == [(T0_MS + i, float(i)) for i in range(total)]


def test_messages_are_acknowledged_only_after_their_points_committed(
    db: psycopg.Connection,
    db_url: str,
    broker: Broker,
    publisher: Publisher,
    make_active_event: Callable[..., ActiveEvent],
    make_token: Callable[..., str],
) -> None:
    ev = make_active_event()
    root = unique("ack")
    with mqtt_engine(db_url, broker, make_token(), root) as e, psycopg.connect(db_url) as locker:
        # The writer cannot commit while the table is locked: received, not acknowledged.
        locker.execute("LOCK TABLE datapoints IN ACCESS EXCLUSIVE MODE")
        for i in range(20):
            publisher.publish(f"{root}/{ev.public_id}", orjson.dumps({"value": i, "timestamp": T0_MS + i}))
        publisher.flush()
        wait_until(lambda: e.stats()["mqtt"]["received"] == 20, 30, "the messages reaching the engine")
        time.sleep(0.5)
        assert (e.stats()["mqtt"]["acked"], e.stats()["written"]) == (0, 0)
        locker.rollback()
        wait_until(lambda: e.stats()["mqtt"]["acked"] == 20, 30, "the acks after the commit")
        assert e.stats()["written"] == 20
    assert stored(db, ev) == [(T0_MS + i, float(i)) for i in range(20)]


def test_a_deleted_token_pauses_ingest_and_the_broker_keeps_the_messages(
    db: psycopg.Connection,
    db_url: str,
    broker: Broker,
    publisher: Publisher,
    make_active_event: Callable[..., ActiveEvent],
    make_token: Callable[..., str],
) -> None:
    ev = make_active_event()
    root = unique("revoked")
    token = make_token()
    digest = hashlib.sha256(token.encode()).hexdigest()
    with mqtt_engine(db_url, broker, token, root) as e:
        row = db.execute("DELETE FROM api_tokens WHERE token_hash = %s RETURNING name, user_id", (digest,)).fetchone()
        assert row is not None
        wait_until(lambda: e.stats()["mqtt"]["connected"] == 0, 20, "the writer leaving the broker")
        for i in range(10):
            publisher.publish(f"{root}/{ev.public_id}", orjson.dumps({"value": i, "timestamp": T0_MS + i}))
        publisher.flush()
        time.sleep(1)
        assert e.stats()["mqtt"]["received"] == 0
        assert any("paused" in line for line in e.drain_mqtt_log())
        db.execute("INSERT INTO api_tokens (name, token_hash, user_id) VALUES (%s, %s, %s)", (row[0], digest, row[1]))
        wait_until(lambda: e.stats()["mqtt"]["acked"] == 10, 30, "the held messages after the token returned")
    assert stored(db, ev) == [(T0_MS + i, float(i)) for i in range(10)]


def test_settings_reach_the_engine_options(tmp_path: Path, db_url: str) -> None:
    from webmacs.services.ingest import mqtt_options

    assert mqtt_options(make_settings(db_url, tmp_path)) == {}
    s = make_settings(
        db_url,
        tmp_path,
        webmacs_mqtt_url="mqtts://u:p@broker:8883",
        webmacs_mqtt_topics="plant/+/telemetry/#, lab/#",
        webmacs_mqtt_token="wm_x",
        webmacs_mqtt_shared=False,
    )
    assert mqtt_options(s) == {
        "mqtt_url": "mqtts://u:p@broker:8883",
        "mqtt_topics": ["plant/+/telemetry/#", "lab/#"],
        "mqtt_token": "wm_x",
        "mqtt_client_id": None,
        "mqtt_shared": False,
        "mqtt_error_topic": None,
    }
    assert "wm_x" not in repr(s)


def test_a_rule_fired_by_an_mqtt_value_queues_its_webhook(
    db: psycopg.Connection,
    db_url: str,
    tmp_path: Path,
    broker: Broker,
    publisher: Publisher,
    make_active_event: Callable[..., ActiveEvent],
    make_token: Callable[..., str],
) -> None:
    from tests.engine.test_rules import add_rule

    ev = make_active_event()
    hook = db.execute(
        "INSERT INTO webhooks (url, events, enabled) VALUES (%s, %s, true) RETURNING id",
        (f"http://127.0.0.1:9/{unique('hook')}", '["sensor.threshold_exceeded"]'),
    ).fetchone()
    assert hook is not None
    root = unique("rule")
    settings = make_settings(
        db_url,
        tmp_path,
        webmacs_mqtt_url=broker.url,
        webmacs_mqtt_token=make_token(),
        webmacs_mqtt_topics=f"{root}/#",
        webmacs_mqtt_client_id=unique("wm-rule"),
    )
    mqtt_server: Server = start_server(settings)
    try:
        rule = add_rule(db, mqtt_server, ev, "gt", 50.0, cooldown=0, action="webhook")
        engine = mqtt_server.rt.ingest.engine
        wait_until(lambda: engine.stats()["mqtt"]["subscribed"] >= 1, 20, "the MQTT subscription")
        publisher.publish(f"{root}/{ev.public_id}", "75.5")
        publisher.flush()

        def queued() -> list[Any]:
            return db.execute(
                "SELECT payload FROM webhook_deliveries WHERE webhook_id = %s AND event_type = %s",
                (hook[0], "sensor.threshold_exceeded"),
            ).fetchall()

        wait_until(lambda: len(queued()) == 1, 30, "the webhook in the outbox")
        p = orjson.loads(queued()[0][0])
        assert (p["rule"], p["value"], p["sensor"], p["operator"]) == (rule, 75.5, ev.public_id, "gt")
    finally:
        mqtt_server.stop()
        db.execute("DELETE FROM webhooks WHERE id = %s", (hook[0],))


def test_malformed_payloads_are_counted_and_do_not_stop_the_stream(
    db: psycopg.Connection,
    db_url: str,
    broker: Broker,
    publisher: Publisher,
    make_active_event: Callable[..., ActiveEvent],
    make_token: Callable[..., str],
) -> None:
    ev = make_active_event()
    root = unique("bad")
    errors = Subscriber(broker, f"{root}-errors")
    try:
        with mqtt_engine(
            db_url, broker, make_token(), root, max_frame_bytes=65_536, mqtt_error_topic=f"{root}-errors"
        ) as e:
            hostile: list[tuple[str, bytes]] = [
                (f"{root}/x", b'{"datapoints": [{"value": 1,'),  # invalid JSON
                (f"{root}/x", b'{"datapoints": [{"value": 1, "event_public_id": "\xff\xfe"}]}'),  # not UTF-8
                (f"{root}/{ev.public_id}", b"\xc3\x28"),  # not UTF-8, one-value form
                (f"{root}/x", b'{"datapoints": [' + b"[" * 5000 + b"]" * 5000 + b"]}"),  # deep nesting
                (f"{root}/{ev.public_id}", b'{"value": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}"),
                (f"{root}/x", b'{"datapoints": [{"value": 1, "event_public_id": "' + b"a" * 70_000 + b'"}]}'),  # huge
                (f"{root}/{ev.public_id}", b"[1, 2]"),  # not a value
                (f"{root}/x", b""),  # empty
                (f"{root}/x", b'{"datapoints": [{"value": 1e999, "event_public_id": "a"}]}'),  # beyond f64
            ]
            for topic, payload in hostile:
                publisher.publish(topic, payload)
            # Entry-level rejects: counted per point, the rest of the message stored.
            entry_level = [
                (f"{root}/{ev.public_id}", b"NaN"),
                (f"{root}/{ev.public_id}", b'"1e999"'),
                (f"{root}/x", b'"datapoints"'),  # a string for an event "x": not a number
                (
                    f"{root}/x",
                    b'{"datapoints": [{"value": NaN, "event_public_id": "%s", "timestamp": %d},'
                    b' {"value": 2.5, "event_public_id": "%s", "timestamp": %d}]}'
                    % (ev.public_id.encode(), T0_MS, ev.public_id.encode(), T0_MS + 1),
                ),
            ]
            for topic, payload in entry_level:
                publisher.publish(topic, payload)
            # The stream goes on.
            for i in range(100):
                publisher.publish(f"{root}/{ev.public_id}", orjson.dumps({"value": i, "timestamp": T0_MS + 10 + i}))
            publisher.flush()
            n = len(hostile) + len(entry_level) + 100
            wait_until(lambda: e.stats()["mqtt"]["acked"] == n, 60, "every message acknowledged")
            s = e.stats()["mqtt"]
            assert s["malformed"] == len(hostile)
            assert {k: v for k, v in s["rejected"].items() if v} == {"non_finite": 3, "invalid_value": 1}
            assert s["accepted"] == 101
            assert s["connected"] == 1 and s["reconnects"] == 0
            reports = errors.wait_for(len(hostile) + len(entry_level))
            assert len(reports) == len(hostile) + len(entry_level)
            bodies = [orjson.loads(p) for _, p in reports]
            assert all(b["topic"].startswith(root) for b in bodies)
            assert sum(1 for b in bodies if b["error"] is not None) == len(hostile)
            assert sorted(tuple(b["reasons"]) for b in bodies if b["error"] is None) == [
                ("invalid_value",),
                ("non_finite",),
                ("non_finite",),
                ("non_finite",),
            ]
        assert stored(db, ev) == [(T0_MS + 1, 2.5)] + [(T0_MS + 10 + i, float(i)) for i in range(100)]
    finally:
        errors.close()


def test_a_scoped_token_feeds_only_its_plugin_instances_events(
    db: psycopg.Connection,
    db_url: str,
    broker: Broker,
    publisher: Publisher,
    make_active_event: Callable[..., ActiveEvent],
    make_token: Callable[..., str],
) -> None:
    own, foreign = make_active_event(), make_active_event()
    root = unique("scoped")
    token = make_token(plugin_instance_id=own.plugin_instance_id)
    with mqtt_engine(db_url, broker, token, root) as e:
        publisher.publish(f"{root}/x", frame([(own.public_id, 1.0, T0_MS), (foreign.public_id, 2.0, T0_MS)]))
        publisher.publish(f"{root}/{foreign.public_id}", orjson.dumps({"value": 3.0, "timestamp": T0_MS + 1}))
        publisher.publish(f"{root}/{own.public_id}", orjson.dumps({"value": 4.0, "timestamp": T0_MS + 1}))
        publisher.flush()
        wait_until(lambda: e.stats()["mqtt"]["acked"] == 3, 30, "every message acknowledged")
        s = e.stats()
        assert s["mqtt"]["rejected"]["not_permitted"] == 2
        assert s["mqtt"]["accepted"] == 2
        assert e.drain_mqtt_log()[0].endswith("1 of 2 datapoint(s) rejected (not_permitted)")
    assert stored(db, own) == [(T0_MS, 1.0), (T0_MS + 1, 4.0)]
    assert stored(db, foreign) == []


@pytest.mark.parametrize("role", ["viewer", None])
def test_the_writer_needs_a_valid_operator_token(
    db_url: str, broker: Broker, make_token: Callable[..., str], role: str | None
) -> None:
    token = make_token(role) if role else "wm_" + "A" * 43
    with pytest.raises(ConfigError, match="token"):
        Engine(db_url, mqtt_url=broker.url, mqtt_token=token, fanout="off")
    with pytest.raises(ConfigError, match="WEBMACS_MQTT_TOKEN"):
        Engine(db_url, mqtt_url=broker.url, fanout="off")
    with pytest.raises(ConfigError, match="scheme"):
        Engine(db_url, mqtt_url="http://127.0.0.1:1", mqtt_token=token, fanout="off")


def test_two_engines_share_the_subscription_and_store_every_point_once(
    db: psycopg.Connection,
    db_url: str,
    broker: Broker,
    publisher: Publisher,
    make_active_event: Callable[..., ActiveEvent],
    make_token: Callable[..., str],
) -> None:
    ev = make_active_event()
    root = unique("shared")
    token = make_token()
    total = 5_000
    # Default client ids: distinct slots of one host, so the two sessions do not take each other over.
    with (
        mqtt_engine(db_url, broker, token, root, mqtt_client_id=None) as one,
        mqtt_engine(db_url, broker, token, root, mqtt_client_id=None) as two,
    ):
        assert one.mqtt_client_id != two.mqtt_client_id
        for i in range(total):
            publisher.publish(f"{root}/{ev.public_id}", orjson.dumps({"value": i, "timestamp": T0_MS + i}))
        publisher.flush()
        wait_until(
            lambda: one.stats()["mqtt"]["acked"] + two.stats()["mqtt"]["acked"] == total, 120, "all acknowledged"
        )
        got = one.stats()["mqtt"]["received"], two.stats()["mqtt"]["received"]
        assert got[0] > 0 and got[1] > 0, got
        assert sum(got) == total
        assert one.stats()["duplicates"] + two.stats()["duplicates"] == 0
    assert stored(db, ev) == [(T0_MS + i, float(i)) for i in range(total)]
