"""Database backup and restore: `pg_dump` in custom format, `pg_restore` inside TimescaleDB's pre/post restore."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from webmacs.db.cluster import ClusterError, _pg_bindir

#: A dump of a busy database can take a while; a stuck one must not hold an update forever.
TOOL_TIMEOUT_S = 3600
#: How long a replacing restore waits for TimescaleDB's job scheduler to leave the database it renames.
QUIESCE_TIMEOUT_S = 30
#: Schemas that belong to PostgreSQL or to TimescaleDB itself: tables there do not make a database "in use".
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "_timescaledb_%", "timescaledb_%", "toolkit_%")


class BackupError(RuntimeError):
    """A backup or restore could not be made; the message says why and what to do."""


@dataclass(frozen=True)
class DatabaseState:
    """What a dump must be restored next to: the server's and the extension's versions, the schema version."""

    postgres_version: str
    timescaledb_version: str | None
    schema_version: int | None


@dataclass(frozen=True)
class Backup:
    path: Path
    created: str
    database: str
    state: DatabaseState

    @property
    def sidecar(self) -> Path:
        return sidecar(self.path)


@dataclass(frozen=True)
class Restored:
    database: str
    #: Where the replaced database's contents were kept (renamed, never dropped), if there were any.
    kept_as: str | None


def sidecar(dump: Path) -> Path:
    """The JSON file written beside a dump, recording the versions it was taken with."""
    return dump.with_name(dump.name + ".json")


def pg_tool(name: str) -> str:
    """Path of a PostgreSQL client program: the newest installed server's (the version the local cluster
    runs, and new enough for older servers), else whatever PATH offers."""
    try:
        candidate = _pg_bindir() / name
        if candidate.exists():
            return str(candidate)
    except ClusterError:
        pass
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} not found; install the PostgreSQL client programs (postgresql-client).")
    return found


def _libpq(url: str, **override: str) -> tuple[str, dict[str, str]]:
    """(conninfo without the password, environment carrying it): a password on a command line is visible
    to every user of the machine in `ps`."""
    params = {k: str(v) for k, v in conninfo_to_dict(url).items()}
    params.update(override)
    password = params.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    return make_conninfo(**params), env


def _run(args: list[str], env: dict[str, str]) -> None:
    try:
        r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=TOOL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise BackupError(f"{Path(args[0]).name} did not finish within {TOOL_TIMEOUT_S} s") from e
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        # pg_dump warns about TimescaleDB's circular catalog keys on every run; the error is at the end.
        raise BackupError(f"{Path(args[0]).name} failed ({r.returncode}): " + " | ".join(lines[-5:]))


def database_state(url: str) -> DatabaseState:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        pg = conn.execute("SHOW server_version").fetchone()
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
        schema = None
        if conn.execute("SELECT to_regclass('public.schema_migrations')").fetchone() != (None,):
            row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
            schema = row[0] if row else None
    assert pg is not None  # SHOW always answers
    return DatabaseState(str(pg[0]), str(ext[0]) if ext else None, schema)


def backup_name(directory: Path, now: datetime | None = None) -> Path:
    """`webmacs_backup_<YYYYmmdd_HHMMSS>.dump` in `directory` (spec §10.6's name, custom format instead of
    SQL text); a second backup within the same second gets a suffix instead of replacing the first."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d_%H%M%S")
    path = directory / f"webmacs_backup_{stamp}.dump"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"webmacs_backup_{stamp}_{n}.dump"
    return path


def backup(url: str, dest: Path) -> Backup:
    """Dump the database at `url` to `dest` (a file, or a directory to create a named backup in) with
    `pg_dump --format=custom`, plus a JSON sidecar recording the versions a restore needs. The dump is
    written under a temporary name first: a failed run never leaves a file that looks like a backup."""
    if dest.is_dir():
        dest = backup_name(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    state = database_state(url)
    conninfo, env = _libpq(url)
    part = dest.with_name(f".{dest.name}.part")
    try:
        _run([pg_tool("pg_dump"), "--format=custom", f"--file={part}", f"--dbname={conninfo}"], env)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    made = Backup(dest, datetime.now(UTC).isoformat(), str(conninfo_to_dict(url).get("dbname", "")), state)
    sidecar(dest).write_text(
        json.dumps({"created": made.created, "database": made.database, **asdict(state)}, indent=2) + "\n",
        encoding="utf-8",
    )
    return made


def _recorded_state(dump: Path) -> DatabaseState | None:
    try:
        data = json.loads(sidecar(dump).read_text(encoding="utf-8"))
        return DatabaseState(data["postgres_version"], data["timescaledb_version"], data["schema_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _in_use(conn: psycopg.Connection) -> bool:
    """Whether the connected database holds any table of its own."""
    pattern = sql.SQL(" AND ").join(sql.SQL("schemaname NOT LIKE {}").format(sql.Literal(s)) for s in _SYSTEM_SCHEMAS)
    row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM pg_tables WHERE {})").format(pattern)).fetchone()
    return bool(row and row[0])


def _pre_restore(url: str, database: str, timescaledb_version: str | None = None) -> None:
    """Create the extension (at the dump's version when known) and call `timescaledb_pre_restore()`, which
    stops the database's background jobs until `timescaledb_post_restore()`."""
    with psycopg.connect(make_conninfo(url, dbname=database), autocommit=True) as conn:
        version = (
            sql.SQL(" VERSION {}").format(sql.Literal(timescaledb_version)) if timescaledb_version else sql.SQL("")
        )
        conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS timescaledb{}").format(version))
        # Roles belong to the cluster, not the dump, but the dump grants to the dashboards' read-only role
        # (migration 0029): it must exist before those grants are restored. Its logins are not carried over.
        conn.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'webmacs_reader') THEN"
            " CREATE ROLE webmacs_reader NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT; END IF; END $$"
        )
        conn.execute("SELECT timescaledb_pre_restore()")


def _post_restore(url: str, database: str) -> None:
    with psycopg.connect(make_conninfo(url, dbname=database), autocommit=True) as conn:
        conn.execute("SELECT timescaledb_post_restore()")


def _pg_restore(dump: Path, url: str, database: str) -> None:
    """`pg_restore` in one transaction (a failure leaves nothing half restored). --no-owner: objects belong
    to the role restoring them, i.e. the role the server connects as, even when the dump came from a
    cluster with other role names."""
    conninfo, env = _libpq(url, dbname=database)
    args = ["--no-owner", "--single-transaction", "--exit-on-error", f"--dbname={conninfo}", str(dump)]
    _run([pg_tool("pg_restore"), *args], env)


def _sessions(admin: psycopg.Connection, database: str, *, clients_only: bool) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %(d)s AND pid <> pg_backend_pid()"
        " AND (NOT %(c)s OR backend_type = 'client backend')",
        {"d": database, "c": clients_only},
    ).fetchone()
    return int(row[0]) if row else 0


def _rename(admin: psycopg.Connection, old: str, new: str) -> None:
    admin.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))


def _quiesce(admin: psycopg.Connection, database: str) -> None:
    """Wait (bounded) until nothing but TimescaleDB's stopped job scheduler was connected to `database`:
    a database can only be renamed when no session uses it."""
    deadline = time.monotonic() + QUIESCE_TIMEOUT_S
    while (n := _sessions(admin, database, clients_only=False)) > 0:
        if time.monotonic() > deadline:
            raise BackupError(f"{n} session(s) still use '{database}'; stop the server and the updater, then retry")
        time.sleep(0.1)


def restore(dump: Path, url: str, *, replace: bool = False) -> Restored:
    """Restore `dump` (made by `backup`) into the database named by `url`, in TimescaleDB's required order:
    extension, `timescaledb_pre_restore()`, `pg_restore`, `timescaledb_post_restore()`.

    A missing database is created; an empty one is restored into. A database holding tables is replaced
    only with `replace`: the dump is restored into a new database first, and only when that succeeded is
    the old one renamed aside (kept, never dropped; its background jobs stay stopped) and the new one given
    its name. No client may be connected to it (stop the server and the updater first)."""
    if not dump.is_file():
        raise BackupError(f"{dump}: no such backup file")
    _run([pg_tool("pg_restore"), "--list", str(dump)], dict(os.environ))  # is it a custom-format dump at all?
    recorded = _recorded_state(dump)
    ext_version = recorded.timescaledb_version if recorded else None
    params = conninfo_to_dict(url)
    database = str(params.get("dbname") or params.get("user") or "")
    if not database:
        raise BackupError("the database URL names no database")
    maintenance = make_conninfo(url, dbname="postgres")
    with psycopg.connect(maintenance, autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is not None
        if not exists:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        elif replace and (n := _sessions(admin, database, clients_only=True)):
            raise BackupError(f"{n} client(s) are connected to '{database}'; stop the server and the updater first")
    in_use = False
    if exists:
        with psycopg.connect(make_conninfo(url, dbname=database), autocommit=True) as conn:
            in_use = _in_use(conn)
        if in_use and not replace:
            raise BackupError(
                f"database '{database}' already holds data; restore with --replace to keep it aside under"
                " another name and put the backup in its place"
            )
    if not in_use:
        _pre_restore(url, database, ext_version)
        try:
            _pg_restore(dump, url, database)
        finally:
            _post_restore(url, database)
        return Restored(database, None)

    stamp = datetime.now(UTC).strftime("%Y%m%d_%H%M%S")
    staging, kept = f"{database}_restoring_{stamp}", f"{database}_before_restore_{stamp}"
    with psycopg.connect(maintenance, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(staging)))
    try:
        # The staging database stays in restore mode until it has its final name: its job scheduler would
        # otherwise connect to it and block the rename.
        _pre_restore(url, staging, ext_version)
        _pg_restore(dump, url, staging)
        _pre_restore(url, database)
        with psycopg.connect(maintenance, autocommit=True) as admin:
            try:
                _quiesce(admin, database)
                _quiesce(admin, staging)
                _rename(admin, database, kept)
            except BaseException:
                _post_restore(url, database)  # the old database goes on as it was
                raise
            try:
                _rename(admin, staging, database)
            except BaseException:
                _rename(admin, kept, database)  # never leave the name unoccupied
                _post_restore(url, database)
                raise
    except BaseException:
        with psycopg.connect(maintenance, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(staging)))
        raise
    _post_restore(url, database)
    return Restored(database, kept)
