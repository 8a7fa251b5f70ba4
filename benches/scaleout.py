"""Scale-out benchmark: `webmacs serve --workers 1` vs `--workers 2` side by side, and a capacity model.

`make bench-scaleout`. Knobs (env): BENCH_SECONDS (each phase, default 20), BENCH_DB_CORES (database cores of the
modelled node, default 8).
For each worker count, on one throwaway cluster and the same load generator (core-rs/examples/wsload.rs):
  bulk    4 connections of 500-point frames, 32 unacknowledged frames each: rows/s, server CPU (all workers) and
          database CPU per row
  small   100 connections of 1-point frames, 4 unacknowledged each: frames/s and server CPU per frame
The capacity model then predicts rows/s for 1, 2, 4, 8 ingest processes (each with a core of its own) in front of one
database node: min(N × 1e6 / server µs per row, DB cores × 1e6 / DB µs per row). The last line is machine-readable.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
from webmacs.db.cluster import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ServerProcess, free_port
from ingest import build_wsload, db_cpu_seconds, setup_events, truncate, wsload


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process and all its descendants (the uvicorn supervisor and its workers)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(proc.name)] = int(fields[1])
        times[int(proc.name)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid, t in times.items():
        p = pid
        while p not in (0, 1):
            if p == root:
                total += t
                break
            p = parents.get(p, 0)
    return total


def phase(
    loader: Path, server: ServerProcess, cluster: Cluster, events: list[tuple[int, str]], **kw: Any
) -> dict[str, float]:
    url = f"ws://127.0.0.1:{server.port}/ws/controller/telemetry?token={server.token}"
    cpu0, db0 = tree_cpu_seconds(server.proc.pid), db_cpu_seconds(cluster)
    r = wsload(loader, url, events, **kw)
    frames = r["frames"]
    return {
        "rows_per_s": r["rows_per_s"],
        "frames_per_s": r["frames_per_s"],
        "server_us_per_row": (tree_cpu_seconds(server.proc.pid) - cpu0) / r["rows"] * 1e6,
        "server_us_per_frame": (tree_cpu_seconds(server.proc.pid) - cpu0) / frames * 1e6,
        "db_us_per_row": (db_cpu_seconds(cluster) - db0) / r["rows"] * 1e6,
        "p99_ms": r["p99_ms"],
    }


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "20"))
    db_cores = float(os.environ.get("BENCH_DB_CORES", "8"))
    loader = build_wsload()
    home = Path(tempfile.mkdtemp(prefix="webmacs-bench-scale-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    results: dict[int, dict[str, dict[str, float]]] = {}
    try:
        url = cluster.up()
        from webmacs.db import migrate

        migrate.apply(url)
        events = setup_events(url)
        for workers in (1, 2):
            server = ServerProcess(url, home, {"WEBMACS_WORKERS": str(workers)})
            try:
                truncate(url)
                bulk = phase(loader, server, cluster, events, conns=4, seconds=seconds, window=32, points=500)
                small = phase(loader, server, cluster, events, conns=100, seconds=seconds, window=4, points=1)
            finally:
                server.stop()
            results[workers] = {"bulk": bulk, "small": small}
            print(
                f"workers={workers}: bulk {bulk['rows_per_s']:,.0f} rows/s, server {bulk['server_us_per_row']:.2f} "
                f"µs/row, DB {bulk['db_us_per_row']:.2f} µs/row, p99 {bulk['p99_ms']:.0f} ms | small "
                f"{small['frames_per_s']:,.0f} frames/s, server {small['server_us_per_frame']:.1f} µs/frame, DB "
                f"{small['db_us_per_row']:.1f} µs/row",
                flush=True,
            )
    finally:
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)

    one = results[1]
    print(f"\ncapacity model (one database node with {db_cores:g} cores; each ingest process with one core):")
    print("| processes | 500-point frames, rows/s | 1-point frames, frames/s | limit |")
    print("|---|---|---|---|")
    db_bulk = db_cores * 1e6 / one["bulk"]["db_us_per_row"]
    db_small = db_cores * 1e6 / one["small"]["db_us_per_row"]
    model = {}
    for n in (1, 2, 4, 8):
        srv_bulk = n * 1e6 / one["bulk"]["server_us_per_row"]
        srv_small = n * 1e6 / one["small"]["server_us_per_frame"]
        rows, frames = min(srv_bulk, db_bulk), min(srv_small, db_small)
        model[n] = rows
        limit = "database" if db_bulk < srv_bulk else "ingest processes"
        print(f"| {n} | {rows:,.0f} | {frames:,.0f} | {limit} |")
    speedup_bulk = results[2]["bulk"]["rows_per_s"] / one["bulk"]["rows_per_s"]
    speedup_small = results[2]["small"]["frames_per_s"] / one["small"]["frames_per_s"]
    print(
        "scaleout "
        + " ".join(
            [
                f"w1_rows_per_s={one['bulk']['rows_per_s']:.0f}",
                f"w2_rows_per_s={results[2]['bulk']['rows_per_s']:.0f}",
                f"w1_small_frames_per_s={one['small']['frames_per_s']:.0f}",
                f"w2_small_frames_per_s={results[2]['small']['frames_per_s']:.0f}",
                f"speedup_bulk={speedup_bulk:.2f}",
                f"speedup_small={speedup_small:.2f}",
                f"server_us_per_row={one['bulk']['server_us_per_row']:.3f}",
                f"server_us_per_small_frame={one['small']['server_us_per_frame']:.2f}",
                f"db_us_per_row={one['bulk']['db_us_per_row']:.3f}",
                *(f"model_{n}_rows_per_s={v:.0f}" for n, v in model.items()),
            ]
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
