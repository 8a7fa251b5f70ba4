"""A private Mosquitto on a free loopback port, `wm_` tokens for the MQTT writer, and a paho-mqtt publisher."""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import free_port, unique

MOSQUITTO = "/usr/sbin/mosquitto"


@dataclass
class Broker:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def _provision() -> None:
    """Install Debian's `mosquitto` when it is missing (as the TimescaleDB fixture provisions its extension)."""
    if Path(MOSQUITTO).exists():
        return
    subprocess.run(["apt-get", "install", "-y", "-q", "mosquitto"], check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    _provision()
    home = Path(tempfile.mkdtemp(prefix="webmacs-mqtt-"))
    port = free_port()
    conf = home / "mosquitto.conf"
    # Sessions queue without limit (the default 1000 would drop what a stopped server misses); no persistence
    # to disk: the broker lives as long as the test session.
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 0\n"
        "log_dest stderr\n"
        "log_type error\n"
        "log_type warning\n"
    )
    log = home / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    b = Broker(port, proc, log)
    deadline = time.monotonic() + 10
    while True:
        try:
            c = publisher_client(b)
            c.disconnect()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {log.read_text()}") from None
            time.sleep(0.05)
    try:
        yield b
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def publisher_client(broker: Broker, client_id: str | None = None) -> paho.Client:
    c = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or unique("pub"),
        protocol=paho.MQTTv5,
    )
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", broker.port)
    return c


class Publisher:
    """Publishes at QoS 1 from paho's network thread and waits for every PUBACK (the broker's, not ours)."""

    def __init__(self, broker: Broker) -> None:
        self.client = publisher_client(broker)
        self.client.loop_start()
        self._infos: list[paho.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self._infos.append(self.client.publish(topic, payload, qos=qos))

    def flush(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for info in self._infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not take a message"
        self._infos.clear()

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publisher]:
    p = Publisher(broker)
    yield p
    p.close()


class Subscriber:
    """Collects what arrives on a topic filter (the error topic)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = publisher_client(broker)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.loop_start()
        self.client.subscribe(topic, qos=0)
        assert self._subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def wait_for(self, n: int, timeout: float = 20) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.05)
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def make_token(db: psycopg.Connection) -> Callable[..., str]:
    """Factory: a `wm_` API token of a new user with `role`, optionally scoped to a plugin instance."""

    def make(role: str = "operator", *, plugin_instance_id: int | None = None, scope: str = "write") -> str:
        user = db.execute(
            "INSERT INTO users (email, username, password_hash, role) VALUES (%s, %s, 'x', %s) RETURNING id",
            (unique("mqtt") + "@example.com", unique("mqtt"), role),
        ).fetchone()
        assert user is not None
        token = "wm_" + secrets.token_urlsafe(32)
        db.execute(
            "INSERT INTO api_tokens (name, token_hash, user_id, scope, plugin_instance_id) VALUES (%s, %s, %s, %s, %s)",
            (unique("tok"), hashlib.sha256(token.encode()).hexdigest(), user[0], scope, plugin_instance_id),
        )
        return token

    return make


def wait_until(predicate: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
