"""Experiment CSV export (spec §13), streamed from a server-side cursor with bounded memory."""

from __future__ import annotations

import contextlib
import csv
import io
import re
from collections.abc import AsyncIterator
from datetime import datetime

import psycopg

from webmacs.repositories import exports as exports_repo
from webmacs.repositories.datapoints import datapoint_public_id

HEADER = ("timestamp", "event_name", "event_public_id", "value", "unit", "datapoint_public_id")
ROWS_PER_CHUNK = 5000

_UNSAFE_FILENAME = re.compile(r'[^\x20-\x7e]|["\\]')


def experiment_stem(name: str, public_id: str) -> str:
    """`experiment_<name>_<id8>` (spec §13): an experiment's download name without its extension."""
    return f"experiment_{name.replace(' ', '_').replace('/', '-')}_{public_id[:8]}"


def content_disposition(name: str, public_id: str) -> str:
    """`attachment; filename="experiment_<safe>_<id8>.csv"` (spec §13)."""
    return attachment(experiment_stem(name, public_id) + ".csv")


def attachment(filename: str) -> str:
    """`attachment; filename="…"` for any download. Characters a quoted header value cannot carry (non-ASCII,
    controls, quotes, backslashes) become `_` there, and the exact UTF-8 name then rides along as RFC 5987
    `filename*`."""
    from urllib.parse import quote

    ascii_name = _UNSAFE_FILENAME.sub("_", filename)
    header = f'attachment; filename="{ascii_name}"'
    if ascii_name != filename:
        header += f"; filename*=UTF-8''{quote(filename, safe='')}"
    return header


#: What a spreadsheet reads as the start of a formula (OWASP "CSV injection"); tab and CR too.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(text: str) -> str:
    """A text cell a spreadsheet would run as a formula gets a leading `'` (shown, never evaluated)."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _encode(rows: list[tuple[datetime, str, str, float, str]], *, guard: bool) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    cell = neutralise if guard else str
    # Only names and units are text: numbers, times and ids are never touched.
    writer.writerows(
        (
            time.isoformat(),
            cell(name),
            event_public_id,
            str(value),
            cell(unit),
            datapoint_public_id(event_public_id, time),
        )
        for time, name, event_public_id, value, unit in rows
    )
    return buf.getvalue().encode()


async def experiment_csv(url: str, *, experiment_id: int, guard: bool = True) -> AsyncIterator[bytes]:
    """The CSV body in chunks of ~5000 rows, read on a connection of its own (a long download must not hold
    one of the API pool's connections). `guard`: neutralise formula-like text cells."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(HEADER)
    yield buf.getvalue().encode()
    conn = await psycopg.AsyncConnection.connect(url, options="-c timezone=UTC")
    batches = exports_repo.experiment_csv_rows(conn, experiment_id=experiment_id, batch_rows=ROWS_PER_CHUNK)
    # aclosing: a download that stops early closes the server-side cursor before its connection.
    async with conn, contextlib.aclosing(batches):
        async for rows in batches:
            yield _encode(rows, guard=guard)
