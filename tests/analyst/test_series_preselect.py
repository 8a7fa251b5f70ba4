"""`GET /api/v1/series` over long ranges: m4/minmax/lttb input pre-selected in SQL (slices' extremes only)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.analyst.conftest import LONG_START, load, long_range, series_points, whole_downsample
from tests.conftest import Server
from webmacs.services import series as series_service

T0 = LONG_START
MAX_POINTS = 40


@pytest.fixture(autouse=True)
def preselect(server: Server) -> Iterator[None]:
    """These tests exercise the pre-selection through the API: on for them (WEBMACS_SERIES_PRESELECT), then the
    setting is put back."""
    before = server.rt.settings
    server.rt.settings = before.model_copy(update={"webmacs_series_preselect": True})
    yield
    server.rt.settings = before


@pytest.fixture
def long_event(db: psycopg.Connection, make_event: Any) -> tuple[Any, list[tuple[datetime, float]]]:
    """20,000 irregular datapoints (gaps, bursts a microsecond apart) over 25 days; values from a small set, so
    slices hold many equal minima and maxima, plus one global minimum and maximum in the middle."""
    ev = make_event()
    rng = random.Random(13)  # noqa: S311 - reproducible test data, not secrets
    t = T0 + timedelta(hours=3)
    rows = []
    for i in range(20_000):
        t += timedelta(microseconds=1) if i % 97 < 3 else timedelta(seconds=rng.randrange(1, 200))
        if i == 9_000:
            t += timedelta(days=2)  # a gap several slices wide
        rows.append((t, float(rng.randrange(0, 9))))
    rows[12_345] = (rows[12_345][0], -1e300)
    rows[4_321] = (rows[4_321][0], 1e300)
    load(db, [(t, ev.id, None, v) for t, v in rows])
    return ev, rows


def test_slice_edges_cut_like_the_rust_downsamplers() -> None:
    rng = random.Random(5)  # noqa: S311 - reproducible test data, not secrets
    for _ in range(300):
        t_first = rng.randrange(-(2**62), 2**62)
        span = rng.choice([1, 2, 3, 7, rng.randrange(1, 10**6), rng.randrange(1, 2**62)])
        slices = rng.randrange(1, 300)
        edges = series_service.slice_edges(t_first, t_first + span, slices)
        assert len(edges) == slices - 1 and edges == sorted(edges)
        for t in [t_first, t_first + span, *(t_first + rng.randrange(0, span + 1) for _ in range(50))]:
            rust = min((t - t_first) * slices // span, slices - 1)
            assert sum(e <= t for e in edges) == rust  # what width_bucket returns


@pytest.mark.parametrize("mode", ["m4", "minmax"])
@pytest.mark.parametrize("max_points", [MAX_POINTS, 41, 1000])
def test_preselection_equals_the_downsample_of_every_row(
    client: httpx.Client,
    viewer: dict[str, str],
    db: psycopg.Connection,
    db_url: str,
    long_event: tuple[Any, list[tuple[datetime, float]]],
    mode: series_service.Mode,
    max_points: int,
) -> None:
    ev, rows = long_event
    assert (
        long_range(db_url, series_service.preselected, ev.id, max_points, mode) is not None
    )  # the long-range path, not a fallback
    got = series_points(client, viewer, ev.public_id, mode=mode, max_points=max_points)
    assert got == whole_downsample(db, ev.id, max_points, mode)
    assert len(got) <= max_points
    # The global extremes and both ends survive.
    assert got[0] == rows[0] and got[-1] == rows[-1]
    assert {v for _, v in got} >= {-1e300, 1e300}


@pytest.mark.parametrize("mode", ["m4", "minmax"])
def test_reading_whole_answers_as_preselecting_does(
    server: Server,
    client: httpx.Client,
    viewer: dict[str, str],
    db: psycopg.Connection,
    long_event: tuple[Any, list[tuple[datetime, float]]],
    mode: series_service.Mode,
) -> None:
    ev, _ = long_event
    preselected = series_points(client, viewer, ev.public_id, mode=mode, max_points=MAX_POINTS)
    server.rt.settings = server.rt.settings.model_copy(update={"webmacs_series_preselect": False})
    whole = series_points(client, viewer, ev.public_id, mode=mode, max_points=MAX_POINTS)
    assert whole == preselected == whole_downsample(db, ev.id, MAX_POINTS, mode)
    assert len(whole) > 4


def test_lttb_on_preselected_points_keeps_the_ends_and_stays_within_max_points(
    client: httpx.Client, viewer: dict[str, str], db_url: str, long_event: tuple[Any, list[tuple[datetime, float]]]
) -> None:
    ev, rows = long_event
    assert long_range(db_url, series_service.preselected, ev.id, MAX_POINTS, "lttb") is not None
    got = series_points(client, viewer, ev.public_id, mode="lttb", max_points=MAX_POINTS)
    assert len(got) == MAX_POINTS
    assert got[0] == rows[0] and got[-1] == rows[-1]
    assert [t for t, _ in got] == sorted({t for t, _ in got})
    assert set(got) <= set(rows)  # datapoints, not synthesised


@pytest.mark.parametrize("mode", ["m4", "minmax", "lttb"])
def test_short_ranges_are_read_whole(
    client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection, db_url: str, make_event: Any, mode: Any
) -> None:
    """At most max_points datapoints (and, for lttb, fewer than LTTB_LONG × max_points): no pre-selection,
    the answer is what it always was."""
    ev = make_event()
    n = MAX_POINTS if mode != "lttb" else MAX_POINTS * series_service.LTTB_LONG - 1
    load(db, [(T0 + timedelta(minutes=i), ev.id, None, float(i % 5)) for i in range(n)])
    assert long_range(db_url, series_service.preselected, ev.id, MAX_POINTS, mode) is None
    got = series_points(client, viewer, ev.public_id, mode=mode, max_points=MAX_POINTS)
    assert got == whole_downsample(db, ev.id, MAX_POINTS, mode)


def test_empty_and_single_time_ranges(
    client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection, db_url: str, make_event: Any
) -> None:
    ev = make_event()
    assert long_range(db_url, series_service.preselected, ev.id, MAX_POINTS, "m4") == []
    assert series_points(client, viewer, ev.public_id, mode="m4", max_points=MAX_POINTS) == []
    load(db, [(T0 + timedelta(days=1), ev.id, None, 2.5)])
    assert long_range(db_url, series_service.preselected, ev.id, MAX_POINTS, "m4") is None
    assert series_points(client, viewer, ev.public_id, mode="minmax") == [(T0 + timedelta(days=1), 2.5)]


def test_hostile_values_and_the_widest_range(
    client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection, make_event: Any
) -> None:
    """NaN and ±infinity (COPY can store them) and a range from year 1 to 9999 still give a bounded,
    ordered answer that keeps both ends."""
    ev = make_event()
    specials = [math.nan, math.inf, -math.inf, 5e-324, -1.7976931348623157e308]
    rows = [(T0 + timedelta(seconds=37 * i), specials[i % 5] if i % 11 == 0 else float(i % 13)) for i in range(5000)]
    load(db, [(t, ev.id, None, v) for t, v in rows])
    for mode in ("m4", "minmax", "lttb"):
        r = client.get(
            "/api/v1/series",
            headers=viewer,
            params={
                "events": ev.public_id,
                "start": "0001-01-01T00:00:00Z",
                "end": "9999-12-31T00:00:00Z",
                "mode": mode,
                "max_points": 10,
            },
        )
        assert r.status_code == 200, r.text
        stamps = [datetime.fromisoformat(t) for t, _ in r.json()["events"][ev.public_id]["points"]]
        assert 2 <= len(stamps) <= 10
        assert stamps == sorted(set(stamps))
        assert stamps[0] == rows[0][0] and stamps[-1] == rows[-1][0]
