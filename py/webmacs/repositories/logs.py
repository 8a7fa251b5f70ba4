"""Log entries (the audit log of spec §4.4, §14)."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from webmacs.errors import NotFound
from webmacs.repositories import assignments

COLUMNS = "id, public_id, content, logging_type, status_type, created_on, user_public_id"
UPDATABLE = ("status_type", "content")


async def create(conn: AsyncConnection, *, content: str, logging_type: str | None, user_public_id: str | None) -> str:
    cur = await conn.execute(
        "INSERT INTO log_entries (content, logging_type, user_public_id) VALUES (%(c)s, %(t)s, %(u)s)"
        " RETURNING public_id",
        {"c": content[:500], "t": logging_type, "u": user_public_id},
    )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return str(row[0])


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    cur = await conn.execute("SELECT count(*) FROM log_entries")
    total = await cur.fetchone()
    rows = conn.cursor(row_factory=dict_row)
    # Newest first; id breaks ties between entries written in one transaction (same created_on).
    await rows.execute(
        f"SELECT {COLUMNS} FROM log_entries ORDER BY created_on DESC, id DESC LIMIT %(l)s OFFSET %(o)s",
        {"l": limit, "o": offset},
    )
    return (int(total[0]) if total else 0), await rows.fetchall()


async def by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    row = None
    if "\x00" not in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(f"SELECT {COLUMNS} FROM log_entries WHERE public_id = %(p)s", {"p": public_id})
        row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("LogEntry", public_id)
    return row


async def update(conn: AsyncConnection, *, public_id: str, changes: dict[str, Any]) -> None:
    row = await by_public_id(conn, public_id=public_id)
    a = assignments(changes, UPDATABLE)
    if a is None:
        return
    stmt = sql.SQL("UPDATE log_entries SET {} WHERE id = %(id)s").format(a.clause)
    await conn.execute(stmt, {**a.params, "id": row["id"]})
