"""Experiment CSV export (spec §13), streamed from a server-side cursor with bounded memory."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from webmacs.repositories.datapoints import datapoint_public_id

HEADER = ("timestamp", "event_name", "event_public_id", "value", "unit", "datapoint_public_id")
ROWS_PER_CHUNK = 5000

# Time bounds let TimescaleDB skip every chunk outside the experiment (there is no index on experiment_id).
_ROWS = (
    "SELECT d.time, e.name, e.public_id, d.value, e.unit FROM datapoints d JOIN events e ON e.id = d.event_id"
    " WHERE d.experiment_id = %(x)s AND d.time >= %(started)s"
)
_ORDER = " ORDER BY d.time, d.event_id"
RUNNING_QUERY = _ROWS + _ORDER
STOPPED_QUERY = _ROWS + " AND d.time <= %(stopped)s" + _ORDER

_UNSAFE_FILENAME = re.compile(r'[^\x20-\x7e]|["\\]')


def content_disposition(name: str, public_id: str) -> str:
    """`attachment; filename="experiment_<safe>_<id8>.csv"` (spec §13). Characters a quoted header value
    cannot carry (non-ASCII, controls, quotes, backslashes) become `_` there, and the exact UTF-8 name then
    rides along as RFC 5987 `filename*`."""
    from urllib.parse import quote

    filename = f"experiment_{name.replace(' ', '_').replace('/', '-')}_{public_id[:8]}.csv"
    ascii_name = _UNSAFE_FILENAME.sub("_", filename)
    header = f'attachment; filename="{ascii_name}"'
    if ascii_name != filename:
        header += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return header


def _encode(rows: list[tuple[datetime, str, str, float, str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerows(
        (time.isoformat(), name, event_public_id, str(value), unit, datapoint_public_id(event_public_id, time))
        for time, name, event_public_id, value, unit in rows
    )
    return buf.getvalue().encode()


async def experiment_csv(pool: AsyncConnectionPool, *, experiment_id: int, started_on: datetime,
                         stopped_on: datetime | None) -> AsyncIterator[bytes]:
    """The CSV body in chunks of ~5000 rows. Opens its own pooled connection: the request's connection is
    released before the response streams."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(HEADER)
    yield buf.getvalue().encode()
    params = {"x": experiment_id, "started": started_on, "stopped": stopped_on}
    async with pool.connection() as conn:
        async with conn.cursor(name="experiment_csv") as cur:
            cur.itersize = ROWS_PER_CHUNK
            await cur.execute(STOPPED_QUERY if stopped_on is not None else RUNNING_QUERY, params)
            while rows := await cur.fetchmany(ROWS_PER_CHUNK):
                yield _encode(rows)
