"""The rate limiter's sliding window (spec §15.3), shared by every server process."""

from __future__ import annotations

from psycopg import AsyncConnection

# One statement: serialise this client's requests (a transaction-scoped advisory lock on its key), count its
# accepted requests in the window, and record this one only if it is under the limit (rejected requests are not
# counted, as in the spec). Two processes never both admit the request that crosses the limit.
_HIT = """
WITH lock AS (SELECT pg_advisory_xact_lock(hashtextextended(%(c)s, 7765627))),
     recent AS (
        SELECT count(*) AS n FROM rate_limit_hits, lock
         WHERE client = %(c)s AND hit_at > clock_timestamp() - make_interval(secs => %(w)s))
INSERT INTO rate_limit_hits (client) SELECT %(c)s FROM recent WHERE n < %(l)s RETURNING id
"""


async def hit(conn: AsyncConnection, *, client: str, limit: int, window_s: float) -> bool:
    """Count one request of `client`; False (and not counted) when it already had `limit` in the window."""
    cur = await conn.execute(_HIT, {"c": client[:64], "l": limit, "w": window_s})
    return await cur.fetchone() is not None


async def prune(conn: AsyncConnection, *, window_s: float) -> None:
    await conn.execute(
        "DELETE FROM rate_limit_hits WHERE hit_at < clock_timestamp() - make_interval(secs => %(w)s)",
        {"w": window_s + 1},
    )
