"""`webmacs import webmacs` of the WebMACS fixture: every row of every table, every public id, every datapoint."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.importer.conftest import NewDatabase, admin_url
from tests.importer.webmacs_fixture import Fixture
from webmacs.db import migrate
from webmacs.importer.relational import SPECS, TABLES
from webmacs.importer.report import Report
from webmacs.importer.run import ImportRefused, import_webmacs


def rows(url: str, query: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, options="-c timezone=UTC") as c:
        return c.execute(query, params).fetchall()


def test_every_table_is_imported_with_its_public_ids(webmacs_source: Fixture, imported: tuple[str, Report]) -> None:
    target, report = imported
    for table in TABLES:
        assert report.tables[table].source == webmacs_source.counts[table], table
        assert report.tables[table].imported == webmacs_source.counts[table], table
        key = "token" if table == "blacklist_tokens" else "public_id"
        # (A server started on the imported database writes log entries of its own: leave those out.)
        only = sql.SQL("WHERE created_on < %(built)s" if table == "log_entries" else "")
        query = sql.SQL("SELECT {} FROM {} {} ORDER BY id").format(sql.Identifier(key), sql.Identifier(table), only)
        with psycopg.connect(webmacs_source.dsn) as s, psycopg.connect(target) as t:
            # Same rows in the same (id) order: lists ordered by id come out as in WebMACS.
            built = {"built": webmacs_source.built_at}
            assert t.execute(query, built).fetchall() == s.execute(query, built).fetchall(), table
    assert not report.problems


def test_users_keep_ids_and_password_hashes(webmacs_source: Fixture, imported: tuple[str, Report]) -> None:
    query = (
        "SELECT id, public_id, email, username, password_hash, role, registered_on, sso_provider, sso_subject_id"
        " FROM users ORDER BY id"
    )
    assert rows(imported[0], query) == rows(webmacs_source.dsn, query)


def test_references_and_secrets_survive(webmacs_source: Fixture, imported: tuple[str, Report]) -> None:
    # Integer foreign keys are remapped; compare through the public ids they lead to.
    checks = [
        "SELECT t.public_id, t.token_hash, u.public_id, t.expires_at FROM api_tokens t"
        " JOIN users u ON u.id = t.user_id ORDER BY t.public_id",
        "SELECT d.public_id, w.public_id, d.status::text, d.payload FROM webhook_deliveries d"
        " JOIN webhooks w ON w.id = d.webhook_id ORDER BY 1",
        "SELECT w.public_id, d.public_id, w.event_public_id, w.config_json, w.x, w.w FROM dashboard_widgets w"
        " JOIN dashboards d ON d.id = w.dashboard_id ORDER BY 1",
        "SELECT m.public_id, p.public_id, m.channel_id, m.event_public_id FROM channel_mappings m"
        " JOIN plugin_instances p ON p.id = m.plugin_instance_id ORDER BY 1",
        "SELECT public_id, url, secret, events, enabled FROM webhooks ORDER BY id",
        "SELECT public_id, name, event_public_id, operator::text, threshold, threshold_high, last_triggered_at"
        " FROM rules ORDER BY id",
        "SELECT public_id, version, file_path, file_hash_sha256, status::text FROM firmware_updates ORDER BY id",
    ]
    for query in checks:
        assert rows(imported[0], query) == rows(webmacs_source.dsn, query), query
    # Deliveries WebMACS never made are history here, not sent again.
    assert rows(imported[0], "SELECT count(*) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL") == [(0,)]


def test_every_datapoint_arrives_once_with_collisions_moved_by_a_microsecond(
    webmacs_source: Fixture, imported: tuple[str, Report]
) -> None:
    target, report = imported
    assert report.datapoints["read"] == webmacs_source.datapoints
    assert report.datapoints["inserted"] == webmacs_source.datapoints
    assert report.datapoints["shifted"] == webmacs_source.collisions > 0
    assert report.datapoints["duplicate"] == report.datapoints["unknown_event"] == 0
    # Per event and experiment: the same count, values and span as in WebMACS.
    source = rows(
        webmacs_source.dsn,
        "SELECT event_public_id, experiment_public_id, count(*), sum(value), min(timestamp), max(timestamp)"
        " FROM datapoints GROUP BY 1, 2 ORDER BY 1, 2",
    )
    ours = rows(
        target,
        "SELECT e.public_id, x.public_id, count(*), sum(d.value), min(d.time), max(d.time) FROM datapoints d"
        " JOIN events e ON e.id = d.event_id LEFT JOIN experiments x ON x.id = d.experiment_id GROUP BY 1, 2"
        " ORDER BY 1, 2",
    )
    assert [r[:3] for r in ours] == [r[:3] for r in source]
    for mine, theirs in zip(ours, source, strict=True):
        assert mine[3] == pytest.approx(theirs[3], rel=1e-12)
        assert mine[4] == theirs[4]
    # The colliding rows: the first keeps its time, the next ones follow 1 µs apart, in insertion (id) order.
    collided = rows(
        webmacs_source.dsn,
        "SELECT d.event_public_id, d.timestamp, array_agg(d.value ORDER BY d.id) FROM datapoints d"
        " GROUP BY 1, 2 HAVING count(*) > 1",
    )
    assert len(collided) > 0
    for event, at, values in collided:
        stored = rows(
            target,
            "SELECT d.time, d.value FROM datapoints d JOIN events e ON e.id = d.event_id"
            " WHERE e.public_id = %(e)s AND d.time >= %(t)s ORDER BY d.time LIMIT %(n)s",
            {"e": event, "t": at, "n": len(values)},
        )
        assert stored == [(at + timedelta(microseconds=i), v) for i, v in enumerate(values)]


def test_running_it_again_changes_nothing(webmacs_source: Fixture, imported: tuple[str, Report]) -> None:
    target = imported[0]
    before = rows(target, "SELECT count(*), sum(value::numeric) FROM datapoints")
    again = import_webmacs(webmacs_source.dsn, target)
    assert any("imported already" in n for n in again.notes)
    assert again.datapoints == imported[1].datapoints
    assert again.tables == imported[1].tables and list(again.tables) == list(TABLES)  # the stored report
    assert rows(target, "SELECT count(*), sum(value::numeric) FROM datapoints") == before
    assert rows(target, "SELECT count(*) FROM users") == [(len(webmacs_source.users),)]


def test_a_second_source_into_the_same_database_is_refused_until_merged(
    small_source: Fixture, new_database: NewDatabase
) -> None:
    # The same WebMACS data in a database of another name is another source: all its rows collide.
    target = new_database()
    first = import_webmacs(small_source.dsn, target)
    copy = clone(small_source, new_database)
    users_before = rows(target, "SELECT id, public_id FROM users ORDER BY id")
    with pytest.raises(ImportRefused) as refused:
        import_webmacs(copy, target)
    assert refused.value.report is not None
    blocking = {p.table for p in refused.value.report.problems if p.blocking}
    assert blocking == set(TABLES) - {"blacklist_tokens"}
    assert rows(target, "SELECT count(*) FROM import_runs") == [(1,)]  # nothing of the refused run
    merged = import_webmacs(copy, target, merge="skip")
    assert merged.tables["users"].merged == len(small_source.users)
    assert merged.tables["log_entries"].imported == 0
    assert merged.datapoints["inserted"] == 0
    assert merged.datapoints["duplicate"] == first.datapoints["inserted"]
    assert rows(target, "SELECT id, public_id FROM users ORDER BY id") == users_before


def test_merging_points_references_at_the_rows_already_here(small_source: Fixture, new_database: NewDatabase) -> None:
    """A database that already has the admin (seeded by a first start) and an event of the same name: the
    import refuses, then with --merge skip keeps them and moves WebMACS's references onto them."""
    target = new_database()
    migrate.apply(target)
    with psycopg.connect(target, autocommit=True) as c:
        c.execute("INSERT INTO users (email, username, password_hash) VALUES ('first@here.example', 'first', 'x')")
        here_admin = c.execute(
            "INSERT INTO users (email, username, password_hash, role)"
            " VALUES ('admin@webmacs.io', 'admin', 'x', 'admin') RETURNING id, public_id"
        ).fetchone()
        here_event = c.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type) VALUES"
            " ('Simulated Device – Temperature Reactor', 0, 1000, '°C', 'sensor') RETURNING id, public_id"
        ).fetchone()
    assert here_admin is not None and here_event is not None
    with pytest.raises(ImportRefused) as refused:
        import_webmacs(small_source.dsn, target)
    assert refused.value.report is not None
    problems = {p.table: p for p in refused.value.report.problems if p.blocking}
    assert set(problems) == {"users", "events"}
    assert "email 'admin@webmacs.io' exists here" in problems["users"].examples[0]
    report = import_webmacs(small_source.dsn, target, merge="skip")
    assert report.tables["users"].merged == 1 and report.tables["events"].merged == 1
    assert report.datapoints["inserted"] == report.datapoints["read"] == small_source.datapoints
    reactor = small_source.event_ids[0]
    old_admin = small_source.users[0].public_id
    assert rows(target, "SELECT count(*) FROM users WHERE public_id = %(p)s", {"p": old_admin}) == [(0,)]
    # Everything of the old admin and the old reactor event now hangs on the rows that were here.
    assert rows(target, "SELECT count(*) FROM events WHERE user_public_id = %(p)s", {"p": old_admin}) == [(0,)]
    assert rows(target, "SELECT count(*) FROM events WHERE public_id = %(p)s", {"p": reactor}) == [(0,)]
    owned = rows(target, "SELECT count(*) FROM events WHERE user_public_id = %(p)s", {"p": here_admin[1]})
    assert owned[0][0] > 0
    assert rows(target, "SELECT count(*) FROM datapoints WHERE event_id = %(i)s", {"i": here_event[0]}) == rows(
        small_source.dsn, "SELECT count(*) FROM datapoints WHERE event_public_id = %(p)s", {"p": reactor}
    )
    linked = rows(target, "SELECT count(*) FROM rules WHERE event_public_id = %(p)s", {"p": here_event[1]})
    assert linked == [(1,)]
    token_owner = rows(
        target,
        "SELECT u.public_id FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.name = 'controller of admin'",
    )
    assert token_owner == [(here_admin[1],)]
    # The old admin is now user 2 and the old user 2 got a new id: WebMACS's JWTs must not be trusted here.
    assert any("do not have their WebMACS id" in n for n in report.notes)


def clone(source: Fixture, new_database: NewDatabase) -> str:
    """A copy of a fixture database under a new name."""
    url = new_database()
    name = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
    with psycopg.connect(admin_url(source.dsn), autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(source.name)))
    return url


def test_enum_values_checked_are_the_schemas(imported: tuple[str, Report]) -> None:
    """The values the mapper lets through are exactly those our CHECK constraints accept (sql/0002)."""
    for spec in SPECS:
        for column, allowed in spec.enums.items():
            definitions = rows(
                imported[0],
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %(t)s::regclass"
                " AND contype = 'c' AND pg_get_constraintdef(oid) LIKE %(c)s",
                {"t": spec.table, "c": f"%({column})%"},
            )
            assert len(definitions) == 1, (spec.table, column)
            assert set(re.findall(r"'([a-z_]+)'::", definitions[0][0])) == set(allowed), (spec.table, column)
