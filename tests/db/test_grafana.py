"""Grafana-ready SQL: the `datapoints_named` view, the panel query with Grafana's macros expanded, the read-only
`webmacs_reader` role and `webmacs db grant-reader`."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from tests.conftest import unique
from webmacs.db.reader import ReaderError, grant_reader

# README "Grafana": the panel query, as Grafana sends it after expanding $__timeFilter(time) and
# time_bucket('$__interval', time) for a 6-hour panel with a 1-minute interval.
PANEL_QUERY = """
SELECT time_bucket('60s', time) AS time, event AS metric, avg(value) AS value
FROM datapoints_named
WHERE time BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-01T06:00:00Z' AND event IN (%(e)s)
GROUP BY 1, 2
ORDER BY 1
"""


@pytest.fixture(scope="module", autouse=True)
def migrated(db_url: str) -> None:
    from webmacs.db import migrate

    migrate.apply(db_url, "1 day")


@pytest.fixture(scope="module")
def charted(db_url: str) -> str:
    """An event with a day of 1-second data beside 30 other events' data, analysed like a live table."""
    name = unique("grafana")
    with psycopg.connect(db_url, autocommit=True) as db:
        ids = [
            db.execute(
                "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'K', 'sensor')"
                " RETURNING id",
                (f"{name}-{i}",),
            ).fetchone()[0]  # type: ignore[index]
            for i in range(31)
        ]
        db.execute(
            "INSERT INTO datapoints (time, event_id, value)"
            " SELECT '2026-01-01T00:00:00Z'::timestamptz + make_interval(secs => s), e, s %% 100"
            " FROM generate_series(0, 8639) s, unnest(%s::int[]) e",
            (ids,),
        )
        db.execute("ANALYZE datapoints")
        db.execute("ANALYZE events")
    return f"{name}-0"


def test_panel_query_runs_through_the_event_time_index(db: psycopg.Connection, charted: str) -> None:
    rows = db.execute(PANEL_QUERY, {"e": charted}).fetchall()
    assert len(rows) == 144  # 8,640 seconds of data = 2 h 24 min of the 6 h window, in 1-minute buckets
    assert all(r[1] == charted for r in rows)
    assert rows[0][2] == pytest.approx(29.5)
    plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + PANEL_QUERY, {"e": charted}).fetchall())
    # The hypertable's chunks are read through their copy of ux_datapoints_event_time (event_id, time).
    assert re.search(r"Index (Only )?Scan using \S*ux_datapoints_event_time", plan), plan
    assert "Seq Scan on _hyper" not in plan, plan


@pytest.fixture
def reader(db_url: str) -> psycopg.Connection:
    name = unique("grafana").replace("-", "_")
    assert grant_reader(db_url, name, "s3cret-pass") is True
    return psycopg.connect(psycopg.conninfo.make_conninfo(db_url, user=name, password="s3cret-pass"), autocommit=True)


def test_reader_reads_the_view_and_catalog_only(reader: psycopg.Connection, charted: str) -> None:
    with reader:
        assert reader.execute(PANEL_QUERY, {"e": charted}).fetchall()
        assert reader.execute("SELECT count(*) FROM events").fetchone()
        assert reader.execute("SELECT count(*) FROM experiments").fetchone() is not None
        for query in [
            "SELECT * FROM users",
            "SELECT * FROM api_tokens",
            "SELECT * FROM blacklist_tokens",
            "SELECT * FROM webhooks",
            "SELECT * FROM datapoints LIMIT 1",
            "INSERT INTO events (name, min_value, max_value, unit, type) VALUES ('x', 0, 1, 'u', 'sensor')",
            "UPDATE events SET unit = 'x'",
            "DELETE FROM experiments",
            "INSERT INTO datapoints (time, event_id, value) VALUES (now(), 1, 1)",
            "CREATE TABLE mine (x int)",
        ]:
            with pytest.raises(errors.InsufficientPrivilege):
                reader.execute(query)


def test_reader_role_cannot_log_in_and_owns_nothing(db: psycopg.Connection) -> None:
    row = db.execute(
        "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = 'webmacs_reader'"
    ).fetchone()
    assert row == (False, False, False, False)
    owned = db.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE r.rolname = 'webmacs_reader'"
    ).fetchone()
    assert owned == (0,)


def test_grant_reader_refuses_bad_names_and_other_roles(db_url: str, db: psycopg.Connection) -> None:
    for bad in ["", "Robert'); DROP TABLE users;--", "1abc", "a" * 64, "x-y"]:
        with pytest.raises(ReaderError):
            grant_reader(db_url, bad, "pw")
    # An existing role that is not a reader (here: the cluster's owner) is never turned into one.
    owner = db.execute("SELECT current_user").fetchone()
    assert owner is not None
    with pytest.raises(ReaderError):
        grant_reader(db_url, owner[0], "pw")
    # A second grant for a reader resets its password, and stores only a SCRAM verifier.
    name = unique("again").replace("-", "_")
    assert grant_reader(db_url, name, "first") is True
    assert grant_reader(db_url, name, "second") is False
    row = db.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,)).fetchone()
    assert row is not None and row[0].startswith("SCRAM-SHA-256$4096:") and "second" not in row[0]


def test_cli_prints_a_generated_password_once(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from webmacs import cli

    name = unique("cli").replace("-", "_")
    os.environ["DATABASE_URL"] = db_url
    try:
        assert cli.main(["db", "grant-reader", name]) == 0
    finally:
        del os.environ["DATABASE_URL"]
    out = capsys.readouterr().out
    password = re.search(r"password: (\S+)", out)
    assert password is not None and len(password.group(1)) >= 24
    psycopg.connect(psycopg.conninfo.make_conninfo(db_url, user=name, password=password.group(1))).close()


def test_the_example_dashboards_sql_panel_runs_for_the_reader(reader: psycopg.Connection, charted: str) -> None:
    import json

    dashboard = json.loads((Path(__file__).parents[2] / "examples/grafana/webmacs-dashboard.json").read_text())
    raw = next(t["rawSql"] for p in dashboard["panels"] for t in p.get("targets", []) if "rawSql" in t)
    # Grafana's macro expansion for a 6-hour range, a 1-minute interval and one selected event.
    expanded = (
        raw.replace("$__interval", "60s")
        .replace("$__timeFilter(time)", "time BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-01T06:00:00Z'")
        .replace("$event", "%(e)s")
    )
    with reader:
        rows = reader.execute(expanded, {"e": charted}).fetchall()
    assert len(rows) == 144 and rows[0][1] == charted
