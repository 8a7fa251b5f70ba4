"""The audit log (spec §4.4, §14): create, list newest first, get, mark read, no delete, trailing slash."""

from __future__ import annotations

import httpx
import psycopg
import pytest

from tests.conftest import unique

FIELDS = {"public_id", "content", "logging_type", "status_type", "created_on", "user_public_id"}


def test_create_defaults_and_owner(client: httpx.Client, operator: dict[str, str], db: psycopg.Connection) -> None:
    content = unique("Controller started – plugin sensor polling active")
    r = client.post("/api/v1/logging", headers=operator, json={"content": content})
    assert r.status_code == 201
    assert r.json() == {"status": "success", "message": "Log entry successfully created."}
    pid = db.execute("SELECT public_id FROM log_entries WHERE content = %s", (content,)).fetchone()[0]  # type: ignore[index]
    me = client.get("/api/v1/auth/me", headers=operator).json()
    got = client.get(f"/api/v1/logging/{pid}", headers=operator).json()
    assert set(got) == FIELDS
    assert (got["content"], got["logging_type"], got["status_type"], got["user_public_id"]) == (
        content,
        "info",
        "unread",
        me["public_id"],
    )
    assert got["created_on"].endswith("Z")


@pytest.mark.parametrize("logging_type", ["info", "warning", "error"])
def test_types(client: httpx.Client, operator: dict[str, str], logging_type: str, db: psycopg.Connection) -> None:
    content = unique(logging_type)
    r = client.post("/api/v1/logging", headers=operator, json={"content": content, "logging_type": logging_type})
    assert r.status_code == 201
    assert db.execute("SELECT logging_type FROM log_entries WHERE content = %s", (content,)).fetchone() == (
        logging_type,
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"content": ""},
        {"content": "x" * 501},
        {"content": "ok", "logging_type": "debug"},
        {"content": "a\x00b"},
        {"content": 12},
    ],
)
def test_invalid_bodies(client: httpx.Client, operator: dict[str, str], body: dict) -> None:
    assert client.post("/api/v1/logging", headers=operator, json=body).status_code == 422


def test_content_of_500_chars_is_accepted(client: httpx.Client, operator: dict[str, str]) -> None:
    assert client.post("/api/v1/logging", headers=operator, json={"content": "é" * 500}).status_code == 201


def test_newest_first_with_paging(
    client: httpx.Client, viewer: dict[str, str], operator: dict[str, str], db: psycopg.Connection
) -> None:
    contents = [unique(f"order-{i}") for i in range(3)]
    for c in contents:
        assert client.post("/api/v1/logging", headers=operator, json={"content": c}).status_code == 201
    r = client.get("/api/v1/logging", headers=viewer, params={"page": 1, "page_size": 3, "_t": "1"})
    body = r.json()
    total = db.execute("SELECT count(*) FROM log_entries").fetchone()[0]  # type: ignore[index]
    assert (body["page"], body["page_size"], body["total"]) == (1, 3, total)
    assert [e["content"] for e in body["data"]] == contents[::-1]
    second = client.get("/api/v1/logging", headers=viewer, params={"page": 2, "page_size": 1}).json()
    assert second["data"][0]["content"] == contents[1]


def test_ties_on_created_on_break_by_id(client: httpx.Client, viewer: dict[str, str], db: psycopg.Connection) -> None:
    with db.transaction():  # one transaction: identical created_on
        for c in ("tie-a", "tie-b"):
            db.execute("INSERT INTO log_entries (content, created_on) VALUES (%s, '2999-01-01')", (c,))
    try:
        data = client.get("/api/v1/logging", headers=viewer, params={"page_size": 2}).json()["data"]
        assert [e["content"] for e in data] == ["tie-b", "tie-a"]
        assert data[0]["logging_type"] is None  # nullable column, served as null
    finally:
        db.execute("DELETE FROM log_entries WHERE created_on = '2999-01-01'")


def test_mark_read_and_edit(
    client: httpx.Client, operator: dict[str, str], viewer: dict[str, str], db: psycopg.Connection
) -> None:
    content = unique("mark")
    client.post("/api/v1/logging", headers=operator, json={"content": content})
    pid = db.execute("SELECT public_id FROM log_entries WHERE content = %s", (content,)).fetchone()[0]  # type: ignore[index]
    assert client.put(f"/api/v1/logging/{pid}", headers=viewer, json={"status_type": "read"}).status_code == 403
    r = client.put(f"/api/v1/logging/{pid}", headers=operator, json={"status_type": "read"})
    assert r.json() == {"status": "success", "message": "LogEntry successfully updated."}
    got = client.get(f"/api/v1/logging/{pid}", headers=viewer).json()
    assert (got["status_type"], got["content"]) == ("read", content)
    client.put(f"/api/v1/logging/{pid}", headers=operator, json={"content": "edited"})
    assert client.get(f"/api/v1/logging/{pid}", headers=viewer).json()["content"] == "edited"
    assert client.put(f"/api/v1/logging/{pid}", headers=operator, json={"status_type": "gone"}).status_code == 422


def test_unknown_is_404_and_delete_is_405(client: httpx.Client, operator: dict[str, str], admin: dict) -> None:
    r = client.get("/api/v1/logging/nope", headers=operator)
    assert r.status_code == 404 and r.json() == {"detail": "LogEntry 'nope' not found."}
    r = client.put("/api/v1/logging/nope", headers=operator, json={"status_type": "read"})
    assert r.status_code == 404 and r.json() == {"detail": "LogEntry 'nope' not found."}
    r = client.delete("/api/v1/logging/nope", headers=admin)
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}


def test_trailing_slash_redirects_with_307(client: httpx.Client, viewer: dict[str, str], admin: dict) -> None:
    r = client.get("/api/v1/logging/", headers=viewer)
    assert r.status_code == 307
    assert r.headers["location"] == f"{str(client.base_url).rstrip('/')}/api/v1/logging"
    followed = client.get("/api/v1/logging/", headers=viewer, follow_redirects=True)
    assert followed.status_code == 200 and "data" in followed.json()
    r = client.post("/api/v1/users/", headers=admin, json={})
    assert r.status_code == 307 and r.headers["location"].endswith("/api/v1/users")


def test_viewer_cannot_create(client: httpx.Client, viewer: dict[str, str]) -> None:
    r = client.post("/api/v1/logging", headers=viewer, json={"content": "x"})
    assert r.status_code == 403 and r.json() == {"detail": "Operator privileges required."}
