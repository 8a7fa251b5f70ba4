"""WebMACS's datapoints into the hypertable: the Rust transfer (`webmacs._core.WebmacsTransfer`) resumed from
the run's checkpoint, with progress reported while it works."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg

from webmacs import _core
from webmacs.epoch import to_micros
from webmacs.importer.relational import events_and_experiments
from webmacs.importer.source import Source

if TYPE_CHECKING:
    from webmacs.importer.run import Run

#: Source rows per batch: one transaction on the target, one checkpoint. Big enough that the checkpoint's
#: update is noise next to the COPY, small enough that a resumed run redoes little.
BATCH_ROWS = 50_000
#: How often the progress callback is called while the transfer runs.
PROGRESS_INTERVAL_S = 0.2


def without_time(source: Source) -> int:
    """Datapoints WebMACS stored without a timestamp: never streamed, reported once."""
    row = source.conn.execute('SELECT count(*) FROM datapoints WHERE "timestamp" IS NULL').fetchone()
    return int(row[0]) if row else 0


def stream(
    source: Source,
    target_url: str,
    conn: psycopg.Connection,
    run: Run,
    *,
    batch_rows: int = BATCH_ROWS,
    progress: Callable[[float, int], None] | None = None,
) -> dict[str, Any]:
    """Stream the source's datapoints after the run's checkpoint into the target; returns this run's counts.
    Ctrl-C stops after the batch being written (the checkpoint is then where the next run resumes)."""
    events, experiments = events_and_experiments(source, conn, run.redirects)
    with source.snapshot():
        statement = source.datapoint_copy(run.position_us)
        first, last = source.datapoint_span()
    transfer = _core.WebmacsTransfer(
        source.url,
        target_url,
        statement,
        run_id=run.id,
        events=events,
        experiments=experiments,
        carry=run.carry,
        batch_rows=batch_rows,
    )
    lo = to_micros(first) if first else 0
    span = max((to_micros(last) if last else 0) - lo, 1)
    read_before = run.counters.get("read", 0)
    outcome: dict[str, Any] = {}
    failure: list[BaseException] = []

    def work() -> None:
        try:
            outcome.update(transfer.run())
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    def report() -> None:
        if progress is not None:
            read, _, position = transfer.progress()
            fraction = 0.0 if position is None else (position - lo) / span
            progress(fraction, read_before + read)

    if progress is not None:
        # Where a resumed run starts: a display measures its rate from here.
        start = 0.0 if run.position_us is None else (run.position_us - lo) / span
        progress(start, read_before)
    thread = threading.Thread(target=work, name="webmacs-import-datapoints", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(PROGRESS_INTERVAL_S)
            report()
    except KeyboardInterrupt:
        transfer.cancel()
        thread.join()
        raise
    if failure:
        raise failure[0]
    if not outcome.get("completed"):
        # Only Ctrl-C cancels (handled above); never mark a run complete that did not read to the end.
        raise RuntimeError("the datapoint transfer stopped before the end of the source")
    report()
    return outcome
