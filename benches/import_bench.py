"""Import benchmark: `webmacs import webmacs` of a WebMACS database vs a plain binary COPY of the same rows.

Runs on its own throwaway TimescaleDB cluster; `make bench-import`. Knobs (env): BENCH_IMPORT_BATCHES (WebMACS
batches of ten datapoints, default 200,000 = 2 M datapoints), BENCH_IMPORT_BATCH_ROWS (rows per checkpointed
transaction, default the importer's), BENCH_IMPORT_ROUNDS (default 2).
Source: the test fixture's WebMACS 2.0 database (tests/importer/webmacs_fixture.py: spec §1's tables, one row
per datapoint with UUID and string foreign keys, all of WebMACS's indexes), in a database of its own.
Each round, on fresh target databases with our migrations applied beforehand:
  import      `import_webmacs()`: the relational tables, then the datapoints COPY out of the old table →
              converted in Rust → COPY into the hypertable, one checkpointed transaction per batch
  copy_limit  the same converted rows (read back from the first import as one binary COPY stream, held in
              memory) written by psycopg with one `COPY datapoints … FROM STDIN (FORMAT binary)` in one
              transaction: what writing these rows costs when nothing is read, converted or checkpointed
The best round of each is reported (the rounds alternate, so load from elsewhere falls on both alike), with
the CPU seconds per million rows of the processes involved (PostgreSQL backends read from /proc): on a 2-core
machine the import's reading and converting compete with the target's COPY for the cores.
The last line is machine-readable.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the test fixture's WebMACS database
from tests.importer import webmacs_fixture

from webmacs.db import migrate
from webmacs.db.cluster import Cluster
from webmacs.importer import datapoints
from webmacs.importer.run import import_webmacs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port

COPY_OUT = "COPY (SELECT time, event_id, experiment_id, value FROM datapoints) TO STDOUT (FORMAT binary)"
COPY_IN = "COPY datapoints (time, event_id, experiment_id, value) FROM STDIN (FORMAT binary)"
PIECE = 1 << 20


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(admin: str, apps: tuple[str, ...], work: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """Seconds `work` takes, and the CPU seconds of this process and of the backends whose application_name
    starts with one of `apps` (sampled until they end)."""
    seen: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        with psycopg.connect(admin, autocommit=True) as c:
            while not done.is_set():
                for pid, app in c.execute(
                    "SELECT pid, application_name FROM pg_stat_activity WHERE application_name = ANY(%s)",
                    (list(apps),),
                ):
                    with contextlib.suppress(OSError):  # it ended between the query and the read
                        seen[app] = cpu_seconds(pid)
                time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    before = os.times()
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    after = os.times()
    done.set()
    watcher.join()
    seen["this process"] = after.user - before.user + after.system - before.system
    return seconds, seen


def fresh_target(admin: str, name: str) -> str:
    url = webmacs_fixture.create_database(admin, name)
    migrate.apply(url, "1 day")
    return url


def read_back(url: str) -> bytes:
    with psycopg.connect(url) as db, db.cursor() as cur, cur.copy(COPY_OUT) as copy:
        return b"".join(bytes(piece) for piece in copy)


def plain_copy(url: str, data: bytes) -> None:
    """Write `data` with one binary COPY in one transaction."""
    with psycopg.connect(url, application_name="bench-copy") as db:
        with db.cursor() as cur, cur.copy(COPY_IN) as copy:
            for at in range(0, len(data), PIECE):
                copy.write(data[at : at + PIECE])
        db.commit()


def per_million(cpu: dict[str, float], rows: int) -> str:
    return ", ".join(f"{name} {seconds * 1e6 / rows:.2f}" for name, seconds in cpu.items())


def main() -> int:
    batches = int(os.environ.get("BENCH_IMPORT_BATCHES", "200000"))
    batch_rows = int(os.environ.get("BENCH_IMPORT_BATCH_ROWS", str(datapoints.BATCH_ROWS)))
    rounds = int(os.environ.get("BENCH_IMPORT_ROUNDS", "2"))
    home = Path(tempfile.mkdtemp(prefix="webmacs-bench-import-"))
    home.chmod(0o755)
    cluster = Cluster(home / "db", free_port())
    try:
        cluster.up()
        admin = psycopg.conninfo.make_conninfo(cluster.url(), dbname="postgres")
        started = time.perf_counter()
        source = webmacs_fixture.build(admin, "webmacs_source", batches=batches)
        rows = source.datapoints
        print(
            f"source       {rows:,} datapoints in WebMACS's table (fixture built in"
            f" {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        imports: list[float] = []
        copies: list[float] = []
        data = b""
        for r in range(rounds):
            target = fresh_target(admin, f"import_{r}")
            outcome: dict[str, Any] = {}

            def run_import(target: str = target, outcome: dict[str, Any] = outcome) -> None:
                outcome["report"] = import_webmacs(source.dsn, target, batch_rows=batch_rows)

            seconds, cpu = with_cpu(admin, ("webmacs-import", "webmacs-import-source"), run_import)
            imports.append(seconds)
            inserted = outcome["report"].datapoints["inserted"]
            if inserted != rows:
                raise RuntimeError(f"the import wrote {inserted:,} of {rows:,} rows")
            print(
                f"import       {rows / seconds:>12,.0f} rows/s (round {r + 1}, {seconds:.2f} s; CPU s per million"
                f" rows: {per_million(cpu, rows)})",
                flush=True,
            )
            if not data:
                data = read_back(target)
            baseline = fresh_target(admin, f"copy_{r}")
            seconds, cpu = with_cpu(admin, ("bench-copy",), functools.partial(plain_copy, baseline, data))
            copies.append(seconds)
            print(
                f"copy_limit   {rows / seconds:>12,.0f} rows/s (round {r + 1}, {seconds:.2f} s; CPU s per million"
                f" rows: {per_million(cpu, rows)})",
                flush=True,
            )
            with psycopg.connect(admin, autocommit=True) as c:
                for name in (f"import_{r}", f"copy_{r}"):
                    c.execute(psycopg.sql.SQL("DROP DATABASE {}").format(psycopg.sql.Identifier(name)))
        import_rate, copy_rate = rows / min(imports), rows / min(copies)
        print(
            f"best         import {import_rate:,.0f} rows/s vs copy_limit {copy_rate:,.0f} rows/s"
            f" ({rows:,} rows, {len(data) / 1e6:,.0f} MB of COPY, {batch_rows:,}-row checkpointed batches)",
            flush=True,
        )
        print(
            f"import import_rows_per_s={import_rate:.0f} copy_limit_rows_per_s={copy_rate:.0f}"
            f" ratio_vs_copy={import_rate / copy_rate:.2f} rows={rows} batch_rows={batch_rows}",
            flush=True,
        )
        return 0
    finally:
        cluster.destroy()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
