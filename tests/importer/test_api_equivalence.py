"""After importing the WebMACS fixture, the API answers what WebMACS answers for the same data (spec §3, §4, §13):
every expectation below is computed from the WebMACS database itself, following the spec.

The one deliberate difference: datapoint ids are ours (`<event public_id>@<µs>`, README "Importing from
WebMACS"), so the experiment CSV's last column and the series' `public_id` are compared against those."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import SECRET, Server, bearer, login
from tests.importer.webmacs_fixture import Fixture, webmacs_jwt
from webmacs.repositories.datapoints import datapoint_public_id


@pytest.fixture(scope="module")
def api(imported_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=imported_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def admin(api: httpx.Client, webmacs_source: Fixture) -> dict[str, str]:
    old = webmacs_source.users[0]
    return bearer(login(api, old.email, old.password))


def source_rows(fixture: Fixture, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(fixture.dsn, options="-c timezone=UTC") as c, c.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()


def when(text: str | None) -> datetime | None:
    """An API datetime (spec §0: ISO 8601, `Z`) as an aware datetime."""
    return None if text is None else datetime.fromisoformat(text)


def same(api_items: list[dict[str, Any]], expected: list[dict[str, Any]], times: tuple[str, ...] = ()) -> None:
    """The API's items equal the expected rows, field by field, datetimes compared as instants."""
    assert len(api_items) == len(expected)
    for got, want in zip(api_items, expected, strict=True):
        for key, value in want.items():
            assert (when(got[key]) if key in times else got[key]) == value, (key, got, want)


def page(api: httpx.Client, path: str, headers: dict[str, str], *, whole: bool = True) -> list[dict[str, Any]]:
    """The first 100 items (`whole`: and there are no more)."""
    r = api.get(path, params={"page_size": 100}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == len(body["data"]) or not whole
    return list(body["data"])


def test_old_passwords_log_in_as_the_same_users(api: httpx.Client, webmacs_source: Fixture) -> None:
    for user in webmacs_source.users[:3]:
        r = api.post("/api/v1/auth/login", json={"email": user.email, "password": user.password})
        assert r.status_code == 200, r.text
        assert r.json()["public_id"] == user.public_id
        assert r.json()["username"] == user.username
        me = api.get("/api/v1/auth/me", headers=bearer(r.json()["access_token"])).json()
        assert (me["public_id"], me["role"], me["admin"]) == (user.public_id, user.role, user.role == "admin")
    # No admin was seeded over the imported ones: the default password does not open anything.
    r = api.post("/api/v1/auth/login", json={"email": "admin@webmacs.io", "password": "admin123"})
    assert r.status_code == 401


def test_api_tokens_and_webmacs_jwts_keep_working(api: httpx.Client, webmacs_source: Fixture) -> None:
    assert api.get("/api/v1/events", headers=bearer(webmacs_source.api_token)).status_code == 200
    r = api.get("/api/v1/events", headers=bearer(webmacs_source.expired_api_token))
    assert (r.status_code, r.json()) == (401, {"detail": "API token has expired."})
    # Under the same SECRET_KEY a JWT WebMACS issued still names the same user (users kept their ids) …
    viewer = webmacs_source.users[2]
    issued = webmacs_jwt(viewer.id, viewer.role, SECRET, at=datetime.now(UTC))
    me = api.get("/api/v1/auth/me", headers=bearer(issued))
    assert (me.status_code, me.json()["public_id"]) == (200, viewer.public_id)
    # … and one that was logged out of in WebMACS stays revoked.
    r = api.get("/api/v1/auth/me", headers=bearer(webmacs_source.blacklisted_jwt))
    assert (r.status_code, r.json()) == (401, {"detail": "Token has been revoked."})


def test_lists_are_the_same(api: httpx.Client, admin: dict[str, str], webmacs_source: Fixture) -> None:
    src = webmacs_source
    same(
        page(api, "/api/v1/users", admin),
        [
            {**r, "admin": r["role"] == "admin"}
            for r in source_rows(
                src,
                "SELECT public_id, email, username, role, registered_on, sso_provider FROM users ORDER BY id",
            )
        ],
        times=("registered_on",),
    )
    same(
        page(api, "/api/v1/events", admin),
        source_rows(
            src,
            "SELECT public_id, name, min_value, max_value, unit, type::text AS type, user_public_id FROM events"
            " ORDER BY id",
        ),
    )
    same(
        page(api, "/api/v1/experiments", admin),
        source_rows(src, "SELECT public_id, name, started_on, stopped_on, user_public_id FROM experiments ORDER BY id"),
        times=("started_on", "stopped_on"),
    )
    same(
        page(api, "/api/v1/rules", admin),
        source_rows(
            src,
            "SELECT public_id, name, event_public_id, operator::text AS operator, threshold, threshold_high,"
            " action_type::text AS action_type, webhook_event_type, enabled, cooldown_seconds, last_triggered_at,"
            " created_on, user_public_id FROM rules ORDER BY id",
        ),
        times=("last_triggered_at", "created_on"),
    )
    hooks = source_rows(
        src, "SELECT id, public_id, url, events, enabled, created_on, user_public_id FROM webhooks ORDER BY id"
    )
    same(
        page(api, "/api/v1/webhooks", admin),
        [{**{k: v for k, v in h.items() if k != "id"}, "events": json.loads(h["events"])} for h in hooks],
        times=("created_on",),
    )
    same(
        page(api, f"/api/v1/webhooks/{hooks[0]['public_id']}/deliveries", admin),
        source_rows(
            src,
            "SELECT public_id, event_type, status::text AS status, attempts, last_error, response_code, created_on,"
            " delivered_on FROM webhook_deliveries WHERE webhook_id = %(w)s ORDER BY created_on DESC, id DESC",
            {"w": hooks[0]["id"]},
        ),
        times=("created_on", "delivered_on"),
    )
    same(
        page(api, "/api/v1/ota", admin),
        [
            {**{k: v for k, v in r.items() if k != "file_path"}, "has_firmware_file": r["file_path"] is not None}
            for r in source_rows(
                src,
                "SELECT public_id, version, changelog, file_path, file_hash_sha256, file_size_bytes,"
                " status::text AS status, error_message, created_on, started_on, completed_on, user_public_id"
                " FROM firmware_updates ORDER BY id",
            )
        ],
        times=("created_on", "started_on", "completed_on"),
    )
    # (last_used_at moves whenever a token is used, as in WebMACS: the token test above used one.)
    same(
        page(api, "/api/v1/tokens", admin),
        source_rows(
            src,
            "SELECT t.public_id, t.name, t.expires_at, t.created_at, u.public_id AS user_public_id"
            " FROM api_tokens t JOIN users u ON u.id = t.user_id ORDER BY t.created_at DESC, t.id DESC",
        ),
        times=("expires_at", "created_at"),
    )


def test_plugins_dashboards_and_logs_are_the_same(
    api: httpx.Client, admin: dict[str, str], webmacs_source: Fixture
) -> None:
    src = webmacs_source
    mappings = source_rows(
        src,
        "SELECT plugin_instance_id, public_id, channel_id, channel_name, direction::text AS direction, unit,"
        " event_public_id, created_on FROM channel_mappings ORDER BY id",
    )
    instances = source_rows(
        src,
        "SELECT id, public_id, plugin_id, instance_name, demo_mode, enabled, status::text AS status, config_json,"
        " error_message, created_on, updated_on, user_public_id FROM plugin_instances ORDER BY id",
    )
    plugins = page(api, "/api/v1/plugins", admin)
    same(plugins, [{k: v for k, v in i.items() if k != "id"} for i in instances], times=("created_on", "updated_on"))
    for plugin, instance in zip(plugins, instances, strict=True):
        own = [{k: v for k, v in m.items() if k != "plugin_instance_id"} for m in mappings]
        own = [m for m, raw in zip(own, mappings, strict=True) if raw["plugin_instance_id"] == instance["id"]]
        same(plugin["channel_mappings"], own, times=("created_on",))

    boards = source_rows(
        src,
        "SELECT d.id, d.public_id, d.name, d.is_global, d.created_on, d.user_public_id FROM dashboards d"
        " WHERE d.is_global OR d.user_public_id = %(me)s ORDER BY d.created_on DESC, d.id DESC",
        {"me": src.users[0].public_id},
    )
    listed = page(api, "/api/v1/dashboards", admin)
    same(listed, [{k: v for k, v in b.items() if k != "id"} for b in boards], times=("created_on",))
    for board in boards:
        widgets = source_rows(
            src,
            "SELECT public_id, widget_type::text AS widget_type, title, event_public_id, x, y, w, h, config_json"
            " FROM dashboard_widgets WHERE dashboard_id = %(d)s ORDER BY id",
            {"d": board["id"]},
        )
        got = api.get(f"/api/v1/dashboards/{board['public_id']}", headers=admin).json()
        same(got["widgets"], widgets)

    # Newest first; entries written since the import (start-up, the logins above) come before WebMACS's.
    logs = [
        e
        for e in page(api, "/api/v1/logging", admin, whole=False)
        if when(e["created_on"]) < src.built_at  # type: ignore[operator]
    ]
    same(
        logs,
        source_rows(
            src,
            "SELECT public_id, content, logging_type::text AS logging_type, status_type::text AS status_type,"
            " created_on, user_public_id FROM log_entries ORDER BY created_on DESC, id DESC LIMIT %(n)s",
            {"n": len(logs)},
        ),
        times=("created_on",),
    )


def expected_csv(fixture: Fixture, experiment: str) -> bytes:
    """The experiment CSV as spec §13 describes it, from the WebMACS database (rows of one time in event order,
    which the spec leaves open; datapoint ids ours)."""
    rows = source_rows(
        fixture,
        "SELECT d.timestamp, e.name, e.public_id, d.value, e.unit FROM datapoints d"
        " JOIN events e ON e.public_id = d.event_public_id WHERE d.experiment_public_id = %(x)s"
        " ORDER BY d.timestamp, e.id",
        {"x": experiment},
    )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["timestamp", "event_name", "event_public_id", "value", "unit", "datapoint_public_id"])
    for r in rows:
        t = r["timestamp"].astimezone(UTC)
        writer.writerow(
            [
                t.isoformat(),
                r["name"],
                r["public_id"],
                str(r["value"]),
                r["unit"],
                datapoint_public_id(r["public_id"], t),
            ]
        )
    return out.getvalue().encode()


def test_experiment_csv_is_byte_for_byte_the_same(
    api: httpx.Client, admin: dict[str, str], webmacs_source: Fixture
) -> None:
    sizes = []
    for experiment in webmacs_source.experiment_ids:
        r = api.get(f"/api/v1/experiments/{experiment}/export/csv", headers=admin)
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/csv; charset=utf-8"
        assert r.content == expected_csv(webmacs_source, experiment)
        sizes.append(r.content.count(b"\r\n") - 1)
    # Several experiments with data (names with commas, quotes, umlauts), an empty one and the running one.
    assert sorted(sizes)[0] == 0 and sum(1 for n in sizes if n > 10_000) >= 3


def test_series_and_latest_are_the_same(api: httpx.Client, admin: dict[str, str], webmacs_source: Fixture) -> None:
    src = webmacs_source
    r = api.post(
        "/api/v1/datapoints/series",
        json={"event_public_ids": src.event_ids, "minutes": 2880, "max_points": 500},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    series = r.json()
    # The fixture leaves an hour without datapoints around two days before it was built: the cutoff
    # (now − 2 days, computed by the server a little later) falls in it, so both sides select the same rows.
    for event in src.event_ids:
        rows = source_rows(
            src,
            "SELECT timestamp, value, event_public_id, experiment_public_id FROM datapoints"
            " WHERE event_public_id = %(e)s AND timestamp >= %(cut)s ORDER BY timestamp, id",
            {"e": event, "cut": src.built_at - timedelta(days=2)},
        )
        n, k = len(rows), 500
        # Spec §4.2: n > max_points → items at ⌊i·n/k⌋ for i < k−1, then the last.
        picked = [rows[int(i * (n / k))] for i in range(k - 1)] + [rows[-1]] if n > k else rows
        got = series[event]
        assert len(got) == len(picked) == 500
        same(got, picked, times=("timestamp",))
        assert all(g["public_id"] == datapoint_public_id(event, when(g["timestamp"])) for g in got)  # type: ignore[arg-type]

    latest = {d["event_public_id"]: d for d in api.get("/api/v1/datapoints/latest", headers=admin).json()}
    newest = source_rows(
        src,
        "SELECT DISTINCT ON (event_public_id) event_public_id, value, timestamp, experiment_public_id"
        " FROM datapoints ORDER BY event_public_id, timestamp DESC, id DESC",
    )
    assert set(latest) == {r["event_public_id"] for r in newest}
    same([latest[r["event_public_id"]] for r in newest], newest, times=("timestamp",))
    health = api.get("/health").json()
    assert when(health["last_datapoint"]) == max(r["timestamp"] for r in newest)
