"""Webhooks and their delivery records (spec §1 webhooks, webhook_deliveries)."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from webmacs.errors import Conflict, NotFound

WEBHOOK_COLUMNS = "id, public_id, url, events, enabled, created_on, user_public_id"
DELIVERY_COLUMNS = "public_id, event_type, status, attempts, last_error, response_code, created_on, delivered_on"
WRITABLE = ("url", "secret", "events", "enabled")


async def by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        raise NotFound.entity("Webhook", public_id)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE public_id = %(p)s", {"p": public_id})
    row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("Webhook", public_id)
    return row


async def url_taken(conn: AsyncConnection, *, url: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM webhooks WHERE url = %(u)s LIMIT 1", {"u": url})
    return await cur.fetchone() is not None


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {WEBHOOK_COLUMNS}, count(*) OVER () AS _total FROM webhooks ORDER BY id LIMIT %(l)s OFFSET %(o)s",
        {"l": limit, "o": offset},
    )
    rows = await cur.fetchall()
    if rows:
        return rows[0]["_total"], rows
    c = await conn.execute("SELECT count(*) FROM webhooks")
    r = await c.fetchone()
    return (int(r[0]) if r else 0), []


async def create(
    conn: AsyncConnection, *, url: str, secret: str | None, events: str, enabled: bool, user_public_id: str
) -> None:
    # Serialised per URL so two concurrent creates of one URL cannot both pass the duplicate check.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('webhook-url'), hashtext(%(u)s))", {"u": url})
    if await url_taken(conn, url=url):
        raise Conflict.exists("Webhook")
    await conn.execute(
        "INSERT INTO webhooks (url, secret, events, enabled, user_public_id)"
        " VALUES (%(url)s, %(secret)s, %(events)s, %(enabled)s, %(user)s)",
        {"url": url, "secret": secret, "events": events, "enabled": enabled, "user": user_public_id},
    )


async def update(conn: AsyncConnection, *, webhook_id: int, changes: dict[str, Any]) -> None:
    cols = [c for c in WRITABLE if c in changes]
    if not cols:
        return
    stmt = sql.SQL("UPDATE webhooks SET {} WHERE id = %(_id)s").format(
        sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c)) for c in cols)
    )
    await conn.execute(stmt, {**{c: changes[c] for c in cols}, "_id": webhook_id})


async def delete(conn: AsyncConnection, *, public_id: str) -> None:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        raise NotFound.entity("Webhook", public_id)
    # Deliveries go with the webhook (ON DELETE CASCADE).
    cur = await conn.execute("DELETE FROM webhooks WHERE public_id = %(p)s", {"p": public_id})
    if cur.rowcount == 0:
        raise NotFound.entity("Webhook", public_id)


async def deliveries_page(
    conn: AsyncConnection, *, webhook_id: int, status: str | None, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    cur = conn.cursor(row_factory=dict_row)
    params = {"w": webhook_id, "s": status, "l": limit, "o": offset}
    await cur.execute(
        f"SELECT {DELIVERY_COLUMNS}, count(*) OVER () AS _total FROM webhook_deliveries"
        " WHERE webhook_id = %(w)s AND (%(s)s::text IS NULL OR status = %(s)s::text)"
        " ORDER BY created_on DESC, id DESC LIMIT %(l)s OFFSET %(o)s",
        params,
    )
    rows = await cur.fetchall()
    if rows:
        return rows[0]["_total"], rows
    c = await conn.execute(
        "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = %(w)s"
        " AND (%(s)s::text IS NULL OR status = %(s)s::text)",
        params,
    )
    r = await c.fetchone()
    return (int(r[0]) if r else 0), []


async def outbox_counts(conn: AsyncConnection) -> dict[str, int]:
    """Deliveries waiting to be sent and those given up on (for /metrics)."""
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead_letter')"
        " FROM webhook_deliveries WHERE status IN ('pending', 'dead_letter')"
    )
    row = await cur.fetchone()
    return {"pending": int(row[0]), "dead_letter": int(row[1])} if row else {}
