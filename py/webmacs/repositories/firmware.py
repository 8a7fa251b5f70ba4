"""Firmware update records (spec §1 firmware_updates, §10)."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from webmacs.errors import NotFound
from webmacs.repositories import assignments, conflict_on_duplicate

FIRMWARE_COLUMNS = (
    "id, public_id, version, changelog, file_path, file_hash_sha256, file_size_bytes, status, error_message,"
    " created_on, started_on, completed_on, user_public_id"
)
# Columns the OTA service may set; UPDATE identifiers come only from here.
WRITABLE = ("file_path", "file_hash_sha256", "file_size_bytes", "status", "error_message", "started_on", "completed_on")


async def by_public_id(conn: AsyncConnection, *, public_id: str, for_update: bool = False) -> dict[str, Any]:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        raise NotFound.entity("FirmwareUpdate", public_id)
    cur = conn.cursor(row_factory=dict_row)
    # FOR UPDATE serialises apply/rollback of one record (two concurrent applies must not both pass the
    # state check).
    lock = " FOR UPDATE" if for_update else ""
    await cur.execute(
        f"SELECT {FIRMWARE_COLUMNS} FROM firmware_updates WHERE public_id = %(p)s{lock}", {"p": public_id}
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("FirmwareUpdate", public_id)
    return row


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {FIRMWARE_COLUMNS}, count(*) OVER () AS _total FROM firmware_updates ORDER BY id"
        " LIMIT %(l)s OFFSET %(o)s",
        {"l": limit, "o": offset},
    )
    rows = await cur.fetchall()
    if rows:
        return rows[0]["_total"], rows
    c = await conn.execute("SELECT count(*) FROM firmware_updates")
    r = await c.fetchone()
    return (int(r[0]) if r else 0), []


async def create(conn: AsyncConnection, *, version: str, changelog: str | None, user_public_id: str) -> None:
    async with conflict_on_duplicate(conn, "FirmwareUpdate"):
        await conn.execute(
            "INSERT INTO firmware_updates (version, changelog, user_public_id) VALUES (%(v)s, %(c)s, %(u)s)",
            {"v": version, "c": changelog, "u": user_public_id},
        )


async def update(conn: AsyncConnection, *, firmware_id: int, changes: dict[str, Any]) -> None:
    """Set columns; a value of `NOW` (the sentinel below) means the database's now()."""
    a = assignments(changes, WRITABLE)
    if a is None:
        return
    stmt = sql.SQL("UPDATE firmware_updates SET {} WHERE id = %(_id)s").format(a.clause)
    await conn.execute(stmt, {**a.params, "_id": firmware_id})


async def delete(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        raise NotFound.entity("FirmwareUpdate", public_id)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("DELETE FROM firmware_updates WHERE public_id = %(p)s RETURNING file_path", {"p": public_id})
    row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("FirmwareUpdate", public_id)
    return row


async def candidate_versions(conn: AsyncConnection) -> list[str]:
    """Versions that count as available updates (spec §10.4): pending or completed records."""
    cur = await conn.execute("SELECT version FROM firmware_updates WHERE status IN ('pending', 'completed')")
    return [r[0] for r in await cur.fetchall()]
