"""`webmacs import webmacs|csv|parquet`: history from a WebMACS database or from files, into the database."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from webmacs.settings import Settings

#: Exit status of an import stopped by Ctrl-C (the shell's convention for SIGINT).
INTERRUPTED = 130


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register the `import` sub-command group; its handler is `args.handler(args, settings)`."""
    p = subparsers.add_parser(
        "import",
        help="import history: a WebMACS database, or CSV/Parquet files",
        description="Import history into the configured database (DATABASE_URL, else the local cluster).",
    )
    kinds = p.add_subparsers(dest="kind", required=True)

    w = kinds.add_parser(
        "webmacs",
        help="import a WebMACS database (read only), keeping every public id",
        description="Import users (with their password hashes), API tokens, events, experiments, plugin instances"
        " and channel mappings, rules, webhooks, dashboards, log entries, OTA records and every datapoint of a"
        " WebMACS database. Datapoints stream in checkpointed batches: an interrupted import resumes where it"
        " stopped when the same command is run again; a finished one is not repeated.",
    )
    w.add_argument("--from", dest="source", required=True, metavar="URL", help="the WebMACS database (postgresql://…)")
    w.add_argument(
        "--merge",
        choices=["refuse", "skip"],
        default="refuse",
        help="rows colliding with rows already here (same public id, email, name …): refuse the import (default),"
        " or skip them, keeping what is here and pointing their references at it",
    )
    w.add_argument("--dry-run", action="store_true", help="report counts and problems, write nothing")
    w.add_argument("--batch-rows", type=_positive, default=None, help="datapoints per transaction (default 50,000)")
    w.add_argument("--json", action="store_true", help="print the report as JSON")
    w.set_defaults(handler=run_webmacs)

    for fmt in ("csv", "parquet"):
        f = kinds.add_parser(
            fmt,
            help=f"import datapoints from a {fmt.upper()} file",
            description="Import datapoints from a file: our exports (time, event_public_id, …, value,"
            " experiment_public_id), WebMACS's experiment CSV (timestamp, event_name, event_public_id, value, …),"
            " a time and a value column of one event (--event), or a time column and one column per event (--map)."
            " Values go through the engine's checks; a datapoint whose event already has one at that time is"
            " kept out (importing a file twice stores it once).",
        )
        f.add_argument("file", type=Path)
        how = f.add_mutually_exclusive_group()
        how.add_argument("--event", metavar="EVENT", help="public id (or name) of the event of every value")
        how.add_argument(
            "--map", nargs="+", default=[], metavar="COLUMN=EVENT", help="columns holding the values of events"
        )
        f.add_argument("--experiment", metavar="PUBLIC_ID", help="tag every datapoint with this experiment")
        f.add_argument("--time-column", help="default: time or timestamp")
        f.add_argument("--value-column", help="with --event: the column of the values (default: value)")
        f.add_argument("--tz", help="IANA time zone of times without an offset (default UTC)")
        f.add_argument(
            "--create-missing",
            action="store_true",
            help="create the events and experiments the file names (by public id) that do not exist yet",
        )
        f.add_argument("--dry-run", action="store_true", help="read and check the file, write nothing")
        f.add_argument("--batch-rows", type=_positive, default=None, help="rows per transaction (default 50,000)")
        f.add_argument("--json", action="store_true", help="print the report as JSON")
        f.set_defaults(handler=run_file, format=fmt)
    return p


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


class Progress:
    """A one-line progress bar on stderr (fraction done, rows, rate), redrawn at most 5× a second."""

    WIDTH = 30

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.drawn = 0.0
        self.first_rows: int | None = None
        self.rows = 0

    def __call__(self, fraction: float, rows: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if self.first_rows is None:
            # The first call comes as the datapoints start (after a resumed run's rows): the rate counts from here.
            self.first_rows, self.started = rows, now
        self.rows = rows
        if not final and now - self.drawn < 0.2:
            return
        self.drawn = now
        fraction = max(0.0, min(1.0, fraction))
        filled = round(self.WIDTH * fraction)
        rate = self.streamed / max(now - self.started, 1e-9)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:4.0%} {rows:,} rows {rate:,.0f} rows/s"
        )
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()

    @property
    def streamed(self) -> int:
        """Rows this run streamed."""
        return 0 if self.first_rows is None else self.rows - self.first_rows


def _target(settings: Settings) -> str:
    from webmacs.app import database_url

    return database_url(settings)


def run_webmacs(args: argparse.Namespace, settings: Settings) -> int:
    import psycopg

    from webmacs._core import CoreException
    from webmacs.db.cluster import Cluster
    from webmacs.importer import datapoints, run
    from webmacs.importer.source import NotWebmacs

    batch_rows = args.batch_rows or datapoints.BATCH_ROWS
    try:
        if args.dry_run:
            # A dry run starts nothing: a local cluster that is down counts as an empty target.
            target = settings.database_url or Cluster(settings.webmacs_home, settings.webmacs_db_port).url()
            report = run.dry_run(args.source, target, merge=args.merge)
        else:
            progress = Progress()
            try:
                report = run.import_webmacs(
                    args.source,
                    _target(settings),
                    merge=args.merge,
                    batch_rows=batch_rows,
                    chunk_interval=settings.webmacs_chunk_interval,
                    progress=progress,
                )
            except KeyboardInterrupt:
                sys.stderr.write("\ninterrupted: run the same command again to resume after the last batch written\n")
                return INTERRUPTED
            if progress.first_rows is not None:  # datapoints were streamed (not a finished import run again)
                progress(1.0, report.datapoints.get("read", 0), final=True)
                seconds = time.monotonic() - progress.started
                rows = progress.streamed
                report.notes.append(f"{rows:,} datapoints streamed in {seconds:.1f} s ({rows / seconds:,.0f} rows/s)")
    except NotWebmacs as e:
        sys.stderr.write(f"webmacs import: {e}\n")
        return 1
    except (psycopg.Error, CoreException) as e:
        what = "" if args.dry_run else "; run the same command again to resume after the last batch written"
        sys.stderr.write(f"\nwebmacs import: {e}{what}\n")
        return 1
    except run.ImportRefused as e:
        if e.report is not None:
            _emit(e.report, args.json)
        sys.stderr.write(f"webmacs import: {e}; nothing was written\n")
        return 1
    _emit(report, args.json)
    return 1 if args.dry_run and report.blocked else 0


def run_file(args: argparse.Namespace, settings: Settings) -> int:
    from webmacs.db import migrate
    from webmacs.importer import files

    if args.tz:
        try:
            ZoneInfo(args.tz)
        except (ZoneInfoNotFoundError, ValueError):
            sys.stderr.write(f"webmacs import: unknown time zone {args.tz!r}\n")
            return 2
    mapping: dict[str, str] = {}
    for item in args.map:
        column, sep, event = item.partition("=")
        if not sep or not column or not event:
            sys.stderr.write(f"webmacs import: --map wants COLUMN=EVENT, got {item!r}\n")
            return 2
        mapping[column] = event
    if not args.file.is_file():
        sys.stderr.write(f"webmacs import: no such file: {args.file}\n")
        return 1
    started = time.monotonic()
    target = _target(settings)
    if not args.dry_run:
        migrate.apply(target, settings.webmacs_chunk_interval)
    try:
        report = files.import_file(
            args.file,
            target,
            fmt=args.format,
            event=args.event,
            mapping=mapping,
            experiment=args.experiment,
            time_column=args.time_column,
            value_column=args.value_column,
            tz=args.tz,
            create_missing=args.create_missing,
            dry_run=args.dry_run,
            batch_rows=args.batch_rows or files.BATCH_ROWS,
        )
    except files.FileImportError as e:
        sys.stderr.write(f"webmacs import: {e}\n")
        return 1
    seconds = time.monotonic() - started
    rows = report.datapoints.get("read", 0)
    report.notes.append(f"{rows:,} datapoints in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s)")
    _emit(report, args.json)
    return 0


def _emit(report: object, as_json: bool) -> None:
    from webmacs.importer.report import Report

    assert isinstance(report, Report)
    sys.stdout.write((json.dumps(report.to_json(), indent=2) if as_json else report.render()) + "\n")
    sys.stdout.flush()
