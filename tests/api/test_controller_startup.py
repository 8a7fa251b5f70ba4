"""The WebMACS controller's start-up sequence (spec §18.3) over real HTTP against a freshly created database:
every call it makes answers JSON with the status the controller expects."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from pydantic import BaseModel

from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Server, make_settings, start_server


class EventType(StrEnum):  # the controller's model: an unknown type would crash it
    sensor = "sensor"
    actuator = "actuator"
    range = "range"
    cmd_button = "cmd_button"
    cmd_opened = "cmd_opened"
    cmd_closed = "cmd_closed"


class ControllerEvent(BaseModel):
    public_id: str
    name: str
    min_value: float
    max_value: float
    unit: str
    type: EventType
    user_public_id: str | None = None


@pytest.fixture(scope="module")
def fresh_server(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    name = f"controller_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as admin_conn:
        admin_conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    tmp: Path = tmp_path_factory.mktemp("controller")
    s = start_server(make_settings(make_conninfo(db_url, dbname=name), tmp))
    try:
        yield s
    finally:
        s.stop()
        with psycopg.connect(db_url, autocommit=True) as admin_conn:
            admin_conn.execute(psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))


def test_startup_sequence(fresh_server: Server) -> None:
    with httpx.Client(
        base_url=f"{fresh_server.url}/api/v1",
        follow_redirects=True,
        timeout=30,
        headers={"Content-Type": "application/json"},
    ) as http:

        def call(method: str, path: str, expected: int, body: object = None) -> Any:  # decoded JSON
            r = http.request(method, path, json=body)
            assert r.status_code == expected, (method, path, r.text)
            assert r.headers["content-type"] == "application/json"
            return r.json()

        # 1. login
        login = call("POST", "/auth/login", 200, {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        http.headers["Authorization"] = f"Bearer {login['access_token']}"

        # 2. dev auto-seed: no instances, no events → register the Simulated Device.
        plugins = call("GET", "/plugins", 200)
        assert plugins == {"page": 1, "page_size": 25, "total": 0, "data": []}
        assert call("GET", "/events", 200)["data"] == []
        assert call(
            "POST",
            "/plugins",
            201,
            {"plugin_id": "simulated", "instance_name": "Simulated Device", "demo_mode": True, "enabled": True},
        ) == {"status": "success", "message": "Plugin instance created."}
        for content in (
            "Controller started in development mode",
            "Simulated Device plugin auto-registered with 9 channels",
        ):
            assert call("POST", "/logging", 201, {"content": content, "logging_type": "info"}) == {
                "status": "success",
                "message": "Log entry successfully created.",
            }

        # 3. events, parsed as the controller does
        page = call("GET", "/events", 200)
        events = [ControllerEvent.model_validate(e) for e in page["data"]]
        assert len(events) == 9
        assert all(e.name.startswith("Simulated Device \u2013 ") for e in events)
        assert [e.type for e in events].count(EventType.sensor) == 7
        assert [e.type for e in events].count(EventType.actuator) == 2
        assert {e.name for e in events} >= {
            "Simulated Device – Temperature Reactor",
            "Simulated Device – Valve Position",
        }

        # 5. plugin bridge: enabled instances and their channel map
        instances = [i for i in call("GET", "/plugins", 200)["data"] if i.get("enabled") is not False]
        assert [(i["plugin_id"], i["instance_name"], i["demo_mode"]) for i in instances] == [
            ("simulated", "Simulated Device", True)
        ]
        channels = call("GET", f"/plugins/{instances[0]['public_id']}/channels", 200)
        assert isinstance(channels, list) and len(channels) == 9
        channel_map = {
            (instances[0]["public_id"], c["channel_id"]): c["event_public_id"]
            for c in channels
            if c["event_public_id"] is not None
        }
        assert set(channel_map.values()) == {e.public_id for e in events}

        # 6. running, 8. shutting down
        call(
            "POST",
            "/logging",
            201,
            {"content": "Controller started – plugin sensor polling active", "logging_type": "info"},
        )
        call("POST", "/logging", 201, {"content": "Controller shutting down", "logging_type": "warning"})
        logs = call("GET", "/logging/", 200)  # the frontend's trailing-slash form, redirect followed
        contents = [e["content"] for e in logs["data"]]
        assert contents[:4] == [
            "Controller shutting down",
            "Controller started – plugin sensor polling active",
            "Simulated Device plugin auto-registered with 9 channels",
            "Controller started in development mode",
        ]
