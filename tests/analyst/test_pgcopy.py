"""`webmacs._core.CopyReader` and `decode_datapoints`: binary COPY of datapoints → column buffers (real database)."""

from __future__ import annotations

import itertools
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests.analyst.conftest import load
from webmacs import _core
from webmacs.exceptions import DatabaseError, InvalidDataError

COPY = (
    "COPY (SELECT time, event_id, value, experiment_id FROM datapoints WHERE event_id = {} ORDER BY time)"
    " TO STDOUT (FORMAT binary)"
)


def _rows(columns: tuple[int, bytes, bytes, bytes, bytes, bytes, int, bool]) -> list[tuple[Any, ...]]:
    n, times, events, values, experiments, validity, nulls, _ = columns
    t, e, v, x = (
        struct.unpack(f"={n}{c}", b) for c, b in (("q", times), ("i", events), ("d", values), ("i", experiments))
    )
    valid = [bool(validity[i // 8] >> (i % 8) & 1) if nulls else True for i in range(n)]
    assert nulls == valid.count(False)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return [(epoch + timedelta(microseconds=t[i]), e[i], v[i], x[i] if valid[i] else None) for i in range(n)]


@pytest.mark.parametrize("max_rows", [1, 7, 1000])
def test_reader_round_trip(
    db: psycopg.Connection, db_url: str, make_event: Any, make_experiment: Any, max_rows: int
) -> None:
    ev = make_event()
    x_id, _ = make_experiment(datetime(2026, 8, 1, tzinfo=UTC))
    t0 = datetime(2026, 8, 1, 23, 59, 58, 123457, tzinfo=UTC)  # across a chunk boundary
    rows = [(t0 + timedelta(milliseconds=250 * i), ev.id, i / 3 - 4.0, x_id if i % 3 else None) for i in range(23)]
    rows.append((datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), ev.id, float("inf"), None))  # < PG epoch
    load(db, [(t, e, x, v) for t, e, v, x in rows])
    reader = _core.CopyReader(db_url)
    try:
        for _ in range(2):  # a reader runs one COPY after another
            reader.start(COPY.format(ev.id), max_rows)
            got = []
            while (columns := reader.next_frame()) is not None:
                assert columns[0] <= max_rows
                got += _rows(columns)
            assert got == sorted(rows)
            assert reader.next_frame() is None
    finally:
        reader.close()


def test_reader_errors(db_url: str) -> None:
    reader = _core.CopyReader(db_url)
    reader.start("COPY (SELECT 1::int4, 2::int4) TO STDOUT (FORMAT binary)", 10)
    with pytest.raises(InvalidDataError, match="2 fields"):
        reader.next_frame()
    assert reader.next_frame() is None  # the failed COPY is over
    reader.start("COPY (SELECT 'x') TO STDOUT (FORMAT csv)", 10)
    with pytest.raises(InvalidDataError, match="signature"):
        reader.next_frame()
    reader.start("COPY (SELECT no_such_column FROM datapoints) TO STDOUT (FORMAT binary)", 10)
    with pytest.raises(DatabaseError, match="database error"):
        reader.next_frame()
    # Abandoning a COPY half read leaves the connection usable.
    reader.start(
        "COPY (SELECT now(), 1, 1.0::float8, NULL::int4 FROM generate_series(1, 100000)) TO STDOUT (FORMAT binary)", 10
    )
    assert reader.next_frame() is not None
    reader.start("COPY (SELECT now(), 2, 2.0::float8, 3) TO STDOUT (FORMAT binary)", 10)
    columns = reader.next_frame()
    assert columns is not None and _rows(columns)[0][1:] == (2, 2.0, 3)
    reader.close()
    with pytest.raises(DatabaseError, match="closed"):
        reader.start(COPY.format(1), 10)
    with pytest.raises(DatabaseError):
        _core.CopyReader("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")


def test_decode_rejects_truncated_bytes() -> None:
    header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    one = struct.pack(">hiqiiiqi", 4, 8, 0, 4, 7, 8, 0, -1)
    assert _core.decode_datapoints(header + one + b"\xff\xff", True)[0] == 1
    with pytest.raises(InvalidDataError, match="ends inside") as truncated:
        _core.decode_datapoints(header + one[:-1], True)
    assert truncated.value.code == "truncated"
    with pytest.raises(InvalidDataError, match="signature"):
        _core.decode_datapoints(b"PGCOPX\n\xff\r\n\x00" + bytes(8), True)


@pytest.mark.parametrize("max_rows", [1, 2, 5, 1000])
def test_reader_orders_ties_by_event_without_splitting_them(
    db: psycopg.Connection, db_url: str, make_event: Any, max_rows: int
) -> None:
    events = [make_event() for _ in range(3)]
    t0 = datetime(2026, 8, 5, tzinfo=UTC)
    # Loaded newest event first, so the heap order is not the event order.
    rows = [(t0 + timedelta(seconds=i), ev.id, float(i), None) for i in range(6) for ev in reversed(events)]
    load(db, [(t, e, x, v) for t, e, v, x in rows])
    ids = ",".join(str(ev.id) for ev in events)
    reader = _core.CopyReader(db_url)
    try:
        reader.start(
            "COPY (SELECT time, event_id, value, experiment_id FROM datapoints WHERE event_id IN"
            f" ({ids}) ORDER BY time) TO STDOUT (FORMAT binary)",
            max_rows,
            ties_by_event=True,
        )
        frames = []
        while (columns := reader.next_frame()) is not None:
            frames.append(_rows(columns))
    finally:
        reader.close()
    got = [row for frame in frames for row in frame]
    assert [(t, e) for t, e, _, _ in got] == sorted((t, e) for t, e, _, _ in rows)
    for before, after in itertools.pairwise(frames):
        if before and after:
            assert before[-1][0] != after[0][0]  # no run of equal times is split
    assert all(len(frame) <= max(max_rows, 1) + len(events) for frame in frames)


def test_reader_prefetch(db_url: str) -> None:
    """A prefetched statement is taken over when started next; one that is not started is abandoned."""
    copy = "COPY (SELECT now(), {}, 1.0::float8, NULL::int4 FROM generate_series(1, {})) TO STDOUT (FORMAT binary)"
    reader = _core.CopyReader(db_url)
    try:
        statements = [copy.format(i, 1000 * i) for i in (1, 2, 3)]
        for i, statement in enumerate(statements):
            reader.start(statement, 300, prefetch=statements[i + 1] if i + 1 < len(statements) else None)
            got = []
            while (columns := reader.next_frame()) is not None:
                got += _rows(columns)
            assert len(got) == 1000 * (i + 1) and {row[1] for row in got} == {i + 1}
        reader.start(statements[0], 300, prefetch=statements[2])
        reader.start(statements[1], 300)  # not the prefetched one: it is dropped, both connections stay usable
        assert sum(c[0] for c in iter(reader.next_frame, None)) == 2000
        reader.start(statements[0], 300, prefetch=statements[1])
        reader.start(statements[1], 300)
        assert sum(c[0] for c in iter(reader.next_frame, None)) == 2000
    finally:
        reader.close()
