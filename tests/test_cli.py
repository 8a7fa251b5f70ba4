"""The `webmacs` command (`db up|status|url|migrate|down`) and the settings it reads (spec §3.3, §16)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

from tests.conftest import free_port
from webmacs.db.cluster import Cluster
from webmacs.settings import Settings

# Variables of ours and of spec §16 that a developer's shell might carry into the subprocess.
_SCRUBBED = ("DATABASE_URL", "SECRET_KEY", "ENV", "WEBMACS_HOME", "WEBMACS_DB_PORT")


@pytest.fixture
def local_cluster() -> Iterator[tuple[Path, int]]:
    """A WEBMACS_HOME and port for a cluster the CLI manages; destroyed afterwards whatever happened."""
    home = Path(tempfile.mkdtemp(prefix="webmacs-cli-"))
    home.chmod(0o755)  # the postgres user must be able to enter it when tests run as root
    port = free_port()
    try:
        yield home, port
    finally:
        Cluster(home, port).destroy()
        shutil.rmtree(home, ignore_errors=True)


def webmacs(home: Path, port: int, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k.upper() not in _SCRUBBED}
    environ.update(WEBMACS_HOME=str(home), WEBMACS_DB_PORT=str(port), **env)
    # cwd=home: no .env file of the checkout is read.
    return subprocess.run(
        [sys.executable, "-m", "webmacs.cli", *args],
        cwd=home,
        env=environ,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def postmaster_pid(cluster: Cluster) -> int:
    return int((cluster.data_dir / "postmaster.pid").read_text().splitlines()[0])


def alive(pid: int) -> bool:
    """Whether `pid` runs; an exited process not yet reaped by its (re)parent counts as gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" not in state.split()[1]


def processes_using(data_dir: Path) -> list[int]:
    """PIDs whose command line names the data directory (the postmaster and its children)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if str(data_dir) in cmdline and "postgres" in cmdline:
            found.append(int(proc.name))
    return found


def test_db_lifecycle(local_cluster: tuple[Path, int]) -> None:
    home, port = local_cluster
    cluster = Cluster(home, port)
    url = f"postgresql://webmacs@127.0.0.1:{port}/webmacs"

    status = webmacs(home, port, "db", "status")
    assert status.returncode == 0 and status.stdout.startswith("not initialised")

    up = webmacs(home, port, "db", "up")
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == url
    status = webmacs(home, port, "db", "status")
    assert status.stdout.startswith(f"running on 127.0.0.1:{port}")
    assert webmacs(home, port, "db", "url").stdout.strip() == url

    # Second `up` takes the fast path: the same server keeps running, nothing is re-initialised.
    pid = postmaster_pid(cluster)
    again = webmacs(home, port, "db", "up")
    assert again.returncode == 0 and again.stdout.strip() == url
    assert postmaster_pid(cluster) == pid

    migrated = webmacs(home, port, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith("applied: 0001_extension")
    assert webmacs(home, port, "db", "migrate").stdout.strip() == "applied: nothing (up to date)"

    down = webmacs(home, port, "db", "down")
    assert down.returncode == 0 and down.stdout.strip() == "stopped"
    assert not cluster.running()
    assert not (cluster.data_dir / "postmaster.pid").exists()
    assert not alive(pid)
    assert processes_using(cluster.data_dir) == []
    assert webmacs(home, port, "db", "status").stdout.startswith(f"stopped on 127.0.0.1:{port}")
    # Stopping a stopped cluster is harmless.
    assert webmacs(home, port, "db", "down").returncode == 0


def test_db_url_prefers_database_url_normalised(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    r = webmacs(tmp_path, free_port(), "db", "url", DATABASE_URL="postgresql+asyncpg://u:p@db.example:5432/webmacs")
    assert r.returncode == 0 and r.stdout.strip() == "postgresql://u:p@db.example:5432/webmacs"


def test_unknown_db_action_is_a_usage_error(tmp_path: Path) -> None:
    r = webmacs(tmp_path, free_port(), "db", "explode")
    assert r.returncode == 2 and "invalid choice" in r.stderr


# --- Settings ---


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_production_refuses_a_short_secret(secret: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="SECRET_KEY"):
        Settings(_env_file=None, env="production", secret_key=secret)


@pytest.mark.parametrize("env", ["Production", " PRODUCTION "])
def test_production_is_recognised_in_any_case(env: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="SECRET_KEY"):
        Settings(_env_file=None, env=env, secret_key="short")


@pytest.mark.parametrize("env", ["staging", "test", "development"])
def test_other_environments_run_as_development(env: str) -> None:
    s = Settings(_env_file=None, env=env, secret_key="")
    assert s.env == env and s.weak_secret


def test_production_accepts_a_long_secret() -> None:
    s = Settings(_env_file=None, env="production", secret_key="x" * 32)
    assert not s.weak_secret and s.secret_key_effective == "x" * 32


def test_development_tolerates_an_empty_secret_with_a_generated_key_shared_by_its_home(tmp_path: Path) -> None:
    a = Settings(_env_file=None, env="development", secret_key="", webmacs_home=tmp_path / "a")
    b = Settings(_env_file=None, env="development", secret_key="", webmacs_home=tmp_path / "a")
    other = Settings(_env_file=None, env="development", secret_key="", webmacs_home=tmp_path / "b")
    assert a.weak_secret
    # Never sign with "": a random key generated once per home, shared by every process (worker) of it.
    assert len(a.secret_key_effective) >= 32 and a.secret_key_effective == b.secret_key_effective
    assert a.secret_key_effective != other.secret_key_effective
    assert ((tmp_path / "a" / "secret-key").stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            "postgresql+asyncpg://webmacs:webmacs@localhost:5432/webmacs",
            "postgresql://webmacs:webmacs@localhost:5432/webmacs",
        ),
        ("postgresql+psycopg://u@h/d", "postgresql://u@h/d"),
        ("postgres://u@h/d", "postgresql://u@h/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("  ", None),
        ("", None),
    ],
)
def test_database_url_is_normalised(given: str, expected: str | None) -> None:
    assert Settings(_env_file=None, database_url=given).database_url == expected


def test_settings_read_the_spec_variable_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://a:b@h:5432/x")
    monkeypatch.setenv("rate_limit_per_minute", "7")  # names are case-insensitive
    monkeypatch.setenv("CORS_ORIGINS", '["https://ui.example"]')
    monkeypatch.setenv("ENV", "development")
    s = Settings()
    assert s.database_url == "postgresql://a:b@h:5432/x"
    assert s.rate_limit_per_minute == 7
    assert s.cors_origins == ["https://ui.example"]


def test_production_from_the_environment_with_a_short_secret_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENV", "production")
    monkeypatch.setenv("SECRET_KEY", "too-short")
    with pytest.raises(ValueError, match="SECRET_KEY"):
        Settings()


def test_dotenv_in_the_working_directory_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("SECRET_KEY", "ENV"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text("SECRET_KEY=" + "k" * 40 + "\nENV=production\n")
    s = Settings()
    assert s.env == "production" and s.secret_key == "k" * 40


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("Admin@WEBMACS.IO", "Admin@webmacs.io"),
        (" admin@webmacs.io ", "admin@webmacs.io"),
        ("admin@localhost", "admin@localhost"),  # refused by the validator: kept as given
    ],
)
def test_initial_admin_email_is_normalised_like_login(given: str, stored: str) -> None:
    # Login lower-cases the domain (spec §3.4); the seeded admin must match or could never log in.
    assert Settings(_env_file=None, initial_admin_email=given).initial_admin_email == stored
