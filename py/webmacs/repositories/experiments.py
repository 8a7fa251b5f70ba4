"""Experiments (spec §4.3, §13): start (create), rename, stop, delete with their datapoints."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from webmacs.errors import NotFound
from webmacs.repositories import conflict_on_duplicate
from webmacs.repositories import series as series_repo

COLUMNS = "id, public_id, name, started_on, stopped_on, user_public_id"


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    cur = await conn.execute("SELECT count(*) FROM experiments")
    total = await cur.fetchone()
    rows = conn.cursor(row_factory=dict_row)
    await rows.execute(
        f"SELECT {COLUMNS} FROM experiments ORDER BY id LIMIT %(l)s OFFSET %(o)s", {"l": limit, "o": offset}
    )
    return (int(total[0]) if total else 0), await rows.fetchall()


async def by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    row = None
    if "\x00" not in public_id:  # PostgreSQL text cannot hold NUL: no row has such an id
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(f"SELECT {COLUMNS} FROM experiments WHERE public_id = %(p)s", {"p": public_id})
        row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("Experiment", public_id)
    return row


async def public_ids(conn: AsyncConnection, *, ids: list[int]) -> dict[int, str]:
    """The public ids of the experiments among internal `ids` that still exist, by internal id."""
    cur = await conn.execute("SELECT id, public_id FROM experiments WHERE id = ANY(%s)", (ids,))
    return {r[0]: r[1] for r in await cur.fetchall()}


async def create(conn: AsyncConnection, *, name: str, user_public_id: str) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    async with conflict_on_duplicate(conn, "Experiment"):
        await cur.execute(
            f"INSERT INTO experiments (name, user_public_id) VALUES (%(n)s, %(u)s) RETURNING {COLUMNS}",
            {"n": name, "u": user_public_id},
        )
    row = await cur.fetchone()
    assert row is not None  # INSERT … RETURNING always yields the row
    return row


async def rename(conn: AsyncConnection, *, public_id: str, name: str) -> None:
    row = await by_public_id(conn, public_id=public_id)
    async with conflict_on_duplicate(conn, "Experiment"):
        await conn.execute("UPDATE experiments SET name = %(n)s WHERE id = %(id)s", {"n": name, "id": row["id"]})


async def stop(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    """Stamp stopped_on = now, on every call (spec §4.3: re-stopping overwrites the time)."""
    row = await by_public_id(conn, public_id=public_id)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(
        f"UPDATE experiments SET stopped_on = now() WHERE id = %(id)s RETURNING {COLUMNS}", {"id": row["id"]}
    )
    stopped = await cur.fetchone()
    if stopped is None:  # deleted by a concurrent request since the lookup
        raise NotFound.entity("Experiment", public_id)
    return stopped


async def delete(conn: AsyncConnection, *, public_id: str) -> None:
    async with conn.transaction():
        row = None
        if "\x00" not in public_id:
            cur = await conn.execute("SELECT id FROM experiments WHERE public_id = %(p)s FOR UPDATE", {"p": public_id})
            row = await cur.fetchone()
        if row is None:
            raise NotFound.entity("Experiment", public_id)
        # No FK on the hypertable: the experiment's datapoints are removed explicitly (spec §1: deleted, not orphaned).
        await series_repo.delete_datapoints(conn, "experiment_id = %(id)s", {"id": row[0]})
        await conn.execute("DELETE FROM experiments WHERE id = %(id)s", {"id": row[0]})
