"""Soak: ingest at ~80 % of the measured maximum for a long time with everything else running, then report.

`make soak` (= `.venv/bin/python benches/soak.py`; `SOAK_SECONDS=600`, `SOAK_FRACTION=0.8`):
1. a throwaway cluster and a `webmacs serve` subprocess, 50 events, a webhook subscribed to `sensor.reading` and
   a threshold rule (deliveries to a receiver on 127.0.0.1), three live-stream subscribers plus one that never
   reads (it must be dropped, not hold up the others), an export every 20 s;
2. the maximum: the Rust load generator, 8 connections of 100-point frames, 16 in flight, 15 s;
3. the soak: the same generator paced at SOAK_FRACTION of that rate for SOAK_SECONDS, while the server's RSS, the
   queue depth and the oldest unacknowledged row are sampled every 5 s;
4. reconciliation: rows stored = rows acknowledged (every acknowledged row exactly once).
The last line: `soak seconds=… rate_rows_per_s=… rss_start_mb=… rss_end_mb=… rss_growth_pct=… p99_ms=…
max_queue_depth=… max_unacked_s=… acked=… stored=… lost=… unacknowledged_stored=… exports=… deliveries=…
reading_subscribers_starved=…`.
RSS growth compares the end with the RSS after the first minute (the allocator's warm-up is not growth).
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psycopg
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, free_port, setup_events
from webmacs.db import migrate
from webmacs.db.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent


def build_loader() -> Path:
    subprocess.run(["cargo", "build", "-q", "--release", "--example", "wsload"], cwd=ROOT, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release" / "examples" / "wsload"


def wsload(loader: Path, url: str, events: list[str], seconds: float, rate: float = 0.0) -> dict[str, float]:
    cmd = [
        str(loader),
        url,
        "--events",
        ",".join(events),
        "--connections",
        "8",
        "--seconds",
        str(seconds),
        "--window",
        "16",
        "--points",
        "100",
    ]
    if rate:
        cmd += ["--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300, check=True).stdout
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in out.strip().splitlines()[-1].split()[1:])}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Receiver(http.server.BaseHTTPRequestHandler):
    count = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        Receiver.count += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def subscriber(base: str, token: str, stop: threading.Event, counts: list[int], i: int, reads: bool) -> None:
    url = f"{base.replace('http://', 'ws://')}/ws/datapoints/stream?token={token}"
    try:
        # The client's own keepalive off: the one that never reads would otherwise give up on the server first.
        with connect(url, open_timeout=10, proxy=None, max_size=None, ping_interval=None) as ws:
            while not stop.is_set():
                if not reads:
                    time.sleep(0.5)  # never reads: the server must drop it, not wait for it
                    continue
                try:
                    ws.recv(timeout=1)
                    counts[i] += 1
                except TimeoutError:
                    continue
    except (ConnectionClosed, OSError):
        pass


def exporter(base: str, token: str, events: list[str], stop: threading.Event, done: list[int]) -> None:
    with httpx.Client(base_url=base, timeout=120) as c:
        while not stop.wait(20):
            end = time.time()
            params: list[tuple[str, str | int | float | bool | None]] = [("events", e) for e in events[:10]]
            params += [
                ("start", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end - 60))),
                ("end", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end))),
                ("format", "parquet" if done[0] % 2 else "csv"),
            ]
            with c.stream("GET", "/api/v1/export", params=params, headers={"Authorization": f"Bearer {token}"}) as r:
                for _ in r.iter_bytes():
                    pass
                if r.status_code == 200:
                    done[0] += 1


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    fraction = float(os.environ.get("SOAK_FRACTION", "0.8"))
    loader = build_loader()
    home = Path(tempfile.mkdtemp(prefix="webmacs-soak-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    server = None
    stop = threading.Event()
    try:
        url = cluster.up()
        migrate.apply(url, "1 day")
        events = [pid for _, pid in setup_events(url, 50, "soak")]
        server = ServerProcess(url, home, {"WEBMACS_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"})
        auth = {"Authorization": f"Bearer {server.token}"}
        with httpx.Client(base_url=server.base, timeout=30) as c:
            r = c.post(
                "/api/v1/webhooks",
                headers=auth,
                json={
                    "url": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                    "events": ["sensor.reading", "sensor.threshold_exceeded"],
                },
            )
            assert r.status_code == 201, r.text
            r = c.post(
                "/api/v1/rules",
                headers=auth,
                json={
                    "name": "soak-rule",
                    "event_public_id": events[0],
                    "operator": "gt",
                    "threshold": 1.0,
                    "action_type": "webhook",
                    "cooldown_seconds": 10,
                },
            )
            assert r.status_code == 201, r.text
        ws_url = f"ws://127.0.0.1:{server.port}/ws/controller/telemetry?token={server.token}"
        top = wsload(loader, ws_url, events, 15)
        rate_frames = fraction * top["frames_per_s"]
        print(f"maximum      {top['rows_per_s']:>12,.0f} rows/s (8 connections of 100-point frames, 16 in flight)")
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("TRUNCATE datapoints")

        counts = [0, 0, 0, 0]
        side = [
            threading.Thread(target=subscriber, args=(server.base, server.token, stop, counts, i, i < 3), daemon=True)
            for i in range(4)
        ]
        exports = [0]
        side.append(
            threading.Thread(target=exporter, args=(server.base, server.token, events, stop, exports), daemon=True)
        )
        for t in side:
            t.start()

        samples: list[tuple[float, float, int, float]] = []
        result: dict[str, float] = {}
        load = threading.Thread(target=lambda: result.update(wsload(loader, ws_url, events, seconds, rate_frames)))
        started = time.monotonic()
        load.start()
        with httpx.Client(base_url=server.base, timeout=30) as c:
            while load.is_alive():
                time.sleep(5)
                ingest = c.get("/health").json().get("ingest") or {}
                samples.append(
                    (
                        time.monotonic() - started,
                        rss_mb(server.proc.pid),
                        ingest.get("queue_depth", 0),
                        ingest.get("oldest_unacked_s") or 0.0,
                    )
                )
        load.join()
        stop.set()
        time.sleep(2)
        # No row can be stored twice: (event_id, time) is the table's unique key, and server times never repeat
        # per event. Exactly once is then: as many rows stored as acknowledged.
        with psycopg.connect(url) as db:
            row = db.execute("SELECT count(*) FROM datapoints").fetchone()
        assert row is not None
        stored = int(row[0])
        acked = int(result["rows"])
        warm = [rss for t, rss, _, _ in samples if t >= 60] or [s[1] for s in samples]
        rss_start, rss_end = warm[0], samples[-1][1]
        dropped = sum(1 for i in range(3) if counts[i] == 0)
        line = {
            "seconds": f"{seconds:.0f}",
            "rate_rows_per_s": f"{result['rows_per_s']:.0f}",
            "rss_start_mb": f"{rss_start:.0f}",
            "rss_end_mb": f"{rss_end:.0f}",
            "rss_growth_pct": f"{(rss_end - rss_start) / rss_start * 100:.1f}",
            "p99_ms": f"{result['p99_ms']:.1f}",
            "max_queue_depth": str(max(q for _, _, q, _ in samples)),
            "max_unacked_s": f"{max(u for _, _, _, u in samples):.2f}",
            "acked": str(acked),
            "stored": str(stored),
            "lost": str(max(0, acked - stored)),
            "unacknowledged_stored": str(max(0, stored - acked)),
            "exports": str(exports[0]),
            "deliveries": str(Receiver.count),
            "reading_subscribers_starved": str(dropped),
        }
        print(
            f"soak: {len(samples)} samples; RSS after the first minute {rss_start:.0f} MB, at the end {rss_end:.0f} MB"
        )
        print("soak " + " ".join(f"{k}={v}" for k, v in line.items()), flush=True)
        return 0 if acked == stored else 1
    finally:
        stop.set()
        if server is not None:
            server.stop()
        receiver.shutdown()
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
