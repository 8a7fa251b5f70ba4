"""`--dry-run` reports what an import would do and find — orphan datapoints, colliding timestamps, values out of
range, rows that collide with the target — without writing anywhere; the import then does what it said."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import unique
from tests.importer.conftest import NewDatabase, admin_url
from tests.importer.webmacs_fixture import Fixture, build
from webmacs.importer.run import dry_run, import_webmacs


@pytest.fixture(scope="module")
def dirty(db_url: str, created_databases: list[str]) -> Fixture:
    """A small WebMACS database that lost its foreign keys (as one restored from a dump of SQLite might) and
    holds every kind of problem."""
    name = unique("webmacs_dirty").replace("-", "_")
    created_databases.append(name)
    f = build(admin_url(db_url), name, batches=300)
    ev, ev2 = f.event_ids[0], f.event_ids[1]
    with psycopg.connect(f.dsn, autocommit=True) as c:
        for table in ("datapoints", "rules", "dashboard_widgets"):
            for (constraint,) in c.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'f'", (table,)
            ).fetchall():
                c.execute(
                    psycopg.sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                        psycopg.sql.Identifier(table), psycopg.sql.Identifier(constraint)
                    )
                )
        c.execute(
            "INSERT INTO datapoints (value, timestamp, event_public_id, experiment_public_id) VALUES"
            " (1, now() - interval '1 day', 'ghost-event', NULL),"
            " (2, now() - interval '25 hours', 'ghost-event', NULL),"
            " (3, now() - interval '2 day', 'other-ghost', NULL),"
            " (4, now() - interval '1 day', NULL, NULL),"
            " (5, NULL, %(ev)s, NULL), (6, NULL, %(ev)s, NULL),"
            " ('NaN', now() - interval '3 hours', %(ev)s, NULL),"
            " ('Infinity', now() - interval '4 hours', %(ev)s, NULL),"
            " (7, '1969-12-31T23:59:59Z', %(ev)s, NULL), (8, now() + interval '1 day', %(ev)s, NULL),"
            " (9, now() - interval '5 hours', %(ev)s, 'gone-experiment'),"
            " (10, now() - interval '6 hours', %(ev2)s, 'gone-experiment'),"
            " (11, '2026-01-01T00:00:00Z', %(ev)s, NULL), (12, '2026-01-01T00:00:00Z', %(ev)s, NULL),"
            " (13, '2026-01-01T00:00:00Z', %(ev)s, NULL)",
            {"ev": ev, "ev2": ev2},
        )
        c.execute(
            "INSERT INTO rules (public_id, name, event_public_id, operator, threshold, action_type)"
            " VALUES ('rule-of-a-ghost', 'Ghost rule', 'ghost-event', 'gt', 1, 'log')"
        )
        c.execute(
            "UPDATE dashboard_widgets SET event_public_id = 'ghost-event'"
            " WHERE id = (SELECT min(id) FROM dashboard_widgets WHERE title = 'gauge 1')"
        )
        c.execute("UPDATE users SET role = 'guest' WHERE username = 'victor'")
        row = c.execute("SELECT count(*) FROM datapoints").fetchone()
        assert row is not None
        f.datapoints = int(row[0])
    return f


def problems(report: Any) -> dict[tuple[str, str], int]:
    return {(p.table, p.kind): p.count for p in report.problems}


def test_dry_run_reports_and_writes_nothing(dirty: Fixture, new_database: NewDatabase) -> None:
    target = new_database()
    report = dry_run(dirty.dsn, target)
    found = problems(report)
    assert found[("datapoints", "orphan_datapoints")] == 3
    assert found[("datapoints", "no_event")] == 1
    assert found[("datapoints", "no_timestamp")] == 2
    assert found[("datapoints", "invalid_value")] == 2
    assert found[("datapoints", "bad_time")] == 2
    assert found[("datapoints", "orphan_experiment")] == 2
    assert found[("datapoints", "duplicate_timestamps")] == 2
    assert found[("datapoints", "out_of_range")] > 0
    assert found[("users", "invalid")] == 1  # role 'guest'
    assert found[("rules", "dangling")] == 1  # its event is gone: left out
    assert found[("dashboard_widgets", "dangling")] == 1  # its event is gone: unlinked
    assert found[("log_entries", "dangling")] == 100  # victor's, who is left out: their owner becomes NULL
    assert not report.blocked
    assert report.tables["datapoints"].source == dirty.datapoints
    with psycopg.connect(target) as c:  # not even migrated
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


def test_the_import_does_what_the_dry_run_said(dirty: Fixture, new_database: NewDatabase) -> None:
    target = new_database()
    report = import_webmacs(dirty.dsn, target)
    d = report.datapoints
    assert d["unknown_event"] == 3 + 1
    assert d["no_timestamp"] == 2
    assert d["invalid_value"] == 2
    assert d["bad_time"] == 2
    assert d["unknown_experiment"] == 2
    assert d["shifted"] == 2
    assert d["read"] + d["no_timestamp"] == dirty.datapoints
    assert d["inserted"] == d["read"] - d["unknown_event"] - d["invalid_value"] - d["bad_time"]
    assert report.tables["users"].invalid == 1 and report.tables["rules"].invalid == 1
    with psycopg.connect(target, options="-c timezone=UTC") as c:
        assert c.execute("SELECT count(*) FROM datapoints").fetchone() == (d["inserted"],)
        three = c.execute(
            "SELECT value FROM datapoints WHERE time >= '2026-01-01' AND time < '2026-01-01 00:00:01' ORDER BY time"
        ).fetchall()
        assert three == [(11.0,), (12.0,), (13.0,)]


def test_dry_run_against_a_target_with_colliding_rows(
    dirty: Fixture, new_database: NewDatabase, run_cli: Any, tmp_path: Path
) -> None:
    target = new_database()
    status, _, _ = run_cli(target, "db", "migrate")
    assert status == 0
    with psycopg.connect(target, autocommit=True) as c:
        c.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, '', 'sensor')",
            ("Start Button",),
        )
    status, out, _ = run_cli(target, "import", "webmacs", "--from", dirty.dsn, "--dry-run", "--json")
    report = json.loads(out)
    blocking = [p for p in report["problems"] if p["blocking"]]
    assert status == 1
    assert [(p["table"], p["kind"], p["count"]) for p in blocking] == [("events", "conflict", 1)]
    assert "name 'Start Button' exists here" in blocking[0]["examples"][0]
    status, out, _ = run_cli(target, "import", "webmacs", "--from", dirty.dsn, "--dry-run", "--merge", "skip", "--json")
    assert status == 0 and not [p for p in json.loads(out)["problems"] if p["blocking"]]
    # The real import refuses the same way, and writes nothing.
    status, out, err = run_cli(target, "import", "webmacs", "--from", dirty.dsn)
    assert status == 1 and "nothing was written" in err
    with psycopg.connect(target) as c:
        assert c.execute("SELECT count(*) FROM users").fetchone() == (0,)


def test_unusable_sources_are_one_line_errors(new_database: NewDatabase, run_cli: Any) -> None:
    target = new_database()
    status, _, err = run_cli(target, "import", "webmacs", "--from", target)
    assert status == 1
    assert "does not hold WebMACS's tables (missing: users, events, experiments, datapoints)" in err
    status, _, err = run_cli(target, "import", "webmacs", "--from", "postgresql://nobody@127.0.0.1:1/webmacs")
    assert status == 1 and err.strip().startswith("webmacs import: connection") and "resume" in err


def test_a_webmacs_from_before_roles_and_tokens(
    db_url: str, created_databases: list[str], new_database: NewDatabase
) -> None:
    """WebMACS before alembic 004 had an `admin` flag instead of roles, and no API tokens or plugin tables."""
    name = unique("webmacs_old").replace("-", "_")
    created_databases.append(name)
    old = build(admin_url(db_url), name, batches=50)
    with psycopg.connect(old.dsn, autocommit=True) as c:
        c.execute("ALTER TABLE users ADD COLUMN admin boolean NOT NULL DEFAULT false")
        c.execute("UPDATE users SET admin = (role = 'admin')")
        c.execute("ALTER TABLE users DROP COLUMN role, DROP COLUMN sso_provider, DROP COLUMN sso_subject_id")
        c.execute("DROP TABLE api_tokens, channel_mappings, plugin_instances, plugin_packages")
    target = new_database()
    report = import_webmacs(old.dsn, target)
    assert report.tables["api_tokens"].source == report.tables["plugin_instances"].source == 0
    assert report.datapoints["inserted"] == old.datapoints
    with psycopg.connect(target) as c:
        roles = c.execute("SELECT username, role FROM users ORDER BY id").fetchall()
    assert roles == [("admin", "admin"), ("olga", "viewer"), ("victor", "viewer"), ("sso_user", "viewer")]
