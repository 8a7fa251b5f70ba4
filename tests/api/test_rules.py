"""Rules API (spec §4.6): operator+ CRUD, validation, hysteresis fields, catalog refresh on change."""

from __future__ import annotations

import json
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import unique


@pytest.fixture
def event_id(client: httpx.Client, db: psycopg.Connection) -> str:
    row = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 100, 'C', 'sensor')"
        " RETURNING public_id",
        (unique("ev"),),
    ).fetchone()
    assert row is not None
    return str(row[0])


def rule_body(event_id: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": unique("rule"),
        "event_public_id": event_id,
        "operator": "gt",
        "threshold": 50.0,
        "action_type": "log",
    }
    body.update(over)
    return body


@pytest.fixture
def create(client: httpx.Client, db: psycopg.Connection) -> Any:
    """Factory: create a rule through the API and return its public_id."""

    def make(headers: dict[str, str], body: dict[str, Any]) -> str:
        r = client.post("/api/v1/rules", headers=headers, json=body)
        assert r.status_code == 201, r.text
        assert r.json() == {"status": "success", "message": "Rule successfully created."}
        row = db.execute("SELECT public_id FROM rules WHERE name = %s", (body["name"],)).fetchone()
        assert row is not None
        return str(row[0])

    return make


def test_create_and_get_round_trip(client: httpx.Client, operator: dict[str, str], event_id: str, create: Any) -> None:
    body = rule_body(
        event_id,
        operator="between",
        threshold=10,
        threshold_high=20.5,
        action_type="webhook",
        webhook_event_type="sensor.reading",
        cooldown_seconds=0,
    )
    pid = create(operator, body)
    r = client.get(f"/api/v1/rules/{pid}", headers=operator)
    assert r.status_code == 200
    got = r.json()
    assert got["name"] == body["name"] and got["event_public_id"] == event_id
    assert got["operator"] == "between" and got["threshold"] == 10.0 and got["threshold_high"] == 20.5
    assert got["action_type"] == "webhook" and got["webhook_event_type"] == "sensor.reading"
    assert got["enabled"] is True and got["cooldown_seconds"] == 0 and got["last_triggered_at"] is None
    assert got["clear_threshold"] is None and got["rearm_on_clear"] is False
    assert got["user_public_id"] and got["created_on"].endswith("Z")


def test_defaults(client: httpx.Client, operator: dict[str, str], event_id: str, create: Any) -> None:
    pid = create(operator, rule_body(event_id))
    got = client.get(f"/api/v1/rules/{pid}", headers=operator).json()
    assert got["cooldown_seconds"] == 60 and got["enabled"] is True and got["webhook_event_type"] is None
    assert got["threshold_high"] is None


@pytest.mark.parametrize("op", ["gt", "lt", "eq", "gte", "lte"])
def test_simple_operators_accepted(client: httpx.Client, operator: dict[str, str], event_id: str, op: str) -> None:
    r = client.post("/api/v1/rules", headers=operator, json=rule_body(event_id, operator=op))
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("op", ["between", "not_between"])
def test_range_operator_without_high_is_422_value_error(
    client: httpx.Client, operator: dict[str, str], event_id: str, op: str
) -> None:
    r = client.post("/api/v1/rules", headers=operator, json=rule_body(event_id, operator=op))
    assert r.status_code == 422
    err = r.json()["detail"][0]
    assert err["type"] == "value_error" and err["loc"] == ["body"]
    assert err["msg"] == "Value error, threshold_high is required for between/not_between operators"


def test_high_below_low_is_422(client: httpx.Client, operator: dict[str, str], event_id: str) -> None:
    r = client.post(
        "/api/v1/rules", headers=operator, json=rule_body(event_id, operator="between", threshold=10, threshold_high=5)
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "Value error, threshold_high must be >= threshold"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("operator", "gtx"),
        ("action_type", "email"),
        ("webhook_event_type", "sensor.nope"),
        ("cooldown_seconds", -1),
        ("name", ""),
        ("threshold", "abc"),
    ],
)
def test_invalid_fields_are_422(
    client: httpx.Client, operator: dict[str, str], event_id: str, field: str, value: Any
) -> None:
    r = client.post("/api/v1/rules", headers=operator, json=rule_body(event_id, **{field: value}))
    assert r.status_code == 422
    assert isinstance(r.json()["detail"], list)


def test_unknown_event_is_404_before_duplicate_name(
    client: httpx.Client, operator: dict[str, str], event_id: str, create: Any
) -> None:
    body = rule_body(event_id)
    create(operator, body)
    r = client.post("/api/v1/rules", headers=operator, json={**body, "event_public_id": "no-such-event"})
    assert r.status_code == 404 and r.json() == {"detail": "Event not found."}
    r = client.post("/api/v1/rules", headers=operator, json=body)
    assert r.status_code == 409 and r.json() == {"detail": "Rule already exists."}


def test_list_is_paginated_in_creation_order(
    client: httpx.Client, operator: dict[str, str], event_id: str, create: Any
) -> None:
    first = create(operator, rule_body(event_id))
    second = create(operator, rule_body(event_id))
    total = client.get("/api/v1/rules", headers=operator).json()["total"]
    last_two = client.get("/api/v1/rules", headers=operator, params={"page": total - 1, "page_size": 1}).json()
    assert last_two["page"] == total - 1 and last_two["page_size"] == 1 and last_two["total"] == total
    assert [d["public_id"] for d in last_two["data"]] == [first]
    assert (
        client.get("/api/v1/rules", headers=operator, params={"page": total, "page_size": 1}).json()["data"][0][
            "public_id"
        ]
        == second
    )
    assert client.get("/api/v1/rules", headers=operator, params={"page_size": 0}).status_code == 422


def test_update_fields(
    client: httpx.Client, operator: dict[str, str], event_id: str, db: psycopg.Connection, create: Any
) -> None:
    pid = create(operator, rule_body(event_id))
    r = client.put(
        f"/api/v1/rules/{pid}",
        headers=operator,
        json={"threshold": 70, "enabled": False, "operator": "lte", "cooldown_seconds": 5},
    )
    assert r.status_code == 200 and r.json() == {"status": "success", "message": "Rule successfully updated."}
    got = client.get(f"/api/v1/rules/{pid}", headers=operator).json()
    assert (got["threshold"], got["enabled"], got["operator"], got["cooldown_seconds"]) == (70.0, False, "lte", 5)
    # An explicit null for a NOT NULL column leaves it as it is.
    assert client.put(f"/api/v1/rules/{pid}", headers=operator, json={"name": None}).status_code == 200
    assert client.get(f"/api/v1/rules/{pid}", headers=operator).json()["name"] == got["name"]


def test_update_merged_validation_uses_string_details(
    client: httpx.Client, operator: dict[str, str], event_id: str, create: Any
) -> None:
    pid = create(operator, rule_body(event_id, threshold=10))
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"operator": "between"})
    assert r.status_code == 422
    assert r.json() == {"detail": "threshold_high required for between/not_between operators"}
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"threshold_high": 5})
    assert r.status_code == 422 and r.json() == {"detail": "threshold_high must be >= threshold"}
    # Schema-level check of the body alone: a list-shaped 422.
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"operator": "between", "threshold": 1})
    assert r.status_code == 422 and isinstance(r.json()["detail"], list)
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"operator": "not_between", "threshold_high": 30})
    assert r.status_code == 200
    assert client.get(f"/api/v1/rules/{pid}", headers=operator).json()["operator"] == "not_between"


def test_update_to_unknown_event_and_taken_name(
    client: httpx.Client, operator: dict[str, str], event_id: str, create: Any
) -> None:
    a = rule_body(event_id)
    create(operator, a)
    pid = create(operator, rule_body(event_id))
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"event_public_id": "missing-event"})
    assert r.status_code == 404 and r.json() == {"detail": "Event not found."}
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"name": a["name"]})
    assert r.status_code == 409 and r.json() == {"detail": "Rule already exists."}


def test_unknown_rule_is_404_everywhere(client: httpx.Client, operator: dict[str, str]) -> None:
    detail = {"detail": "Rule 'nope' not found."}
    assert client.get("/api/v1/rules/nope", headers=operator).json() == detail
    r = client.put("/api/v1/rules/nope", headers=operator, json={"enabled": False})
    assert r.status_code == 404 and r.json() == detail
    r = client.delete("/api/v1/rules/nope", headers=operator)
    assert r.status_code == 404 and r.json() == detail


def test_delete_then_404(client: httpx.Client, operator: dict[str, str], event_id: str, create: Any) -> None:
    pid = create(operator, rule_body(event_id))
    r = client.delete(f"/api/v1/rules/{pid}", headers=operator)
    assert r.status_code == 200 and r.json() == {"status": "success", "message": "Rule successfully deleted."}
    assert client.get(f"/api/v1/rules/{pid}", headers=operator).status_code == 404


def test_event_delete_cascades_to_rules(
    client: httpx.Client, operator: dict[str, str], event_id: str, db: psycopg.Connection, create: Any
) -> None:
    pid = create(operator, rule_body(event_id))
    db.execute("DELETE FROM events WHERE public_id = %s", (event_id,))
    assert client.get(f"/api/v1/rules/{pid}", headers=operator).status_code == 404


# --- hysteresis (beyond the reference) ---


@pytest.mark.parametrize(
    ("op", "threshold", "clear"),
    [
        ("gt", 50, 45),
        ("gte", 50, 50),
        ("lt", 10, 12),
        ("lte", 10, 10),
    ],
)
def test_hysteresis_accepted_on_the_non_firing_side(
    client: httpx.Client, operator: dict[str, str], event_id: str, op: str, threshold: float, clear: float, create: Any
) -> None:
    pid = create(
        operator, rule_body(event_id, operator=op, threshold=threshold, clear_threshold=clear, rearm_on_clear=True)
    )
    got = client.get(f"/api/v1/rules/{pid}", headers=operator).json()
    assert got["clear_threshold"] == float(clear) and got["rearm_on_clear"] is True


@pytest.mark.parametrize(
    ("op", "threshold", "clear", "msg"),
    [
        ("gt", 50, 55, "clear_threshold must be <= threshold for gt/gte operators"),
        ("gte", 50, 50.1, "clear_threshold must be <= threshold for gt/gte operators"),
        ("lt", 10, 9, "clear_threshold must be >= threshold for lt/lte operators"),
        ("lte", 10, -1, "clear_threshold must be >= threshold for lt/lte operators"),
        ("eq", 10, 10, "clear_threshold must be null for eq/between/not_between operators"),
        ("between", 10, 10, "clear_threshold must be null for eq/between/not_between operators"),
        ("not_between", 10, 12, "clear_threshold must be null for eq/between/not_between operators"),
    ],
)
def test_hysteresis_rejected(
    client: httpx.Client, operator: dict[str, str], event_id: str, op: str, threshold: float, clear: float, msg: str
) -> None:
    body = rule_body(event_id, operator=op, threshold=threshold, clear_threshold=clear, threshold_high=threshold + 5)
    r = client.post("/api/v1/rules", headers=operator, json=body)
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == f"Value error, {msg}"


def test_rearm_on_clear_without_level_is_allowed_for_any_operator(
    client: httpx.Client, operator: dict[str, str], event_id: str
) -> None:
    r = client.post(
        "/api/v1/rules",
        headers=operator,
        json=rule_body(event_id, operator="between", threshold=1, threshold_high=2, rearm_on_clear=True),
    )
    assert r.status_code == 201


def test_hysteresis_checked_after_merge_on_update(
    client: httpx.Client, operator: dict[str, str], event_id: str, create: Any
) -> None:
    pid = create(operator, rule_body(event_id, operator="gt", threshold=50, clear_threshold=40))
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"operator": "lt"})
    assert r.status_code == 422
    assert r.json() == {"detail": "clear_threshold must be >= threshold for lt/lte operators"}
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"threshold": 30})
    assert r.status_code == 422
    assert r.json() == {"detail": "clear_threshold must be <= threshold for gt/gte operators"}
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"operator": "eq"})
    assert r.status_code == 422
    r = client.put(f"/api/v1/rules/{pid}", headers=operator, json={"operator": "eq", "clear_threshold": None})
    assert r.status_code == 200, r.text
    got = client.get(f"/api/v1/rules/{pid}", headers=operator).json()
    assert got["operator"] == "eq" and got["clear_threshold"] is None


def test_rule_changes_notify_other_processes(
    client: httpx.Client, operator: dict[str, str], event_id: str, db_url: str, create: Any
) -> None:
    """Every server process refreshes its catalog on `webmacs_catalog`, including hysteresis-only changes."""
    pid = create(operator, rule_body(event_id, clear_threshold=10))
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN webmacs_catalog")
        assert (
            client.put(
                f"/api/v1/rules/{pid}", headers=operator, json={"clear_threshold": 20, "rearm_on_clear": True}
            ).status_code
            == 200
        )
        got = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
    assert got == ["rules"]


# --- access ---


def test_access_matrix(
    client: httpx.Client,
    admin: dict[str, str],
    operator: dict[str, str],
    viewer: dict[str, str],
    event_id: str,
    create: Any,
) -> None:
    pid = create(admin, rule_body(event_id))
    calls = [
        ("GET", "/api/v1/rules", None),
        ("GET", f"/api/v1/rules/{pid}", None),
        ("PUT", f"/api/v1/rules/{pid}", {"enabled": True}),
        ("POST", "/api/v1/rules", rule_body(event_id)),
    ]
    for method, url, body in calls:
        assert client.request(method, url, json=body).status_code == 401
        r = client.request(method, url, headers=viewer, json=body)
        assert r.status_code == 403 and r.json() == {"detail": "Operator privileges required."}
    for who in (operator, admin):
        for method, url, body in calls:
            if method == "POST":
                body = rule_body(event_id)
            r = client.request(method, url, headers=who, json=body)
            assert r.status_code in (200, 201), (method, url, r.text)
    assert client.delete(f"/api/v1/rules/{pid}").status_code == 401
    assert client.delete(f"/api/v1/rules/{pid}", headers=viewer).status_code == 403
    assert client.delete(f"/api/v1/rules/{pid}", headers=operator).status_code == 200


def test_nul_and_out_of_range_input_is_422_or_404_never_500(
    client: httpx.Client, operator: dict[str, str], event_id: str
) -> None:
    for over in ({"name": "a\x00b"}, {"event_public_id": "e\x00"}, {"cooldown_seconds": 2**31}):
        r = client.post("/api/v1/rules", headers=operator, json=rule_body(event_id, **over))
        assert r.status_code == 422, over
    for level in ("NaN", "Infinity", "-Infinity"):  # Python's json extensions, accepted by lax parsers
        body = json.dumps(rule_body(event_id)).replace('"threshold": 50.0', f'"threshold": {level}')
        r = client.post("/api/v1/rules", headers={**operator, "Content-Type": "application/json"}, content=body)
        assert r.status_code == 422, level
    for method in ("GET", "PUT", "DELETE"):
        r = client.request(method, "/api/v1/rules/x%00y", headers=operator, json={} if method == "PUT" else None)
        assert r.status_code == 404, method
