"""Dashboards and widgets (spec §4.8, §11): visibility, ownership, widget check order and messages."""

from __future__ import annotations

import httpx
import psycopg
import pytest

from tests.conftest import Server, unique

DASHBOARD_FIELDS = {"public_id", "name", "is_global", "created_on", "user_public_id", "widgets"}
WIDGET_FIELDS = {"public_id", "widget_type", "title", "event_public_id", "x", "y", "w", "h", "config_json"}


def dashboard(client: httpx.Client, headers: dict[str, str], **fields: object) -> dict:
    r = client.post("/api/v1/dashboards", headers=headers, json={"name": unique("dash"), **fields})
    assert r.status_code == 201, r.text
    return r.json()


def widget(client: httpx.Client, headers: dict[str, str], dash: dict, **fields: object) -> dict:
    r = client.post(
        f"/api/v1/dashboards/{dash['public_id']}/widgets",
        headers=headers,
        json={"widget_type": "line_chart", "title": "T", **fields},
    )
    assert r.status_code == 201, r.text
    return r.json()


def event(db: psycopg.Connection) -> str:
    return str(
        db.execute(
            "INSERT INTO events (name, min_value, max_value, unit, type)"
            " VALUES (%s, 0, 1, 'V', 'sensor') RETURNING public_id",
            (unique("w"),),
        ).fetchone()[0]  # type: ignore[index]
    )


@pytest.fixture(scope="module")
def operator2(server: Server, admin: dict[str, str]) -> dict[str, str]:
    from tests.conftest import user_with_role

    return user_with_role(server, admin, "operator")


def test_create_returns_full_dashboard(client: httpx.Client, operator: dict[str, str]) -> None:
    me = client.get("/api/v1/auth/me", headers=operator).json()
    d = dashboard(client, operator, name="Übersicht 🌡")
    assert set(d) == DASHBOARD_FIELDS
    assert (d["name"], d["is_global"], d["widgets"], d["user_public_id"]) == ("Übersicht 🌡", False, [], me["public_id"])
    assert client.get(f"/api/v1/dashboards/{d['public_id']}", headers=operator).json() == d


def test_visibility(
    client: httpx.Client,
    operator: dict[str, str],
    operator2: dict[str, str],
    admin: dict[str, str],
    viewer: dict[str, str],
) -> None:
    private = dashboard(client, operator)
    shared = dashboard(client, operator, is_global=True)
    for other in (operator2, admin, viewer):
        r = client.get(f"/api/v1/dashboards/{private['public_id']}", headers=other)
        assert r.status_code == 403 and r.json() == {"detail": "Not allowed."}
        assert client.get(f"/api/v1/dashboards/{shared['public_id']}", headers=other).status_code == 200
        listed = {
            d["public_id"]
            for d in client.get("/api/v1/dashboards", headers=other, params={"page_size": 100}).json()["data"]
        }
        assert shared["public_id"] in listed and private["public_id"] not in listed
    mine = client.get("/api/v1/dashboards", headers=operator, params={"page_size": 2}).json()
    # Newest first.
    assert [d["public_id"] for d in mine["data"]] == [shared["public_id"], private["public_id"]]


def test_list_total_counts_visible_only(
    client: httpx.Client, operator2: dict[str, str], db: psycopg.Connection
) -> None:
    dashboard(client, operator2)
    me = client.get("/api/v1/auth/me", headers=operator2).json()["public_id"]
    expected = db.execute("SELECT count(*) FROM dashboards WHERE user_public_id = %s OR is_global", (me,)).fetchone()[0]  # type: ignore[index]
    body = client.get("/api/v1/dashboards", headers=operator2, params={"page_size": 1}).json()
    assert body["total"] == expected and len(body["data"]) == 1


def test_update_and_delete_owner_or_admin(
    client: httpx.Client, operator: dict[str, str], operator2: dict[str, str], admin: dict[str, str]
) -> None:
    d = dashboard(client, operator, is_global=True)
    url = f"/api/v1/dashboards/{d['public_id']}"
    r = client.put(url, headers=operator2, json={"name": "hijack"})
    assert r.status_code == 403 and r.json() == {"detail": "Not allowed."}
    assert client.delete(url, headers=operator2).status_code == 403
    r = client.put(url, headers=operator, json={"name": "renamed", "is_global": False})
    assert r.json() == {"status": "success", "message": "Dashboard successfully updated."}
    got = client.get(url, headers=operator).json()
    assert (got["name"], got["is_global"]) == ("renamed", False)
    assert client.put(url, headers=admin, json={"name": "by admin"}).status_code == 200
    r = client.delete(url, headers=admin)
    assert r.json() == {"status": "success", "message": "Dashboard successfully deleted."}
    r = client.get(url, headers=operator)
    assert r.status_code == 404 and r.json() == {"detail": f"Dashboard '{d['public_id']}' not found."}


def test_widget_lifecycle(client: httpx.Client, operator: dict[str, str], db: psycopg.Connection) -> None:
    d = dashboard(client, operator)
    ev = event(db)
    config = '{"color": "#ff0000",  "minutes": 60, "nested": {"a": [1, 2]}}'
    w1 = widget(
        client,
        operator,
        d,
        widget_type="gauge",
        title="Gauge",
        event_public_id=ev,
        x=-3,
        y=7,
        w=12,
        h=1,
        config_json=config,
    )
    assert set(w1) == WIDGET_FIELDS
    assert w1 | {"public_id": None} == {
        "public_id": None,
        "widget_type": "gauge",
        "title": "Gauge",
        "event_public_id": ev,
        "x": -3,
        "y": 7,
        "w": 12,
        "h": 1,
        "config_json": config,
    }
    w2 = widget(client, operator, d)
    assert (w2["x"], w2["y"], w2["w"], w2["h"], w2["event_public_id"], w2["config_json"]) == (0, 0, 4, 3, None, None)
    url = f"/api/v1/dashboards/{d['public_id']}/widgets/{w1['public_id']}"
    r = client.put(url, headers=operator, json={"x": 5, "y": 6})
    assert r.json() == {"status": "success", "message": "Widget successfully updated."}
    got = client.get(f"/api/v1/dashboards/{d['public_id']}", headers=operator).json()["widgets"]
    assert [w["public_id"] for w in got] == [w1["public_id"], w2["public_id"]]
    assert got[0] == w1 | {"x": 5, "y": 6}  # other fields kept
    client.put(url, headers=operator, json={"event_public_id": None})
    got = client.get(f"/api/v1/dashboards/{d['public_id']}", headers=operator).json()["widgets"][0]
    assert got["event_public_id"] is None and got["config_json"] == config
    r = client.delete(url, headers=operator)
    assert r.json() == {"status": "success", "message": "Widget successfully deleted."}
    got = client.get(f"/api/v1/dashboards/{d['public_id']}", headers=operator).json()["widgets"]
    assert [w["public_id"] for w in got] == [w2["public_id"]]


def test_widget_check_order_and_messages(
    client: httpx.Client, operator: dict[str, str], operator2: dict, admin: dict[str, str], viewer: dict[str, str]
) -> None:
    d = dashboard(client, operator)
    other = dashboard(client, operator)
    w = widget(client, operator, d)
    w_other = widget(client, operator, other)
    base = f"/api/v1/dashboards/{d['public_id']}/widgets"
    body = {"widget_type": "gauge", "title": "x"}

    r = client.post("/api/v1/dashboards/nope/widgets", headers=operator2, json=body)
    assert r.status_code == 404 and r.json() == {"detail": "Dashboard 'nope' not found."}
    r = client.post(base, headers=operator2, json={**body, "event_public_id": "nope"})
    assert r.status_code == 403 and r.json() == {"detail": "Not allowed."}
    r = client.post(base, headers=viewer, json=body)
    assert r.status_code == 403 and r.json() == {"detail": "Operator privileges required."}
    r = client.post(base, headers=operator, json={**body, "event_public_id": "nope"})
    assert r.status_code == 404 and r.json() == {"detail": "Event not found."}
    assert client.post(base, headers=admin, json=body).status_code == 201

    for method in ("PUT", "DELETE"):
        update = {"title": "y"} if method == "PUT" else None
        r = client.request(method, f"/api/v1/dashboards/nope/widgets/{w['public_id']}", headers=operator, json=update)
        assert r.status_code == 404 and r.json() == {"detail": "Dashboard 'nope' not found."}
        r = client.request(method, f"{base}/nope", headers=operator2, json=update)
        assert r.status_code == 403 and r.json() == {"detail": "Not allowed."}
        r = client.request(method, f"{base}/nope", headers=operator, json=update)
        assert r.status_code == 404 and r.json() == {"detail": "DashboardWidget 'nope' not found."}
        r = client.request(method, f"{base}/{w_other['public_id']}", headers=operator, json=update)
        assert r.status_code == 404 and r.json() == {"detail": "Widget not on this dashboard."}
    r = client.put(f"{base}/{w['public_id']}", headers=operator, json={"event_public_id": "nope"})
    assert r.status_code == 404 and r.json() == {"detail": "Event not found."}


@pytest.mark.parametrize(
    "body",
    [
        {"widget_type": "gauge", "title": ""},
        {"widget_type": "pie", "title": "x"},
        {"widget_type": "gauge", "title": "x", "w": 0},
        {"widget_type": "gauge", "title": "x", "h": 13},
        {"widget_type": "gauge", "title": "x", "x": 2**31},
        {"widget_type": "gauge", "title": "x", "y": "abc"},
        {"widget_type": "gauge", "title": "x" * 256},
        {"title": "x"},
    ],
)
def test_widget_validation(client: httpx.Client, operator: dict[str, str], body: dict) -> None:
    d = dashboard(client, operator)
    assert client.post(f"/api/v1/dashboards/{d['public_id']}/widgets", headers=operator, json=body).status_code == 422


@pytest.mark.parametrize("body", [{"title": ""}, {"w": 13}, {"h": 0}, {"widget_type": "bar"}])
def test_widget_update_validation(client: httpx.Client, operator: dict[str, str], body: dict) -> None:
    d = dashboard(client, operator)
    w = widget(client, operator, d)
    url = f"/api/v1/dashboards/{d['public_id']}/widgets/{w['public_id']}"
    assert client.put(url, headers=operator, json=body).status_code == 422


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": "x" * 256}, {"name": "x", "is_global": "maybe"}])
def test_dashboard_validation(client: httpx.Client, operator: dict[str, str], body: dict) -> None:
    assert client.post("/api/v1/dashboards", headers=operator, json=body).status_code == 422


def test_viewer_cannot_create_and_anonymous_is_401(client: httpx.Client, viewer: dict[str, str]) -> None:
    r = client.post("/api/v1/dashboards", headers=viewer, json={"name": "x"})
    assert r.status_code == 403 and r.json() == {"detail": "Operator privileges required."}
    assert client.get("/api/v1/dashboards").status_code == 401
