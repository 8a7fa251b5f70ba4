"""SQL for each resource: keyword-only async functions, `%(name)s` parameters, no string-built SQL."""

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, errors, sql

from webmacs.errors import Conflict


@asynccontextmanager
async def conflict_on_duplicate(conn: AsyncConnection, entity: str) -> AsyncIterator[None]:
    """A savepoint whose unique violation becomes `Conflict("<entity> already exists.")` (spec §0.1); the
    request's transaction stays usable."""
    try:
        async with conn.transaction():
            yield
    except errors.UniqueViolation as e:
        raise Conflict.exists(entity) from e


class _Now:
    def __repr__(self) -> str:
        return "NOW"


#: A change whose value is NOW sets the column to the database's now().
NOW: Any = _Now()


@dataclass(frozen=True)
class Assignments:
    """The `SET` list of an UPDATE and its parameters (named after the columns)."""

    clause: sql.Composable
    params: dict[str, Any]


def assignments(changes: Mapping[str, Any], allowed: Iterable[str]) -> Assignments | None:
    """`col = %(col)s, …` for the columns of `allowed` present in `changes` (None when there are none). Column
    names come from the allow-list, never from the request."""
    cols = [c for c in allowed if c in changes]
    if not cols:
        return None
    clause = sql.SQL(", ").join(
        sql.SQL("{} = now()").format(sql.Identifier(c))
        if changes[c] is NOW
        else sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c))
        for c in cols
    )
    return Assignments(clause, {c: changes[c] for c in cols if changes[c] is not NOW})
