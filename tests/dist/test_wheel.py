"""The wheel as a user gets it: installed into a fresh virtualenv outside the checkout, `webmacs --version`,
`webmacs db migrate`, `webmacs serve` and `webmacs export` work from the package alone; the sdist carries what a
wheel is built from. `make dist-quick` builds both (`make dist` builds the wheel from the sdist, slower); a wheel
and an sdist newer than every source are reused."""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import tarfile
import time
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, SECRET, free_port

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
MIGRATIONS = sorted(p.name for p in (ROOT / "sql").glob("*.sql"))
# Everything a wheel is made of: a wheel older than any of these is stale.
_SOURCES = ("py/webmacs", "sql", "core-rs/src", "pyproject.toml", "Cargo.toml", "Cargo.lock", "core-rs/Cargo.toml")
# The first test may build the wheel (a release build of the engine when the cache was made by another kind of
# build, several minutes); with a built wheel the module takes about 2.5 min, mostly pip installing dependencies.
pytestmark = pytest.mark.timeout(1800)
# Never let the checkout (or a developer's settings) leak into the installed package's processes.
_SCRUBBED = ("PYTHONPATH", "VIRTUAL_ENV", "DATABASE_URL", "SECRET_KEY", "ENV")


def _newest_source() -> float:
    newest = 0.0
    for name in _SOURCES:
        path = ROOT / name
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        newest = max([newest, *(p.stat().st_mtime for p in files if p.suffix != ".so")])
    return newest


def _built(pattern: str) -> Path | None:
    found = sorted(DIST.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found and found[-1].stat().st_mtime >= _newest_source() else None


@pytest.fixture(scope="module")
def artifacts() -> tuple[Path, Path]:
    """The wheel and the sdist of this version, built by `make dist` unless fresh ones are there."""
    wheel, sdist = _built(f"webmacs_ts-{VERSION}-*abi3*.whl"), _built(f"webmacs_ts-{VERSION}.tar.gz")
    if wheel is None or sdist is None:
        subprocess.run(["make", "dist-quick"], cwd=ROOT, check=True, timeout=1800, stdout=subprocess.DEVNULL)
        wheel, sdist = _built(f"webmacs_ts-{VERSION}-*abi3*.whl"), _built(f"webmacs_ts-{VERSION}.tar.gz")
    assert wheel is not None and sdist is not None, "make dist did not produce a wheel and an sdist"
    return wheel, sdist


@pytest.fixture(scope="module")
def venv(artifacts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv (outside the checkout) with the wheel and its dependencies installed by pip."""
    where = tmp_path_factory.mktemp("wheel-venv")
    assert not where.resolve().is_relative_to(ROOT)
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True, timeout=120)
    pip = where / "venv" / "bin" / "pip"
    r = subprocess.run(
        [str(pip), "install", "-q", "--disable-pip-version-check", str(artifacts[0])],
        cwd=where,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return where / "venv"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in _SCRUBBED and not k.upper().startswith("WEBMACS_")}
    env.update(extra)
    return env


def _run(venv: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "webmacs"), *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def database(db_url: str) -> Iterator[str]:
    """A database of its own on the session's cluster, for the installed package to migrate."""
    name = f"wheel_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # a generated identifier, not input
    try:
        yield db_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_wheel_contents_and_metadata(artifacts: tuple[Path, Path]) -> None:
    wheel = artifacts[0]
    assert "-cp311-abi3-" in wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.parser.Parser().parsestr(z.read(f"webmacs_ts-{VERSION}.dist-info/METADATA").decode())
    assert {f"webmacs/sql/{m}" for m in MIGRATIONS} <= names
    assert "webmacs/db/provision-timescaledb.sh" in names and "webmacs/_core.abi3.so" in names
    assert not any(n.startswith("sql/") for n in names), "migrations must live inside the package"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["Name"] == "webmacs-ts" and meta["Version"] == VERSION
    assert meta["Requires-Python"] == ">=3.11"
    assert meta.get("License-Expression") == "MIT"
    assert "Programming Language :: Python :: 3.11" in meta.get_all("Classifier", [])
    assert meta.get_all("Project-URL") and meta["Description-Content-Type"].startswith("text/markdown")
    assert "# WebMACS-TS" in meta.get_payload()


def test_sdist_carries_what_a_wheel_is_built_from(artifacts: tuple[Path, Path]) -> None:
    sdist = artifacts[1]
    top = f"webmacs_ts-{VERSION}/"
    with tarfile.open(sdist) as t:
        names = {n.removeprefix(top) for n in t.getnames()}
    for needed in ("pyproject.toml", "Cargo.toml", "Cargo.lock", "core-rs/Cargo.toml", "core-rs/src/lib.rs"):
        assert needed in names, needed
    assert {"LICENSE", "README.md", "py/webmacs/__init__.py", "py/webmacs/db/provision-timescaledb.sh"} <= names
    # The package data a wheel built from the sdist needs, and the schema's source beside it.
    assert {f"py/webmacs/sql/{m}" for m in MIGRATIONS} <= names
    assert {f"sql/{m}" for m in MIGRATIONS} <= names


def test_installed_wheel_runs_outside_the_checkout(venv: Path, database: str, tmp_path: Path) -> None:
    # --version comes from the installed distribution's metadata.
    r = _run(venv, tmp_path, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"webmacs-ts {VERSION} (engine ")
    # The package is the installed one, its migrations and provisioning script package data.
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import webmacs, webmacs.db.cluster as c; from webmacs.db import migrate;"
            "print(webmacs.__file__); print(migrate.sql_dir()); print(c.PROVISION_SCRIPT.is_file());"
            "print(','.join(m.path.name for m in migrate.discover()))",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    package, sql_dir, script, found = probe.stdout.split("\n")[:4]
    assert Path(package).is_relative_to(venv) and Path(sql_dir).is_relative_to(venv)
    assert script == "True" and found.split(",") == MIGRATIONS

    r = _run(venv, tmp_path, "db", "migrate", DATABASE_URL=database)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "applied: " + ", ".join(m.removesuffix(".sql") for m in MIGRATIONS)
    assert _run(venv, tmp_path, "db", "migrate", DATABASE_URL=database).stdout.strip().endswith("(up to date)")

    port = free_port()
    env = _env(DATABASE_URL=database, SECRET_KEY=SECRET, WEBMACS_BCRYPT_ROUNDS="4")
    env.update(WEBMACS_UPDATE_DIR=str(tmp_path), WEBMACS_PLUGIN_DIR=str(tmp_path), WEBMACS_HOME=str(tmp_path / "h"))
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(venv / "bin" / "webmacs"), "serve", "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        health = None
        while health is None:
            try:
                health = httpx.get(f"{base}/health", timeout=5)
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["status"] in ("ok", "degraded")
        with httpx.Client(base_url=base, timeout=30) as c:
            token = c.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
            assert token.status_code == 200, token.text
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            event = c.post(
                "/api/v1/events",
                headers=headers,
                json={"name": "wheel-probe", "min_value": 0, "max_value": 10, "unit": "V", "type": "sensor"},
            )
            assert event.status_code == 201, event.text
            public_id = c.get("/api/v1/events", headers=headers).json()["data"][0]["public_id"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO datapoints (time, event_id, value)"
            " SELECT '2026-01-01T00:00:00Z'::timestamptz + n * interval '1 second', e.id, n"
            " FROM events e, generate_series(1, 3) n WHERE e.public_id = %s",
            (public_id,),
        )
    out = tmp_path / "out.csv"
    r = _run(
        venv,
        tmp_path,
        "export",
        "--events",
        public_id,
        "--start",
        "2026-01-01T00:00:00Z",
        "--end",
        "2026-01-02T00:00:00Z",
        "-o",
        str(out),
        DATABASE_URL=database,
    )
    assert r.returncode == 0, r.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and "wheel-probe" in lines[1]
