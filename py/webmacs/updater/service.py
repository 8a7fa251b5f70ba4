"""The updater's pass over the update directory: lock, verify, back up, apply, check health, roll back, record."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import psycopg

from webmacs.db import backup as db_backup
from webmacs.repositories import logs as logs_repo
from webmacs.repositories import users as users_repo
from webmacs.settings import Settings
from webmacs.updater import bundle as bundles
from webmacs.updater import signature
from webmacs.updater.apply import COMPOSE_FILE, ApplyFailed, ApplyStep, Command, DockerCompose, Release
from webmacs.updater.commands import Commands
from webmacs.updater.health import Probe, exec_probe, http_probe, wait_healthy

log = logging.getLogger("webmacs.updater")

Outcome = Literal["applied", "refused", "rolled_back", "failed"]
LOCK_FILE = ".updater.lock"
WORK_DIR = ".work"


@dataclass(frozen=True)
class Result:
    bundle: str
    outcome: Outcome
    #: Where the bundle was moved (applied/… or failed/…).
    moved_to: Path
    version: str | None = None
    reason: str | None = None
    backup: Path | None = None


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the local cluster's URL. The updater never starts the cluster: that is the server's."""
    if settings.database_url:
        return settings.database_url
    from webmacs.db.cluster import Cluster

    return Cluster(settings.webmacs_home, settings.webmacs_db_port).url()


def _natural(path: Path) -> list[int | str]:
    # "Oldest first" by name (spec), with numbers compared as numbers: 2.10.0 comes after 2.9.0.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _free(path: Path) -> Path:
    """`path`, or `path` with a counter when a bundle of that name was moved there before."""
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


class Updater:
    def __init__(
        self,
        settings: Settings,
        *,
        step: ApplyStep | None = None,
        probe: Probe | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.directory = settings.webmacs_update_dir
        self.sleep = sleep
        self.commands = Commands(settings.webmacs_updater_command_timeout_s)
        self.limits = bundles.Limits.from_settings(settings)
        # A malformed key stops the updater at start rather than failing every bundle for a config error.
        key = settings.webmacs_updater_public_key.strip()
        self.public_key = signature.PublicKey.parse(key) if key else None
        compose_dir = settings.webmacs_updater_compose_dir
        if step is None:
            if settings.webmacs_updater_apply.strip():
                step = Command(settings.webmacs_updater_apply, settings.webmacs_updater_rollback, self.commands)
            else:
                step = DockerCompose(compose_dir, self.commands, sleep)
        self.step = step
        if probe is None:
            mode = settings.webmacs_updater_health_check or ("exec" if isinstance(step, DockerCompose) else "http")
            url = settings.webmacs_updater_health_url
            compose_file = compose_dir / COMPOSE_FILE
            probe = exec_probe(self.commands, compose_file, url) if mode == "exec" else http_probe(url)
        self.probe = probe

    # --- the service ---

    def pending(self) -> list[Path]:
        """Bundles waiting, oldest first. Only regular files: a link placed in the directory is not followed."""
        found = [p for p in self.directory.glob(bundles.BUNDLE_GLOB) if p.is_file() and not p.is_symlink()]
        return sorted(found, key=_natural)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[bool]:
        """An exclusive lock on the update directory for one pass: two updaters (two hosts sharing the
        directory, or a second process started by mistake) never work on the same bundle. Released by the
        kernel if the process dies."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def run_once(self) -> list[Result] | None:
        """One pass: every waiting bundle, oldest first. None when another updater holds the lock."""
        with self._locked() as mine:
            if not mine:
                log.info("another updater is working on %s; skipping this pass", self.directory)
                return None
            return [self.process(b) for b in self.pending()]

    def run_forever(self, stop: threading.Event) -> None:
        log.info("updater watching %s every %g s", self.directory, self.settings.webmacs_updater_poll)
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # one bad pass (a full disk, a lost directory) must not end the service
                log.exception("updater pass failed")
            stop.wait(self.settings.webmacs_updater_poll)

    # --- one bundle ---

    def process(self, path: Path) -> Result:
        work = self.directory / WORK_DIR / path.name.removesuffix(".tar.gz")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            return self._process(path, work)
        except Exception as e:
            # A bundle left in place would be tried again every pass (docker load and all): record it as
            # failed instead, whatever went wrong.
            log.exception("bundle %s: unexpected failure", path.name)
            return self._move(path, "failed", "failed", f"unexpected failure: {e!r}", version=None, backup=None)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _process(self, path: Path, work: Path) -> Result:
        name = path.name
        log.info("bundle %s: verifying", name)
        try:
            extracted = bundles.extract(path, work, self.limits)
            if self.public_key is not None:
                signature.verify(self.public_key, extracted)
        except bundles.BundleInvalid as e:
            return self._refused(path, str(e))
        except OSError as e:  # extraction could not write (disk full, permissions): still recorded
            return self._refused(path, f"cannot extract: {e.strerror or e}")
        release = Release(extracted.manifest.version, work, name)
        previous = self.step.current_version()

        url = database_url(self.settings)
        made: db_backup.Backup | None = None
        try:
            backups = self.directory / "backups"
            backups.mkdir(exist_ok=True)
            made = db_backup.backup(url, backups)
            log.info("bundle %s: database backed up to %s", name, made.path)
        except (db_backup.BackupError, psycopg.Error, OSError) as e:
            if self.settings.webmacs_updater_require_backup:
                why = f"database backup failed: {e}"
                return self._move(path, "failed", "failed", why, version=release.version, backup=None)
            log.warning("bundle %s: database backup failed, going on without one: %s", name, e)

        log.info("bundle %s: applying %s (running now: %s)", name, release.version, previous or "unknown")
        try:
            self.step.apply(release, previous)
            unhealthy = self._wait_healthy()
            if unhealthy is None:
                return self._move(path, "applied", "applied", None, version=release.version, backup=made)
            reason = f"unhealthy after the update: {unhealthy}"
        except ApplyFailed as e:
            if not e.changed:
                return self._move(path, "failed", "failed", f"apply failed: {e}", version=release.version, backup=made)
            reason = f"apply failed: {e}"
        except OSError as e:  # the compose directory not writable, a full disk: files may be half replaced
            reason = f"apply failed: {e}"
        return self._roll_back(path, release, previous, reason, made, url)

    def _roll_back(
        self, path: Path, release: Release, previous: str | None, reason: str, made: db_backup.Backup | None, url: str
    ) -> Result:
        log.error("bundle %s: %s; rolling back to %s", path.name, reason, previous or "the previous version")
        back_to = previous or "the previous version"
        outcome: Outcome = "rolled_back"
        try:
            self.step.rollback(release, previous)
            after = self._wait_healthy()
            summary = f"rolled back to {back_to}"
            if after is not None:
                outcome = "failed"
                summary += f", which is not healthy either ({after})"
        except (ApplyFailed, OSError) as e:
            outcome = "failed"
            summary = f"the rollback failed too ({e}); the installation needs an administrator"
        detail = f"{reason}; {summary}. {self._database_note(made, url, release.version)}".strip()
        return self._move(path, "failed", outcome, detail, version=release.version, backup=made)

    def _wait_healthy(self) -> str | None:
        s = self.settings
        return wait_healthy(self.probe, s.webmacs_updater_health_tries, s.webmacs_updater_health_interval_s, self.sleep)

    def _database_note(self, made: db_backup.Backup | None, url: str, version: str) -> str:
        """Whether the failed version migrated the database, and how to get the old schema back: migrations
        only add, so the previous version usually runs on the new schema, and restoring would lose what was
        written since the backup — hence advice, not an automatic restore."""
        if made is None:
            return "No database backup was taken."
        restore = f"webmacs updater restore {made.path.name}"
        try:
            now = db_backup.database_state(url).schema_version
        except (psycopg.Error, OSError):
            return f"Could not tell whether {version} migrated the database; to return to the backup: {restore}."
        before = made.state.schema_version
        if now == before:
            return "The database was not migrated."
        return (
            f"{version} migrated the database (schema {before} to {now}); if the previous version misbehaves,"
            f" stop the server and restore the backup: {restore}."
        )

    # --- outcomes ---

    def _refused(self, path: Path, reason: str) -> Result:
        return self._move(path, "failed", "refused", reason, version=None, backup=None)

    def _move(
        self,
        path: Path,
        to: str,
        outcome: Outcome,
        reason: str | None,
        *,
        version: str | None,
        backup: db_backup.Backup | None,
    ) -> Result:
        target_dir = self.directory / to
        target_dir.mkdir(parents=True, exist_ok=True)
        dest = _free(target_dir / (f"{version}_{path.name}" if to == "applied" else path.name))
        os.replace(path, dest)
        if reason is not None:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            dest.with_name(dest.name + ".reason").write_text(f"{stamp} {outcome}: {reason}\n", encoding="utf-8")
        result = Result(path.name, outcome, dest, version, reason, backup.path if backup else None)
        self._record(result)
        return result

    def _record(self, result: Result) -> None:
        """Log the outcome, and write it to the audit log (`/logging`) so that admins see it in the UI."""
        if result.outcome == "applied":
            content, level = f"Update {result.version} applied from bundle '{result.bundle}'.", "info"
            log.info("%s", content)
        else:
            what = f"Update {result.version}" if result.version else "Update bundle"
            verb = "refused" if result.outcome == "refused" else "failed"
            content, level = f"{what} '{result.bundle}' {verb}: {result.reason}", "error"
            log.error("%s", content)
        try:
            asyncio.run(_write_log_entry(database_url(self.settings), content, level))
        except (psycopg.Error, OSError) as e:  # the database may be what is broken; the files still say it
            log.warning("could not write the audit log entry: %s", e)


async def _write_log_entry(url: str, content: str, logging_type: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as conn:
        admin = await users_repo.first_admin(conn)
        await logs_repo.create(
            conn, content=content, logging_type=logging_type, user_public_id=admin["public_id"] if admin else None
        )
