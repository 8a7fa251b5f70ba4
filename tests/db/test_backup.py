"""Backup and restore (`webmacs db backup|restore`, the updater's backups): a dump of the session database,
restored into a fresh cluster with TimescaleDB's pre/post restore, serves the same data through the API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    ActiveEvent,
    Server,
    bearer,
    free_port,
    login,
    make_settings,
    start_server,
    throwaway_cluster,
    unique,
)
from tests.services.receiver import Receiver
from tests.test_cli import webmacs
from tests.updater.support import HEALTHY, build, manifest_for
from webmacs.db import backup
from webmacs.db.cluster import Cluster
from webmacs.updater.service import Updater


@pytest.fixture(scope="module")
def fresh() -> Iterator[Cluster]:
    """A second, empty cluster: what a machine rebuilt from its backups starts with."""
    with throwaway_cluster("webmacs-restore-") as c:
        yield c


def test_restored_cluster_serves_the_same_data(
    fresh: Cluster,
    server: Server,
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    make_active_event: Callable[..., ActiveEvent],
    tmp_path: Path,
) -> None:
    event = make_active_event(unit="°C")
    name = unique("restore run")
    r = client.post("/api/v1/experiments", headers=operator, json={"name": name})
    assert r.status_code == 201, r.text
    [(exp_id, exp_public_id)] = db.execute("SELECT id, public_id FROM experiments WHERE name = %s", (name,)).fetchall()
    # Datapoints over ten days: ten chunks of the hypertable must come back, not just one.
    db.execute(
        "INSERT INTO datapoints (time, event_id, experiment_id, value)"
        " SELECT now() - g * interval '1 day' - interval '1 hour', %s, %s, g / 7.0 FROM generate_series(1, 10) g",
        (event.id, exp_id),
    )
    paths = [
        f"/api/v1/events/{event.public_id}",
        f"/api/v1/experiments/{exp_public_id}",
        f"/api/v1/experiments/{exp_public_id}/export/csv",
    ]
    before = [client.get(p, headers=operator).content for p in paths]
    assert b"\xc2\xb0C" in before[2]  # the unit, UTF-8, in every CSV row

    dump = tmp_path / "webmacs.dump"
    made = webmacs(tmp_path, free_port(), "db", "backup", str(dump), DATABASE_URL=server.settings.database_url or "")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"{dump} (PostgreSQL ")
    restored = webmacs(tmp_path, free_port(), "db", "restore", str(dump), DATABASE_URL=fresh.url())
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == f"restored {dump} into database 'webmacs'\n"

    copy = start_server(make_settings(fresh.url(), tmp_path / "copy"))
    try:
        with httpx.Client(base_url=copy.url, timeout=30) as c:
            headers = bearer(login(c, ADMIN_EMAIL, ADMIN_PASSWORD))  # the users came along, password hashes too
            assert [c.get(p, headers=headers).content for p in paths] == before
            # The restored hypertable takes new data (post_restore ended restore mode): a chunk for today.
            r = c.post("/api/v1/datapoints", headers=headers, json={"value": 1.5, "event_public_id": event.public_id})
            assert r.status_code == 201, r.text
    finally:
        copy.stop()
    with psycopg.connect(fresh.url()) as restored_db:
        rows = restored_db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (event.id,)).fetchone()
        restoring = restored_db.execute("SHOW timescaledb.restoring").fetchone()
    assert rows == (11,) and restoring == ("off",)


@pytest.mark.usefixtures("server")  # the session database with its schema and the audit log
def test_updater_backup_restores_into_a_fresh_cluster(fresh: Cluster, db_url: str, tmp_path: Path) -> None:
    """The updater's pre-update backup is the same function's: its file restores elsewhere."""
    (tmp_path / "updates").mkdir()
    build(tmp_path / "updates" / "webmacs-update-2.1.0.tar.gz", manifest=manifest_for())
    with Receiver() as health:
        health.default = HEALTHY
        settings = make_settings(
            db_url,
            tmp_path,
            webmacs_updater_apply="true",
            webmacs_updater_health_url=f"{health.url}/health",
        )
        [result] = Updater(settings).run_once() or []
    assert result.outcome == "applied" and result.backup is not None

    target = make_conninfo(fresh.url(), dbname=unique("from_updater").replace("-", "_"))
    assert backup.restore(result.backup, target).kept_as is None
    with psycopg.connect(target) as restored, psycopg.connect(db_url) as original:
        query = "SELECT content FROM log_entries WHERE content LIKE 'Update 2.1.0 applied%' ORDER BY id"
        # The entry recording this very update was written after the backup; everything before it is there.
        assert len(restored.execute(query).fetchall()) == len(original.execute(query).fetchall()) - 1
        assert (
            restored.execute("SELECT count(*) FROM schema_migrations").fetchone()
            == original.execute("SELECT count(*) FROM schema_migrations").fetchone()
        )


def test_restore_refuses_a_database_that_holds_data(fresh: Cluster, db_url: str, tmp_path: Path) -> None:
    made = backup.backup(db_url, tmp_path)
    target = make_conninfo(fresh.url(), dbname=unique("twice").replace("-", "_"))
    backup.restore(made.path, target)
    with pytest.raises(backup.BackupError, match="already holds data; restore with --replace"):
        backup.restore(made.path, target)
    replaced = backup.restore(made.path, target, replace=True)
    assert replaced.kept_as is not None and replaced.kept_as.startswith(replaced.database + "_before_restore_")


def test_restore_of_something_else_fails_clearly(fresh: Cluster, tmp_path: Path) -> None:
    junk = tmp_path / "not-a-dump"
    junk.write_text("SELECT 1;\n")
    with pytest.raises(backup.BackupError, match="pg_restore failed"):
        backup.restore(junk, fresh.url())
    with pytest.raises(backup.BackupError, match="no such backup file"):
        backup.restore(tmp_path / "missing.dump", fresh.url())
