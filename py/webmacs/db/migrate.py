"""Numbered SQL migrations from `sql/`, applied in order and recorded in `schema_migrations`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Any constant works; it only has to be the same in every process applying migrations.
_LOCK_KEY = 0x7765626D61637301


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def sql_dir() -> Path:
    """Where the migrations are: `WEBMACS_SQL_DIR`, else the package data of an installed wheel (`webmacs/sql`),
    else the checkout's top-level `sql/` (an editable install, `maturin develop`)."""
    env = os.environ.get("WEBMACS_SQL_DIR")
    if env:
        return Path(env)
    packaged = resources.files("webmacs") / "sql"
    if packaged.is_dir():
        # A wheel is installed as plain files, so the traversable is a real directory.
        return Path(str(packaged))
    # py/webmacs/db/migrate.py -> repository root / sql
    return Path(__file__).resolve().parents[3] / "sql"


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found = []
    for p in sorted(directory.glob("*.sql")):
        m = _NAME.match(p.name)
        if not m:
            raise ValueError(f"migration file name {p.name!r} is not NNNN_name.sql")
        found.append(Migration(int(m.group(1)), p.stem, p))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError("two migrations share a version number")
    return found


def apply(conninfo: str, chunk_interval: str = "1 day", directory: Path | None = None) -> list[str]:
    """Apply pending migrations; returns the names applied. Safe to call concurrently from several processes."""
    applied: list[str] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_on timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for m in discover(directory):
                if m.version in done:
                    continue
                with conn.transaction():
                    conn.execute("SELECT set_config('webmacs.chunk_interval', %s, true)", (chunk_interval,))
                    conn.execute(m.path.read_text(encoding="utf-8"))  # a trusted migration file, not user input
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
                applied.append(m.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied
