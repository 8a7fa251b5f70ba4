"""`webmacs import csv|parquet`: our exports read back (round trips into an empty database), WebMACS's experiment
CSV (spec §13), one-event and wide files; the engine's checks and first-write-wins on the way in."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest

from tests.importer.conftest import NewDatabase
from tests.importer.test_api_equivalence import expected_csv
from tests.importer.webmacs_fixture import Fixture
from webmacs.db import migrate
from webmacs.importer.report import Report


def counts(out: str) -> dict[str, int]:
    return dict(json.loads(out)["datapoints"])


def test_parquet_export_imports_into_an_empty_database_as_identical_rows(
    imported: tuple[str, Report], webmacs_source: Fixture, new_database: NewDatabase, run_cli: Any, tmp_path: Path
) -> None:
    events = webmacs_source.event_ids[:4]
    first, second = tmp_path / "first.parquet", tmp_path / "second.parquet"
    assert run_cli(imported[0], "export", "--events", *events, "-o", str(first))[0] == 0
    empty = new_database()
    status, out, err = run_cli(empty, "import", "parquet", str(first), "--create-missing", "--json")
    assert status == 0, err
    n = pq.ParquetFile(first).metadata.num_rows
    assert n > 300_000
    assert counts(out) == {
        "read": n,
        "inserted": n,
        "duplicate": 0,
        "unknown_event": 0,
        "unknown_experiment": 0,
        "invalid_value": 0,
        "bad_time": 0,
    }
    assert run_cli(empty, "export", "--events", *events, "-o", str(second))[0] == 0
    assert pq.read_table(second).equals(pq.read_table(first))
    # A second import of the same file stores nothing twice.
    status, out, _ = run_cli(empty, "import", "parquet", str(first), "--json")
    assert (status, counts(out)["inserted"], counts(out)["duplicate"]) == (0, 0, n)


def test_csv_export_in_a_time_zone_round_trips(
    imported: tuple[str, Report], webmacs_source: Fixture, new_database: NewDatabase, run_cli: Any, tmp_path: Path
) -> None:
    events = webmacs_source.event_ids[4:6]
    start = (webmacs_source.built_at - timedelta(days=1)).isoformat()
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    args = ["--events", *events, "--start", start, "--tz", "Europe/Berlin"]
    assert run_cli(imported[0], "export", *args, "-o", str(first))[0] == 0
    empty = new_database()
    status, out, err = run_cli(empty, "import", "csv", str(first), "--create-missing", "--json")
    assert status == 0, err
    assert counts(out)["inserted"] == first.read_bytes().count(b"\r\n") - 1 > 50_000
    assert run_cli(empty, "export", *args, "-o", str(second))[0] == 0
    assert second.read_bytes() == first.read_bytes()


def test_webmacs_experiment_csv_imports_with_its_experiment(
    webmacs_source: Fixture, imported: tuple[str, Report], new_database: NewDatabase, run_cli: Any, tmp_path: Path
) -> None:
    experiment = webmacs_source.experiment_ids[1]  # 'Run 2, "hot"'
    path = tmp_path / "experiment.csv"
    path.write_bytes(expected_csv(webmacs_source, experiment))
    empty = new_database()
    migrate.apply(empty)
    with psycopg.connect(empty, autocommit=True) as c:
        c.execute("INSERT INTO experiments (public_id, name) VALUES (%s, 'Run 2')", (experiment,))
    status, out, err = run_cli(
        empty, "import", "csv", str(path), "--experiment", experiment, "--create-missing", "--json"
    )
    assert status == 0, err
    query = (
        "SELECT e.public_id, d.time, d.value FROM datapoints d JOIN events e ON e.id = d.event_id"
        " JOIN experiments x ON x.id = d.experiment_id WHERE x.public_id = %(x)s ORDER BY 2, 1"
    )
    with psycopg.connect(empty) as mine, psycopg.connect(imported[0]) as reference:
        got = mine.execute(query, {"x": experiment}).fetchall()
        assert got == reference.execute(query, {"x": experiment}).fetchall()
    assert counts(out)["inserted"] == len(got) > 1000
    # Into the database imported from WebMACS: all of it is there already.
    status, out, _ = run_cli(imported[0], "import", "csv", str(path), "--experiment", experiment, "--json")
    assert (status, counts(out)["inserted"], counts(out)["duplicate"]) == (0, 0, len(got))


@pytest.fixture
def events_here(new_database: NewDatabase) -> tuple[str, list[tuple[int, str]]]:
    """A database with three events ('alpha', 'beta', 'gamma')."""
    url = new_database()
    migrate.apply(url)
    with psycopg.connect(url, autocommit=True) as c:
        made = [
            c.execute(
                "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 100, 'u', 'sensor')"
                " RETURNING id, public_id",
                (name,),
            ).fetchone()
            for name in ("alpha", "beta", "gamma")
        ]
    return url, [m for m in made if m is not None]


def stored(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, options="-c timezone=UTC") as c:
        return c.execute(
            "SELECT e.name, d.time, d.value FROM datapoints d JOIN events e ON e.id = d.event_id ORDER BY 2, 1"
        ).fetchall()


def test_wide_file_with_a_map_naive_times_and_empty_cells(
    events_here: tuple[str, list[tuple[int, str]]], run_cli: Any, tmp_path: Path
) -> None:
    url, events = events_here
    path = tmp_path / "logger.csv"
    path.write_text(
        "Zeit,Temp,Druck\n2026-03-29 01:30:00,20.5,1.25\n2026-03-29 03:30:00,,1.5\n2026-07-01 12:00:00.25,21,\n"
    )
    status, out, err = run_cli(
        url,
        "import",
        "csv",
        str(path),
        "--time-column",
        "Zeit",
        "--map",
        "Temp=alpha",
        f"Druck={events[1][1]}",
        "--tz",
        "Europe/Berlin",
        "--json",
    )
    assert status == 0, err
    assert counts(out)["read"] == counts(out)["inserted"] == 4
    utc = UTC
    assert stored(url) == [
        ("alpha", datetime(2026, 3, 29, 0, 30, tzinfo=utc), 20.5),
        ("beta", datetime(2026, 3, 29, 0, 30, tzinfo=utc), 1.25),
        ("beta", datetime(2026, 3, 29, 1, 30, tzinfo=utc), 1.5),  # after the DST change: UTC+2
        ("alpha", datetime(2026, 7, 1, 10, 0, 0, 250000, tzinfo=utc), 21.0),
    ]


def test_one_event_file_goes_through_the_engines_checks(
    events_here: tuple[str, list[tuple[int, str]]], run_cli: Any, tmp_path: Path
) -> None:
    url, _ = events_here
    path = tmp_path / "gamma.csv"
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    path.write_text(
        "timestamp,reading\n"
        "2026-01-01T00:00:00Z,1\n"
        "2026-01-01T00:00:00Z,2\n"  # the same time again: the first write wins
        "2026-01-01T00:00:01+00:00,nan\n"
        f"{future},3\n"
        "1960-01-01T00:00:00Z,4\n"
        "2026-01-01T00:00:02Z,\n"
        "2026-01-01T00:00:03.5Z,5\n"
    )
    status, out, err = run_cli(
        url, "import", "csv", str(path), "--event", "gamma", "--value-column", "reading", "--json"
    )
    assert status == 0, err
    assert counts(out) == {
        "read": 6,  # the empty cell is no datapoint
        "inserted": 2,
        "duplicate": 1,
        "unknown_event": 0,
        "unknown_experiment": 0,
        "invalid_value": 1,
        "bad_time": 2,
    }
    assert [(v, t.isoformat()) for _, t, v in stored(url)] == [
        (1.0, "2026-01-01T00:00:00+00:00"),
        (5.0, "2026-01-01T00:00:03.500000+00:00"),
    ]


def test_unknown_events_are_refused_or_counted(
    events_here: tuple[str, list[tuple[int, str]]], run_cli: Any, tmp_path: Path
) -> None:
    url, events = events_here
    one = tmp_path / "one.csv"
    one.write_text("time,value\n2026-01-01T00:00:00Z,1\n")
    status, _, err = run_cli(url, "import", "csv", str(one), "--event", "nope")
    assert (status, err.strip()) == (1, "webmacs import: Event 'nope' not found.")
    long = tmp_path / "long.csv"
    long.write_text(
        f"time,event_public_id,value\n2026-01-01T00:00:00Z,{events[0][1]},1\n2026-01-01T00:00:00Z,ghost,2\n"
    )
    status, out, _ = run_cli(url, "import", "csv", str(long), "--dry-run", "--json")
    assert (status, counts(out)["unknown_event"], counts(out)["inserted"]) == (0, 1, 0)
    assert stored(url) == []  # a dry run writes nothing
    status, out, _ = run_cli(url, "import", "csv", str(long), "--json")
    assert (status, counts(out)["unknown_event"], counts(out)["inserted"]) == (0, 1, 1)
    status, _, err = run_cli(url, "import", "csv", str(tmp_path / "missing.csv"))
    assert status == 1 and "no such file" in err
