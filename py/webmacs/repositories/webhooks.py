"""Webhooks and their delivery records (spec §1 webhooks, webhook_deliveries)."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from webmacs.errors import Conflict, NotFound
from webmacs.repositories import assignments

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
    a = assignments(changes, WRITABLE)
    if a is None:
        return
    stmt = sql.SQL("UPDATE webhooks SET {} WHERE id = %(_id)s").format(a.clause)
    await conn.execute(stmt, {**a.params, "_id": webhook_id})


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


# --- the delivery outbox (written by services.webhooks.enqueue, worked by services.dispatcher) ---


async def enqueue_deliveries(conn: AsyncConnection, *, event_type: str, payload: str) -> int:
    """One pending delivery per enabled webhook subscribed to `event_type`, in the caller's transaction."""
    cur = await conn.execute(
        "INSERT INTO webhook_deliveries (webhook_id, event_type, payload)"
        " SELECT id, %(t)s::text, %(b)s::text FROM webhooks"
        " WHERE enabled AND webmacs_webhook_subscribes(events, %(t)s::text)",
        {"t": event_type, "b": payload},
    )
    return cur.rowcount


# Claiming sets next_attempt_at to the lease end and counts the attempt; SKIP LOCKED lets several processes
# claim side by side without ever taking the same row. `attempts` is the fencing token for the outcome.
_CLAIM = """
UPDATE webhook_deliveries d
   SET attempts = d.attempts + 1,
       next_attempt_at = now() + make_interval(secs => %(lease)s)
  FROM webhooks w
 WHERE w.id = d.webhook_id
   AND d.id IN (SELECT id FROM webhook_deliveries
                 WHERE status = 'pending' AND next_attempt_at <= now()
                 ORDER BY next_attempt_at, id
                 LIMIT %(n)s
                 FOR UPDATE SKIP LOCKED)
RETURNING d.id, d.public_id, d.payload, d.attempts, w.url, w.secret
"""

_DELIVERED = """
UPDATE webhook_deliveries
   SET status = 'delivered', delivered_on = now(), response_code = %(code)s, last_error = NULL,
       next_attempt_at = NULL
 WHERE id = %(id)s AND attempts = %(attempts)s AND status = 'pending'
"""

_FAILED = """
UPDATE webhook_deliveries
   SET response_code = %(code)s, last_error = %(error)s,
       status = CASE WHEN %(final)s THEN 'dead_letter' ELSE 'pending' END,
       next_attempt_at = CASE WHEN %(final)s THEN NULL ELSE now() + make_interval(secs => %(delay)s) END
 WHERE id = %(id)s AND attempts = %(attempts)s AND status = 'pending'
"""

# A send interrupted by shutdown is due again at once (for whichever process is up); the attempt stays counted
# because the receiver may have seen it.
_RELEASE = """
UPDATE webhook_deliveries SET next_attempt_at = now()
 WHERE id = %(id)s AND attempts = %(attempts)s AND status = 'pending'
"""

_NEXT_DUE = "SELECT min(next_attempt_at) - now() FROM webhook_deliveries WHERE status = 'pending'"

# The channel sql/0020_webhook_outbox.sql's trigger notifies when deliveries are queued.
_LISTEN_OUTBOX = "LISTEN webhook_outbox"


async def claim_due_deliveries(conn: AsyncConnection, *, limit: int, lease_s: float) -> list[dict[str, Any]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_CLAIM, {"n": limit, "lease": lease_s})
    return await cur.fetchall()


async def mark_delivered(conn: AsyncConnection, *, delivery_id: int, attempts: int, code: int | None) -> None:
    await conn.execute(_DELIVERED, {"id": delivery_id, "attempts": attempts, "code": code})


async def mark_failed(
    conn: AsyncConnection,
    *,
    delivery_id: int,
    attempts: int,
    code: int | None,
    error: str | None,
    final: bool,
    delay_s: float,
) -> None:
    """A failed attempt: dead_letter when `final`, else due again after `delay_s`."""
    await conn.execute(
        _FAILED,
        {"id": delivery_id, "attempts": attempts, "code": code, "error": error, "final": final, "delay": delay_s},
    )


async def release_delivery(conn: AsyncConnection, *, delivery_id: int, attempts: int) -> None:
    await conn.execute(_RELEASE, {"id": delivery_id, "attempts": attempts})


async def seconds_to_next_due(conn: AsyncConnection) -> float | None:
    cur = await conn.execute(_NEXT_DUE)
    row = await cur.fetchone()
    return None if row is None or row[0] is None else float(row[0].total_seconds())


async def outbox_counts(conn: AsyncConnection) -> dict[str, int]:
    """Deliveries waiting to be sent and those given up on (for /metrics)."""
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead_letter')"
        " FROM webhook_deliveries WHERE status IN ('pending', 'dead_letter')"
    )
    row = await cur.fetchone()
    return {"pending": int(row[0]), "dead_letter": int(row[1])} if row else {}


async def listen_outbox(conn: AsyncConnection) -> None:
    """Subscribe `conn` (autocommit, not a pool's) to the outbox channel: its `notifies()` then say that
    deliveries were queued."""
    await conn.execute(_LISTEN_OUTBOX)
