"""Line-protocol benchmark: rows/s through `POST /api/v2/write` versus the WebSocket telemetry path, same run.

Runs a `webmacs serve` subprocess on its own throwaway TimescaleDB cluster. Both phases write the same number of
client-timestamped rows to the same 100 events (created by a first line-protocol write, so both paths feed the
same catalog entries), from BENCH_LP_CLIENTS concurrent senders (default 4), each waiting for its answer:
  lineproto   bodies of BENCH_LP_LINES lines (default 5,000; one float field per line), 204 after commit
  websocket   frames of 500 datapoints with `seq`, next frame after the ack (sent after commit)
The phases alternate over BENCH_LP_ROUNDS rounds (default 2) so load from elsewhere falls on both alike; the best
round of each is reported with the ratio. BENCH_LP_ROWS rows per phase (default 400,000).
The last line is machine-readable.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson
import psycopg
from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
from webmacs.db.cluster import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, free_port

SERIES = 100
FRAME = 500


def in_threads(n: int, work: list[list[bytes]], send: object) -> float:
    assert callable(send)
    errors: list[BaseException] = []

    def run(items: list[bytes]) -> None:
        try:
            send(items)
        except BaseException as e:  # reported after the phase
            errors.append(e)

    threads = [threading.Thread(target=run, args=(work[i],)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def main() -> int:
    rows = int(os.environ.get("BENCH_LP_ROWS", "400000"))
    lines = int(os.environ.get("BENCH_LP_LINES", "5000"))
    clients = int(os.environ.get("BENCH_LP_CLIENTS", "4"))
    rounds = int(os.environ.get("BENCH_LP_ROUNDS", "2"))
    home = Path(tempfile.mkdtemp(prefix="webmacs-lpbench-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    url = cluster.up()
    server = ServerProcess(url, home)
    try:
        with httpx.Client(base_url=server.base, timeout=120) as c:
            r = c.post(
                "/api/v1/tokens",
                headers={"Authorization": f"Bearer {server.token}"},
                json={"name": "bench", "scope": "write"},
            )
            r.raise_for_status()
            token = r.json()["token"]
            auth = {"Authorization": f"Token {token}"}
            base_ns = (time.time_ns() // 1000 - 10 * 24 * 3600 * 1_000_000) * 1000
            first = "\n".join(f"bench,rig=r{s} value=0 {base_ns}" for s in range(SERIES))
            c.post("/api/v2/write", headers=auth, content=first).raise_for_status()
        with psycopg.connect(url) as db:
            events = [
                str(r[0])
                for r in db.execute(
                    "SELECT e.public_id FROM events e WHERE e.name LIKE 'bench,rig=%% value' ORDER BY e.name"
                ).fetchall()
            ]
        assert len(events) == SERIES, events
        ws_url = f"ws://127.0.0.1:{server.port}/ws/controller/telemetry?token={token}"
        best = {"lineproto": 0.0, "websocket": 0.0}
        offset = 1
        for _ in range(rounds):
            # Line protocol: each row its own microsecond (no duplicates), spread over the series.
            bodies = [
                "\n".join(
                    f"bench,rig=r{i % SERIES} value={i % 1000 / 10} {base_ns + (offset + i) * 1000}"
                    for i in range(start, min(start + lines, rows))
                ).encode()
                for start in range(0, rows, lines)
            ]
            offset += rows

            def send_lp(items: list[bytes]) -> None:
                with httpx.Client(base_url=server.base, timeout=120) as c:
                    for b in items:
                        r = c.post("/api/v2/write", headers=auth, content=b)
                        assert r.status_code == 204, r.text

            elapsed = in_threads(clients, [bodies[i::clients] for i in range(clients)], send_lp)
            best["lineproto"] = max(best["lineproto"], rows / elapsed)
            print(f"lineproto  {rows / elapsed:>12,.0f} rows/s  ({rows:,} rows, {clients} clients)", flush=True)

            frames = []
            for n, start in enumerate(range(0, rows, FRAME)):
                pts = [
                    {
                        "value": i % 1000 / 10,
                        "event_public_id": events[i % SERIES],
                        "timestamp": (base_ns // 1000 + offset + i) / 1000,
                    }
                    for i in range(start, min(start + FRAME, rows))
                ]
                frames.append(orjson.dumps({"seq": n, "datapoints": pts}))
            offset += rows

            def send_ws(items: list[bytes]) -> None:
                with connect(ws_url, max_size=None, open_timeout=30) as ws:
                    for f in items:
                        ws.send(f)
                        reply = orjson.loads(ws.recv(timeout=120))
                        assert reply.get("type") == "ack" and reply["rejected"] == 0, reply

            elapsed = in_threads(clients, [frames[i::clients] for i in range(clients)], send_ws)
            best["websocket"] = max(best["websocket"], rows / elapsed)
            print(f"websocket  {rows / elapsed:>12,.0f} rows/s  ({rows:,} rows, {clients} clients)", flush=True)
        with psycopg.connect(url) as db:
            stored = db.execute("SELECT count(*) FROM datapoints").fetchone()
        assert stored is not None and stored[0] == SERIES + 2 * rows * rounds, stored
        ratio = best["lineproto"] / best["websocket"]
        print(f"best: lineproto {best['lineproto']:,.0f} rows/s, websocket {best['websocket']:,.0f} rows/s")
        print(
            orjson.dumps(
                {"lineproto_rows_s": round(best["lineproto"]), "ws_rows_s": round(best["websocket"]), "ratio": ratio}
            ).decode()
        )
    finally:
        server.stop()
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
