"""Events (channel definitions, spec §1, §4.1): CRUD and the delete that takes the event's datapoints along."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from webmacs.errors import NotFound
from webmacs.repositories import assignments, conflict_on_duplicate
from webmacs.repositories import series as series_repo

COLUMNS = "id, public_id, name, min_value, max_value, unit, type, user_public_id"
UPDATABLE = ("name", "min_value", "max_value", "unit", "type")


def valid_id(public_id: str) -> bool:
    """PostgreSQL text cannot hold NUL; such an id can name no row (and must not reach the driver)."""
    return "\x00" not in public_id


async def count(conn: AsyncConnection) -> int:
    cur = await conn.execute("SELECT count(*) FROM events")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {COLUMNS} FROM events ORDER BY id LIMIT %(l)s OFFSET %(o)s", {"l": limit, "o": offset})
    return await count(conn), await cur.fetchall()


async def find(conn: AsyncConnection, *, public_id: str) -> dict[str, Any] | None:
    if not valid_id(public_id):
        return None
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {COLUMNS} FROM events WHERE public_id = %(p)s", {"p": public_id})
    return await cur.fetchone()


async def by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    row = await find(conn, public_id=public_id)
    if row is None:
        raise NotFound.entity("Event", public_id)
    return row


async def by_public_ids(conn: AsyncConnection, *, public_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Known events among `public_ids` by public_id, each as its internal id, name and unit (ids PostgreSQL
    cannot hold name no event)."""
    cur = await conn.execute(
        "SELECT public_id, id, name, unit FROM events WHERE public_id = ANY(%s)",
        ([p for p in public_ids if valid_id(p)],),
    )
    return {r[0]: {"id": r[1], "name": r[2], "unit": r[3]} for r in await cur.fetchall()}


async def create(
    conn: AsyncConnection,
    *,
    name: str,
    min_value: float,
    max_value: float,
    unit: str,
    type: str,
    user_public_id: str | None,
) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    async with conflict_on_duplicate(conn, "Event"):
        await cur.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type, user_public_id)"
            " VALUES (%(name)s, %(min)s, %(max)s, %(unit)s, %(type)s, %(user)s) RETURNING " + COLUMNS,
            {"name": name, "min": min_value, "max": max_value, "unit": unit, "type": type, "user": user_public_id},
        )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return row


async def get_or_create(
    conn: AsyncConnection,
    *,
    name: str,
    min_value: float,
    max_value: float,
    unit: str,
    type: str,
    user_public_id: str | None,
) -> str:
    """The public_id of the event called `name`, created with these fields if there is none (plugin
    auto-creation, spec §12.1). Safe against a concurrent creator of the same name."""
    cur = await conn.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type, user_public_id)"
        " VALUES (%(name)s, %(min)s, %(max)s, %(unit)s, %(type)s, %(user)s)"
        " ON CONFLICT (name) DO NOTHING RETURNING public_id",
        {"name": name, "min": min_value, "max": max_value, "unit": unit, "type": type, "user": user_public_id},
    )
    row = await cur.fetchone()
    if row is None:
        cur = await conn.execute("SELECT public_id FROM events WHERE name = %(n)s", {"n": name})
        row = await cur.fetchone()
        assert row is not None  # the conflicting row is committed and events are only deleted under lock
    return str(row[0])


async def update(conn: AsyncConnection, *, public_id: str, changes: dict[str, Any]) -> None:
    row = await by_public_id(conn, public_id=public_id)
    a = assignments(changes, UPDATABLE)
    if a is None:
        return
    stmt = sql.SQL("UPDATE events SET {} WHERE id = %(id)s").format(a.clause)
    async with conflict_on_duplicate(conn, "Event"):
        await conn.execute(stmt, {**a.params, "id": row["id"]})


async def delete_ids(conn: AsyncConnection, *, ids: list[int]) -> None:
    """Delete events and their datapoints (no FK on the hypertable); rules go by FK cascade, widget and
    channel-mapping links are set NULL by their FKs."""
    if not ids:
        return
    await conn.execute("DELETE FROM datapoints WHERE event_id = ANY(%(ids)s)", {"ids": ids})
    await series_repo.delete_event_cells(conn, event_ids=ids)
    await conn.execute("DELETE FROM events WHERE id = ANY(%(ids)s)", {"ids": ids})


async def delete(conn: AsyncConnection, *, public_id: str) -> None:
    if not valid_id(public_id):
        raise NotFound.entity("Event", public_id)
    async with conn.transaction():
        cur = await conn.execute("SELECT id FROM events WHERE public_id = %(p)s FOR UPDATE", {"p": public_id})
        row = await cur.fetchone()
        if row is None:
            raise NotFound.entity("Event", public_id)
        await delete_ids(conn, ids=[row[0]])
