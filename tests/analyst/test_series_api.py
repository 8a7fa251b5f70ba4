"""`POST /api/v1/datapoints/series` (spec §4.2) and the bucketed `GET /api/v1/series`."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.analyst.conftest import load
from tests.analyst.test_downsample import reference_stride
from tests.conftest import unique
from webmacs.repositories import exports as exports_repo
from webmacs.repositories import series as series_repo

SERIES = "/api/v1/datapoints/series"


def _iso_z(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
def recent_event(db: psycopg.Connection, make_event: Any, make_experiment: Any) -> tuple[Any, list[datetime], str]:
    """1200 datapoints in the last 20 minutes (one per second, the older half in an experiment) and five
    two hours old."""
    ev = make_event()
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    x_id, x_public = make_experiment(now - timedelta(hours=1))
    recent = [now - timedelta(seconds=i) for i in range(1200)]
    old = [now - timedelta(hours=2, seconds=i) for i in range(5)]
    load(db, [(t, ev.id, x_id if i >= 600 else None, float(i % 37)) for i, t in enumerate(recent)])
    load(db, [(t, ev.id, None, -1.0) for t in old])
    return ev, sorted(recent), x_public


def test_series_strides_like_the_reference(
    client: httpx.Client, viewer: dict[str, str], recent_event: tuple[Any, list[datetime], str]
) -> None:
    ev, times, x_public = recent_event
    missing = unique("nope")
    r = client.post(SERIES, headers=viewer, json={"event_public_ids": [ev.public_id, missing]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {ev.public_id, missing}
    assert body[missing] == []
    points = body[ev.public_id]
    kept = reference_stride(len(times), 500)
    assert [p["timestamp"] for p in points] == [_iso_z(times[i]) for i in kept]
    first = points[0]
    assert set(first) == {"public_id", "value", "timestamp", "event_public_id", "experiment_public_id"}
    assert first["event_public_id"] == ev.public_id
    assert first["public_id"] == f"{ev.public_id}@{int(times[0].timestamp()) * 1_000_000}"
    assert first["experiment_public_id"] == x_public  # the oldest half belongs to the experiment
    assert points[-1]["experiment_public_id"] is None
    assert all(p["value"] >= 0 for p in points)  # the two-hour-old points (value −1) are outside the window


def test_series_minutes_window_and_small_series(
    client: httpx.Client, viewer: dict[str, str], recent_event: tuple[Any, list[datetime], str]
) -> None:
    ev, _times, _ = recent_event
    r = client.post(
        SERIES, headers=viewer, json={"event_public_ids": [ev.public_id], "minutes": 180, "max_points": 2000}
    )
    points = r.json()[ev.public_id]
    assert len(points) == 1205  # everything, oldest first
    assert [p["value"] for p in points[:5]] == [-1.0] * 5
    stamps = [p["timestamp"] for p in points]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize("mode", ["stride", "lttb", "minmax", "m4", "avg"])
def test_series_modes_stay_within_max_points(
    client: httpx.Client, viewer: dict[str, str], mode: str, recent_event: tuple[Any, list[datetime], str]
) -> None:
    ev, times, _ = recent_event
    r = client.post(SERIES, headers=viewer, json={"event_public_ids": [ev.public_id], "max_points": 50, "mode": mode})
    assert r.status_code == 200, r.text
    points = r.json()[ev.public_id]
    assert 0 < len(points) <= 50
    stamps = [datetime.fromisoformat(p["timestamp"]) for p in points]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    if mode != "avg":
        assert stamps[0] == times[0] and stamps[-1] == times[-1]
    if mode in ("minmax", "m4"):
        assert {p["value"] for p in points} >= {0.0, 36.0}


@pytest.mark.parametrize(
    "body",
    [
        {"event_public_ids": []},
        {"event_public_ids": ["a"] * 21},
        {"event_public_ids": ["a"], "minutes": 0},
        {"event_public_ids": ["a"], "minutes": 14401},
        {"event_public_ids": ["a"], "max_points": 9},
        {"event_public_ids": ["a"], "max_points": 2001},
        {"event_public_ids": ["a"], "mode": "median"},
    ],
)
def test_series_validation(client: httpx.Client, viewer: dict[str, str], body: dict[str, Any]) -> None:
    r = client.post(SERIES, headers=viewer, json=body)
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], list)


def test_series_needs_authentication(client: httpx.Client) -> None:
    assert client.post(SERIES, json={"event_public_ids": ["a"]}).status_code == 401


# --- GET /series ---------------------------------------------------------------------------------------------

BERLIN_DST = [
    # (first day, DST day, day after) around the change, and the DST day's length in hours
    ("2026-03-28", "2026-03-29", "2026-03-30", 23),
    ("2026-10-24", "2026-10-25", "2026-10-26", 25),
]


@pytest.mark.parametrize(("before", "change", "after", "hours"), BERLIN_DST)
def test_day_buckets_follow_dst_in_berlin(
    client: httpx.Client,
    viewer: dict[str, str],
    db: psycopg.Connection,
    make_event: Any,
    before: str,
    change: str,
    after: str,
    hours: int,
) -> None:
    ev = make_event()
    # One datapoint every 15 minutes (UTC) over four days around the change.
    t0 = datetime.fromisoformat(before).replace(tzinfo=UTC) - timedelta(days=1)
    load(db, [(t0 + timedelta(minutes=15 * i), ev.id, None, 1.0) for i in range(4 * 24 * 4)])
    r = client.get(
        "/api/v1/series",
        headers=viewer,
        params={
            "events": ev.public_id,
            "start": before,
            "end": f"{after}T23:59:59",
            "bucket": "1 day",
            "agg": "count",
            "tz": "Europe/Berlin",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["start"].startswith(before) and body["tz"] == "Europe/Berlin"
    points = body["events"][ev.public_id]["points"]
    assert [p[0][:10] for p in points] == [before, change, after]
    starts = [datetime.fromisoformat(p[0]) for p in points]
    lengths = [(b - a).total_seconds() / 3600 for a, b in itertools.pairwise(starts)]
    assert lengths == [24, hours]
    assert [p[1] for p in points] == [96, hours * 4, 96]
    assert {p[0][-6:] for p in points} == {"+01:00", "+02:00"}


def test_bucket_aggregates(
    client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection, make_event: Any
) -> None:
    a, b = make_event(unit="V"), make_event(unit="A")
    t0 = datetime(2026, 5, 1, tzinfo=UTC)
    # a: values 0..119, one per minute over two hours; b: constant 2.5 over the first hour only.
    load(db, [(t0 + timedelta(minutes=i), a.id, None, float(i)) for i in range(120)])
    load(db, [(t0 + timedelta(minutes=i), b.id, None, 2.5) for i in range(60)])
    expected = {
        "avg": [29.5, 89.5],
        "min": [0, 60],
        "max": [59, 119],
        "count": [60, 60],
        "first": [0, 60],
        "last": [59, 119],
        "sum": [sum(range(60)), sum(range(60, 120))],
    }
    for agg, values in expected.items():
        r = client.get(
            "/api/v1/series",
            headers=viewer,
            params={
                "events": [a.public_id, b.public_id],
                "start": "2026-05-01T00:00:00Z",
                "end": "2026-05-01T02:00:00Z",
                "bucket": "1h",
                "agg": agg,
            },
        )
        assert r.status_code == 200, r.text
        events = r.json()["events"]
        assert events[a.public_id]["unit"] == "V" and events[a.public_id]["name"] == a.name
        assert [p[0] for p in events[a.public_id]["points"]] == ["2026-05-01T00:00:00Z", "2026-05-01T01:00:00Z"]
        assert [p[1] for p in events[a.public_id]["points"]] == values
        assert len(events[b.public_id]["points"]) == 1
    r = client.get(
        "/api/v1/series",
        headers=viewer,
        params={"events": a.public_id, "start": "2026-05-01T00:00:00Z", "end": "2026-05-01T02:00:00Z"},
    )
    assert len(r.json()["events"][a.public_id]["points"]) == 120  # no bucket: the raw datapoints
    r = client.get(
        "/api/v1/series",
        headers=viewer,
        params={
            "events": a.public_id,
            "start": "2026-05-01T00:00:00Z",
            "end": "2026-05-01T02:00:00Z",
            "mode": "lttb",
            "max_points": 10,
        },
    )
    points = r.json()["events"][a.public_id]["points"]
    assert len(points) == 10 and points[0][1] == 0 and points[-1][1] == 119


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"bucket": "5 parsecs"}, 422),
        ({"bucket": "0m"}, 422),
        ({"bucket": "1 second", "start": "2000-01-01T00:00:00Z"}, 422),  # far too many buckets
        ({"tz": "Mars/Olympus_Mons"}, 422),
        ({"tz": "../../etc/passwd"}, 422),
        ({"start": "2026-05-02T00:00:00Z"}, 422),
        ({"start": "2026-05-01T02:00:00Z"}, 422),
        ({"agg": "median"}, 422),
        ({"mode": "median"}, 422),
        ({"events": "unknown-event"}, 404),
    ],
)
def test_series_query_errors(
    client: httpx.Client, viewer: dict[str, str], make_event: Any, params: dict[str, str], status: int
) -> None:
    ev = make_event()
    query = {
        "events": ev.public_id,
        "start": "2026-05-01T00:00:00Z",
        "end": "2026-05-01T02:00:00Z",
        "bucket": "1h",
    } | params
    r = client.get("/api/v1/series", headers=viewer, params=query)
    assert r.status_code == status, r.text
    if status == 404:
        assert r.json() == {"detail": "Event 'unknown-event' not found."}


@pytest.mark.parametrize("query", ["range", "bucketed", "recent", "export"])
def test_single_event_queries_use_the_channel_index(db: psycopg.Connection, make_event: Any, query: str) -> None:
    ev = make_event()
    now = datetime.now(UTC)
    load(db, [(datetime(2026, 5, 1, tzinfo=UTC) + timedelta(days=i), ev.id, None, 1.0) for i in range(40)])
    load(db, [(now - timedelta(seconds=10 * i), ev.id, None, 1.0) for i in range(1, 40)])  # a chunk for `recent`
    start, end = datetime(2026, 5, 1, tzinfo=UTC), datetime(2026, 5, 3, tzinfo=UTC)
    cases: dict[str, tuple[str | psycopg.sql.Composable, tuple[Any, ...] | dict[str, Any]]] = {
        "range": (series_repo.RANGE_SQL, (ev.id, start, end)),
        "bucketed": (
            series_repo.BUCKETED_SQL.format(agg=series_repo.AGGREGATES["avg"]),
            ("1 hour", "Europe/Berlin", ev.id, start, end),
        ),
        "recent": (series_repo.RECENT_SQL, (ev.id, 60)),
        "export": (exports_repo.EVENTS_QUERY, {"events": [ev.id], "start": start, "end": end}),
    }
    sql, params = cases[query]
    with db.transaction():
        # Tiny tables make a sequential scan look cheap; forbid it to see whether the index *can* serve.
        db.execute("SET LOCAL enable_seqscan = off")
        query_sql = psycopg.sql.SQL(sql) if isinstance(sql, str) else sql
        plan = "\n".join(r[0] for r in db.execute(psycopg.sql.SQL("EXPLAIN ") + query_sql, params).fetchall())
    assert "ux_datapoints_event_time" in plan
    assert "Seq Scan" not in plan
