"""One-point frames on the API's port (100 connections, 4 in flight each), server and database CPU per frame:
the A/B driver for changes to the per-frame path (run it on the build before and after).

    .venv/bin/python benches/small_frames.py LABEL

Knobs (env): BENCH_ROUNDS (default 3), BENCH_SECONDS (per round, default 10).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as bench


def main() -> int:
    label = sys.argv[1] if len(sys.argv) > 1 else "run"
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    loader = bench.build_wsload()
    with bench.throwaway_cluster("webmacs-small-") as (home, cluster, url):
        events = bench.setup_events(url)
        server = bench.Server(url, home)
        try:
            bench.wsload(loader, server.ws_url(), events, conns=100, seconds=3, window=4)  # warm-up
            for i in range(rounds):
                cpu0, db0 = server.cpu_seconds(), bench.db_cpu_seconds(cluster)
                r = bench.wsload(loader, server.ws_url(), events, conns=100, seconds=seconds, window=4)
                server_us = (server.cpu_seconds() - cpu0) / r["frames"] * 1e6
                db_us = (bench.db_cpu_seconds(cluster) - db0) / r["frames"] * 1e6
                print(
                    f"{label} round {i}: {r['frames_per_s']:,.0f} frames/s, server {server_us:.1f} µs/frame,"
                    f" db {db_us:.1f} µs/frame, p99 {r['p99_ms']:.1f} ms",
                    flush=True,
                )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
