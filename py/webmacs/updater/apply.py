"""Apply steps: how a verified bundle is installed and taken back — the spec's Docker Compose flow, or an
admin's command for bare-metal/systemd installs."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from webmacs.updater.bundle import IMAGES, SEMVER
from webmacs.updater.commands import Commands, failure

COMPOSE_FILE = "docker-compose.prod.yml"
#: The spec's pause between the two `docker compose up` attempts.
COMPOSE_RETRY_DELAY_S = 5.0
_ENV_VERSION = re.compile(r"^WEBMACS_VERSION=(.*)$", re.MULTILINE)


class ApplyFailed(Exception):
    def __init__(self, reason: str, *, changed: bool) -> None:
        super().__init__(reason)
        #: Whether anything was changed before the failure (then a rollback is due).
        self.changed = changed


@dataclass(frozen=True)
class Release:
    """A verified, extracted bundle."""

    version: str
    directory: Path
    bundle: str


class ApplyStep(Protocol):
    def current_version(self) -> str | None:
        """The version running now, if this step can tell (what a rollback returns to)."""

    def apply(self, release: Release, previous: str | None) -> None:
        """Install `release`; raises ApplyFailed."""

    def rollback(self, release: Release, previous: str | None) -> None:
        """Put back what ran before `release` was applied; raises ApplyFailed."""


def _bak(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def _copy_atomically(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.new")
    shutil.copy2(src, tmp)
    os.replace(tmp, dest)


class DockerCompose:
    """Spec §10.6: `docker load -i images.tar`; back up and replace the compose file when the bundle has one;
    `docker compose -f … up -d --no-build --remove-orphans` with WEBMACS_VERSION (two tries); the version
    written into the compose directory's `.env`. Rollback puts the backed-up compose file and `.env` back and
    brings the previous version up the same way."""

    def __init__(self, compose_dir: Path, commands: Commands, sleep: Callable[[float], None]) -> None:
        self.compose_dir = compose_dir
        self.compose_file = compose_dir / COMPOSE_FILE
        self.env_file = compose_dir / ".env"
        self.commands = commands
        self.sleep = sleep

    def current_version(self) -> str | None:
        try:
            m = _ENV_VERSION.search(self.env_file.read_text(encoding="utf-8"))
        except OSError:
            m = None
        found = m[1].strip().strip("\"'") if m else os.environ.get("WEBMACS_VERSION")
        return found or None

    def apply(self, release: Release, previous: str | None) -> None:
        r = self.commands.run(["docker", "load", "-i", str(release.directory / IMAGES)])
        if r.returncode != 0:
            raise ApplyFailed(failure(r), changed=False)  # nothing was touched yet
        # Backups of exactly what this update is about to change; a stale one from an earlier update would
        # roll back to the wrong thing.
        for path in (self.compose_file, self.env_file):
            if path.exists():
                shutil.copy2(path, _bak(path))
            else:
                _bak(path).unlink(missing_ok=True)
        new_compose = release.directory / COMPOSE_FILE
        if new_compose.is_file():
            _copy_atomically(new_compose, self.compose_file)
        self._up(release.version)
        self._persist(release.version)

    def rollback(self, release: Release, previous: str | None) -> None:
        for path in (self.compose_file, self.env_file):
            if _bak(path).exists():
                _copy_atomically(_bak(path), path)
        self._up(previous)

    def _up(self, version: str | None) -> None:
        env = dict(os.environ)
        if version:
            env["WEBMACS_VERSION"] = version
        else:
            env.pop("WEBMACS_VERSION", None)  # unknown: the restored .env decides
        args = ["docker", "compose", "-f", str(self.compose_file), "up", "-d", "--no-build", "--remove-orphans"]
        r = self.commands.run(args, env=env)
        if r.returncode != 0:
            self.sleep(COMPOSE_RETRY_DELAY_S)
            r = self.commands.run(args, env=env)
            if r.returncode != 0:
                raise ApplyFailed(failure(r), changed=True)

    def _persist(self, version: str) -> None:
        """Write the version into `.env` (when there is one) so that it survives a reboot (spec §10.6)."""
        if not self.env_file.exists() or not re.match(SEMVER, version):
            return
        text = self.env_file.read_text(encoding="utf-8")
        line = f"WEBMACS_VERSION={version}"
        text = _ENV_VERSION.sub(line, text) if _ENV_VERSION.search(text) else text.rstrip("\n") + f"\n{line}\n"
        tmp = self.env_file.with_name(".env.new")
        tmp.write_text(text, encoding="utf-8")
        shutil.copymode(self.env_file, tmp)  # .env holds secrets: keep its permissions
        os.replace(tmp, self.env_file)


class Command:
    """Bare-metal/systemd installs: run the admin's command (e.g. `pip install` of a wheel shipped in the
    bundle, then a service restart) with the bundle directory and versions in the environment; roll back
    with a second command, when one is configured."""

    def __init__(self, apply_command: str, rollback_command: str, commands: Commands) -> None:
        self.apply_command = shlex.split(apply_command)
        self.rollback_command = shlex.split(rollback_command)
        self.commands = commands

    def current_version(self) -> str | None:
        try:
            return importlib.metadata.version("webmacs-ts")
        except importlib.metadata.PackageNotFoundError:
            return None

    def _run(self, args: list[str], action: str, release: Release, previous: str | None) -> None:
        env = dict(os.environ)
        env.update(
            WEBMACS_UPDATER_ACTION=action,
            WEBMACS_BUNDLE_DIR=str(release.directory),
            WEBMACS_VERSION=release.version,
            WEBMACS_PREVIOUS_VERSION=previous or "",
        )
        r = self.commands.run(args, env=env, cwd=release.directory)
        if r.returncode != 0:
            # The command may have done part of its work: treat the installation as changed.
            raise ApplyFailed(failure(r), changed=True)

    def apply(self, release: Release, previous: str | None) -> None:
        self._run(self.apply_command, "apply", release, previous)

    def rollback(self, release: Release, previous: str | None) -> None:
        if not self.rollback_command:
            raise ApplyFailed("no WEBMACS_UPDATER_ROLLBACK command is configured", changed=True)
        self._run(self.rollback_command, "rollback", release, previous)
