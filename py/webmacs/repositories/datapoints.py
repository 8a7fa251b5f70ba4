"""Datapoints read side (spec §4.2): list, get and delete by the derived public_id `<event public_id>@<µs>`."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from webmacs.epoch import from_micros, to_micros
from webmacs.errors import NotFound
from webmacs.repositories import series as series_repo

_MICROS = re.compile(r"-?[0-9]{1,19}")


def datapoint_public_id(event_public_id: str, time: datetime) -> str:
    """The API id of the datapoint of `event_public_id` at `time` (the hypertable's unique key)."""
    return f"{event_public_id}@{to_micros(time)}"


def parse_datapoint_public_id(public_id: str) -> tuple[str, datetime] | None:
    """`(event public_id, time)` from a datapoint id, or None when it cannot name a datapoint."""
    event_public_id, sep, micros = public_id.rpartition("@")
    if not sep or not event_public_id or "\x00" in event_public_id or not _MICROS.fullmatch(micros):
        return None
    try:
        return event_public_id, from_micros(int(micros))
    except OverflowError:
        return None


_SELECT = (
    "SELECT d.time, d.value, e.public_id AS event_public_id, x.public_id AS experiment_public_id"
    " FROM datapoints d JOIN events e ON e.id = d.event_id LEFT JOIN experiments x ON x.id = d.experiment_id"
)


def with_public_id(row: dict[str, Any]) -> dict[str, Any]:
    row["public_id"] = datapoint_public_id(row["event_public_id"], row["time"])
    return row


async def page(conn: AsyncConnection, *, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    # The inner join hides rows of an event deleted while a batch for it was in flight; count the same way.
    cur = await conn.execute("SELECT count(*) FROM datapoints d JOIN events e ON e.id = d.event_id")
    total = await cur.fetchone()
    rows = conn.cursor(row_factory=dict_row)
    await rows.execute(
        _SELECT + " ORDER BY d.time DESC, d.event_id DESC LIMIT %(l)s OFFSET %(o)s", {"l": limit, "o": offset}
    )
    return (int(total[0]) if total else 0), [with_public_id(r) for r in await rows.fetchall()]


async def by_public_id(conn: AsyncConnection, *, public_id: str) -> dict[str, Any]:
    key = parse_datapoint_public_id(public_id)
    if key is None:
        raise NotFound.entity("Datapoint", public_id)
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(_SELECT + " WHERE e.public_id = %(e)s AND d.time = %(t)s", {"e": key[0], "t": key[1]})
    row = await cur.fetchone()
    if row is None:
        raise NotFound.entity("Datapoint", public_id)
    return with_public_id(row)


async def delete(conn: AsyncConnection, *, public_id: str) -> None:
    key = parse_datapoint_public_id(public_id)
    removed = 0
    if key is not None:
        removed = await series_repo.delete_datapoints(
            conn,
            "event_id = (SELECT id FROM events WHERE public_id = %(e)s) AND time = %(t)s",
            {"e": key[0], "t": key[1]},
        )
    if removed == 0:
        raise NotFound.entity("Datapoint", public_id)


# The hypertable's only index is (event_id, time): a plain max(time) scans every chunk (350 ms at 3 M rows,
# growing with the table, on every health probe). One backward index probe per event, newest chunk first,
# answers in milliseconds whatever the size. Datapoints never outlive their event (deleted together).
_LAST_TIME = "SELECT max((SELECT max(d.time) FROM datapoints d WHERE d.event_id = e.id)) FROM events e"


async def last_time(conn: AsyncConnection) -> datetime | None:
    """The newest datapoint's time, or None."""
    cur = await conn.execute(_LAST_TIME)
    row = await cur.fetchone()
    return row[0] if row else None
