"""Datapoints read side (spec §4.2): list order and paging, get/delete by the derived public_id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from tests.conftest import unique
from webmacs.repositories.datapoints import datapoint_public_id, parse_datapoint_public_id

FIELDS = {"public_id", "value", "timestamp", "event_public_id", "experiment_public_id"}


def make_event(db: psycopg.Connection) -> tuple[int, str]:
    row = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'V', 'sensor')"
        " RETURNING id, public_id",
        (unique("dp"),),
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.mark.parametrize(
    "t",
    [
        datetime(2026, 11, 26, 6, 50, 4, 125998, tzinfo=UTC),
        datetime(2026, 11, 26, 6, 50, 4, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
    ],
)
def test_public_id_round_trips(t: datetime) -> None:
    pid = datapoint_public_id("evt@with@ats", t)
    assert parse_datapoint_public_id(pid) == ("evt@with@ats", t)


def test_public_id_form() -> None:
    t = datetime(1970, 1, 1, 0, 0, 1, 5, tzinfo=UTC)
    assert datapoint_public_id("e", t) == "e@1000005"


@pytest.mark.parametrize(
    "bad", ["", "abc", "@123", "e@", "e@1.5", "e@+5", "e@ 5", "e@1_000", "e@0x10", "e@" + "9" * 30, "e\x00@5", "e@٣"]
)
def test_malformed_public_ids_parse_to_none(bad: str) -> None:
    assert parse_datapoint_public_id(bad) is None


def test_list_get_delete(
    client: httpx.Client, viewer: dict[str, str], operator: dict[str, str], db: psycopg.Connection
) -> None:
    eid, epid = make_event(db)
    exp = db.execute("INSERT INTO experiments (name) VALUES (%s) RETURNING id, public_id", (unique("x"),)).fetchone()
    assert exp is not None
    # Far in the future so these are the newest rows whatever other tests inserted.
    t = datetime(2999, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    eid2, epid2 = make_event(db)
    db.execute(
        "INSERT INTO datapoints (time, event_id, experiment_id, value) VALUES"
        " (%s, %s, %s, 1.5), (%s, %s, NULL, 2), (%s, %s, NULL, 3)",
        (t, eid, exp[0], t, eid2, t - timedelta(seconds=1), eid),
    )
    try:
        r = client.get("/api/v1/datapoints", headers=viewer, params={"page_size": 3})
        assert r.status_code == 200
        body = r.json()
        total = db.execute("SELECT count(*) FROM datapoints d JOIN events e ON e.id = d.event_id").fetchone()
        assert body["total"] == total[0]  # type: ignore[index]
        assert all(set(d) == FIELDS for d in body["data"])
        # time DESC, then event id DESC on ties
        assert [(d["event_public_id"], d["value"]) for d in body["data"]] == [(epid2, 2.0), (epid, 1.5), (epid, 3.0)]
        first = body["data"][1]
        assert first == {
            "public_id": f"{epid}@{datapoint_public_id(epid, t).rpartition('@')[2]}",
            "value": 1.5,
            "timestamp": "2999-01-01T00:00:00.123456Z",
            "event_public_id": epid,
            "experiment_public_id": exp[1],
        }
        assert client.get(f"/api/v1/datapoints/{first['public_id']}", headers=viewer).json() == first

        r = client.delete(f"/api/v1/datapoints/{first['public_id']}", headers=viewer)
        assert r.status_code == 403
        r = client.delete(f"/api/v1/datapoints/{first['public_id']}", headers=operator)
        assert r.json() == {"status": "success", "message": "Datapoint successfully deleted."}
        r = client.get(f"/api/v1/datapoints/{first['public_id']}", headers=viewer)
        assert r.status_code == 404 and r.json() == {"detail": f"Datapoint '{first['public_id']}' not found."}
        assert client.delete(f"/api/v1/datapoints/{first['public_id']}", headers=operator).status_code == 404
        # The neighbours are untouched.
        assert db.execute("SELECT count(*) FROM datapoints WHERE event_id IN (%s, %s)", (eid, eid2)).fetchone() == (2,)
    finally:
        db.execute("DELETE FROM datapoints WHERE event_id IN (%s, %s)", (eid, eid2))


@pytest.mark.parametrize(
    ("path", "pid"),
    [("nope", "nope"), ("x@1", "x@1"), ("x@abc", "x@abc"), ("x%00@1", "x\x00@1"), ("x@99999999999999999999999", None)],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_unknown_or_malformed_ids_are_404(
    client: httpx.Client, operator: dict[str, str], path: str, pid: str | None, method: str
) -> None:
    r = client.request(method, f"/api/v1/datapoints/{path}", headers=operator)
    assert r.status_code == 404
    assert r.json() == {"detail": f"Datapoint '{pid or path}' not found."}


def test_unauthenticated(client: httpx.Client) -> None:
    assert client.get("/api/v1/datapoints").status_code == 401
    assert client.get("/api/v1/datapoints/x@1").status_code == 401
    assert client.delete("/api/v1/datapoints/x@1").status_code == 401
