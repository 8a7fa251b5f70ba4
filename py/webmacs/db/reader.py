"""Read-only database logins for dashboards (Grafana): members of the `webmacs_reader` role (migration 0029)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

import psycopg
from psycopg import sql

READER_ROLE = "webmacs_reader"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
SCRAM_ITERATIONS = 4096


class ReaderError(ValueError):
    """The login cannot be created as asked (a bad name, a name taken by a role that is not a reader)."""


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def scram_sha256(password: str, *, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores: the password itself never reaches the server (nor its logs)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def grant_reader(url: str, name: str, password: str) -> bool:
    """Create (or, for an existing reader, reset the password of) the login `name` in `webmacs_reader`.
    Returns True when the login was created."""
    if not _NAME.fullmatch(name):
        raise ReaderError("a reader name is 1-63 characters: a-z, 0-9 and _, not starting with a digit")
    verifier = scram_sha256(password)
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        row = conn.execute(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb, pg_has_role(oid, %(r)s, 'MEMBER')"
            " FROM pg_roles WHERE rolname = %(n)s",
            {"n": name, "r": READER_ROLE},
        ).fetchone()
        ident = sql.Identifier(name)
        if row is None:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN INHERIT PASSWORD {} IN ROLE {}").format(
                    ident, sql.Literal(verifier), sql.Identifier(READER_ROLE)
                )
            )
            return True
        privileged, member = row
        if privileged or not member:
            raise ReaderError(f"role {name!r} exists and is not a webmacs reader")
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(verifier)))
        return False
