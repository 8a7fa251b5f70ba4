"""SQL for each resource: keyword-only async functions, `%(name)s` parameters, no string-built SQL."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from psycopg import AsyncConnection, errors

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
