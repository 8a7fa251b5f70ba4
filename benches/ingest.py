"""Ingest benchmark: the engine behind WebSockets vs the binary-COPY limit and a careful pure-Python path.

Runs on its own throwaway TimescaleDB cluster; `make bench-ingest`. Knobs (env): BENCH_SECONDS (engine phase,
default 30), BENCH_COPY_ROWS (default 2_000_000), BENCH_PYTHON_ROWS (default 1_000_000),
BENCH_WINDOW (unacknowledged frames per connection in the engine phase, default 32).
Phases:
  copy_limit    pre-encoded binary COPY on one psycopg connection, 20k rows per transaction (the ceiling)
  python_path   orjson parse + validate + psycopg binary COPY of the same frames, same batching (the baseline)
  engine        the real server (`webmacs serve`, a subprocess): 4 WS connections of 500-point frames with seq
                acks, BENCH_WINDOW frames in flight per connection; rows counted from acks (= committed)
  small_frames  100 WS connections, 1 point per frame, 4 in flight each, driven by the Rust load generator
                (core-rs/examples/wsload.rs), against the Python endpoint and the engine's native listener
                (WEBMACS_TELEMETRY_LISTEN) of the same server; once with the engine defaults, once on a second
                server with SMALL_FRAME_TUNING (2 ms batches, 4 writers). The last line reports the native
                listener with the tuning (the Python endpoint without a listener; the Python client without cargo)
  engine_native the engine phase's load (4 connections, 500-point frames) through the native listener
  latency       4 connections at half the engine's rate; frame sent → ack (sent after commit: the rows are
                visible by then, so this bounds frame-sent→row-visible from above)
The last line is machine-readable.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
from webmacs.db.cluster import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import ServerProcess, count_rows, free_port

ROOT = Path(__file__).resolve().parent.parent

EVENTS = 50
FRAME_POINTS = 500
BATCH_ROWS = 20_000
PG_EPOCH_US = 946_684_800_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Engine settings of the second small-frames run (see `small_frames`).
SMALL_FRAME_TUNING = {"WEBMACS_INGEST_MAX_AGE_MS": "2", "WEBMACS_INGEST_WRITERS": "4"}
RULES = 100
WEBHOOKS = 10
COPY_SQL = "COPY datapoints (time, event_id, experiment_id, value) FROM STDIN (FORMAT binary)"


def setup_events(url: str) -> list[tuple[int, str]]:
    return common.setup_events(url, EVENTS, "bench")


class WebhookReceiver:
    """A local HTTP endpoint that answers 200 to every webhook delivery and counts them."""

    def __init__(self) -> None:
        import http.server
        import threading

        receiver = self
        self.count = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.count += 1
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def add_rules_and_webhooks(url: str, events: list[tuple[int, str]], receiver_url: str) -> None:
    """100 always-matching rules (2 per event, webhook action, the default 60 s cooldown) and 10 subscribers of
    sensor.threshold_exceeded: every rule fires when the phase starts and again after each cooldown."""
    with psycopg.connect(url, autocommit=True) as db:
        for i in range(RULES):
            db.execute(
                "INSERT INTO rules (name, event_public_id, operator, threshold, action_type, cooldown_seconds)"
                " VALUES (%s, %s, 'gt', -1e300, 'webhook', 60)",
                (f"bench-rule-{i}", events[i % EVENTS][1]),
            )
        for _ in range(WEBHOOKS):
            db.execute(
                "INSERT INTO webhooks (url, events, enabled) VALUES (%s, %s, true)",
                (receiver_url, '["sensor.threshold_exceeded"]'),
            )


def truncate(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("TRUNCATE datapoints")
        db.execute("CHECKPOINT")


def make_frames(events: list[tuple[int, str]], n: int) -> list[bytes]:
    return [
        orjson.dumps(
            {
                "datapoints": [
                    {"value": round(20 + 10 * math.sin(f + i), 3), "event_public_id": events[i % EVENTS][1]}
                    for i in range(FRAME_POINTS)
                ]
            }
        )
        for f in range(n)
    ]


def bench_copy_limit(url: str, events: list[tuple[int, str]], rows: int) -> float:
    row = struct.Struct(">hiqiiiid")
    base = int(time.time() * 1e6) - PG_EPOCH_US - rows
    batches = []
    for start in range(0, rows, BATCH_ROWS):
        buf = bytearray(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
        for k in range(start, min(start + BATCH_ROWS, rows)):
            buf += row.pack(4, 8, base + k, 4, events[k % EVENTS][0], -1, 8, float(k % 1000))
        buf += struct.pack(">h", -1)
        batches.append(bytes(buf))
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        for b in batches:
            with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
                copy.write(b)
            conn.commit()
        elapsed = time.perf_counter() - t0
    return rows / elapsed


def bench_python_path(url: str, events: list[tuple[int, str]], frames: list[bytes], rows: int) -> float:
    catalog = {public_id: (event_id, True) for event_id, public_id in events}
    last_us: dict[int, int] = {}
    with psycopg.connect(url) as conn:
        t0 = time.perf_counter()
        pending: list[tuple[datetime, int, None, float]] = []
        done = 0
        i = 0
        while done < rows:
            doc = orjson.loads(frames[i % len(frames)])
            i += 1
            now_us = time.time_ns() // 1000
            for dp in doc["datapoints"]:
                value = dp.get("value")
                if isinstance(value, str):
                    value = float(value)
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                entry = catalog.get(dp.get("event_public_id"))
                if entry is None or not entry[1]:
                    continue
                event_id = entry[0]
                us = max(now_us, last_us.get(event_id, 0) + 1)
                last_us[event_id] = us
                pending.append((EPOCH + timedelta(microseconds=us), event_id, None, float(value)))
            if len(pending) >= BATCH_ROWS or done + len(pending) >= rows:
                with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
                    copy.set_types(["timestamptz", "int4", "int4", "float8"])
                    for r in pending:
                        copy.write_row(r)
                conn.commit()
                done += len(pending)
                pending = []
        elapsed = time.perf_counter() - t0
    return done / elapsed


class Server(ServerProcess):
    """The server subprocess, optionally with the native telemetry listener on a second port."""

    def __init__(self, url: str, home: Path, native: bool, settings: dict[str, str] | None = None) -> None:
        self.native_port = free_port() if native else None
        listen = f"127.0.0.1:{self.native_port}" if native else ""
        super().__init__(url, home, {"WEBMACS_TELEMETRY_LISTEN": listen, **(settings or {})})


async def pump(
    url: str, frames: list[bytes], seconds: float, window: int, interval: float | None, latencies: list[float] | None
) -> int:
    """One connection: frames with seq, at most `window` unacknowledged; returns committed rows."""
    rows = 0
    sent_at: dict[int, float] = {}
    free = asyncio.Semaphore(window)
    async with connect(url, max_size=None, compression=None) as ws:

        async def acks() -> None:
            nonlocal rows
            async for msg in ws:
                m = orjson.loads(msg)
                if m.get("type") != "ack":
                    raise RuntimeError(f"unexpected message {m}")
                rows += m["accepted"]
                t = sent_at.pop(m["seq"])
                if latencies is not None:
                    latencies.append(time.perf_counter() - t)
                free.release()

        reader = asyncio.create_task(acks())
        deadline = time.perf_counter() + seconds
        seq = 0
        next_at = time.perf_counter()
        while time.perf_counter() < deadline:
            await free.acquire()
            if interval is not None:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            seq += 1
            frame = frames[seq % len(frames)]
            sent_at[seq] = time.perf_counter()
            await ws.send(b'{"seq":%d,' % seq + frame[1:])
        for _ in range(window):
            await asyncio.wait_for(free.acquire(), 120)
        reader.cancel()
    return rows


async def run_clients(
    url: str,
    frames: list[bytes],
    conns: int,
    seconds: float,
    window: int,
    interval: float | None = None,
    latencies: list[float] | None = None,
) -> tuple[int, float]:
    t0 = time.perf_counter()
    rows = await asyncio.gather(*(pump(url, frames, seconds, window, interval, latencies) for _ in range(conns)))
    return sum(rows), time.perf_counter() - t0


def build_wsload() -> Path | None:
    """The Rust load generator (core-rs/examples/wsload.rs), or None without cargo."""
    if shutil.which("cargo") is None:
        return None
    r = subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "wsload"], cwd=ROOT / "core-rs")
    if r.returncode != 0:
        return None
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT / "core-rs",
        capture_output=True,
        check=True,
    )
    path = Path(orjson.loads(meta.stdout)["target_directory"]) / "release" / "examples" / "wsload"
    return path if path.exists() else None


def wsload(
    binary: Path, url: str, events: list[tuple[int, str]], conns: int, seconds: float, window: int, points: int = 1
) -> float:
    """Run the Rust client; acknowledged (= committed) frames per second."""
    out = subprocess.run(
        [
            str(binary),
            url,
            "--events",
            ",".join(e[1] for e in events),
            "--connections",
            str(conns),
            "--seconds",
            str(seconds),
            "--window",
            str(window),
            "--points",
            str(points),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 180,
        check=True,
    ).stdout
    fields = dict(kv.split("=", 1) for kv in out.strip().splitlines()[-1].split()[1:])
    return float(fields["frames_per_s"])


def small_frames(server: Server, loader: Path, events: list[tuple[int, str]], seconds: float, setting: str) -> float:
    """100 connections of 1-point frames, 4 in flight each, Rust client: the Python endpoint, then the native
    listener; returns the native rate (the Python endpoint's without a listener)."""
    results: list[float] = []
    endpoints = [("Python endpoint", server.port)]
    if server.native_port is not None:
        endpoints.append(("native listener", server.native_port))
    for name, port in endpoints:
        url = f"ws://127.0.0.1:{port}/ws/controller/telemetry?token={server.token}"
        cpu0 = server.cpu_seconds()
        fps = wsload(loader, url, events, 100, seconds, 4)
        cpu = server.cpu_seconds() - cpu0
        vs = f"; {fps / results[0]:.2f}x the Python endpoint" if results else ""
        results.append(fps)
        print(
            f"small_frames {fps:>12,.0f} frames/s (100 connections, 1 point per frame, Rust client, {name},"
            f" {setting}; server CPU {cpu / (fps * seconds) * 1e6:.1f} µs/frame{vs})",
            flush=True,
        )
    return results[-1]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "30"))
    copy_rows = int(os.environ.get("BENCH_COPY_ROWS", "2000000"))
    python_rows = int(os.environ.get("BENCH_PYTHON_ROWS", "1000000"))
    window = int(os.environ.get("BENCH_WINDOW", "32"))
    home = Path(tempfile.mkdtemp(prefix="webmacs-bench-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    try:
        url = cluster.up()
        from webmacs.db import migrate

        migrate.apply(url, "1 day")
        events = setup_events(url)
        frames = make_frames(events, 64)

        truncate(url)
        copy_limit = bench_copy_limit(url, events, copy_rows)
        print(f"copy_limit   {copy_limit:>12,.0f} rows/s  ({copy_rows:,} rows, pre-encoded binary COPY)", flush=True)
        truncate(url)
        python_path = bench_python_path(url, events, frames, python_rows)
        print(
            f"python_path  {python_path:>12,.0f} rows/s  ({python_rows:,} rows, orjson + psycopg binary COPY)",
            flush=True,
        )

        from webmacs._core import Engine

        native = hasattr(Engine, "listen")
        loader = build_wsload()
        truncate(url)
        server = Server(url, home, native)
        try:
            ws_url = f"ws://127.0.0.1:{server.port}/ws/controller/telemetry?token={server.token}"
            cpu0 = server.cpu_seconds()
            rows, elapsed = asyncio.run(run_clients(ws_url, frames, 4, seconds, window))
            cpu = server.cpu_seconds() - cpu0
            engine = rows / elapsed
            stored = count_rows(url)
            print(
                f"engine       {engine:>12,.0f} rows/s  ({rows:,} acked rows in {elapsed:.1f} s, {stored:,} stored;"
                f" server CPU {cpu:.1f} s)",
                flush=True,
            )
            cpu_per_million = cpu / (rows / 1e6)

            small = [
                orjson.dumps({"datapoints": [{"value": 1.5, "event_public_id": events[i % EVENTS][1]}]})
                for i in range(EVENTS)
            ]
            small_s = min(seconds, 15)
            if loader is None:
                small_rows, small_elapsed = asyncio.run(run_clients(ws_url, small, 100, small_s, 4))
                small_fps = small_rows / small_elapsed
                print(
                    f"small_frames {small_fps:>12,.0f} frames/s (100 connections, 1 point per frame, Python client)",
                    flush=True,
                )
            else:
                small_fps = small_frames(server, loader, events, small_s, "engine defaults")
                if server.native_port is not None:
                    native_url = f"ws://127.0.0.1:{server.native_port}/ws/controller/telemetry?token={server.token}"
                    cpu0 = server.cpu_seconds()
                    native_fps = wsload(loader, native_url, events, 4, small_s, window, FRAME_POINTS)
                    cpu = server.cpu_seconds() - cpu0
                    native_rows = native_fps * FRAME_POINTS
                    print(
                        f"engine_native {native_rows:>11,.0f} rows/s  (4 connections of {FRAME_POINTS}-point"
                        f" frames, {window} in flight, Rust client, native listener; server CPU"
                        f" {cpu / (native_rows * small_s / 1e6):.2f} s per million rows)",
                        flush=True,
                    )

            latencies: list[float] = []
            per_conn_fps = engine / 2 / FRAME_POINTS / 4
            asyncio.run(
                run_clients(ws_url, frames, 4, min(seconds, 15), 64, interval=1 / per_conn_fps, latencies=latencies)
            )
            p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
            print(
                f"latency      p50 {p50:.1f} ms, p99 {p99:.1f} ms at {engine / 2:,.0f} rows/s (half max),"
                f" frame sent → ack after commit",
                flush=True,
            )
            peak_rss = server.peak_rss_mb()
        finally:
            server.stop()
        if loader is not None:
            # 400 frames in flight, each acknowledged after its commit: the rate is 400 / (batch age + COPY +
            # durable commit). Shorter batches and more writer connections shorten that cycle.
            server = Server(url, home, native, SMALL_FRAME_TUNING)
            try:
                small_fps = small_frames(
                    server, loader, events, small_s, "WEBMACS_INGEST_MAX_AGE_MS=2, WEBMACS_INGEST_WRITERS=4"
                )
            finally:
                server.stop()
        if os.environ.get("BENCH_RULES", "1") != "0":
            # Issue 5: the same engine phase with 100 matching rules and 10 webhook subscribers (deliveries to a
            # local receiver), both phases starting on an empty table.
            # The baseline is measured again right before, under the same conditions (the table has seen tens of
            # millions of rows by now), so the ratio compares like with like.
            receiver = WebhookReceiver()
            rates = []
            for with_rules in (False, True):
                truncate(url)
                if with_rules:
                    add_rules_and_webhooks(url, events, receiver.url)
                server = Server(url, home, False, {"WEBMACS_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"})
                try:
                    ws_url = f"ws://127.0.0.1:{server.port}/ws/controller/telemetry?token={server.token}"
                    rows, elapsed = asyncio.run(run_clients(ws_url, frames, 4, seconds, window))
                    rates.append(rows / elapsed)
                finally:
                    server.stop()
            receiver.close()
            print(
                f"rules        {rates[1]:>12,.0f} rows/s  ({RULES} matching rules, {WEBHOOKS} webhook subscribers,"
                f" {receiver.count:,} deliveries received) vs {rates[0]:,.0f} rows/s without;"
                f" ratio_with_rules={rates[1] / rates[0]:.2f}",
                flush=True,
            )
        print(
            f"ingest engine_rows_per_s={engine:.0f} copy_limit_rows_per_s={copy_limit:.0f}"
            f" python_rows_per_s={python_path:.0f} ratio_vs_copy={engine / copy_limit:.2f}"
            f" ratio_vs_python={engine / python_path:.2f} small_frames_per_s={small_fps:.0f}"
            f" p99_visible_ms={p99:.0f} cpu_s_per_million={cpu_per_million:.2f} peak_rss_mb={peak_rss:.0f}"
        )
        return 0
    finally:
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
