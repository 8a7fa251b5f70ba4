"""MQTT ingest throughput against the WebSocket path of the same engine, in the same run.

    .venv/bin/python benches/mqtt_bench.py

One engine (in this process, GIL released while it works) on a throwaway TimescaleDB cluster and a private
Mosquitto. Both phases send the same frames of BENCH_POINTS client-timestamped points (default 100) until
BENCH_ROWS rows (default 400,000) are committed:

  websocket  frames with "seq" over the engine's own WebSocket port, BENCH_WINDOW (32) un-acked per connection,
             BENCH_CONNS (4) connections; rows counted from acks (= committed)
  mqtt       the same frames published at QoS 1 by BENCH_CONNS paho-mqtt clients to the broker; the engine
             PUBACKs after commit; rows counted from the engine's acks (= committed)

The clients are Python in both phases (paho-mqtt, websockets), so the ratio compares the transports through the
same engine; it is not the engine's ceiling (`make bench-ingest` measures that). Requires /usr/sbin/mosquitto.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import psycopg

from common import SECRET, count_rows, free_port, setup_events
from webmacs._core import Engine
from webmacs.db.cluster import Cluster

T0_MS = 1_700_000_000_000


def frames(events: list[tuple[int, str]], rows: int, points: int, offset_ms: int) -> list[bytes]:
    out = []
    for f in range(rows // points):
        dps = []
        for i in range(points):
            n = f * points + i
            ev = events[n % len(events)][1]
            dps.append({"value": n * 0.5, "event_public_id": ev, "timestamp": offset_ms + n // len(events)})
        out.append(orjson.dumps({"datapoints": dps}))
    return out


def start_broker(home: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = home / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nlog_dest none\n"
    )
    proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(conf)])
    time.sleep(0.5)
    return proc, port


def make_token(url: str) -> str:
    token = "wm_" + secrets.token_urlsafe(32)
    with psycopg.connect(url, autocommit=True) as db:
        user = db.execute(
            "INSERT INTO users (email, username, password_hash, role) VALUES ('b@x', 'bench', 'x', 'operator')"
            " RETURNING id"
        ).fetchone()
        assert user is not None
        db.execute(
            "INSERT INTO api_tokens (name, token_hash, user_id) VALUES ('bench', %s, %s)",
            (hashlib.sha256(token.encode()).hexdigest(), user[0]),
        )
    return token


def bench_ws(engine: Engine, token: str, batch: list[bytes], conns: int, window: int) -> float:
    from websockets.sync.client import connect

    bound = engine.serve_websockets(secret_key=SECRET, listen="127.0.0.1:0")
    url = f"ws://{bound}/ws/controller/telemetry?token={token}"
    shares = [batch[i::conns] for i in range(conns)]

    def run(share: list[bytes]) -> None:
        with connect(url, max_size=None, proxy=None) as ws:
            in_flight = 0
            for seq, f in enumerate(share):
                ws.send(f[:-1] + b',"seq":%d}' % seq)
                in_flight += 1
                while in_flight >= window:
                    if orjson.loads(ws.recv())["type"] == "ack":
                        in_flight -= 1
            while in_flight:
                if orjson.loads(ws.recv())["type"] == "ack":
                    in_flight -= 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def bench_mqtt(engine: Engine, port: int, root: str, batch: list[bytes], conns: int) -> float:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    clients = []
    for i in range(conns):
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-{i}", protocol=paho.MQTTv5)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append(c)
    acked0 = engine.stats()["mqtt"]["acked"]
    shares = [batch[i::conns] for i in range(conns)]

    def run(c: paho.Client, share: list[bytes]) -> None:
        for f in share:
            c.publish(f"{root}/frames", f, qos=1)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(c, s)) for c, s in zip(clients, shares, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while engine.stats()["mqtt"]["acked"] - acked0 < len(batch):
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.disconnect()
        c.loop_stop()
    return elapsed


def main() -> int:
    rows = int(os.environ.get("BENCH_ROWS", "400000"))
    points = int(os.environ.get("BENCH_POINTS", "100"))
    conns = int(os.environ.get("BENCH_CONNS", "4"))
    window = int(os.environ.get("BENCH_WINDOW", "32"))
    home = Path(tempfile.mkdtemp(prefix="webmacs-mqtt-bench-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    broker = None
    try:
        url = cluster.up()
        from webmacs.db import migrate

        migrate.apply(url, "1 day")
        events = setup_events(url, 16, "mqtt-bench")
        token = make_token(url)
        broker, port = start_broker(home)
        root = "bench"
        engine = Engine(
            url,
            fanout="off",
            mqtt_url=f"mqtt://127.0.0.1:{port}",
            mqtt_token=token,
            mqtt_topics=[f"{root}/#"],
            mqtt_client_id="webmacs-bench",
        )
        while engine.stats()["mqtt"]["subscribed"] < 1:
            time.sleep(0.05)
        try:
            ws_s = bench_ws(engine, token, frames(events, rows, points, T0_MS), conns, window)
            ws_rate = rows / ws_s
            print(
                f"websocket {ws_rate:>12,.0f} rows/s  ({rows:,} rows in {points}-point frames, {conns} connections,"
                f" window {window})"
            )
            mqtt_s = bench_mqtt(engine, port, root, frames(events, rows, points, T0_MS + 10**9), conns)
            mqtt_rate = rows / mqtt_s
            print(
                f"mqtt      {mqtt_rate:>12,.0f} rows/s  ({rows:,} rows in {points}-point frames, {conns} publishers,"
                f" QoS 1, PUBACK after commit)"
            )
            print(f"ratio     {mqtt_rate / ws_rate:>12.2f}  (mqtt / websocket)")
            stored = count_rows(url)
            assert stored == 2 * rows, f"{stored} rows stored, expected {2 * rows}"
            s = engine.stats()["mqtt"]
            assert s["accepted"] == rows and s["malformed"] == 0, s
        finally:
            engine.close(30)
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(10)
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
