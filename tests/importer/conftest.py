"""Fixtures of the importer tests: WebMACS databases (spec §1) on the session's cluster, and one import of the
big one shared by the tests that only read it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import SECRET, Server, make_settings, start_server, unique
from tests.importer import webmacs_fixture
from tests.importer.webmacs_fixture import Fixture
from webmacs import cli
from webmacs.importer.report import Report
from webmacs.importer.run import import_webmacs

NewDatabase = Callable[[], str]


def admin_url(db_url: str) -> str:
    return psycopg.conninfo.make_conninfo(db_url, dbname="postgres")


@pytest.fixture(scope="session")
def created_databases(db_url: str) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    with psycopg.connect(admin_url(db_url), autocommit=True) as c:
        for name in created:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def new_database(db_url: str, created_databases: list[str]) -> NewDatabase:
    """Factory: an empty database on the test cluster (dropped at the end of the session); returns its URL."""

    def create() -> str:
        name = unique("imp").replace("-", "_")
        created_databases.append(name)
        return webmacs_fixture.create_database(admin_url(db_url), name)

    return create


@pytest.fixture(scope="session")
def webmacs_source(db_url: str, created_databases: list[str]) -> Fixture:
    """The WebMACS database with about a million datapoints (built once per session, only ever read)."""
    name = unique("webmacs_src").replace("-", "_")
    created_databases.append(name)
    # WebMACS ran with the SECRET_KEY the test servers use: its JWTs can be presented to them.
    return webmacs_fixture.build(admin_url(db_url), name, secret=SECRET)


@pytest.fixture(scope="session")
def small_source(db_url: str, created_databases: list[str]) -> Fixture:
    """The same kind of WebMACS database with 20,000 datapoints, for the tests that import it many times."""
    name = unique("webmacs_small").replace("-", "_")
    created_databases.append(name)
    return webmacs_fixture.build(admin_url(db_url), name, batches=2_000)


@pytest.fixture(scope="session")
def imported(webmacs_source: Fixture, new_database: NewDatabase) -> tuple[str, Report]:
    """A database holding the import of `webmacs_source` (and the import's report)."""
    target = new_database()
    return target, import_webmacs(webmacs_source.dsn, target)


@pytest.fixture(scope="session")
def imported_server(imported: tuple[str, Report], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on the imported database."""
    tmp: Path = tmp_path_factory.mktemp("imported")
    s = start_server(make_settings(imported[0], tmp))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Any:
    """`webmacs …` in this process against a database; returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    monkeypatch.setenv("WEBMACS_HOME", str(tmp_path / "home"))

    def run(database: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setenv("DATABASE_URL", database)
        capsys.readouterr()
        status = cli.main(list(argv))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run
