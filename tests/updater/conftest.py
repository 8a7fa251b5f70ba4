"""The updater's test rig: an update directory, a compose directory, a recording `docker` and a health endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import make_settings, unique
from tests.services.receiver import Receiver
from tests.updater.support import COMPOSE_V1, HEALTHY, Docker, build, install_docker, manifest_for
from webmacs.db import migrate
from webmacs.settings import Settings
from webmacs.updater.service import Result, Updater

ENV_FILE = "SECRET_KEY=kept-secret\nWEBMACS_VERSION=2.0.0\n"


@dataclass
class Rig:
    root: Path
    updates: Path
    compose: Path
    docker: Docker
    health: Receiver
    db_url: str
    #: What the updater slept for (nothing really waits: the tests never depend on timing).
    sleeps: list[float] = field(default_factory=list)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "webmacs_updater_compose_dir": self.compose,
            "webmacs_updater_health_tries": 3,
            "webmacs_updater_health_interval_s": 5,
        }
        values.update(overrides)
        return make_settings(self.db_url, self.root, **values)

    @property
    def health_url(self) -> str:
        return f"{self.health.url}/health"

    def updater(self, **overrides: Any) -> Updater:
        return Updater(self.settings(**overrides), sleep=self.sleeps.append)

    def run(self, **overrides: Any) -> Result:
        """One pass of an updater with these settings over a directory holding one bundle."""
        results = self.updater(**overrides).run_once()
        assert results is not None and len(results) == 1, results
        return results[0]

    def bundle(self, version: str = "2.1.0", **kw: Any) -> Path:
        """A bundle with a name of its own (its log entries are told apart by it)."""
        kw.setdefault("manifest", manifest_for(version))
        return build(self.updates / f"webmacs-update-{version}-{unique('b')}.tar.gz", **kw)

    def log_entries(self, bundle: Path) -> list[tuple[str, str]]:
        with psycopg.connect(self.db_url, autocommit=True) as db:
            rows = db.execute(
                "SELECT content, logging_type FROM log_entries WHERE content LIKE %s ORDER BY id",
                (f"%{bundle.name}%",),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]


@pytest.fixture(scope="session")
def schema(db_url: str) -> str:
    """The session database with the schema in place (the updater writes log entries, backs it up)."""
    migrate.apply(db_url)
    return db_url


@pytest.fixture
def rig(tmp_path: Path, schema: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    (tmp_path / "updates").mkdir()
    compose = tmp_path / "opt-webmacs"
    compose.mkdir()
    (compose / "docker-compose.prod.yml").write_bytes(COMPOSE_V1)
    (compose / ".env").write_text(ENV_FILE)
    (compose / ".env").chmod(0o600)
    docker = install_docker(tmp_path / "docker")
    for k, v in docker.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WEBMACS_VERSION", raising=False)
    with Receiver() as health:
        health.default = HEALTHY
        yield Rig(tmp_path, tmp_path / "updates", compose, docker, health, schema)
