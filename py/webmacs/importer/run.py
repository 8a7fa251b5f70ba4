"""Importing a WebMACS database: the phases, the lock, the resume.

1. The relational tables (`relational.Mapper`) and the run's row in `import_runs` are written in one
   transaction: a run killed before it commits left nothing behind; after it, the run resumes at phase 2.
2. The datapoints stream in batches, each committed with the run's checkpoint (`datapoints`).
3. The run is marked complete; running the same import again then does nothing.

One import at a time per target database (an advisory lock). A resumed run reads its checkpoint through an
UPDATE of the run's row: a batch of a killed run whose COMMIT was already sent holds that row until it has
committed or rolled back, so the new run continues from whatever it left. The source is only read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from webmacs.importer import datapoints
from webmacs.importer.relational import Mapper, Merge, redirects
from webmacs.importer.report import Report
from webmacs.importer.source import Source, redacted

#: Advisory lock key of imports (any constant; the same in every process).
LOCK_KEY = 0x7765626D61637316
#: How long to wait for the lock: a killed run's connection may take a moment to be noticed.
LOCK_WAIT_S = 30.0

Progress = Callable[[float, int], None]


class ImportRefused(Exception):
    """The import would collide with data already in the target (or the source is unusable)."""

    def __init__(self, message: str, report: Report | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Run:
    id: int
    state: str
    position_us: int | None
    position_id: int | None
    carry: list[tuple[int, int]]
    redirects: dict[str, dict[str, str]]
    report: dict[str, Any]
    finished_on: datetime | None
    counters: dict[str, int]


def _load_run(conn: psycopg.Connection, source: str, *, claim: bool = False) -> Run | None:
    """The run of `source`. `claim`: through an UPDATE of its row, which waits for any transaction still
    holding it — a batch of a killed run whose COMMIT was already on its way — and then sees its outcome."""
    query = (
        "UPDATE import_runs SET updated_on = now() WHERE source = %s RETURNING *"
        if claim
        else "SELECT * FROM import_runs WHERE source = %s"
    )
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query, (source,)).fetchone()
    if row is None:
        return None
    counters = {k.removeprefix("rows_"): int(v) for k, v in row.items() if k.startswith("rows_")}
    return Run(
        id=row["id"],
        state=row["state"],
        position_us=row["position_us"],
        position_id=row["position_id"],
        carry=list(zip(row["carry_events"], row["carry_times"], strict=True)),
        redirects=row["redirects"],
        report=row["report"],
        finished_on=row["finished_on"],
        counters=counters,
    )


def _lock(conn: psycopg.Connection) -> None:
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        if row and row[0]:
            return
        if time.monotonic() > deadline:
            raise ImportRefused("another import into this database is running")
        time.sleep(0.2)


def _report(run: Run) -> Report:
    report = Report.from_json(run.report)
    report.datapoints = {**report.datapoints, **run.counters}
    return report


def import_webmacs(
    source_url: str,
    target_url: str,
    *,
    merge: Merge = "refuse",
    batch_rows: int = datapoints.BATCH_ROWS,
    chunk_interval: str = "1 day",
    progress: Progress | None = None,
) -> Report:
    """Import everything of the WebMACS database at `source_url` into `target_url` (migrated first), or
    resume an interrupted import of it. Raises `ImportRefused` (with the report) when it collides with data
    already there and `merge` is "refuse"."""
    from webmacs.db import migrate

    source = Source.open(source_url)
    try:
        migrate.apply(target_url, chunk_interval)
        with psycopg.connect(target_url, autocommit=True, options="-c timezone=UTC") as conn:
            _lock(conn)
            fingerprint = source.fingerprint()
            run = _load_run(conn, fingerprint, claim=True)
            if run is not None and run.state == "complete":
                report = _report(run)
                report.notes.append(
                    f"{redacted(source.url)} was imported already (finished {run.finished_on:%Y-%m-%d %H:%M:%S} UTC):"
                    " nothing to do."
                )
                return report
            if run is None:
                run = _relational(source, conn, fingerprint, merge)
            datapoints.stream(source, target_url, conn, run, batch_rows=batch_rows, progress=progress)
            conn.execute(
                "UPDATE import_runs SET state = 'complete', finished_on = now(), updated_on = now() WHERE id = %s",
                (run.id,),
            )
            done = _load_run(conn, fingerprint)
            assert done is not None
            return _report(done)
    finally:
        source.close()


def _relational(source: Source, conn: psycopg.Connection, fingerprint: str, merge: Merge) -> Run:
    """Phase 1: every relational table and the run's row, in one transaction."""
    report = Report()
    now = datetime.now(UTC)
    with conn.transaction(), source.snapshot():
        mapper = Mapper(source, conn, merge=merge, report=report, now=now, write=True)
        mapper.run()
        report.datapoints["no_timestamp"] = datapoints.without_time(source)
        if report.blocked:
            raise ImportRefused("the target database already holds some of this data", report)
        row = conn.execute(
            "INSERT INTO import_runs (source, state, merge, redirects, report) VALUES (%s, 'datapoints', %s, %s, %s)"
            " RETURNING id",
            (fingerprint, merge, Jsonb(redirects(mapper)), Jsonb(report.to_json())),
        ).fetchone()
        assert row is not None
    run = _load_run(conn, fingerprint)
    assert run is not None
    return run


def dry_run(source_url: str, target_url: str | None, *, merge: Merge = "refuse") -> Report:
    """What `import_webmacs` would do, without writing anywhere: counts, problems of the source's data, and
    collisions with what the target holds (when it is reachable and has our schema)."""
    report = Report()
    source = Source.open(source_url)
    try:
        target = _target_for_planning(target_url)
        try:
            with source.snapshot():
                if target is not None:
                    fingerprint = source.fingerprint()
                    has_runs = target.execute("SELECT to_regclass('import_runs') IS NOT NULL").fetchone()
                    run = _load_run(target, fingerprint) if has_runs and has_runs[0] else None
                    if run is not None:
                        report.notes.append(
                            f"{redacted(source.url)} was imported already"
                            if run.state == "complete"
                            else f"an import of {redacted(source.url)} would resume after {run.counters['read']:,}"
                            " datapoints"
                        )
                mapper = Mapper(source, target, merge=merge, report=report, now=datetime.now(UTC), write=False)
                mapper.run()
                total = source.datapoint_problems(report, now=datetime.now(UTC))
                report.table("datapoints").source = total
        finally:
            if target is not None:
                target.close()
    finally:
        source.close()
    return report


def _target_for_planning(target_url: str | None) -> psycopg.Connection | None:
    """A read-only connection to the target when it exists and has our tables, else None (an empty target)."""
    if not target_url:
        return None
    try:
        conn = psycopg.connect(
            target_url, autocommit=True, options="-c default_transaction_read_only=on -c timezone=UTC"
        )
    except psycopg.OperationalError:
        return None
    row = conn.execute("SELECT to_regclass('users') IS NOT NULL AND to_regclass('datapoints') IS NOT NULL").fetchone()
    if not (row and row[0]):
        conn.close()
        return None
    return conn


__all__ = ["ImportRefused", "dry_run", "import_webmacs"]
