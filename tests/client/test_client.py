"""`webmacs.client`: a Controller streams across a server restart losing nothing; Client reads series and exports."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest

from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ActiveEvent, Server, free_port, make_settings, start_server
from webmacs.client import ApiError, Client, Controller, SpoolFull, telemetry_url

POINTS = 100_000


def stored(db: psycopg.Connection, event_id: int) -> pl.DataFrame:
    rows = db.execute("SELECT time, value FROM datapoints WHERE event_id = %s ORDER BY time", (event_id,)).fetchall()
    return pl.DataFrame(rows, schema={"time": pl.Datetime("us", "UTC"), "value": pl.Float64}, orient="row")


def test_controller_survives_a_server_restart_and_every_acked_point_is_stored_once(
    db: psycopg.Connection, db_url: str, tmp_path: Path, make_active_event: Callable[..., ActiveEvent]
) -> None:
    events = [make_active_event(max_value=1e9), make_active_event(max_value=1e9)]
    port = free_port()
    settings = make_settings(db_url, tmp_path)
    server: Server = start_server(settings, port=port)
    with Client(server.url) as api:
        token = api.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    base = datetime.now(UTC) - timedelta(days=1)
    sent: dict[int, list[tuple[datetime, float]]] = {ev.id: [] for ev in events}
    controller = Controller(server.url, token, batch_size=500, spool_capacity=20_000, max_backoff_s=0.5)
    restarted = threading.Event()

    def restart() -> None:
        nonlocal server
        # Restart once a good part of the points is underway: queued and in-flight frames see the server go.
        while controller.stats.accepted < POINTS // 4:
            time.sleep(0.01)
        server.stop()
        time.sleep(1.0)  # the controller finds nobody listening and backs off
        server = start_server(settings, port=port)
        restarted.set()

    restarter = threading.Thread(target=restart)
    restarter.start()
    try:
        for i in range(POINTS):
            ev = events[i % 2]
            t = base + timedelta(microseconds=7 * i)
            controller.send(ev.public_id, float(i), t, timeout=120)
            sent[ev.id].append((t, float(i)))
        restarter.join(timeout=120)
        assert restarted.is_set()
        assert controller.flush(timeout=120), controller.stats
        stats = controller.stats
    finally:
        controller.close(timeout=5)
        restarter.join(timeout=60)
        server.stop()
    assert stats.reconnects >= 1, stats
    assert stats.spooled == 0 and stats.rejected == 0, stats
    for ev in events:
        expected = pl.DataFrame(
            sent[ev.id], schema={"time": pl.Datetime("us", "UTC"), "value": pl.Float64}, orient="row"
        )
        # Exactly the points sent: none lost, none twice (resent frames were deduplicated by client time).
        assert stored(db, ev.id).equals(expected)


def test_client_series_and_export_equal_a_direct_sql_read(
    server: Server, db: psycopg.Connection, admin_token: str, make_active_event: Callable[..., ActiveEvent]
) -> None:
    ev = make_active_event(max_value=1e9)
    base = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
    with Controller(server.url, admin_token, batch_size=500) as controller:
        for i in range(2_345):
            controller.send(ev.public_id, i * 0.5 - 100, base + timedelta(seconds=i, microseconds=i))
        assert controller.flush(timeout=60)
    direct = stored(db, ev.id)
    assert direct.height == 2_345
    with Client(server.url, token=admin_token) as api:
        for fmt in ("parquet", "arrow"):
            frame = api.export([ev.public_id], format=fmt)
            assert frame.select("time", "value").equals(direct), fmt
            assert set(frame["event_public_id"]) == {ev.public_id}
        series = api.series([ev.public_id], base, base + timedelta(days=1))
        assert series.select("time", "value").equals(direct)
        bucketed = api.series([ev.public_id], base, base + timedelta(days=1), bucket="1h", agg="count")
        assert bucketed["value"].sum() == 2_345
        with pytest.raises(ApiError) as e:
            api.export(["no-such-event"])
        assert e.value.status == 404


def test_controller_refuses_hostile_input_locally(server: Server, admin_token: str) -> None:
    with Controller(server.url, admin_token, batch_size=1, spool_capacity=1, window=1) as controller:
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="finite"):
                controller.send("x", bad)
        with pytest.raises(ValueError, match="non-empty"):
            controller.send("", 1.0)
        with pytest.raises(ValueError, match="could not convert"):
            controller.send("x", "not a number")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheme"):
        telemetry_url("ftp://example.com", "t")
    assert telemetry_url("https://h:1/base/", "a b&c") == "wss://h:1/base/ws/controller/telemetry?token=a+b%26c"


def test_a_full_spool_pushes_back_on_send(admin_token: str) -> None:
    # Nobody listens on this port: nothing is ever acked, so the spool fills and `send` gives up in time.
    url = f"http://127.0.0.1:{free_port()}"
    controller = Controller(url, admin_token, batch_size=10, spool_capacity=10, max_backoff_s=0.2)
    try:
        for i in range(10):
            controller.send("ev", float(i))
        with pytest.raises(SpoolFull):
            controller.send("ev", 10.0, timeout=0.2)
        assert controller.stats.spooled == 10
        assert controller.stats.last_error is not None and "connect" in controller.stats.last_error
    finally:
        assert controller.close(timeout=0.1) is False  # ten points never acknowledged, and it says so
