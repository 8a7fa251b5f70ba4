"""`GET /api/v1/admin/storage` and the drop_chunks retention job of the Apache edition."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.analyst.conftest import load
from tests.conftest import make_settings, start_server

STORAGE = "/api/v1/admin/storage"


def test_storage_report(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, make_event: Any) -> None:
    ev = make_event()
    load(
        db, [(datetime(2026, 8, 1, tzinfo=UTC), ev.id, None, 1.0), (datetime(2026, 8, 9, tzinfo=UTC), ev.id, None, 2.0)]
    )
    db.execute("ANALYZE datapoints")
    r = client.get(STORAGE, headers=admin)
    assert r.status_code == 200, r.text
    body = r.json()
    chunks = db.execute("SELECT count(*) FROM show_chunks('datapoints')").fetchone()
    assert chunks is not None and body["chunks"] == chunks[0] >= 2
    assert body["hypertable"] == "datapoints"
    assert body["size_bytes"] > 0 and body["row_estimate"] >= 2
    assert body["license"] in ("apache", "timescale")
    assert body["chunk_interval"] == "1 day"
    assert body["retention_days"] is None and body["retention_mode"] == "off"
    assert datetime.fromisoformat(body["oldest_chunk_start"]) <= datetime(2026, 8, 1, tzinfo=UTC)
    assert isinstance(body["jobs"], list)


@pytest.mark.parametrize("who", ["viewer", "operator", None])
def test_storage_is_admin_only(client: httpx.Client, request: pytest.FixtureRequest, who: str | None) -> None:
    headers = request.getfixturevalue(who) if who else {}
    assert client.get(STORAGE, headers=headers).status_code == (403 if who else 401)


def test_retention_job_drops_expired_chunks(
    db: psycopg.Connection, db_url: str, make_event: Any, admin: dict[str, str], tmp_path: Path
) -> None:
    ev = make_event()
    # 20000 days (~55 years) reaches back to early 1972: only chunks from before then can be dropped, so
    # the job touches no other test's data.
    expired, kept = datetime(1971, 1, 1, tzinfo=UTC), datetime(1973, 1, 1, tzinfo=UTC)
    load(db, [(expired, ev.id, None, 1.0), (kept, ev.id, None, 2.0)])
    server = start_server(make_settings(db_url, tmp_path, webmacs_retention_days=20000))
    try:
        deadline = time.monotonic() + 30
        while server.rt.retention.last_run is None:  # the job runs once at start-up, then hourly
            assert time.monotonic() < deadline, "retention job did not run"
            time.sleep(0.1)
        left = db.execute("SELECT time FROM datapoints WHERE event_id = %s ORDER BY time", (ev.id,)).fetchall()
        assert [r[0] for r in left] == [kept]
        with httpx.Client(base_url=server.url, headers=admin) as c:
            body = c.get(STORAGE).json()
        assert body["retention_days"] == 20000
        if body["license"] == "apache":
            assert body["retention_mode"] == "job"
            assert body["retention_last_dropped"] >= 1
            assert [j["kind"] for j in body["jobs"]][-1] == "webmacs_drop_chunks"
    finally:
        server.stop()
