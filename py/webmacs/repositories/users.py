"""Users, API tokens and the JWT blacklist."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from webmacs.errors import NotFound
from webmacs.repositories import assignments, conflict_on_duplicate
from webmacs.repositories import series as series_repo

USER_COLUMNS = "id, public_id, email, username, password_hash, role, registered_on, sso_provider"


async def by_id(conn: AsyncConnection, *, user_id: int) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {USER_COLUMNS} FROM users WHERE id = %(id)s", {"id": user_id})
    return await cur.fetchone()


async def by_email(conn: AsyncConnection, *, email: str) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {USER_COLUMNS} FROM users WHERE email = %(email)s", {"email": email})
    return await cur.fetchone()


async def by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        raise NotFound.entity("User", public_id)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {USER_COLUMNS} FROM users WHERE public_id = %(p)s", {"p": public_id})
    row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("User", public_id)
    return row


async def count(conn: AsyncConnection) -> int:
    cur = await conn.execute("SELECT count(*) FROM users")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {USER_COLUMNS}, count(*) OVER () AS _total FROM users ORDER BY id LIMIT %(l)s OFFSET %(o)s",
        {"l": limit, "o": offset},
    )
    rows = await cur.fetchall()
    total = rows[0]["_total"] if rows else await count(conn)
    return total, rows


async def create(conn: AsyncConnection, *, email: str, username: str, password_hash: str, role: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    async with conflict_on_duplicate(conn, "User"):
        await cur.execute(
            "INSERT INTO users (email, username, password_hash, role)"
            " VALUES (%(email)s, %(username)s, %(ph)s, %(role)s) RETURNING " + USER_COLUMNS,
            {"email": email, "username": username, "ph": password_hash, "role": role},
        )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return row


async def update(conn: AsyncConnection, *, user_id: int, changes: dict[str, Any]) -> None:
    # Column names come from a fixed allow-list, never from the request.
    a = assignments(changes, ("email", "username", "password_hash", "role"))
    if a is None:
        return
    async with conflict_on_duplicate(conn, "User"):
        await conn.execute(
            sql.SQL("UPDATE users SET {} WHERE id = %(id)s").format(a.clause), {**a.params, "id": user_id}
        )


async def delete(conn: AsyncConnection, *, public_id: str) -> None:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        raise NotFound.entity("User", public_id)
    async with conn.transaction():
        cur = await conn.execute("SELECT id FROM users WHERE public_id = %(p)s FOR UPDATE", {"p": public_id})
        row = await cur.fetchone()
        if row is None:
            raise NotFound.entity("User", public_id)
        uid = row[0]
        # The user's events and experiments go with the user; so do their datapoints (no FK on the hypertable).
        await series_repo.delete_datapoints(
            conn,
            "event_id IN (SELECT id FROM events WHERE user_public_id = %(p)s)"
            " OR experiment_id IN (SELECT id FROM experiments WHERE user_public_id = %(p)s)",
            {"p": public_id},
        )
        await conn.execute("DELETE FROM users WHERE id = %(id)s", {"id": uid})


async def first_admin(conn: AsyncConnection) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {USER_COLUMNS} FROM users WHERE role = 'admin' ORDER BY id LIMIT 1")
    return await cur.fetchone()


# --- JWT blacklist ---


async def is_blacklisted(conn: AsyncConnection, *, jti: str | None, token: str) -> bool:
    """Revoked by its id, or (rows from before revocation by id, tokens without one) by its exact text."""
    cur = await conn.execute(
        "SELECT 1 FROM blacklist_tokens WHERE jti = %(j)s OR token = %(t)s LIMIT 1", {"j": jti, "t": token}
    )
    return await cur.fetchone() is not None


async def blacklist(conn: AsyncConnection, *, jti: str | None, token: str) -> None:
    """Revoke a JWT: by its `jti` when it has one (the token text is not kept), else by its text."""
    if jti is not None:
        await conn.execute("INSERT INTO blacklist_tokens (jti) VALUES (%(j)s) ON CONFLICT (jti) DO NOTHING", {"j": jti})
    else:
        await conn.execute(
            "INSERT INTO blacklist_tokens (token) VALUES (%(t)s) ON CONFLICT (token) DO NOTHING", {"t": token}
        )


async def purge_blacklist(conn: AsyncConnection, *, older_than: datetime) -> int:
    cur = await conn.execute("DELETE FROM blacklist_tokens WHERE blacklisted_on < %(t)s", {"t": older_than})
    return cur.rowcount


# --- failed logins ---


async def login_failures(conn: AsyncConnection, *, account: str, peer: str, window_s: int) -> tuple[int, int, float]:
    """Failures of `account` and from `peer` within the window, and seconds until the oldest of them leaves it."""
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE account = %(a)s), count(*) FILTER (WHERE peer = %(p)s),"
        " coalesce(extract(epoch FROM min(failed_at) + make_interval(secs => %(w)s) - now()), 0)::float8"
        " FROM login_failures WHERE (account = %(a)s OR peer = %(p)s)"
        " AND failed_at > now() - make_interval(secs => %(w)s)",
        {"a": account, "p": peer, "w": window_s},
    )
    row = await cur.fetchone()
    return (int(row[0]), int(row[1]), float(row[2])) if row else (0, 0, 0.0)


async def record_login_failure(conn: AsyncConnection, *, account: str, peer: str) -> None:
    await conn.execute(
        "INSERT INTO login_failures (account, peer) VALUES (%(a)s, %(p)s)", {"a": account[:320], "p": peer[:64]}
    )


async def clear_login_failures(conn: AsyncConnection, *, account: str) -> None:
    await conn.execute("DELETE FROM login_failures WHERE account = %(a)s", {"a": account})


async def purge_login_failures(conn: AsyncConnection, *, older_than_s: int) -> int:
    cur = await conn.execute(
        "DELETE FROM login_failures WHERE failed_at < now() - make_interval(secs => %(w)s)", {"w": older_than_s}
    )
    return cur.rowcount


# --- API tokens ---

# Column names, not a secret.
TOKEN_COLUMNS = (
    "t.id, t.public_id, t.name, t.last_used_at, t.expires_at, t.created_at, u.public_id AS user_public_id,"  # noqa: S105
    " t.scope, (SELECT p.public_id FROM plugin_instances p WHERE p.id = t.plugin_instance_id)"
    " AS plugin_instance_public_id"
)


async def token_owner(conn: AsyncConnection, *, token_hash: str) -> dict[str, Any] | None:
    """The token row joined with its owner (owner columns prefixed `u_`), or None when unknown."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "SELECT t.id AS token_id, t.expires_at, t.user_id, u.id AS u_id, t.scope, t.plugin_instance_id"
        " FROM api_tokens t"
        " LEFT JOIN users u ON u.id = t.user_id WHERE t.token_hash = %(h)s",
        {"h": token_hash},
    )
    return await cur.fetchone()


async def touch_token(conn: AsyncConnection, *, token_id: int) -> None:
    # The row lock is held until the request commits; concurrent requests with the same token (a controller
    # posting batches in parallel) skip the update instead of queueing behind it — the holder records the use.
    await conn.execute(
        "UPDATE api_tokens SET last_used_at = now()"
        " WHERE id = (SELECT id FROM api_tokens WHERE id = %(id)s FOR UPDATE SKIP LOCKED)",
        {"id": token_id},
    )


async def create_token(
    conn: AsyncConnection,
    *,
    user_id: int,
    name: str,
    token_hash: str,
    expires_at: datetime | None,
    scope: str = "full",
    plugin_instance_id: int | None = None,
) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        "INSERT INTO api_tokens (name, token_hash, user_id, expires_at, scope, plugin_instance_id)"
        " VALUES (%(n)s, %(h)s, %(u)s, %(e)s, %(s)s, %(p)s)"
        " RETURNING public_id, name, expires_at, created_at, scope",
        {"n": name, "h": token_hash, "u": user_id, "e": expires_at, "s": scope, "p": plugin_instance_id},
    )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return row


async def tokens_page(
    conn: AsyncConnection, *, user_id: int | None, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"SELECT {TOKEN_COLUMNS}, count(*) OVER () AS _total FROM api_tokens t JOIN users u ON u.id = t.user_id"
        " WHERE (%(u)s::int IS NULL OR t.user_id = %(u)s::int)"
        " ORDER BY t.created_at DESC, t.id DESC LIMIT %(l)s OFFSET %(o)s",
        {"u": user_id, "l": limit, "o": offset},
    )
    rows = await cur.fetchall()
    if rows:
        return rows[0]["_total"], rows
    c = await conn.execute(
        "SELECT count(*) FROM api_tokens WHERE (%(u)s::int IS NULL OR user_id = %(u)s::int)", {"u": user_id}
    )
    r = await c.fetchone()
    return (int(r[0]) if r else 0), []


async def token_by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any] | None:
    if "\x00" in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        return None
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute("SELECT id, user_id FROM api_tokens WHERE public_id = %(p)s", {"p": public_id})
    return await cur.fetchone()


async def delete_token(conn: AsyncConnection, *, token_id: int) -> None:
    await conn.execute("DELETE FROM api_tokens WHERE id = %(id)s", {"id": token_id})
