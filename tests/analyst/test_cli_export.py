"""`webmacs export` (py/webmacs/cli_export.py) against the test database."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest

from tests.analyst.conftest import load
from tests.conftest import make_settings
from webmacs import cli_export


def _run(argv: list[str], db_url: str, tmp_path: Path) -> int:
    parser = argparse.ArgumentParser(prog="webmacs")
    cli_export.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args, make_settings(db_url, tmp_path)))


def test_cli_exports_parquet_with_progress(
    db: psycopg.Connection, db_url: str, make_event: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ev = make_event()
    t0 = datetime(2026, 7, 1, tzinfo=UTC)
    load(db, [(t0 + timedelta(minutes=i), ev.id, None, i * 0.5) for i in range(3000)])
    out = tmp_path / "dump.parquet"
    rc = _run(
        [
            "export",
            "--events",
            ev.public_id,
            "--start",
            "2026-07-01T10:00:00",
            "--tz",
            "Europe/Berlin",
            "--end",
            "2026-07-03T00:00:00Z",
            "--chunk-rows",
            "500",
            "-o",
            str(out),
        ],
        db_url,
        tmp_path,
    )
    assert rc == 0
    frame = pl.read_parquet(out)
    # 10:00 Berlin is 08:00 UTC: minutes 480 … 2879 (--end cuts the last two hours off).
    assert frame["value"].to_list() == [i * 0.5 for i in range(480, 2880)]
    assert frame["time"][0] == t0 + timedelta(hours=8)
    err = capsys.readouterr().err
    assert "100%" in err and "2,400 rows" in err
    assert not list(tmp_path.glob(".*.partial"))


def test_cli_csv_to_stdout_and_unknown_event(
    db: psycopg.Connection, db_url: str, make_event: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ev = make_event()
    load(db, [(datetime(2026, 7, 5, tzinfo=UTC), ev.id, None, 4.25)])
    assert _run(["export", "--events", ev.public_id, "-o", "-"], db_url, tmp_path) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "time,event_public_id,event_name,unit,value,experiment_public_id",
        f"2026-07-05T00:00:00+00:00,{ev.public_id},{ev.name},{ev.unit},4.25,",
    ]
    assert _run(["export", "--events", "nope", "-o", str(tmp_path / "x.csv")], db_url, tmp_path) == 1
    assert "Event 'nope' not found." in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
