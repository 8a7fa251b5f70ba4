"""The spec's Docker Compose flow, with `docker` replaced by a recording stand-in: the commands and their
arguments are the spec's, exactly; a failing health check rolls back to the previous compose file and version."""

from __future__ import annotations

import stat
import subprocess

import httpx

from tests.conftest import Server
from tests.updater.conftest import ENV_FILE, Rig
from tests.updater.support import COMPOSE_V1, COMPOSE_V2, build, compose_exec_health, compose_up, manifest_for
from webmacs.db.backup import pg_tool
from webmacs.updater.apply import COMPOSE_RETRY_DELAY_S, DockerCompose
from webmacs.updater.commands import Commands
from webmacs.updater.service import Updater


def test_bundle_is_applied_backed_up_and_recorded(rig: Rig, server: Server, admin: dict[str, str]) -> None:
    bundle = rig.bundle(files={"docker-compose.prod.yml": COMPOSE_V2})
    work = rig.updates / ".work" / bundle.name.removesuffix(".tar.gz")

    result = rig.run()

    assert result.outcome == "applied" and result.reason is None and result.version == "2.1.0"
    assert rig.docker.calls() == [
        {"args": ["load", "-i", f"{work}/images.tar"], "WEBMACS_VERSION": None},
        {"args": compose_up(rig.compose), "WEBMACS_VERSION": "2.1.0"},
        {"args": compose_exec_health(rig.compose), "WEBMACS_VERSION": None},
    ]
    assert result.moved_to == rig.updates / "applied" / f"2.1.0_{bundle.name}" and result.moved_to.is_file()
    assert not bundle.exists() and not work.exists()
    # The compose file was backed up, then replaced; the version persisted in .env, its mode kept (secrets).
    assert (rig.compose / "docker-compose.prod.yml").read_bytes() == COMPOSE_V2
    assert (rig.compose / "docker-compose.prod.yml.bak").read_bytes() == COMPOSE_V1
    assert (rig.compose / ".env").read_text() == "SECRET_KEY=kept-secret\nWEBMACS_VERSION=2.1.0\n"
    assert stat.S_IMODE((rig.compose / ".env").stat().st_mode) == 0o600
    # A real pg_dump of the session database, in custom format, with its versions beside it.
    assert result.backup is not None and result.backup.parent == rig.updates / "backups"
    assert result.backup.name.startswith("webmacs_backup_") and result.backup.suffix == ".dump"
    listing = subprocess.run([pg_tool("pg_restore"), "--list", str(result.backup)], capture_output=True, text=True)
    assert listing.returncode == 0 and "TABLE DATA public log_entries" in listing.stdout
    assert '"timescaledb_version"' in result.backup.with_name(result.backup.name + ".json").read_text()
    # Admins see the outcome in the UI's log.
    assert rig.log_entries(bundle) == [(f"Update 2.1.0 applied from bundle '{bundle.name}'.", "info")]
    r = httpx.get(f"{server.url}/api/v1/logging", headers=admin, params={"page_size": 100})
    assert any(e["content"] == f"Update 2.1.0 applied from bundle '{bundle.name}'." for e in r.json()["data"])


def test_failing_health_check_rolls_back(rig: Rig) -> None:
    bundle = rig.bundle(files={"docker-compose.prod.yml": COMPOSE_V2})
    rig.docker.script(exec=[1, 1, 1])  # three tries after the update fail; after the rollback it is healthy

    result = rig.run()

    assert result.outcome == "rolled_back"
    health = compose_exec_health(rig.compose)
    assert rig.docker.calls()[1:] == [
        {"args": compose_up(rig.compose), "WEBMACS_VERSION": "2.1.0"},
        {"args": health, "WEBMACS_VERSION": None},
        {"args": health, "WEBMACS_VERSION": None},
        {"args": health, "WEBMACS_VERSION": None},
        {"args": compose_up(rig.compose), "WEBMACS_VERSION": "2.0.0"},
        {"args": health, "WEBMACS_VERSION": None},
    ]
    assert rig.sleeps == [5, 5]  # the health check's interval between its three tries; nothing slept for real
    # The previous compose file and .env are back.
    assert (rig.compose / "docker-compose.prod.yml").read_bytes() == COMPOSE_V1
    assert (rig.compose / ".env").read_text() == ENV_FILE
    failed = rig.updates / "failed" / bundle.name
    assert result.moved_to == failed and failed.is_file()
    reason = failed.with_name(failed.name + ".reason").read_text()
    assert "unhealthy after the update: health check 'docker compose exec' exited with 1: stand-in" in reason
    assert "rolled back to 2.0.0. The database was not migrated." in reason
    [(content, level)] = rig.log_entries(bundle)
    assert level == "error" and content.startswith(f"Update 2.1.0 '{bundle.name}' failed: unhealthy after the update")


def test_compose_up_is_tried_twice_then_rolled_back(rig: Rig) -> None:
    rig.bundle()
    rig.docker.script(up=[1, 1])

    result = rig.run()

    assert result.outcome == "rolled_back" and "apply failed: 'docker compose up' exited with 1" in (
        result.reason or ""
    )
    ups = [c for c in rig.docker.calls() if "up" in c["args"]]
    assert [c["WEBMACS_VERSION"] for c in ups] == ["2.1.0", "2.1.0", "2.0.0"]
    assert rig.sleeps == [COMPOSE_RETRY_DELAY_S]  # the spec's 5 s between the two tries
    assert (rig.compose / "docker-compose.prod.yml").read_bytes() == COMPOSE_V1  # never replaced: no file bundled
    assert (rig.compose / ".env").read_text() == ENV_FILE  # the version was not persisted


def test_second_compose_try_succeeds(rig: Rig) -> None:
    rig.bundle()
    rig.docker.script(up=[1])
    result = rig.run()
    assert result.outcome == "applied"
    assert [c["WEBMACS_VERSION"] for c in rig.docker.calls() if "up" in c["args"]] == ["2.1.0", "2.1.0"]


def test_failed_docker_load_changes_nothing(rig: Rig) -> None:
    bundle = rig.bundle(files={"docker-compose.prod.yml": COMPOSE_V2})
    rig.docker.script(load=[1])

    result = rig.run()

    assert result.outcome == "failed"
    assert result.reason == "apply failed: 'docker load' exited with 1: stand-in docker load: exit 1"
    assert [c["args"][0] for c in rig.docker.calls()] == ["load"]  # no compose, no rollback needed
    assert (rig.compose / "docker-compose.prod.yml").read_bytes() == COMPOSE_V1
    assert (rig.updates / "failed" / bundle.name).exists()


def test_bundles_are_taken_oldest_first(rig: Rig) -> None:
    names = ["webmacs-update-2.10.0.tar.gz", "webmacs-update-2.9.0.tar.gz", "webmacs-update-2.9.1.tar.gz"]
    for name in names:
        version = name.removeprefix("webmacs-update-").removesuffix(".tar.gz")
        build(rig.updates / name, manifest=manifest_for(version))
    (rig.updates / "notes.txt").write_text("not a bundle")

    results = rig.updater().run_once() or []

    assert [r.version for r in results] == ["2.9.0", "2.9.1", "2.10.0"]
    ups = [c["WEBMACS_VERSION"] for c in rig.docker.calls() if "up" in c["args"]]
    assert ups == ["2.9.0", "2.9.1", "2.10.0"]
    assert (rig.compose / ".env").read_text().endswith("WEBMACS_VERSION=2.10.0\n")
    assert (rig.updates / "notes.txt").exists()


def test_unwritable_compose_directory_is_a_failed_apply(rig: Rig) -> None:
    bundle = rig.bundle()
    broken = rig.root / "not-a-directory"
    broken.write_text("")

    result = rig.run(webmacs_updater_compose_dir=broken)

    assert result.outcome == "rolled_back"
    assert (result.reason or "").startswith("apply failed: [Errno 20] Not a directory")
    assert (rig.updates / "failed" / bundle.name).exists()


def test_unexpected_error_does_not_leave_the_bundle_to_be_retried(rig: Rig) -> None:
    class Exploding(DockerCompose):
        def current_version(self) -> str | None:
            raise RuntimeError("bug")

    bundle = rig.bundle()
    updater = Updater(rig.settings(), step=Exploding(rig.compose, Commands(10), rig.sleeps.append))
    [result] = updater.run_once() or []
    assert result.outcome == "failed" and result.reason == "unexpected failure: RuntimeError('bug')"
    assert (rig.updates / "failed" / bundle.name).exists()
    assert updater.run_once() == []
