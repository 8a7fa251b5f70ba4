"""Log entries (the audit log of spec §4.4, §14)."""

from __future__ import annotations

from psycopg import AsyncConnection


async def create(conn: AsyncConnection, *, content: str, logging_type: str | None, user_public_id: str | None) -> str:
    cur = await conn.execute(
        "INSERT INTO log_entries (content, logging_type, user_public_id) VALUES (%(c)s, %(t)s, %(u)s)"
        " RETURNING public_id",
        {"c": content[:500], "t": logging_type, "u": user_public_id},
    )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return str(row[0])
