"""Threshold rules (spec §1 rules, §8): rows the ingest engine compiles into its catalog."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, errors, sql
from psycopg.rows import dict_row

from webmacs.errors import NotFound
from webmacs.repositories import assignments, conflict_on_duplicate

RULE_COLUMNS = (
    "id, public_id, name, event_public_id, operator, threshold, threshold_high, action_type, webhook_event_type,"
    " enabled, cooldown_seconds, last_triggered_at, created_on, user_public_id, clear_threshold, rearm_on_clear"
)
# Columns a client may set, in the order of RULE_COLUMNS; identifiers for UPDATE come only from here.
WRITABLE = (
    "name",
    "event_public_id",
    "operator",
    "threshold",
    "threshold_high",
    "action_type",
    "webhook_event_type",
    "enabled",
    "cooldown_seconds",
    "clear_threshold",
    "rearm_on_clear",
)

EVENT_NOT_FOUND = "Event not found."

# One process wins a firing: the cooldown is claimed in the database, so several server processes (each
# with its own in-memory cooldown mirror) still fire a rule once per cooldown.
CLAIM_RULE_SQL = """
UPDATE rules SET last_triggered_at = now()
 WHERE id = %(id)s AND enabled
   AND (last_triggered_at IS NULL OR last_triggered_at <= now() - make_interval(secs => cooldown_seconds))
RETURNING user_public_id
"""


async def event_exists(conn: AsyncConnection, *, public_id: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM events WHERE public_id = %(p)s", {"p": public_id})
    return await cur.fetchone() is not None


async def by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        raise NotFound.entity("Rule", public_id)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {RULE_COLUMNS} FROM rules WHERE public_id = %(p)s", {"p": public_id})
    row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("Rule", public_id)
    return row


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {RULE_COLUMNS}, count(*) OVER () AS _total FROM rules ORDER BY id LIMIT %(l)s OFFSET %(o)s",
        {"l": limit, "o": offset},
    )
    rows = await cur.fetchall()
    if rows:
        return rows[0]["_total"], rows
    c = await conn.execute("SELECT count(*) FROM rules")
    r = await c.fetchone()
    return (int(r[0]) if r else 0), []


async def create(conn: AsyncConnection, *, values: dict[str, Any], user_public_id: str) -> None:
    """Insert a rule; NotFound("Event not found.") for an unknown event (checked first), Conflict for a taken name."""
    if not await event_exists(conn, public_id=values["event_public_id"]):
        raise NotFound(EVENT_NOT_FOUND)
    cols = [c for c in WRITABLE if c in values]
    stmt = sql.SQL("INSERT INTO rules ({}, user_public_id) VALUES ({}, %(_user)s)").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in cols),
        sql.SQL(", ").join(sql.Placeholder(c) for c in cols),
    )
    try:
        async with conflict_on_duplicate(conn, "Rule"):
            await conn.execute(stmt, {**{c: values[c] for c in cols}, "_user": user_public_id})
    except errors.ForeignKeyViolation as e:  # the event was deleted since the check
        raise NotFound(EVENT_NOT_FOUND) from e


async def update(conn: AsyncConnection, *, rule_id: int, changes: dict[str, Any]) -> None:
    a = assignments(changes, WRITABLE)
    if a is None:
        return
    stmt = sql.SQL("UPDATE rules SET {} WHERE id = %(_id)s").format(a.clause)
    try:
        async with conflict_on_duplicate(conn, "Rule"):
            await conn.execute(stmt, {**a.params, "_id": rule_id})
    except errors.ForeignKeyViolation as e:
        raise NotFound(EVENT_NOT_FOUND) from e


async def delete(conn: AsyncConnection, *, public_id: str) -> None:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        raise NotFound.entity("Rule", public_id)
    cur = await conn.execute("DELETE FROM rules WHERE public_id = %(p)s", {"p": public_id})
    if cur.rowcount == 0:
        raise NotFound.entity("Rule", public_id)


async def claim_firing(conn: AsyncConnection, *, rule_id: int) -> dict[str, Any] | None:
    """Start the rule's cooldown now if it is enabled and out of its cooldown: its `user_public_id` (the
    owner, may be None), or None when the rule is gone, disabled, or fired within its cooldown."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(CLAIM_RULE_SQL, {"id": rule_id})
    return await cur.fetchone()
