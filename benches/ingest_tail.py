"""Where the ack latency tail comes from: 500-point frames paced at a fixed rate, per-round p50/p99 with the
checkpoints and WAL written in the round, on a throwaway cluster in one of three configurations.

    .venv/bin/python benches/ingest_tail.py [ROWS_PER_S] [default|bigwal|asynccommit]

`bigwal` sets max_wal_size = 32GB (no checkpoint can start in a round); `asynccommit` sets synchronous_commit =
off — a diagnosis only (commits stop waiting for the WAL flush, so acks would promise less than durability).
Knobs (env): BENCH_ROUNDS (default 3), BENCH_SECONDS (per round, default 15).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as bench

VARIANTS = {
    "default": None,
    "bigwal": "ALTER SYSTEM SET max_wal_size = '32GB'",
    "asynccommit": "ALTER SYSTEM SET synchronous_commit = off",
}
WAL_AND_CHECKPOINTS = "SELECT checkpoints_timed + checkpoints_req, pg_current_wal_lsn() FROM pg_stat_bgwriter"


def main() -> int:
    rate = float(sys.argv[1]) if len(sys.argv) > 1 else 437_000.0
    variant = sys.argv[2] if len(sys.argv) > 2 else "default"
    rounds = int(os.environ.get("BENCH_ROUNDS", "3"))
    seconds = float(os.environ.get("BENCH_SECONDS", "15"))
    loader = bench.build_wsload()
    with bench.throwaway_cluster("webmacs-tail-") as (home, cluster, url):
        setting = VARIANTS[variant]
        if setting:
            with psycopg.connect(url, autocommit=True) as c:
                c.execute(setting)
                c.execute("SELECT pg_reload_conf()")
        events = bench.setup_events(url)
        server = bench.Server(url, home)
        try:
            bench.wsload(loader, server.ws_url(), events, conns=4, seconds=3, window=32, points=bench.FRAME_POINTS)
            for i in range(rounds):
                with psycopg.connect(url, autocommit=True) as c:
                    before = c.execute(WAL_AND_CHECKPOINTS).fetchone()
                m = bench.measure(
                    server,
                    cluster,
                    lambda: bench.wsload(
                        loader,
                        server.ws_url(),
                        events,
                        conns=4,
                        seconds=seconds,
                        window=256,
                        points=bench.FRAME_POINTS,
                        rate=rate / bench.FRAME_POINTS,
                    ),
                )
                with psycopg.connect(url, autocommit=True) as c:
                    after = c.execute(WAL_AND_CHECKPOINTS).fetchone()
                    assert before is not None and after is not None
                    wal = c.execute("SELECT pg_wal_lsn_diff(%s, %s)", (after[1], before[1])).fetchone()
                wal_mib = float(wal[0] if wal else 0) / 2**20
                print(
                    f"{variant} round {i}: checkpoints {after[0] - before[0]} wal {wal_mib:.0f} MiB;"
                    f" {m.rows_per_s:,.0f} rows/s p50 {m.p50_ms:.1f} ms p99 {m.p99_ms:.1f} ms",
                    flush=True,
                )
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
