"""Analyst benchmark: series and exports through the API vs the same SQL / COPY TO STDOUT directly.

Runs on its own throwaway TimescaleDB cluster; `make bench-query`. Knobs (env): BENCH_EVENTS (default 100),
BENCH_POINTS (per event, default 100_000), BENCH_REPEAT (series requests timed, default 30).
Data: every event gets BENCH_POINTS datapoints evenly over the last 30 days, generated through the ingest engine
(`webmacs._core.Engine`, client timestamps) when it is available and works, else by COPY.
Phases:
  series      GET /api/v1/series, one event, 30 days in 2592 s buckets (1,000 points), median of BENCH_REPEAT
              vs the same time_bucket SQL (checked identical) on one psycopg connection, interleaved (ratio = API / SQL)
  series_long GET /api/v1/series without a bucket, one event's 30 days (BENCH_POINTS raw datapoints,
              100 × max_points by default) thinned to max_points=1000 by m4, minmax and lttb (from the
              datapoint cells: sql/0041), median of BENCH_REPEAT each, vs the raw SQL an analyst would run for
              the same data (`SELECT time, value … ORDER BY time`, fetched by psycopg), interleaved; m4 and
              minmax are checked equal to the downsample of the raw rows. speedup = SQL / API, the smallest of
              the three modes
  export      the whole table through GET /api/v1/export as Parquet and as CSV (the server is a subprocess;
              its peak RSS during each export is reported: export_peak_rss_mb is the Parquet export's,
              csv_peak_rss_mb the CSV export's) vs `COPY … TO STDOUT` read by psycopg, timed before and after
              the exports (the faster of the two is the baseline)
The last line is machine-readable.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
from webmacs.db.cluster import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import ServerProcess, count_rows, free_port

DAYS = 30
BUCKET_S = 2592  # 30 days / 1,000
SERIES_SQL = (
    "SELECT time_bucket(%s::interval, time, %s::text) AS bucket, avg(value) FROM datapoints"
    " WHERE event_id = %s AND time >= %s AND time < %s GROUP BY 1 ORDER BY 1"
)


def setup_events(url: str, n: int) -> list[tuple[int, str]]:
    return common.setup_events(url, n, "query-bench")


def generate_with_engine(url: str, events: list[tuple[int, str]], points: int, end_ms: int) -> float:
    """Frames of 500 datapoints with client timestamps (epoch ms) through the engine; returns seconds."""
    from webmacs import _core

    step_ms = DAYS * 86_400_000 // points
    per_frame = max(1, _core.MAX_FRAME_DATAPOINTS // len(events))
    engine = _core.Engine(url)
    try:
        engine.refresh_catalog()
        t0 = time.perf_counter()
        ticket = 0
        for k0 in range(0, points, per_frame):
            frame = orjson.dumps(
                {
                    "datapoints": [
                        {
                            "value": (k * 7 + i) % 1000 / 10,
                            "event_public_id": pid,
                            "timestamp": end_ms - (points - k) * step_ms,
                        }
                        for k in range(k0, min(points, k0 + per_frame))
                        for i, (_, pid) in enumerate(events)
                    ]
                }
            )
            while True:
                try:
                    receipt = engine.submit(frame)
                    break
                except _core.QueueFullError:
                    time.sleep(0.002)
            if receipt.rejected:
                raise RuntimeError(f"engine rejected datapoints: {receipt.reasons}")
            ticket = receipt.ticket
        while engine.committed_ticket() < ticket:
            time.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        engine.close()


def generate_with_copy(url: str, events: list[tuple[int, str]], points: int, end_ms: int) -> float:
    step_ms = DAYS * 86_400_000 // points
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("TRUNCATE datapoints")
        for i, (event_id, _) in enumerate(events):
            # Server-side rows streamed into COPY-equivalent bulk insert: one statement per event.
            db.execute(
                "INSERT INTO datapoints (time, event_id, value)"
                " SELECT to_timestamp((%s::int8 - (%s::int8 - k) * %s::int8) / 1000.0),"
                " %s, ((k * 7 + %s) %% 1000) / 10.0 FROM generate_series(0, %s - 1) k",
                (end_ms, points, step_ms, event_id, i, points),
            )
        # Written around the engine: the datapoint cells of what was written (sql/0041).
        db.execute("SELECT refresh_datapoint_cells(array(SELECT id FROM events), min(time), max(time)) FROM datapoints")
    return time.perf_counter() - t0


Server = ServerProcess


def bench_series(
    url: str, server: Server, event: tuple[int, str], start: datetime, end: datetime, repeat: int
) -> tuple[float, float, int]:
    """Medians of `repeat` API requests and `repeat` direct queries, interleaved (one of each in turn, after two
    warm-ups of each), so load from elsewhere on the machine falls on both alike. The direct query runs on one
    psycopg connection with the API pool's session settings (timezone=UTC) and binary results like the API's."""
    params = {
        "events": event[1],
        "start": start.isoformat(),
        "end": end.isoformat(),
        "bucket": f"{BUCKET_S}s",
        "agg": "avg",
    }
    api_ms: list[float] = []
    sql_ms: list[float] = []
    points = -1
    with (
        httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {server.token}"}, timeout=60) as c,
        psycopg.connect(url, options="-c timezone=UTC") as db,
    ):
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            r = c.get("/api/v1/series", params=params)
            elapsed = (time.perf_counter() - t0) * 1000
            r.raise_for_status()
            points = len(r.json()["events"][event[1]]["points"])
            if i >= 2:  # two warm-up requests
                api_ms.append(elapsed)
            t0 = time.perf_counter()
            rows = (
                db.cursor(binary=True)
                .execute(SERIES_SQL, (f"{BUCKET_S} seconds", "UTC", event[0], start, end))
                .fetchall()
            )
            elapsed = (time.perf_counter() - t0) * 1000
            assert len(rows) == points
            if i >= 2:
                sql_ms.append(elapsed)
    return statistics.median(api_ms), statistics.median(sql_ms), points


RAW_SQL = "SELECT time, value FROM datapoints WHERE event_id = %s AND time >= %s AND time < %s ORDER BY time"
LONG_MAX_POINTS = 1000


def bench_series_long(
    url: str, server: Server, event: tuple[int, str], start: datetime, end: datetime, repeat: int, mode: str
) -> tuple[float, float, int, int]:
    """Medians of `repeat` thinned API requests without a bucket and `repeat` raw-SQL reads of the same
    datapoints, interleaved after two warm-ups of each; returns (API ms, SQL ms, points, raw rows)."""
    from webmacs.services import series as series_service

    params = {
        "events": event[1],
        "start": start.isoformat(),
        "end": end.isoformat(),
        "mode": mode,
        "max_points": str(LONG_MAX_POINTS),
    }
    api_ms: list[float] = []
    sql_ms: list[float] = []
    got: list[list[object]] = []
    rows: list[tuple[datetime, float]] = []
    with (
        httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {server.token}"}, timeout=60) as c,
        psycopg.connect(url, options="-c timezone=UTC") as db,
    ):
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            r = c.get("/api/v1/series", params=params)
            elapsed = (time.perf_counter() - t0) * 1000
            r.raise_for_status()
            got = r.json()["events"][event[1]]["points"]
            if i >= 2:
                api_ms.append(elapsed)
            t0 = time.perf_counter()
            rows = db.cursor(binary=True).execute(RAW_SQL, (event[0], start, end)).fetchall()
            elapsed = (time.perf_counter() - t0) * 1000
            if i >= 2:
                sql_ms.append(elapsed)
    if mode in ("m4", "minmax"):
        # The pre-selected answer is the downsample of every raw row.
        whole = series_service.downsample(series_service.packed(rows), LONG_MAX_POINTS, mode)  # type: ignore[arg-type]
        expected = [[p.time.isoformat(), p.value] for p in whole]
        if [[datetime.fromisoformat(str(t)).isoformat(), v] for t, v in got] != expected:
            raise RuntimeError(f"series {mode}: the API's points differ from the downsample of the raw rows")
    return statistics.median(api_ms), statistics.median(sql_ms), len(got), len(rows)


def bench_export(server: Server, events: list[tuple[int, str]], fmt: str, rows: int) -> tuple[float, int, float]:
    """Rows/s, bytes and seconds of one whole-table export as the client downloads it; checks that every row
    arrived (CSV lines, Parquet metadata)."""
    import io

    import pyarrow.parquet as pq

    params = {"events": [pid for _, pid in events], "format": fmt}
    received = lines = 0
    parquet = bytearray()
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {server.token}"}, timeout=600) as c:
        t0 = time.perf_counter()
        with c.stream("GET", "/api/v1/export", params=params) as r:
            r.raise_for_status()
            for piece in r.iter_raw():
                received += len(piece)
                if fmt == "csv":
                    lines += piece.count(b"\n")
                else:
                    parquet += piece  # compressed: a few MB for the whole table
        elapsed = time.perf_counter() - t0
    got = lines - 1 if fmt == "csv" else pq.ParquetFile(io.BytesIO(bytes(parquet))).metadata.num_rows
    if got != rows:
        raise RuntimeError(f"{fmt} export returned {got:,} rows, expected {rows:,}")
    return rows / elapsed, received, elapsed


COPY_CPU: list[float] = []  # client CPU seconds of each bench_copy_to


def bench_copy_to(url: str, rows: int) -> float:
    with psycopg.connect(url) as db, db.cursor() as cur:
        c0 = time.process_time()
        t0 = time.perf_counter()
        n = 0
        with cur.copy(
            "COPY (SELECT time, event_id, experiment_id, value FROM datapoints) TO STDOUT (FORMAT binary)"
        ) as copy:
            for _ in copy:
                n += 1
        elapsed = time.perf_counter() - t0
        COPY_CPU.append(time.process_time() - c0)
    assert n >= rows  # one message per row, plus header/trailer
    return rows / elapsed


def main() -> int:
    n_events = int(os.environ.get("BENCH_EVENTS", "100"))
    points = int(os.environ.get("BENCH_POINTS", "100000"))
    repeat = int(os.environ.get("BENCH_REPEAT", "30"))
    from webmacs.repositories import series as series_repo

    api_sql = series_repo.BUCKETED_SQL.format(agg=series_repo.AGGREGATES["avg"]).as_string()
    if api_sql != SERIES_SQL:
        raise RuntimeError(f"the API's bucket query differs from the one compared with: {api_sql}")
    home = Path(tempfile.mkdtemp(prefix="webmacs-bench-query-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    try:
        url = cluster.up()
        from webmacs.db import migrate

        migrate.apply(url, "1 day")
        events = setup_events(url, n_events)
        end = datetime.now(UTC).replace(microsecond=0)
        end_ms = int(end.timestamp() * 1000)
        total = n_events * points
        try:
            seconds = generate_with_engine(url, events, points, end_ms)
            how = "engine (client timestamps)"
            if count_rows(url) != total:
                raise RuntimeError(f"engine stored {count_rows(url):,} of {total:,} rows")
        except Exception as e:  # the engine is optional here: the benchmark measures the read side
            print(f"engine generation unavailable ({e}); using COPY", flush=True)
            seconds = generate_with_copy(url, events, points, end_ms)
            how = "server-side bulk insert"
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("VACUUM ANALYZE datapoints")
            # Steady state: the cells' partial rows merged (the server's upkeep would do it while measuring).
            t0 = time.perf_counter()
            db.execute("SELECT compact_datapoint_cells('-infinity', 100000000)")
            db.execute("VACUUM ANALYZE datapoint_cells")
            print(f"cells        partial rows merged in {time.perf_counter() - t0:.1f} s", flush=True)
        print(
            f"data         {total:,} datapoints ({n_events} events × {points:,}, {DAYS} days) via {how}"
            f" in {seconds:.1f} s",
            flush=True,
        )

        copy_before = bench_copy_to(url, total)
        server = Server(url, home)
        try:
            # 1,000 whole buckets: align to time_bucket's default origin (2000-01-03 00:00 UTC).
            origin = datetime(2000, 1, 3, tzinfo=UTC)
            start = origin + (end - timedelta(days=DAYS) - origin) // timedelta(seconds=BUCKET_S) * timedelta(
                seconds=BUCKET_S
            )
            series_ms, series_sql_ms, n_points = bench_series(
                url, server, events[0], start, start + timedelta(seconds=1000 * BUCKET_S), repeat
            )
            print(
                f"series       API {series_ms:.1f} ms vs SQL {series_sql_ms:.1f} ms ({n_points} buckets, median of"
                f" {repeat})",
                flush=True,
            )
            long: dict[str, tuple[float, float, int, int]] = {}
            for mode in ("m4", "minmax", "lttb"):
                long[mode] = bench_series_long(url, server, events[0], end - timedelta(days=DAYS), end, repeat, mode)
                api_l, sql_l, n_l, raw_l = long[mode]
                print(
                    f"series_long  {mode:<6} API {api_l:.1f} ms vs raw SQL {sql_l:.1f} ms ({raw_l:,} datapoints"
                    f" → {n_l} points, {raw_l / LONG_MAX_POINTS:.0f} × max_points; speedup {sql_l / api_l:.2f})",
                    flush=True,
                )
            long_speedup = min(sql_l / api_l for api_l, sql_l, _, _ in long.values())
            idle = server.peak_rss_mb()
            server.reset_peak_rss()
            cpu0 = server.cpu_seconds()
            parquet, parquet_bytes, parquet_s = bench_export(server, events, "parquet", total)
            peak = server.peak_rss_mb()
            parquet_cpu_us = (server.cpu_seconds() - cpu0) / total * 1e6
            print(
                f"parquet      {parquet:>12,.0f} rows/s ({parquet_bytes / 1e6:,.1f} MB,"
                f" {parquet_bytes / 1e6 / parquet_s:,.1f} MB/s over HTTP; server peak RSS {peak:.0f} MB,"
                f" {idle:.0f} MB before; server CPU {parquet_cpu_us:.2f} µs/row)",
                flush=True,
            )
            server.reset_peak_rss()
            csv, csv_bytes, csv_s = bench_export(server, events, "csv", total)
            csv_peak = server.peak_rss_mb()
            print(
                f"csv          {csv:>12,.0f} rows/s ({csv_bytes / 1e6:,.0f} MB, {csv_bytes / 1e6 / csv_s:,.1f} MB/s;"
                f" server peak RSS {csv_peak:.0f} MB)",
                flush=True,
            )
        finally:
            server.stop()
        copy_after = bench_copy_to(url, total)
        covering = ""
        if os.environ.get("BENCH_COVERING") == "1":
            # Not the schema: what an index covering `value` would change for long ranges (both sides).
            with psycopg.connect(url, autocommit=True) as db:
                t0 = time.perf_counter()
                db.execute("CREATE INDEX bench_covering ON datapoints (event_id, time) INCLUDE (value)")
                db.execute("VACUUM ANALYZE datapoints")
                built = time.perf_counter() - t0
            server = Server(url, home)
            try:
                api_c, sql_c, _, _ = bench_series_long(
                    url, server, events[0], end - timedelta(days=DAYS), end, repeat, "m4"
                )
            finally:
                server.stop()
            print(
                f"covering     with (event_id, time) INCLUDE (value) (built in {built:.0f} s): series_long m4 API"
                f" {api_c:.1f} ms vs raw SQL {sql_c:.1f} ms (speedup {sql_c / api_c:.2f})",
                flush=True,
            )
            covering = f" series_long_speedup_covering_index={sql_c / api_c:.2f}"
        copy_to = max(copy_before, copy_after)
        print(
            f"copy_to      {copy_to:>12,.0f} rows/s (binary COPY TO STDOUT read by psycopg; before/after the"
            f" exports {copy_before:,.0f} / {copy_after:,.0f}; client CPU {min(COPY_CPU) / total * 1e6:.2f} µs/row)",
            flush=True,
        )
        print(
            f"query series_ms={series_ms:.1f} series_sql_ms={series_sql_ms:.1f}"
            f" series_ratio={series_ms / series_sql_ms:.2f} parquet_rows_per_s={parquet:.0f}"
            f" csv_rows_per_s={csv:.0f} copy_to_rows_per_s={copy_to:.0f} parquet_ratio={parquet / copy_to:.2f}"
            f" export_peak_rss_mb={peak:.0f} series_long_api_ms={long['m4'][0]:.1f}"
            f" series_long_sql_ms={long['m4'][1]:.1f} series_long_speedup={long_speedup:.2f}"
            f" csv_peak_rss_mb={csv_peak:.0f}{covering}",
            flush=True,
        )
        return 0
    finally:
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
