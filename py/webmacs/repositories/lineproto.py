"""Line-protocol series → events, and the events created for series nobody mapped."""

from __future__ import annotations

from psycopg import AsyncConnection

#: The plugin instance that owns auto-created events (so the phantom-data guard keeps its meaning).
INSTANCE_NAME = "line-protocol"
#: Wide enough for any float a line may carry: auto-created events impose no range of their own.
EVENT_RANGE = (-1.7976931348623157e308, 1.7976931348623157e308)


async def lookup(conn: AsyncConnection, *, series: list[str]) -> dict[str, str]:
    """Series → event public id, by the series table first, else by an event of exactly that name."""
    cur = await conn.execute(
        "SELECT s.series, e.public_id FROM line_protocol_series s JOIN events e ON e.id = s.event_id"
        " WHERE s.series = ANY(%(s)s)"
        " UNION ALL"
        " SELECT e.name, e.public_id FROM events e WHERE e.name = ANY(%(s)s)"
        " AND NOT EXISTS (SELECT 1 FROM line_protocol_series s WHERE s.series = e.name)",
        {"s": series},
    )
    return {str(name): str(public_id) for name, public_id in await cur.fetchall()}


async def created_by(conn: AsyncConnection, *, token_id: int) -> int:
    """How many series this token has created events for (locks the token row: concurrent requests of one token
    count one after the other, so the cap holds)."""
    await conn.execute("SELECT 1 FROM api_tokens WHERE id = %(t)s FOR UPDATE", {"t": token_id})
    cur = await conn.execute("SELECT count(*) FROM line_protocol_series WHERE token_id = %(t)s", {"t": token_id})
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def default_instance(conn: AsyncConnection) -> int:
    """The "line-protocol" plugin instance's id (created, enabled, on first use)."""
    await conn.execute(
        "INSERT INTO plugin_instances (plugin_id, instance_name, enabled, status)"
        " VALUES (%(n)s, %(n)s, true, 'connected') ON CONFLICT (instance_name) DO NOTHING",
        {"n": INSTANCE_NAME},
    )
    cur = await conn.execute("SELECT id FROM plugin_instances WHERE instance_name = %(n)s", {"n": INSTANCE_NAME})
    row = await cur.fetchone()
    assert row is not None  # inserted above or already there, in this transaction
    return int(row[0])


async def create_event(
    conn: AsyncConnection, *, series: str, instance_id: int, token_id: int, user_public_id: str
) -> str | None:
    """Create the event for `series`, map it to the instance and record the series; None when an event of that
    name appeared meanwhile (a concurrent request: the caller looks it up again)."""
    cur = await conn.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type, user_public_id)"
        " VALUES (%(n)s, %(lo)s, %(hi)s, '', 'sensor', %(u)s) ON CONFLICT (name) DO NOTHING"
        " RETURNING id, public_id",
        {"n": series, "lo": EVENT_RANGE[0], "hi": EVENT_RANGE[1], "u": user_public_id},
    )
    row = await cur.fetchone()
    if row is None:
        return None
    event_id, public_id = int(row[0]), str(row[1])
    await conn.execute(
        "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit, event_public_id)"
        " VALUES (%(i)s, %(c)s, %(n)s, 'input', '', %(c)s)",
        {"i": instance_id, "c": public_id, "n": series},
    )
    await conn.execute(
        "INSERT INTO line_protocol_series (series, event_id, token_id) VALUES (%(s)s, %(e)s, %(t)s)"
        " ON CONFLICT (series) DO NOTHING",
        {"s": series, "e": event_id, "t": token_id},
    )
    return public_id
