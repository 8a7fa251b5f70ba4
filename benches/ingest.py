"""Ingest benchmark: the engine on the API's own port vs the database's own ceiling and a careful Python path.

Runs on its own throwaway TimescaleDB cluster; `make bench-ingest`. Knobs (env): BENCH_SECONDS (each engine phase,
default 30), BENCH_COPY_ROWS (rows per ceiling configuration, default 2_000_000), BENCH_PYTHON_ROWS (default
1_000_000), BENCH_WINDOW (unacknowledged 500-point frames per connection at full rate, default 32), BENCH_RULES=0
skips the rules phase.
Phases (all WebSocket load comes from the Rust load generator, core-rs/examples/wsload.rs, on the API's port):
  copy_ceiling  the database's ceiling: pre-encoded binary COPY of the same rows into the same hypertable, 100k
                rows per transaction, on 1, 2 and 4 connections in parallel; the best is the denominator
  python_path   orjson parse + validate + psycopg binary COPY of the same frames (a careful pure-Python design)
  engine        the real server (`webmacs serve`, a subprocess): 4 connections of 500-point frames with `seq`,
                BENCH_WINDOW in flight each; rows counted from acks (= committed); server and database CPU per row
  levels        the same load paced at 10 %, 50 % and 90 % of the engine's rate: database and server CPU per row,
                p50/p99 from frame sent to its ack (sent after the commit, so this bounds sent → visible)
  small_frames  100 connections, 1 point per frame, 4 in flight each, on the API's port (the default path: uvicorn
                hands each socket to the engine) and on the engine's own port
  rules         the engine phase with 100 matching rules and 10 webhook subscribers vs a fresh baseline
The last line is machine-readable.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
from webmacs.db.cluster import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import ServerProcess, count_rows, free_port

ROOT = Path(__file__).resolve().parent.parent

EVENTS = 50
FRAME_POINTS = 500
BATCH_ROWS = 20_000
#: Rows per transaction of the ceiling: large, so per-statement and per-commit costs vanish.
COPY_BATCH = 100_000
PG_EPOCH_US = 946_684_800_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
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


def encode_rows(events: list[tuple[int, str]], start: int, n: int, base_us: int) -> bytes:
    """`n` rows as one binary COPY stream (distinct times per event)."""
    row = struct.Struct(">hiqiiiid")
    buf = bytearray(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
    for k in range(start, start + n):
        buf += row.pack(4, 8, base_us + k, 4, events[k % EVENTS][0], -1, 8, float(k % 1000))
    buf += struct.pack(">h", -1)
    return bytes(buf)


def bench_copy_ceiling(
    url: str, events: list[tuple[int, str]], rows: int, conns: int, cluster: Cluster
) -> tuple[float, float]:
    """Pre-encoded binary COPY of `rows` rows on `conns` connections in parallel, COPY_BATCH rows per transaction;
    returns (rows/s, database CPU µs per row)."""
    import threading

    base = int(time.time() * 1e6) - PG_EPOCH_US - rows - 10_000_000
    share = rows // conns
    streams = [
        [encode_rows(events, c * share + b, min(COPY_BATCH, share - b), base) for b in range(0, share, COPY_BATCH)]
        for c in range(conns)
    ]
    ready = threading.Barrier(conns + 1)
    # The backends' CPU time is read while they still exist (a closed connection's process is gone).
    done = threading.Barrier(conns + 1)
    measured = threading.Event()
    finished: list[float] = []

    def writer(batches: list[bytes]) -> None:
        with psycopg.connect(url) as conn:
            ready.wait()
            for b in batches:
                with conn.cursor() as cur, cur.copy(COPY_SQL) as copy:
                    copy.write(b)
                conn.commit()
            finished.append(time.perf_counter())
            done.wait()
            measured.wait()

    threads = [threading.Thread(target=writer, args=(st,)) for st in streams]
    for t in threads:
        t.start()
    ready.wait()
    db0, t0 = db_cpu_seconds(cluster), time.perf_counter()
    done.wait()
    db = db_cpu_seconds(cluster) - db0
    elapsed = max(finished) - t0
    measured.set()
    for t in threads:
        t.join()
    return share * conns / elapsed, db / (share * conns) * 1e6


def db_cpu_seconds(cluster: Cluster) -> float:
    """CPU time of every process of the cluster (postmaster, backends, WAL writer, checkpointer, …)."""
    pid_file = cluster.data_dir / "postmaster.pid"
    postmaster = int(pid_file.read_text().split()[0])
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1] is the parent pid; the postmaster itself counts too.
        if int(proc.name) == postmaster or int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    """The server subprocess, also listening on a port of the engine's own (WEBMACS_TELEMETRY_LISTEN)."""

    def __init__(self, url: str, home: Path, settings: dict[str, str] | None = None) -> None:
        self.native_port = free_port()
        super().__init__(url, home, {"WEBMACS_TELEMETRY_LISTEN": f"127.0.0.1:{self.native_port}", **(settings or {})})

    def ws_url(self, native: bool = False) -> str:
        port = self.native_port if native else self.port
        return f"ws://127.0.0.1:{port}/ws/controller/telemetry?token={self.token}"


def build_wsload() -> Path:
    """The Rust load generator (core-rs/examples/wsload.rs)."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "wsload"], cwd=ROOT / "core-rs", check=True)
    meta = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT / "core-rs",
        capture_output=True,
        check=True,
    )
    return Path(orjson.loads(meta.stdout)["target_directory"]) / "release" / "examples" / "wsload"


def wsload(
    binary: Path,
    url: str,
    events: list[tuple[int, str]],
    *,
    conns: int,
    seconds: float,
    window: int,
    points: int = 1,
    rate: float = 0.0,
) -> dict[str, float]:
    """Run the Rust client; its last line as numbers (frames_per_s, rows_per_s, p50_ms, p99_ms, …)."""
    cmd = [
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
    ]
    if rate:
        cmd += ["--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300, check=True).stdout
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in out.strip().splitlines()[-1].split()[1:])}


@dataclass
class Measured:
    rows_per_s: float
    server_us_per_row: float
    db_us_per_row: float
    p50_ms: float
    p99_ms: float


def measure(server: Server, cluster: Cluster, run: Callable[[], dict[str, float]]) -> Measured:
    cpu0, db0 = server.cpu_seconds(), db_cpu_seconds(cluster)
    r = run()
    rows = r["rows"]
    return Measured(
        r["rows_per_s"],
        (server.cpu_seconds() - cpu0) / rows * 1e6,
        (db_cpu_seconds(cluster) - db0) / rows * 1e6,
        r["p50_ms"],
        r["p99_ms"],
    )


@contextlib.contextmanager
def throwaway_cluster(prefix: str) -> Iterator[tuple[Path, Cluster, str]]:
    """A fresh, migrated cluster in a temporary home, as (home, cluster, url); destroyed afterwards."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    try:
        url = cluster.up()
        from webmacs.db import migrate

        migrate.apply(url, "1 day")
        yield home, cluster, url
    finally:
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "30"))
    copy_rows = int(os.environ.get("BENCH_COPY_ROWS", "2000000"))
    python_rows = int(os.environ.get("BENCH_PYTHON_ROWS", "1000000"))
    window = int(os.environ.get("BENCH_WINDOW", "32"))
    loader = build_wsload()
    home = Path(tempfile.mkdtemp(prefix="webmacs-bench-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    try:
        url = cluster.up()
        from webmacs.db import migrate

        migrate.apply(url, "1 day")
        events = setup_events(url)
        frames = make_frames(events, 64)

        ceiling = {}
        for conns in (1, 2, 4):
            truncate(url)
            rate, db_us = bench_copy_ceiling(url, events, copy_rows, conns, cluster)
            ceiling[conns] = rate
            print(
                f"copy_ceiling {rate:>12,.0f} rows/s  ({copy_rows:,} pre-encoded rows, {conns} connection(s),"
                f" {COPY_BATCH:,} rows per transaction; database CPU {db_us:.2f} µs/row)",
                flush=True,
            )
        copy_ceiling = max(ceiling.values())
        copy_limit = ceiling[1]
        truncate(url)
        python_path = bench_python_path(url, events, frames, python_rows)
        print(
            f"python_path  {python_path:>12,.0f} rows/s  ({python_rows:,} rows, orjson + psycopg binary COPY)",
            flush=True,
        )

        truncate(url)
        server = Server(url, home)
        try:
            server.reset_peak_rss()
            full = measure(
                server,
                cluster,
                lambda: wsload(
                    loader, server.ws_url(), events, conns=4, seconds=seconds, window=window, points=FRAME_POINTS
                ),
            )
            stored = count_rows(url)
            print(
                f"engine       {full.rows_per_s:>12,.0f} rows/s  (4 connections of {FRAME_POINTS}-point frames,"
                f" {window} in flight, API port; {stored:,} stored; server CPU {full.server_us_per_row:.2f} µs/row,"
                f" database CPU {full.db_us_per_row:.2f} µs/row; ratio to the ceiling"
                f" {full.rows_per_s / copy_ceiling:.2f})",
                flush=True,
            )
            levels: dict[int, Measured] = {}
            for pct in (10, 50, 90):
                frames_per_s = full.rows_per_s * pct / 100 / FRAME_POINTS

                def paced(fps: float = frames_per_s) -> dict[str, float]:
                    return wsload(
                        loader,
                        server.ws_url(),
                        events,
                        conns=4,
                        seconds=min(seconds, 20),
                        window=256,
                        points=FRAME_POINTS,
                        rate=fps,
                    )

                m = measure(server, cluster, paced)
                levels[pct] = m
                print(
                    f"level {pct:>3} %  {m.rows_per_s:>11,.0f} rows/s  database CPU {m.db_us_per_row:.2f} µs/row,"
                    f" server CPU {m.server_us_per_row:.2f} µs/row, frame → ack p50 {m.p50_ms:.1f} ms,"
                    f" p99 {m.p99_ms:.1f} ms",
                    flush=True,
                )
            small_s = min(seconds, 15)
            small = {}
            for native in (False, True):
                cpu0 = server.cpu_seconds()
                r = wsload(loader, server.ws_url(native), events, conns=100, seconds=small_s, window=4)
                small[native] = r["frames_per_s"]
                print(
                    f"small_frames {r['frames_per_s']:>12,.0f} frames/s (100 connections, 1 point per frame,"
                    f" 4 in flight, {'engine port' if native else 'API port'}; server CPU"
                    f" {(server.cpu_seconds() - cpu0) / r['frames'] * 1e6:.1f} µs/frame, p99 {r['p99_ms']:.1f} ms)",
                    flush=True,
                )
            peak_rss = server.peak_rss_mb()
        finally:
            server.stop()
        ratio_with_rules = float("nan")
        if os.environ.get("BENCH_RULES", "1") != "0":
            # Issue 5: the engine phase with 100 matching rules and 10 webhook subscribers (deliveries to a local
            # receiver), against a baseline measured again right before under the same conditions.
            receiver = WebhookReceiver()
            rates = []
            for with_rules in (False, True):
                truncate(url)
                if with_rules:
                    add_rules_and_webhooks(url, events, receiver.url)
                server = Server(url, home, {"WEBMACS_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"})
                try:
                    r = wsload(
                        loader, server.ws_url(), events, conns=4, seconds=seconds, window=window, points=FRAME_POINTS
                    )
                    rates.append(r["rows_per_s"])
                finally:
                    server.stop()
            receiver.close()
            ratio_with_rules = rates[1] / rates[0]
            print(
                f"rules        {rates[1]:>12,.0f} rows/s  ({RULES} matching rules, {WEBHOOKS} webhook subscribers,"
                f" {receiver.count:,} deliveries received) vs {rates[0]:,.0f} rows/s without;"
                f" ratio_with_rules={ratio_with_rules:.2f}",
                flush=True,
            )
        engine = full.rows_per_s
        print(
            f"ingest engine_rows_per_s={engine:.0f} copy_ceiling_rows_per_s={copy_ceiling:.0f}"
            f" ratio_vs_ceiling={engine / copy_ceiling:.2f} db_cpu_us_per_row={levels[50].db_us_per_row:.2f}"
            f" server_cpu_us_per_row={full.server_us_per_row:.2f} default_small_frames_per_s={small[False]:.0f}"
            f" p99_half_ms={levels[50].p99_ms:.1f} p99_90_ms={levels[90].p99_ms:.1f} peak_rss_mb={peak_rss:.0f}"
            f" copy_limit_rows_per_s={copy_limit:.0f} python_rows_per_s={python_path:.0f}"
            f" ratio_vs_copy={engine / copy_limit:.2f} ratio_vs_python={engine / python_path:.2f}"
            f" small_frames_per_s={max(small.values()):.0f} p99_visible_ms={levels[50].p99_ms:.0f}"
            f" cpu_s_per_million={full.server_us_per_row:.2f} ratio_with_rules={ratio_with_rules:.2f}"
        )
        return 0
    finally:
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
