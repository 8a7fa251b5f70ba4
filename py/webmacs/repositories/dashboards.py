"""Dashboards and their widgets (spec §4.8, §11)."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, errors, sql
from psycopg.rows import dict_row

from webmacs.errors import NotFound
from webmacs.repositories import assignments

COLUMNS = "id, public_id, name, is_global, created_on, user_public_id"
WIDGET_COLUMNS = "id, public_id, dashboard_id, widget_type, title, event_public_id, x, y, w, h, config_json"
UPDATABLE = ("name", "is_global")
WIDGET_UPDATABLE = ("widget_type", "title", "event_public_id", "x", "y", "w", "h", "config_json")


class EventNotFound(NotFound):
    """A widget names an event that does not exist."""

    def __init__(self) -> None:
        super().__init__("Event not found.")


async def visible_page(
    conn: AsyncConnection, *, user_public_id: str, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    """Dashboards owned by the user or global, newest first; each with its `widgets` (ordered by id)."""
    params = {"u": user_public_id, "l": limit, "o": offset}
    cur = await conn.execute("SELECT count(*) FROM dashboards WHERE user_public_id = %(u)s OR is_global", params)
    total = await cur.fetchone()
    rows = conn.cursor(row_factory=dict_row)
    await rows.execute(
        f"SELECT {COLUMNS} FROM dashboards WHERE user_public_id = %(u)s OR is_global"
        " ORDER BY created_on DESC, id DESC LIMIT %(l)s OFFSET %(o)s",
        params,
    )
    dashboards = await rows.fetchall()
    await _attach_widgets(conn, dashboards)
    return (int(total[0]) if total else 0), dashboards


async def _attach_widgets(conn: AsyncConnection, dashboards: list[dict[str, Any]]) -> None:
    by_id = {d["id"]: d for d in dashboards}
    for d in dashboards:
        d["widgets"] = []
    if not by_id:
        return
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {WIDGET_COLUMNS} FROM dashboard_widgets WHERE dashboard_id = ANY(%(ids)s) ORDER BY id",
        {"ids": list(by_id)},
    )
    for w in await cur.fetchall():
        by_id[w["dashboard_id"]]["widgets"].append(w)


async def by_public_id(conn: AsyncConnection, *, public_id: str, with_widgets: bool = False) -> dict[str, Any]:
    row = None
    if "\x00" not in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(f"SELECT {COLUMNS} FROM dashboards WHERE public_id = %(p)s", {"p": public_id})
        row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("Dashboard", public_id)
    if with_widgets:
        await _attach_widgets(conn, [row])
    return row


async def create(conn: AsyncConnection, *, name: str, is_global: bool, user_public_id: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"INSERT INTO dashboards (name, is_global, user_public_id) VALUES (%(n)s, %(g)s, %(u)s) RETURNING {COLUMNS}",
        {"n": name, "g": is_global, "u": user_public_id},
    )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    row["widgets"] = []
    return row


async def update(conn: AsyncConnection, *, dashboard_id: int, changes: dict[str, Any]) -> None:
    a = assignments(changes, UPDATABLE)
    if a is not None:
        await conn.execute(
            sql.SQL("UPDATE dashboards SET {} WHERE id = %(id)s").format(a.clause), {**a.params, "id": dashboard_id}
        )


async def delete(conn: AsyncConnection, *, dashboard_id: int) -> None:
    await conn.execute("DELETE FROM dashboards WHERE id = %(id)s", {"id": dashboard_id})  # widgets by FK cascade


async def widget_by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    row = None
    if "\x00" not in public_id:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(f"SELECT {WIDGET_COLUMNS} FROM dashboard_widgets WHERE public_id = %(p)s", {"p": public_id})
        row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("DashboardWidget", public_id)
    return row


async def _check_event(conn: AsyncConnection, event_public_id: str | None) -> None:
    if event_public_id is None:
        return
    found = None
    if "\x00" not in event_public_id:
        cur = await conn.execute("SELECT 1 FROM events WHERE public_id = %(p)s", {"p": event_public_id})
        found = await cur.fetchone()
    if found is None:
        raise EventNotFound()


async def create_widget(conn: AsyncConnection, *, dashboard_id: int, fields: dict[str, Any]) -> dict[str, Any]:
    await _check_event(conn, fields.get("event_public_id"))
    cur = conn.cursor(row_factory=dict_row)
    try:
        async with conn.transaction():
            await cur.execute(
                "INSERT INTO dashboard_widgets (dashboard_id, widget_type, title, event_public_id, x, y, w, h,"
                " config_json) VALUES (%(d)s, %(widget_type)s, %(title)s, %(event_public_id)s, %(x)s, %(y)s, %(w)s,"
                f" %(h)s, %(config_json)s) RETURNING {WIDGET_COLUMNS}",
                {"d": dashboard_id, **fields},
            )
    except errors.ForeignKeyViolation as e:  # the event was deleted since the check
        raise EventNotFound() from e
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return row


async def update_widget(conn: AsyncConnection, *, widget_id: int, changes: dict[str, Any]) -> None:
    if "event_public_id" in changes:
        await _check_event(conn, changes["event_public_id"])
    a = assignments(changes, WIDGET_UPDATABLE)
    if a is None:
        return
    try:
        async with conn.transaction():
            await conn.execute(
                sql.SQL("UPDATE dashboard_widgets SET {} WHERE id = %(id)s").format(a.clause),
                {**a.params, "id": widget_id},
            )
    except errors.ForeignKeyViolation as e:
        raise EventNotFound() from e


async def delete_widget(conn: AsyncConnection, *, widget_id: int) -> None:
    await conn.execute("DELETE FROM dashboard_widgets WHERE id = %(id)s", {"id": widget_id})
