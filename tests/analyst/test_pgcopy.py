"""`webmacs._core.CopyReader` / `decode_datapoints`: binary COPY of datapoints → column buffers, on the real database."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests.analyst.conftest import load
from webmacs import _core

COPY = ("COPY (SELECT time, event_id, value, experiment_id FROM datapoints WHERE event_id = {} ORDER BY time)"
        " TO STDOUT (FORMAT binary)")


def _rows(columns: tuple[int, bytes, bytes, bytes, bytes, bytes, int, bool]) -> list[tuple[Any, ...]]:
    n, times, events, values, experiments, validity, nulls, _ = columns
    t, e, v, x = (struct.unpack(f"={n}{c}", b) for c, b in
                  (("q", times), ("i", events), ("d", values), ("i", experiments)))
    valid = [bool(validity[i // 8] >> (i % 8) & 1) if nulls else True for i in range(n)]
    assert nulls == valid.count(False)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return [(epoch + timedelta(microseconds=t[i]), e[i], v[i], x[i] if valid[i] else None) for i in range(n)]


@pytest.mark.parametrize("max_rows", [1, 7, 1000])
def test_reader_round_trip(db: psycopg.Connection, db_url: str, make_event: Any, make_experiment: Any,
                           max_rows: int) -> None:
    ev = make_event()
    x_id, _ = make_experiment(datetime(2026, 8, 1, tzinfo=UTC))
    t0 = datetime(2026, 8, 1, 23, 59, 58, 123457, tzinfo=UTC)  # across a chunk boundary
    rows = [(t0 + timedelta(milliseconds=250 * i), ev.id, i / 3 - 4.0, x_id if i % 3 else None) for i in range(23)]
    rows.append((datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), ev.id, float("inf"), None))  # < PG epoch
    load(db, [(t, e, x, v) for t, e, v, x in rows])
    reader = _core.CopyReader(db_url)
    try:
        for _ in range(2):  # a reader runs one COPY after another
            reader.start(COPY.format(ev.id))
            got = []
            while (columns := reader.next_frame(max_rows)) is not None:
                assert columns[0] <= max_rows
                got += _rows(columns)
            assert got == sorted(rows)
            assert reader.next_frame(max_rows) is None
    finally:
        reader.close()


def test_reader_errors(db_url: str) -> None:
    reader = _core.CopyReader(db_url)
    reader.start("COPY (SELECT 1::int4, 2::int4) TO STDOUT (FORMAT binary)")
    with pytest.raises(ValueError, match="2 fields"):
        reader.next_frame(10)
    reader.start("COPY (SELECT 'x') TO STDOUT (FORMAT csv)")
    with pytest.raises(ValueError, match="signature"):
        reader.next_frame(10)
    with pytest.raises(RuntimeError, match="database error"):
        reader.start("COPY (SELECT no_such_column FROM datapoints) TO STDOUT (FORMAT binary)")
    reader.close()
    with pytest.raises(RuntimeError, match="closed"):
        reader.start(COPY.format(1))
    with pytest.raises(RuntimeError):
        _core.CopyReader("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")


def test_decode_rejects_truncated_bytes() -> None:
    header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    one = struct.pack(">hiqiiiqi", 4, 8, 0, 4, 7, 8, 0, -1)
    assert _core.decode_datapoints(header + one + b"\xff\xff", True)[0] == 1
    with pytest.raises(ValueError, match="ends inside"):
        _core.decode_datapoints(header + one[:-1], True)
    with pytest.raises(ValueError, match="signature"):
        _core.decode_datapoints(b"PGCOPX\n\xff\r\n\x00" + bytes(8), True)
