"""The migration runner and the schema it produces (spec §1, DESIGN.md "Data model")."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.conftest import unique
from webmacs.db import migrate

SPEC_TABLES = {
    "users",
    "events",
    "experiments",
    "datapoints",
    "blacklist_tokens",
    "api_tokens",
    "log_entries",
    "webhooks",
    "webhook_deliveries",
    "rules",
    "firmware_updates",
    "dashboards",
    "dashboard_widgets",
    "plugin_instances",
    "channel_mappings",
    "plugin_packages",
}

CreateDb = Callable[[], str]


@pytest.fixture(scope="module")
def create_database(db_url: str) -> Iterator[CreateDb]:
    """Factory: a new, empty database on the test cluster; all of them are dropped at the end of the module."""
    created: list[str] = []
    base = db_url.rsplit("/", 1)[0]

    def create() -> str:
        name = unique("migr").replace("-", "_")
        with psycopg.connect(db_url, autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return f"{base}/{name}"

    yield create
    with psycopg.connect(db_url, autocommit=True) as c:
        for name in created:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def migrated(create_database: CreateDb) -> str:
    """One fresh database with every migration of sql/ applied."""
    url = create_database()
    migrate.apply(url)
    return url


def recorded(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as c:
        return c.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()


def all_migrations() -> list[tuple[int, str]]:
    return [(m.version, m.name) for m in migrate.discover()]


def test_fresh_database_gets_every_migration_in_order(create_database: CreateDb) -> None:
    url = create_database()
    applied = migrate.apply(url)
    assert applied == [name for _, name in all_migrations()]
    assert applied[0] == "0001_extension"
    assert recorded(url) == all_migrations()


def test_applying_twice_is_a_no_op(migrated: str) -> None:
    with psycopg.connect(migrated) as c:
        before = c.execute("SELECT version, applied_on FROM schema_migrations ORDER BY version").fetchall()
    assert migrate.apply(migrated) == []
    with psycopg.connect(migrated) as c:
        assert c.execute("SELECT version, applied_on FROM schema_migrations ORDER BY version").fetchall() == before


def test_concurrent_apply_runs_each_migration_once(create_database: CreateDb) -> None:
    url = create_database()
    start = threading.Barrier(2)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait(timeout=30)
            results.append(migrate.apply(url))
        except BaseException as e:  # surfaced in the test thread below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 2
    names = [name for _, name in all_migrations()]
    assert sorted(results[0] + results[1]) == sorted(names)
    assert recorded(url) == all_migrations()


def test_a_failing_migration_is_rolled_back_and_retried_later(create_database: CreateDb, tmp_path: Path) -> None:
    url = create_database()
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_table (id int);")
    bad = tmp_path / "0002_second.sql"
    bad.write_text("CREATE TABLE second_table (id int); SELECT 1 / 0;")
    with pytest.raises(psycopg.errors.DivisionByZero):
        migrate.apply(url, directory=tmp_path)
    assert recorded(url) == [(1, "0001_first")]
    with psycopg.connect(url) as c:
        assert c.execute("SELECT to_regclass('second_table')").fetchone() == (None,)
    bad.write_text("CREATE TABLE second_table (id int);")
    assert migrate.apply(url, directory=tmp_path) == ["0002_second"]
    assert recorded(url) == [(1, "0001_first"), (2, "0002_second")]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["1_short.sql"], "is not NNNN_name.sql"),
        (["0001_Upper.sql"], "is not NNNN_name.sql"),
        (["0001_a.sql", "0001_b.sql"], "share a version number"),
    ],
)
def test_badly_named_or_duplicate_migrations_are_refused(tmp_path: Path, files: list[str], message: str) -> None:
    for f in files:
        (tmp_path / f).write_text("SELECT 1;")
    with pytest.raises(ValueError, match=message):
        migrate.discover(tmp_path)


def test_the_repository_migrations_are_well_formed() -> None:
    found = migrate.discover()
    assert [m.version for m in found] == sorted({m.version for m in found})
    assert found[0].name == "0001_extension"


def test_every_spec_table_exists(migrated: str) -> None:
    with psycopg.connect(migrated) as c:
        tables = {
            r[0] for r in c.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        }
    assert tables >= SPEC_TABLES


def test_relational_tables_expose_a_unique_public_id(migrated: str) -> None:
    with psycopg.connect(migrated) as c:
        for table in sorted(SPEC_TABLES - {"datapoints", "blacklist_tokens"}):
            col = c.execute(
                "SELECT data_type, character_maximum_length, is_nullable FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name = %s AND column_name = 'public_id'",
                (table,),
            ).fetchone()
            assert col == ("character varying", 100, "NO"), table
            unique_on_public_id = c.execute(
                "SELECT count(*) FROM pg_index i JOIN pg_attribute a"
                " ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
                " WHERE i.indrelid = %s::regclass AND i.indisunique AND i.indnatts = 1 AND a.attname = 'public_id'",
                (table,),
            ).fetchone()
            assert unique_on_public_id == (1,), table


def test_datapoints_is_a_hypertable_on_time(migrated: str) -> None:
    with psycopg.connect(migrated) as c:
        row = c.execute(
            "SELECT column_name, time_interval FROM timescaledb_information.dimensions"
            " WHERE hypertable_schema = 'public' AND hypertable_name = 'datapoints'"
        ).fetchall()
        assert row == [("time", timedelta(days=1))]
        assert c.execute(
            "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'datapoints'"
        ).fetchone() == (1,)


def test_datapoints_has_exactly_one_index_unique_on_event_and_time(migrated: str) -> None:
    with psycopg.connect(migrated) as c:
        indexes = c.execute(
            "SELECT i.indisunique, array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)"
            "  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord)"
            " FROM pg_index i WHERE i.indrelid = 'datapoints'::regclass"
        ).fetchall()
    # Every extra index costs ingest throughput; this one is the dedup key and serves range scans.
    assert indexes == [(True, ["event_id", "time"])]


def test_datapoints_column_types(migrated: str) -> None:
    with psycopg.connect(migrated) as c:
        columns = c.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = 'datapoints' ORDER BY ordinal_position"
        ).fetchall()
    # Binary COPY performs no casts: these must match the engine's row type exactly.
    assert columns == [
        ("time", "timestamp with time zone", "NO"),
        ("event_id", "integer", "NO"),
        ("experiment_id", "integer", "YES"),
        ("value", "double precision", "NO"),
    ]


def test_chunk_interval_is_configurable(create_database: CreateDb) -> None:
    url = create_database()
    migrate.apply(url, chunk_interval="6 hours")
    with psycopg.connect(url) as c:
        assert c.execute(
            "SELECT time_interval FROM timescaledb_information.dimensions WHERE hypertable_name = 'datapoints'"
        ).fetchone() == (timedelta(hours=6),)


def test_datapoints_deduplicate_on_event_and_time(migrated: str) -> None:
    with psycopg.connect(migrated) as c:
        c.execute("INSERT INTO datapoints (time, event_id, value) VALUES ('2026-01-01T00:00:00Z', 1, 1.0)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            c.execute("INSERT INTO datapoints (time, event_id, value) VALUES ('2026-01-01T00:00:00Z', 1, 2.0)")
        c.rollback()
