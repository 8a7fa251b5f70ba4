"""Plugins (spec §4.9, §12): discovery, instances with auto-created events, channel mappings, the deletion
cascade, and wheel packages (upload validation, install, removal)."""

from __future__ import annotations

import importlib
import io
import socket
import sys
import threading
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Server, bearer, login, make_settings, start_server, unique
from tests.plugins.wheels import build_wheel

INSTANCE_FIELDS = {
    "public_id",
    "plugin_id",
    "instance_name",
    "demo_mode",
    "enabled",
    "status",
    "config_json",
    "error_message",
    "created_on",
    "updated_on",
    "user_public_id",
    "channel_mappings",
}
MAPPING_FIELDS = {"public_id", "channel_id", "channel_name", "direction", "unit", "event_public_id", "created_on"}
SIMULATED_CHANNELS = [
    ("temp_reactor", "Temperature Reactor", "input", "°C", 20.0, 500.0),
    ("temp_inlet", "Temperature Inlet", "input", "°C", 15.0, 200.0),
    ("temp_outlet", "Temperature Outlet", "input", "°C", 15.0, 300.0),
    ("pressure_chamber", "Pressure Chamber", "input", "bar", 0.0, 6.0),
    ("pressure_diff", "Pressure Differential", "input", "mbar", 0.0, 100.0),
    ("volume_flow", "Volume Flow", "input", "m³/h", 0.0, 40.0),
    ("humidity", "Humidity", "input", "%", 0.0, 100.0),
    ("heater_power", "Heater Power", "output", "%", 0.0, 100.0),
    ("valve_position", "Valve Position", "output", "%", 0.0, 100.0),
]


def create_instance(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, **fields: object) -> dict:
    body = {"plugin_id": "simulated", "instance_name": unique("inst"), **fields}
    r = client.post("/api/v1/plugins", headers=admin, json=body)
    assert r.status_code == 201, r.text
    assert r.json() == {"status": "success", "message": "Plugin instance created."}
    pid = db.execute(
        "SELECT public_id FROM plugin_instances WHERE instance_name = %s", (body["instance_name"],)
    ).fetchone()[0]  # type: ignore[index]
    got = client.get(f"/api/v1/plugins/{pid}", headers=admin)
    assert got.status_code == 200
    return got.json()


def test_available_lists_builtins(client: httpx.Client, viewer: dict[str, str]) -> None:
    r = client.get("/api/v1/plugins/available", headers=viewer)
    assert r.status_code == 200
    plugins = {p["id"]: p for p in r.json()}
    assert all(set(p) == {"id", "name", "version", "vendor", "description", "url"} for p in plugins.values())
    assert plugins["simulated"] == {
        "id": "simulated",
        "name": "Simulated Device",
        "version": "0.2.0",
        "vendor": "WebMACS",
        "description": "Virtual sensors & actuators for testing and demonstration.",
        "url": "https://github.com/stefanposs/webmacs",
    }
    assert (plugins["system"]["name"], plugins["system"]["version"], plugins["system"]["vendor"]) == (
        "System Monitor",
        "0.1.0",
        "WebMACS",
    )


def test_create_simulated_maps_nine_channels_with_events(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    name = unique("Rig ü")
    inst = create_instance(client, admin, db, instance_name=name, demo_mode=True, config_json='{"seed": 1}')
    assert set(inst) == INSTANCE_FIELDS
    me = client.get("/api/v1/auth/me", headers=admin).json()
    assert (
        inst["plugin_id"],
        inst["instance_name"],
        inst["demo_mode"],
        inst["enabled"],
        inst["status"],
        inst["config_json"],
        inst["error_message"],
        inst["user_public_id"],
    ) == ("simulated", name, True, True, "inactive", '{"seed": 1}', None, me["public_id"])
    maps = inst["channel_mappings"]
    assert all(set(m) == MAPPING_FIELDS for m in maps)
    assert [(m["channel_id"], m["channel_name"], m["direction"], m["unit"]) for m in maps] == [
        c[:4] for c in SIMULATED_CHANNELS
    ]
    for m, (_, ch_name, direction, unit, lo, hi) in zip(maps, SIMULATED_CHANNELS, strict=True):
        ev = client.get(f"/api/v1/events/{m['event_public_id']}", headers=admin).json()
        assert ev["name"] == f"{name} \u2013 {ch_name}"
        assert (ev["type"], ev["unit"], ev["min_value"], ev["max_value"], ev["user_public_id"]) == (
            "sensor" if direction == "input" else "actuator",
            unit,
            lo,
            hi,
            me["public_id"],
        )
    channels = client.get(f"/api/v1/plugins/{inst['public_id']}/channels", headers=admin).json()
    assert channels == maps


def test_existing_event_of_the_name_is_reused(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    name = unique("Reuse")
    existing = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, -1, 1, 'K',"
        " 'range') RETURNING public_id",
        (f"{name} – Humidity",),
    ).fetchone()[0]  # type: ignore[index]
    inst = create_instance(client, admin, db, instance_name=name)
    humidity = next(m for m in inst["channel_mappings"] if m["channel_id"] == "humidity")
    assert humidity["event_public_id"] == existing
    assert db.execute("SELECT unit, type FROM events WHERE public_id = %s", (existing,)).fetchone() == ("K", "range")


def test_system_plugin_channels(client: httpx.Client, admin: dict[str, str], db: psycopg.Connection) -> None:
    inst = create_instance(client, admin, db, plugin_id="system")
    assert [m["channel_id"] for m in inst["channel_mappings"]] == [
        "cpu_percent",
        "memory_percent",
        "memory_used_gb",
        "disk_percent",
        "disk_used_gb",
        "load_avg_1m",
    ]


@pytest.mark.parametrize(
    "fields", [{"auto_create_events": False}, {"plugin_id": "no-such-plugin"}, {"config_json": "{not json"}]
)
def test_instances_without_events(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, fields: dict
) -> None:
    before = db.execute("SELECT count(*) FROM events").fetchone()
    inst = create_instance(client, admin, db, **fields)
    assert db.execute("SELECT count(*) FROM events").fetchone() == before
    if fields.get("auto_create_events") is False:
        assert len(inst["channel_mappings"]) == 9
        assert all(m["event_public_id"] is None for m in inst["channel_mappings"])
    else:
        assert inst["channel_mappings"] == []


def test_long_instance_name_leaves_channels_unlinked(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection
) -> None:
    inst = create_instance(client, admin, db, instance_name=unique("L") + "x" * 240)
    assert len(inst["channel_mappings"]) == 9
    assert all(m["event_public_id"] is None for m in inst["channel_mappings"])


def test_duplicate_instance_name(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, server: Server
) -> None:
    inst = create_instance(client, admin, db)
    r = client.post(
        "/api/v1/plugins", headers=admin, json={"plugin_id": "simulated", "instance_name": inst["instance_name"]}
    )
    assert r.status_code == 409 and r.json() == {"detail": "Plugin instance already exists."}
    name = unique("race")
    codes: list[int] = []

    def post() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            codes.append(
                c.post(
                    "/api/v1/plugins", headers=admin, json={"plugin_id": "simulated", "instance_name": name}
                ).status_code
            )

    threads = [threading.Thread(target=post) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] + [409] * 4
    assert db.execute("SELECT count(*) FROM events WHERE name LIKE %s", (f"{name} – %",)).fetchone() == (9,)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"plugin_id": "", "instance_name": "x"},
        {"plugin_id": "s", "instance_name": ""},
        {"plugin_id": "s" * 101, "instance_name": "x"},
        {"plugin_id": "s", "instance_name": "x", "demo_mode": "perhaps"},
        {"plugin_id": "s", "instance_name": "x", "config_json": {"a": 1}},
    ],
)
def test_invalid_instance_bodies(client: httpx.Client, admin: dict[str, str], body: dict) -> None:
    assert client.post("/api/v1/plugins", headers=admin, json=body).status_code == 422


def test_list_get_update(
    client: httpx.Client, admin: dict[str, str], viewer: dict[str, str], db: psycopg.Connection
) -> None:
    a = create_instance(client, admin, db, auto_create_events=False)
    b = create_instance(client, admin, db, plugin_id="other")
    total = db.execute("SELECT count(*) FROM plugin_instances").fetchone()[0]  # type: ignore[index]
    body = client.get("/api/v1/plugins", headers=viewer, params={"page_size": 100}).json()
    assert body["total"] == total
    ids = [i["public_id"] for i in body["data"]]
    assert ids.index(a["public_id"]) < ids.index(b["public_id"])

    url = f"/api/v1/plugins/{a['public_id']}"
    new_name = unique("renamed")
    r = client.put(url, headers=admin, json={"instance_name": new_name, "enabled": False, "config_json": "{}"})
    assert r.json() == {"status": "success", "message": "Plugin instance successfully updated."}
    got = client.get(url, headers=viewer).json()
    assert (got["instance_name"], got["enabled"], got["config_json"], got["demo_mode"]) == (
        new_name,
        False,
        "{}",
        False,
    )
    assert got["updated_on"] > a["updated_on"]
    client.put(url, headers=admin, json={"config_json": None, "enabled": None})
    got = client.get(url, headers=viewer).json()
    assert (got["config_json"], got["enabled"]) == (None, False)
    r = client.put(url, headers=admin, json={"instance_name": b["instance_name"]})
    assert r.status_code == 409 and r.json() == {"detail": "Plugin instance already exists."}
    assert client.put(url, headers=admin, json={"instance_name": ""}).status_code == 422


def test_not_found_messages(client: httpx.Client, admin: dict[str, str]) -> None:
    r = client.get("/api/v1/plugins/nope", headers=admin)
    assert r.status_code == 404 and r.json() == {"detail": "Plugin instance not found."}
    for method, path, body in [
        ("PUT", "", {"enabled": True}),
        ("DELETE", "", None),
        ("GET", "/channels", None),
        ("POST", "/channels", {"channel_id": "c", "channel_name": "C", "direction": "input", "unit": "V"}),
        ("PUT", "/channels/m", {"event_public_id": None}),
        ("DELETE", "/channels/m", None),
    ]:
        r = client.request(method, f"/api/v1/plugins/nope{path}", headers=admin, json=body)
        assert r.status_code == 404 and r.json() == {"detail": "Plugin instance 'nope' not found."}, (method, path)


def test_channel_mappings_crud(
    client: httpx.Client, admin: dict[str, str], viewer: dict[str, str], db: psycopg.Connection
) -> None:
    inst = create_instance(client, admin, db, plugin_id="custom")
    other = create_instance(client, admin, db, plugin_id="custom")
    base = f"/api/v1/plugins/{inst['public_id']}/channels"
    ev = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'V', 'sensor')"
        " RETURNING public_id",
        (unique("map"),),
    ).fetchone()[0]  # type: ignore[index]
    body = {
        "channel_id": "ch1",
        "channel_name": "Channel 1",
        "direction": "bidirectional",
        "unit": "V",
        "event_public_id": ev,
    }
    r = client.post(base, headers=admin, json=body)
    assert r.status_code == 201 and r.json() == {"status": "success", "message": "Channel mapping created."}
    r = client.post(base, headers=admin, json=body)
    assert r.status_code == 409 and r.json() == {"detail": "Channel mapping already exists."}
    # The same channel id on another instance is fine.
    assert client.post(f"/api/v1/plugins/{other['public_id']}/channels", headers=admin, json=body).status_code == 201
    r = client.post(base, headers=admin, json={**body, "channel_id": "ch2", "event_public_id": "nope"})
    assert r.status_code == 404 and r.json() == {"detail": "Event not found."}
    assert (
        client.post(base, headers=admin, json={**body, "channel_id": "ch3", "event_public_id": None}).status_code == 201
    )
    listed = client.get(base, headers=viewer).json()
    assert [(m["channel_id"], m["event_public_id"]) for m in listed] == [("ch1", ev), ("ch3", None)]

    mid = listed[0]["public_id"]
    r = client.put(f"{base}/{mid}", headers=admin, json={"event_public_id": None})
    assert r.json() == {"status": "success", "message": "Channel mapping successfully updated."}
    assert client.get(base, headers=viewer).json()[0]["event_public_id"] is None
    client.put(f"{base}/{mid}", headers=admin, json={"event_public_id": ev})
    assert client.get(base, headers=viewer).json()[0]["event_public_id"] == ev
    r = client.put(f"{base}/{mid}", headers=admin, json={"event_public_id": "nope"})
    assert r.status_code == 404 and r.json() == {"detail": "Event not found."}
    # A mapping of another instance is not reachable through this one.
    other_mid = client.get(f"/api/v1/plugins/{other['public_id']}/channels", headers=viewer).json()[0]["public_id"]
    for method in ("PUT", "DELETE"):
        r = client.request(method, f"{base}/{other_mid}", headers=admin, json={"event_public_id": None})
        assert r.status_code == 404 and r.json() == {"detail": f"Channel mapping '{other_mid}' not found."}
    r = client.delete(f"{base}/{mid}", headers=admin)
    assert r.json() == {"status": "success", "message": "Channel mapping successfully deleted."}
    assert [m["channel_id"] for m in client.get(base, headers=viewer).json()] == ["ch3"]


@pytest.mark.parametrize(
    "body",
    [
        {"channel_id": "", "channel_name": "C", "direction": "input", "unit": "V"},
        {"channel_id": "c", "channel_name": "C", "direction": "sideways", "unit": "V"},
        {"channel_id": "c", "channel_name": "C", "direction": "input", "unit": "V" * 51},
        {"channel_id": "c" * 101, "channel_name": "C", "direction": "input", "unit": "V"},
    ],
)
def test_invalid_mapping_bodies(
    client: httpx.Client, admin: dict[str, str], db: psycopg.Connection, body: dict
) -> None:
    inst = create_instance(client, admin, db, plugin_id="custom")
    assert client.post(f"/api/v1/plugins/{inst['public_id']}/channels", headers=admin, json=body).status_code == 422


def test_delete_cascade(
    client: httpx.Client, admin: dict[str, str], operator: dict[str, str], db: psycopg.Connection
) -> None:
    inst = create_instance(client, admin, db)
    keep = create_instance(client, admin, db, plugin_id="custom")
    events = [m["event_public_id"] for m in inst["channel_mappings"]]
    ids = [r[0] for r in db.execute("SELECT id FROM events WHERE public_id = ANY(%s)", (events,))]
    db.execute("INSERT INTO datapoints (time, event_id, value) SELECT now(), unnest(%s::int[]), 1", (ids,))
    db.execute(
        "INSERT INTO rules (name, event_public_id, operator, threshold, action_type) VALUES (%s, %s, 'gt', 1, 'log')",
        (unique("r"), events[0]),
    )
    dash = client.post("/api/v1/dashboards", headers=operator, json={"name": "d"}).json()
    client.post(
        f"/api/v1/dashboards/{dash['public_id']}/widgets",
        headers=operator,
        json={"widget_type": "gauge", "title": "g", "event_public_id": events[0]},
    )
    client.post(
        f"/api/v1/plugins/{keep['public_id']}/channels",
        headers=admin,
        json={
            "channel_id": "shared",
            "channel_name": "S",
            "direction": "input",
            "unit": "V",
            "event_public_id": events[1],
        },
    )
    unrelated = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'V', 'sensor') RETURNING id",
        (unique("unrelated"),),
    ).fetchone()[0]  # type: ignore[index]
    db.execute("INSERT INTO datapoints (time, event_id, value) VALUES (now(), %s, 1)", (unrelated,))

    r = client.delete(f"/api/v1/plugins/{inst['public_id']}", headers=admin)
    assert r.json() == {"status": "success", "message": "Plugin instance successfully deleted."}
    assert client.get(f"/api/v1/plugins/{inst['public_id']}", headers=admin).status_code == 404
    assert db.execute("SELECT count(*) FROM events WHERE public_id = ANY(%s)", (events,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM datapoints WHERE event_id = ANY(%s)", (ids,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM rules WHERE event_public_id = ANY(%s)", (events,)).fetchone() == (0,)
    assert db.execute(
        "SELECT count(*) FROM channel_mappings m JOIN plugin_instances p ON p.id ="
        " m.plugin_instance_id WHERE p.public_id = %s",
        (inst["public_id"],),
    ).fetchone() == (0,)
    widgets = client.get(f"/api/v1/dashboards/{dash['public_id']}", headers=operator).json()["widgets"]
    assert widgets[0]["event_public_id"] is None
    shared = client.get(f"/api/v1/plugins/{keep['public_id']}/channels", headers=admin).json()
    assert [(m["channel_id"], m["event_public_id"]) for m in shared] == [("shared", None)]
    assert db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (unrelated,)).fetchone() == (1,)


def test_instance_writes_are_admin_only(client: httpx.Client, operator: dict[str, str], viewer: dict) -> None:
    for headers in (operator, viewer):
        r = client.post("/api/v1/plugins", headers=headers, json={"plugin_id": "simulated", "instance_name": "x"})
        assert r.status_code == 403 and r.json() == {"detail": "Admin privileges required."}


# --- packages ---


def test_packages_list_and_delete_guards(
    client: httpx.Client, admin: dict[str, str], viewer: dict[str, str], db: psycopg.Connection
) -> None:
    bundled = db.execute(
        "INSERT INTO plugin_packages (package_name, version, source, plugin_ids, file_size_bytes)"
        " VALUES (%s, '0.2.0', 'bundled', '[\"simulated\"]', 1234) RETURNING public_id",
        (unique("bundled"),),
    ).fetchone()[0]  # type: ignore[index]
    evil = db.execute(
        "INSERT INTO plugin_packages (package_name, version, source) VALUES (%s, '1', 'uploaded') RETURNING public_id",
        (f"{unique('x')}; rm -rf /",),
    ).fetchone()[0]  # type: ignore[index]
    try:
        listed = {p["public_id"]: p for p in client.get("/api/v1/plugins/packages", headers=viewer).json()}
        b = listed[bundled]
        assert set(b) == {
            "public_id",
            "package_name",
            "version",
            "source",
            "plugin_ids",
            "file_size_bytes",
            "installed_on",
            "removable",
        }
        assert (b["source"], b["plugin_ids"], b["file_size_bytes"], b["removable"]) == (
            "bundled",
            ["simulated"],
            1234,
            False,
        )
        assert listed[evil]["removable"] is True
        r = client.delete(f"/api/v1/plugins/packages/{bundled}", headers=admin)
        assert r.status_code == 400 and r.json() == {"detail": "Bundled plugins cannot be removed."}
        r = client.delete(f"/api/v1/plugins/packages/{evil}", headers=admin)
        assert r.status_code == 400 and r.json() == {"detail": "Invalid package name."}
        r = client.delete("/api/v1/plugins/packages/nope", headers=admin)
        assert r.status_code == 404 and r.json() == {"detail": "Plugin package 'nope' not found."}
        assert client.delete(f"/api/v1/plugins/packages/{bundled}", headers=viewer).status_code == 403
    finally:
        db.execute("DELETE FROM plugin_packages WHERE public_id IN (%s, %s)", (bundled, evil))


INSTALLER = '''\
"""Test installer: pip into a target directory; wheels whose name contains "fail" are refused."""
import subprocess
import sys

wheel = sys.argv[-1]
if "fail" in wheel.rsplit("/", 1)[-1]:
    sys.stderr.write("boom: refusing " + wheel.rsplit("/", 1)[-1])
    sys.exit(3)
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet",
                          "--disable-pip-version-check", "--target", sys.argv[1], wheel]))
'''


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the test installer puts packages; on sys.path so this process (and its server) discovers them."""
    site = tmp_path_factory.mktemp("site")
    sys.path.append(str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def upload_server(db_url: str, tmp_path_factory: pytest.TempPathFactory, site_dir: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("upload-server")
    installer = tmp / "installer.py"
    installer.write_text(INSTALLER)
    s = start_server(make_settings(db_url, tmp, webmacs_plugin_install_cmd=f"{sys.executable} {installer} {site_dir}"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def up(upload_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upload_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def up_admin(upload_server: Server) -> dict[str, str]:
    with httpx.Client(base_url=upload_server.url) as c:
        return bearer(login(c, "admin@webmacs.io", "admin123"))


def upload(up: httpx.Client, headers: dict[str, str], name: str, data: bytes) -> httpx.Response:
    return up.post(
        "/api/v1/plugins/packages/upload", headers=headers, files={"file": (name, data, "application/octet-stream")}
    )


def dist_name() -> str:
    return f"webmacs_plugin_t{uuid.uuid4().hex[:8]}"


def test_upload_install_discover_and_remove(
    up: httpx.Client, up_admin: dict[str, str], tmp_path: Path, upload_server: Server, db: psycopg.Connection
) -> None:
    dist = dist_name()
    plugin_id = dist.removeprefix("webmacs_plugin_")
    wheel = build_wheel(tmp_path, dist, "1.2.3", plugin_id=plugin_id)
    data = wheel.read_bytes()
    r = upload(up, up_admin, wheel.name, data)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "status": "success",
        "message": f"Plugin package '{dist}' v1.2.3 installed "
        f"({len(data):,} bytes). Restart the controller to activate.",
    }
    stored = upload_server.settings.webmacs_plugin_dir / wheel.name
    assert stored.read_bytes() == data
    row = db.execute("SELECT file_hash_sha256, source FROM plugin_packages WHERE package_name = %s", (dist,)).fetchone()
    import hashlib

    assert row == (hashlib.sha256(data).hexdigest(), "uploaded")
    pkg = next(p for p in up.get("/api/v1/plugins/packages", headers=up_admin).json() if p["package_name"] == dist)
    assert (pkg["version"], pkg["plugin_ids"], pkg["file_size_bytes"], pkg["removable"]) == (
        "1.2.3",
        [plugin_id],
        len(data),
        True,
    )

    # Discovered through its entry point; an instance of it maps the declared channels.
    available = {p["id"]: p for p in up.get("/api/v1/plugins/available", headers=up_admin).json()}
    assert available[plugin_id]["vendor"] == "Tests"
    r = up.post("/api/v1/plugins", headers=up_admin, json={"plugin_id": plugin_id, "instance_name": unique("Tank")})
    assert r.status_code == 201
    inst = up.get("/api/v1/plugins", headers=up_admin, params={"page_size": 100}).json()["data"]
    mine = next(i for i in inst if i["plugin_id"] == plugin_id)
    assert [(m["channel_id"], m["direction"], m["unit"]) for m in mine["channel_mappings"]] == [
        ("level", "input", "mm"),
        ("pump", "bidirectional", "%"),
    ]
    pump = up.get(f"/api/v1/events/{mine['channel_mappings'][1]['event_public_id']}", headers=up_admin).json()
    assert pump["type"] == "range"

    # Same file name again; same package under another file name.
    r = upload(up, up_admin, wheel.name, data)
    assert r.status_code == 409 and r.json() == {"detail": f"Package '{wheel.name}' already exists."}
    r = upload(up, up_admin, f"renamed-{wheel.name}", data)
    assert r.status_code == 409
    assert r.json() == {
        "detail": f"Plugin package '{dist}' is already installed. Remove it first to upload a new version."
    }
    assert not (upload_server.settings.webmacs_plugin_dir / f"renamed-{wheel.name}").exists()

    r = up.delete(f"/api/v1/plugins/packages/{pkg['public_id']}", headers=up_admin)
    assert r.json() == {
        "status": "success",
        "message": f"Plugin package '{dist}' uninstalled. Restart the controller to apply.",
    }
    assert not stored.exists()
    assert all(p["package_name"] != dist for p in up.get("/api/v1/plugins/packages", headers=up_admin).json())


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_upload_validation(up: httpx.Client, up_admin: dict[str, str], tmp_path: Path, upload_server: Server) -> None:
    plugin_dir = upload_server.settings.webmacs_plugin_dir
    before = sorted(plugin_dir.iterdir())

    r = upload(up, up_admin, "plugin.tar.gz", b"x")
    assert r.status_code == 400 and r.json() == {"detail": "File must be a .whl (Python wheel) package."}
    r = upload(up, up_admin, "bad name;.whl", b"x")
    assert r.status_code == 400 and r.json() == {"detail": "Invalid wheel file name."}
    r = upload(up, up_admin, f"{dist_name()}.whl", b"this is not a zip")
    assert r.status_code == 422 and r.json()["detail"].startswith("Not a valid ZIP/wheel archive: ")
    r = upload(up, up_admin, f"{dist_name()}.whl", _zip({"pkg/__init__.py": b""}))
    assert r.status_code == 422 and r.json() == {"detail": "No .dist-info/METADATA found in wheel."}
    dist = dist_name()
    no_ep = build_wheel(tmp_path, dist, entry_points="")
    r = upload(up, up_admin, no_ep.name, no_ep.read_bytes())
    assert r.status_code == 422 and r.json() == {
        "detail": f"Wheel '{dist}' does not declare a [webmacs.plugins] entry point. It is not a valid WebMACS "
        "plugin package."
    }
    other_group = build_wheel(tmp_path, dist_name(), entry_points="[console_scripts]\nx = y:z\n")
    assert upload(up, up_admin, other_group.name, other_group.read_bytes()).status_code == 422
    for evil in ("../../etc/evil.py", "/abs/evil.py", "pkg/../../evil.py", "C:/evil.py"):
        bad = build_wheel(tmp_path, dist_name(), extra={evil: b"x"})
        r = upload(up, up_admin, bad.name, bad.read_bytes())
        assert r.status_code == 422 and r.json() == {"detail": f"Wheel contains an unsafe path: '{evil}'."}
    bomb = build_wheel(tmp_path, dist_name(), extra={"pkg/zeros.bin": b"\0" * (201 * 1024 * 1024)})
    assert bomb.stat().st_size < 2 * 1024 * 1024  # it is small compressed …
    r = upload(up, up_admin, bomb.name, bomb.read_bytes())
    assert r.status_code == 422 and "maximum unpacked size" in r.json()["detail"]  # … and refused unpacked
    r = up.post("/api/v1/plugins/packages/upload", headers=up_admin, files={"other": ("a.whl", b"x")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    # A client-side directory in the file name is dropped; the name is then validated.
    r = upload(up, up_admin, "../../tmp/x.tar", b"x")
    assert r.status_code == 400
    # Nothing was left behind by any refused upload.
    assert sorted(plugin_dir.iterdir()) == before


def test_install_failure_is_reported_and_cleaned_up(
    up: httpx.Client, up_admin: dict[str, str], tmp_path: Path, upload_server: Server, db: psycopg.Connection
) -> None:
    dist = dist_name()
    wheel = build_wheel(tmp_path, dist, file_name=f"{dist}-fail-1.0.0-py3-none-any.whl")
    r = upload(up, up_admin, wheel.name, wheel.read_bytes())
    assert r.status_code == 500
    assert r.json() == {"detail": f"Plugin install failed: boom: refusing {wheel.name}"}
    assert not (upload_server.settings.webmacs_plugin_dir / wheel.name).exists()
    assert db.execute("SELECT count(*) FROM plugin_packages WHERE package_name = %s", (dist,)).fetchone() == (0,)


def test_oversize_uploads_are_413(up: httpx.Client, up_admin: dict[str, str], upload_server: Server) -> None:
    big = b"\0" * (50 * 1024 * 1024 + 1)
    name = f"{dist_name()}.whl"
    r = upload(up, up_admin, name, big)  # within the declared-length slack: refused while streaming
    assert r.status_code == 413 and r.json() == {"detail": "Wheel exceeds maximum size (50 MB)."}
    assert not (upload_server.settings.webmacs_plugin_dir / name).exists()

    boundary = "webmacs-test-boundary"

    def chunked() -> Iterator[bytes]:  # no Content-Length: only the streaming cap can stop it
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(51):
            yield b"\0" * (1024 * 1024)
        yield f"\r\n--{boundary}--\r\n".encode()

    r = up.post(
        "/api/v1/plugins/packages/upload",
        content=chunked(),
        headers={**up_admin, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413
    # Refused from the declared length alone, before any of the body is read (raw socket: no client sends less
    # than it declares).
    host, port = upload_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /api/v1/plugins/packages/upload HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: {up_admin['Authorization']}\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\n"
                f"Content-Length: {60 * 1024 * 1024}\r\n\r\n"
            ).encode()
            + b"x" * 16
        )
        status_line = sock.makefile("rb").readline()
    assert status_line.split()[1] == b"413"


def test_upload_is_admin_only(client: httpx.Client, operator: dict[str, str], viewer: dict[str, str]) -> None:
    for headers in (operator, viewer):
        r = client.post("/api/v1/plugins/packages/upload", headers=headers, files={"file": ("a.whl", b"x")})
        assert r.status_code == 403 and r.json() == {"detail": "Admin privileges required."}
    assert client.post("/api/v1/plugins/packages/upload", files={"file": ("a.whl", b"x")}).status_code == 401
