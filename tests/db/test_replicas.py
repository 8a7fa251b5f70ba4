"""Analyst reads on a real streaming replica (pg_basebackup of a throwaway primary, a second postmaster): reads go
to the replica while it is provably fresh within WEBMACS_READ_MAX_STALENESS_S, to the primary otherwise; writes
never go to the replica."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import (
    ADMIN_PASSWORD,
    Server,
    bearer,
    free_port,
    login,
    make_settings,
    start_server,
    throwaway_cluster,
    unique,
)
from webmacs.db.cluster import Cluster

BOUND_S = 30.0


@pytest.fixture(scope="module")
def replicated() -> Iterator[tuple[Cluster, Cluster]]:
    with throwaway_cluster("webmacs-primary-") as primary:
        home = Path(tempfile.mkdtemp(prefix="webmacs-replica-"))
        home.chmod(0o755)
        replica = Cluster(home, free_port())
        try:
            replica.init_replica_of(primary)
            replica.up()
            yield primary, replica
        finally:
            replica.destroy()
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def app(replicated: tuple[Cluster, Cluster], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    primary, replica = replicated
    s = start_server(
        make_settings(
            primary.url(),
            tmp_path_factory.mktemp("replica-app"),
            webmacs_read_database_url=f"{replica.url()}",
            webmacs_read_max_staleness_s=BOUND_S,
        )
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def headers(app: Server) -> dict[str, str]:
    with httpx.Client(base_url=app.url, timeout=30) as c:
        return bearer(login(c, "admin@webmacs.io", ADMIN_PASSWORD))


def _event(primary: Cluster) -> tuple[int, str]:
    with psycopg.connect(primary.url(), autocommit=True) as c:
        row = c.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1e6, 'u', 'sensor')"
            " RETURNING id, public_id",
            (unique("rep"),),
        ).fetchone()
        assert row is not None
        return int(row[0]), str(row[1])


def _insert(primary: Cluster, event_id: int, values: list[float], start: datetime) -> None:
    with psycopg.connect(primary.url(), autocommit=True) as c, c.cursor() as cur:
        cur.executemany(
            "INSERT INTO datapoints (time, event_id, value) VALUES (%s, %s, %s)",
            [(start + timedelta(seconds=i), event_id, v) for i, v in enumerate(values)],
        )


def _replay(replica: Cluster, *, paused: bool) -> None:
    with psycopg.connect(replica.url(), autocommit=True) as c:
        c.execute("SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()")


def _series_values(app: Server, headers: dict[str, str], event: str, start: datetime) -> list[float]:
    r = httpx.get(
        app.url + "/api/v1/series",
        params={
            "events": event,
            "start": start.isoformat(),
            "end": (start + timedelta(hours=1)).isoformat(),
            "bucket": "1 second",
            "agg": "max",
        },
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return [value for _, value in body["events"][event]["points"]]


def _csv_lines(app: Server, headers: dict[str, str], event: str) -> int:
    r = httpx.get(app.url + "/api/v1/export", params={"events": event}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return len(r.text.strip().splitlines()) - 1


def _wait(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _replica_rows(replica: Cluster, event_id: int) -> int:
    with psycopg.connect(replica.url(), autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (event_id,)).fetchone()
        return int(row[0]) if row else 0


def _replica_usable(app: Server) -> bool:
    return all(s["usable"] for s in app.rt.reads.status())


def test_reads_use_the_fresh_replica_and_fall_back_beyond_the_bound(
    app: Server, headers: dict[str, str], replicated: tuple[Cluster, Cluster]
) -> None:
    primary, replica = replicated
    event_id, event = _event(primary)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    _insert(primary, event_id, [1.0, 2.0, 3.0], start)
    _wait(lambda: _replica_rows(replica, event_id) == 3, "the replica to replay")
    _wait(lambda: _replica_usable(app), "the replica to be proven fresh")
    assert _series_values(app, headers, event, start) == [1.0, 2.0, 3.0]

    _replay(replica, paused=True)
    try:
        _insert(primary, event_id, [4.0, 5.0], start + timedelta(seconds=3))
        # Within the bound the replica answers: its snapshot is older than the primary's, by design.
        assert _series_values(app, headers, event, start) == [1.0, 2.0, 3.0]
        # The export's own COPY connections read where the request reads.
        assert _csv_lines(app, headers, event) == 3
        # Writes never go to the replica (it is read-only: this would fail there).
        created = httpx.post(
            app.url + "/api/v1/events",
            json={"name": unique("w"), "min_value": 0, "max_value": 1, "unit": "u", "type": "sensor"},
            headers=headers,
            timeout=30,
        )
        assert created.status_code in (200, 201), created.text

        # Tighten the bound: the paused replica can no longer prove it is fresh, and reads go to the primary.
        app.rt.reads.max_staleness_s = 1.0
        _wait(lambda: not _replica_usable(app), "the paused replica to go stale")
        assert _series_values(app, headers, event, start) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert _csv_lines(app, headers, event) == 5
        health = httpx.get(app.url + "/health", timeout=30).json()
        assert health["status"] == "ok"  # reads still have the primary
        assert health["read_replicas"][0]["usable"] is False
        assert health["read_replicas"][0]["staleness_s"] > 1.0
    finally:
        _replay(replica, paused=False)
    # Replay resumed: the replica catches up, proves it and serves again.
    _wait(lambda: _replica_usable(app), "the replica to be fresh again")
    assert _series_values(app, headers, event, start) == [1.0, 2.0, 3.0, 4.0, 5.0]
    app.rt.reads.max_staleness_s = BOUND_S


def test_a_stopped_replica_costs_no_request(
    app: Server, headers: dict[str, str], replicated: tuple[Cluster, Cluster]
) -> None:
    primary, replica = replicated
    event_id, event = _event(primary)
    start = datetime(2026, 2, 1, tzinfo=UTC)
    _insert(primary, event_id, [7.0, 8.0], start)
    _wait(lambda: _replica_rows(replica, event_id) == 2, "the replica to replay")
    _wait(lambda: _replica_usable(app), "the replica to be proven fresh")
    replica.down()
    try:
        # Right after the stop the router may still think the replica fresh: the request falls back itself.
        for _ in range(5):
            assert _series_values(app, headers, event, start) == [7.0, 8.0]
            assert _csv_lines(app, headers, event) == 2
        _wait(lambda: not _replica_usable(app), "the stopped replica to be marked unusable")
        assert app.rt.reads.status()[0]["error"].startswith("unreachable")
    finally:
        replica.up()
    _wait(lambda: _replica_usable(app), "the restarted replica to be used again")


def test_a_promoted_replica_is_never_read(replicated: tuple[Cluster, Cluster], tmp_path: Path) -> None:
    """A standby that left recovery may have a forked history: the router refuses it."""
    import asyncio

    from psycopg_pool import AsyncConnectionPool

    from webmacs.db.replicas import ReadRouter

    primary, _ = replicated

    async def run() -> list[dict[str, Any]]:
        pool = AsyncConnectionPool(primary.url(), min_size=1, max_size=2, open=False)
        await pool.open(wait=True)
        # The primary itself stands in for a promoted standby: pg_is_in_recovery() is false there.
        router = ReadRouter.build(pool, primary.url(), [primary.url()], 5.0, 2)
        await router.open()
        try:
            assert router.choose().replica is None
            return router.status()
        finally:
            await router.close()
            await pool.close()

    status = asyncio.run(run())
    assert status[0]["usable"] is False
    assert "not a streaming replica" in status[0]["error"]
