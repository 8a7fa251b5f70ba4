"""Single sign-on identities on `users` (the `sso_provider`/`sso_subject_id` pair, spec §1 and §3.10)."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from webmacs.repositories import conflict_on_duplicate
from webmacs.repositories.users import USER_COLUMNS


async def by_identity(conn: AsyncConnection, *, provider: str, subject: str) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {USER_COLUMNS} FROM users WHERE sso_provider = %(p)s AND sso_subject_id = %(s)s",
        {"p": provider, "s": subject},
    )
    return await cur.fetchone()


async def username_taken(conn: AsyncConnection, *, username: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM users WHERE username = %(u)s", {"u": username})
    return await cur.fetchone() is not None


async def link(conn: AsyncConnection, *, user_id: int, provider: str, subject: str) -> dict[str, Any]:
    """Attach the identity to an existing user; returns the updated row."""
    cur = conn.cursor(row_factory=dict_row)
    async with conflict_on_duplicate(conn, "User"):
        await cur.execute(
            "UPDATE users SET sso_provider = %(p)s, sso_subject_id = %(s)s WHERE id = %(id)s RETURNING " + USER_COLUMNS,
            {"p": provider, "s": subject, "id": user_id},
        )
    row = await cur.fetchone()
    assert row is not None  # the caller just read this user inside the same transaction
    return row


async def create(
    conn: AsyncConnection, *, email: str, username: str, password_hash: str, role: str, provider: str, subject: str
) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    async with conflict_on_duplicate(conn, "User"):
        await cur.execute(
            "INSERT INTO users (email, username, password_hash, role, sso_provider, sso_subject_id)"
            " VALUES (%(e)s, %(u)s, %(ph)s, %(r)s, %(p)s, %(s)s) RETURNING " + USER_COLUMNS,
            {"e": email, "u": username, "ph": password_hash, "r": role, "p": provider, "s": subject},
        )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return row


# --- one-time codes (shared by every server process) ---


async def store_code(conn: AsyncConnection, *, code_hash: str, user_id: int, role: str, ttl_s: float) -> None:
    await conn.execute("DELETE FROM sso_codes WHERE expires_at <= now()")
    await conn.execute(
        "INSERT INTO sso_codes (code_hash, user_id, role, expires_at)"
        " VALUES (%(h)s, %(u)s, %(r)s, now() + make_interval(secs => %(t)s))",
        {"h": code_hash, "u": user_id, "r": role, "t": ttl_s},
    )


async def take_code(conn: AsyncConnection, *, code_hash: str) -> tuple[int, str] | None:
    """(user id, role) of a live code, which is used up (at most once, whichever process asks)."""
    cur = await conn.execute(
        "DELETE FROM sso_codes WHERE code_hash = %(h)s RETURNING user_id, role, expires_at > now()",
        {"h": code_hash},
    )
    row = await cur.fetchone()
    if row is None or not row[2]:
        return None
    return int(row[0]), str(row[1])
