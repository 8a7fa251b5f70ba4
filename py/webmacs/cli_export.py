"""`webmacs export`: datapoints of some events to a CSV or Parquet file, straight from the database."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from webmacs.settings import Settings


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register the `export` sub-command; its handler is `args.handler(args, settings)`."""
    p = subparsers.add_parser(
        "export",
        help="export datapoints as CSV or Parquet",
        description="Export the datapoints of some events in [start, end) — ordered by time, then event — with "
        "the columns time, event_public_id, event_name, unit, value, experiment_public_id.",
    )
    p.add_argument("--events", nargs="+", required=True, metavar="PUBLIC_ID", help="event public ids")
    p.add_argument("--start", type=_moment, help="ISO 8601 start (inclusive); naive times are read in --tz")
    p.add_argument("--end", type=_moment, help="ISO 8601 end (exclusive)")
    p.add_argument(
        "--format", choices=["csv", "parquet", "arrow"], help="default: from the output file's suffix, else csv"
    )
    p.add_argument("--tz", help="IANA time zone of CSV timestamps and of naive --start/--end (default UTC)")
    p.add_argument("-o", "--output", required=True, help="output file, or - for stdout")
    p.add_argument("--chunk-rows", type=int, default=None, help="rows per frame (default WEBMACS_EXPORT_CHUNK_ROWS)")
    p.set_defaults(handler=run)
    return p


def _moment(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from e


class Progress:
    """A one-line progress bar on stderr (fraction of the time range done, rows, rate), redrawn ≤ 5×/s."""

    WIDTH = 30

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.started = time.monotonic()
        self.drawn = 0.0
        self.rows = 0

    def __call__(self, fraction: float, rows: int, *, final: bool = False) -> None:
        self.rows = rows
        now = time.monotonic()
        if not final and now - self.drawn < 0.2:
            return
        self.drawn = now
        filled = round(self.WIDTH * max(0.0, min(1.0, fraction)))
        rate = rows / max(now - self.started, 1e-9)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:4.0%} {rows:,} rows {rate:,.0f} rows/s"
        )
        if final:
            self.stream.write("\n")
        self.stream.flush()


def run(args: argparse.Namespace, settings: Settings) -> int:
    from webmacs.app import database_url
    from webmacs.services import export as export_service

    try:
        zone = ZoneInfo(args.tz) if args.tz else UTC
    except (ZoneInfoNotFoundError, ValueError):
        print(f"webmacs export: unknown time zone {args.tz!r}", file=sys.stderr)
        return 2
    start = args.start.replace(tzinfo=zone) if args.start and args.start.tzinfo is None else args.start
    end = args.end.replace(tzinfo=zone) if args.end and args.end.tzinfo is None else args.end
    if start and end and start >= end:
        print("webmacs export: --start must be before --end", file=sys.stderr)
        return 2
    by_suffix: dict[str, export_service.Format] = {".parquet": "parquet", ".arrows": "arrow", ".arrow": "arrow"}
    suffix = next((s for s in by_suffix if args.output.endswith(s)), None)
    fmt: export_service.Format = args.format or (by_suffix[suffix] if suffix else "csv")
    url = database_url(settings)
    with export_service.connect(url) as conn:
        rows = conn.execute(
            "SELECT public_id, id FROM events WHERE public_id = ANY(%s)", ([e for e in args.events if "\x00" not in e],)
        ).fetchall()
        known: dict[str, int] = dict(rows)
        missing = [e for e in args.events if e not in known]
        if missing:
            print(f"webmacs export: Event '{missing[0]}' not found.", file=sys.stderr)
            return 1
        sel = export_service.Selection(event_ids=tuple(sorted(set(known.values()))), start=start, end=end)
        progress = Progress(sys.stderr)
        body = export_service.export(
            conn,
            sel,
            fmt,
            dsn=url,
            tz=args.tz,
            chunk_rows=args.chunk_rows or settings.webmacs_export_chunk_rows,
            sort_rows=settings.webmacs_export_sort_rows,
            progress=progress,
            guard=settings.webmacs_csv_formula_guard,
        )
        if args.output == "-":
            for piece in body:
                sys.stdout.buffer.write(piece)
            sys.stdout.buffer.flush()
        else:
            # Written beside the target and renamed at the end: a failed export leaves no half file behind.
            target = Path(args.output)
            partial = target.with_name(f".{target.name}.partial")
            try:
                with partial.open("wb") as out:
                    for piece in body:
                        out.write(piece)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        progress(1.0, progress.rows, final=True)
    return 0
