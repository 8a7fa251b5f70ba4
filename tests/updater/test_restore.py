"""A failed update that migrated the database: the rollback says so and names the backup, and
`webmacs updater restore BACKUP` puts the database back (the old one kept aside)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.conftest import unique
from tests.updater.conftest import Rig
from tests.updater.support import DEGRADED
from tests.updater.test_service import cli
from webmacs.db import migrate

# The "new version" of this test: it migrates the database (a schema version of the future and a row
# written after the backup), as a real release's start-up would.
MIGRATING_APPLY = """
import os, sys, psycopg
with psycopg.connect(os.environ["SCRATCH_URL"], autocommit=True) as db:
    db.execute("INSERT INTO schema_migrations (version, name) VALUES (9000, '9000_from_the_future')")
    db.execute("INSERT INTO events (name, min_value, max_value, unit, type) VALUES ('after', 0, 1, 'u', 'sensor')")
"""


@pytest.fixture
def scratch(schema: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database of its own in the session cluster (the restore renames it; nothing else may use it)."""
    name = unique("upd").replace("-", "_")
    with psycopg.connect(make_conninfo(schema, dbname="postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(schema, dbname=name)
    migrate.apply(url)
    monkeypatch.setenv("SCRATCH_URL", url)
    try:
        yield url
    finally:
        with psycopg.connect(make_conninfo(schema, dbname="postgres"), autocommit=True) as admin:
            for (db,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{name}%",)):
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def schema_and_events(url: str) -> tuple[int, list[str]]:
    with psycopg.connect(url, autocommit=True) as db:
        version = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
        names = [r[0] for r in db.execute("SELECT name FROM events ORDER BY id")]
    assert version is not None
    return int(version[0]), names


def test_migrating_failure_is_explained_and_the_backup_restores(rig: Rig, scratch: str) -> None:
    with psycopg.connect(scratch, autocommit=True) as db:
        db.execute("INSERT INTO events (name, min_value, max_value, unit, type) VALUES ('before', 0, 1, 'u', 'sensor')")
    schema_before, _ = schema_and_events(scratch)
    apply = rig.root / "migrating.py"
    apply.write_text(MIGRATING_APPLY)
    bundle = rig.bundle()
    rig.health.script(DEGRADED, DEGRADED, DEGRADED)

    result = rig.run(
        database_url=scratch,
        webmacs_updater_apply=f"{sys.executable} {apply}",
        webmacs_updater_rollback="true",
        webmacs_updater_health_url=rig.health_url,
    )

    assert result.outcome == "rolled_back" and result.backup is not None
    assert (
        f"2.1.0 migrated the database (schema {schema_before} to 9000); if the previous version misbehaves,"
        f" stop the server and restore the backup: webmacs updater restore {result.backup.name}."
    ) in (result.reason or "")
    with psycopg.connect(scratch, autocommit=True) as db:
        [(entry,)] = db.execute("SELECT content FROM log_entries WHERE content LIKE %s", (f"%{bundle.name}%",))
    assert f"webmacs updater restore {result.backup.name}" in entry

    # Restored by the name the record gives; the server and the updater are stopped (nothing is connected).
    p = cli(rig, "updater", "restore", result.backup.name, database_url=scratch)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    assert schema_and_events(scratch) == (schema_before, ["before"])
    kept = out.split("kept in database '")[1].split("'")[0]
    assert schema_and_events(make_conninfo(scratch, dbname=kept)) == (9000, ["before", "after"])
