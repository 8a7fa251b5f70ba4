"""Experiments (spec §4.3, §13): start/stop/rename/delete, side effects, and the byte-exact CSV export."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from tests.conftest import Server, unique

FIELDS = {"public_id", "name", "started_on", "stopped_on", "user_public_id"}


def start(client: httpx.Client, headers: dict[str, str], db: psycopg.Connection, name: str | None = None) -> dict:
    name = name or unique("exp")
    r = client.post("/api/v1/experiments", headers=headers, json={"name": name})
    assert r.status_code == 201, r.text
    assert r.json() == {"status": "success", "message": "Experiment successfully created."}
    row = db.execute("SELECT id, public_id FROM experiments WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return {"id": row[0], "public_id": row[1], "name": name}


def test_start_runs_logs_and_queues_webhook(
    client: httpx.Client, operator: dict[str, str], admin: dict, db: psycopg.Connection
) -> None:
    hook = db.execute(
        "INSERT INTO webhooks (url, events) VALUES (%s, %s) RETURNING id",
        (f"https://example.com/{unique('h')}", json.dumps(["experiment.started", "experiment.stopped"])),
    ).fetchone()[0]  # type: ignore[index]
    try:
        exp = start(client, operator, db)
        me = client.get("/api/v1/auth/me", headers=operator).json()
        got = client.get(f"/api/v1/experiments/{exp['public_id']}", headers=operator).json()
        assert set(got) == FIELDS
        assert got["stopped_on"] is None and got["user_public_id"] == me["public_id"]
        assert got["started_on"].endswith("Z")
        log = db.execute(
            "SELECT logging_type, status_type, user_public_id FROM log_entries WHERE content = %s",
            (f"Experiment '{exp['name']}' started.",),
        ).fetchone()
        assert log == ("info", "unread", me["public_id"])
        payloads = [
            json.loads(p)
            for (p,) in db.execute("SELECT payload FROM webhook_deliveries WHERE webhook_id = %s ORDER BY id", (hook,))
        ]
        assert [(p["type"], p["experiment"]) for p in payloads] == [("experiment.started", exp["name"])]

        r = client.put(f"/api/v1/experiments/{exp['public_id']}/stop", headers=operator)
        assert r.json() == {"status": "success", "message": "Experiment successfully stopped."}
        first = client.get(f"/api/v1/experiments/{exp['public_id']}", headers=operator).json()["stopped_on"]
        assert first is not None
        client.put(f"/api/v1/experiments/{exp['public_id']}/stop", headers=operator)
        second = client.get(f"/api/v1/experiments/{exp['public_id']}", headers=operator).json()["stopped_on"]
        assert second > first  # every stop re-stamps
        stops = db.execute(
            "SELECT count(*) FROM log_entries WHERE content = %s", (f"Experiment '{exp['name']}' stopped.",)
        ).fetchone()
        assert stops == (2,)
        types = [
            t
            for (t,) in db.execute(
                "SELECT event_type FROM webhook_deliveries WHERE webhook_id = %s ORDER BY id", (hook,)
            )
        ]
        assert types == ["experiment.started", "experiment.stopped", "experiment.stopped"]
    finally:
        db.execute("DELETE FROM webhooks WHERE id = %s", (hook,))


def test_duplicate_name_is_409_and_not_stored_twice(
    client: httpx.Client, operator: dict[str, str], db: psycopg.Connection
) -> None:
    exp = start(client, operator, db)
    r = client.post("/api/v1/experiments", headers=operator, json={"name": exp["name"]})
    assert r.status_code == 409 and r.json() == {"detail": "Experiment already exists."}
    # The failed request's side effects were rolled back with it.
    assert db.execute(
        "SELECT count(*) FROM log_entries WHERE content = %s", (f"Experiment '{exp['name']}' started.",)
    ).fetchone() == (1,)


def test_concurrent_starts_of_one_name(server: Server, operator: dict[str, str], db: psycopg.Connection) -> None:
    name = unique("race")
    codes: list[int] = []

    def post() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            codes.append(c.post("/api/v1/experiments", headers=operator, json={"name": name}).status_code)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] + [409] * 5


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": "x" * 256}, {"name": None}, {"name": 5}])
def test_invalid_bodies(client: httpx.Client, operator: dict[str, str], body: dict) -> None:
    assert client.post("/api/v1/experiments", headers=operator, json=body).status_code == 422


def test_rename_and_conflict(client: httpx.Client, operator: dict[str, str], db: psycopg.Connection) -> None:
    a, b = start(client, operator, db), start(client, operator, db)
    new = unique("renamed ünï")
    r = client.put(f"/api/v1/experiments/{a['public_id']}", headers=operator, json={"name": new})
    assert r.json() == {"status": "success", "message": "Experiment successfully updated."}
    assert client.get(f"/api/v1/experiments/{a['public_id']}", headers=operator).json()["name"] == new
    r = client.put(f"/api/v1/experiments/{a['public_id']}", headers=operator, json={"name": b["name"]})
    assert r.status_code == 409 and r.json() == {"detail": "Experiment already exists."}
    assert client.put(f"/api/v1/experiments/{a['public_id']}", headers=operator, json={}).status_code == 200


def test_pagination_and_order(
    client: httpx.Client, viewer: dict[str, str], operator: dict, db: psycopg.Connection
) -> None:
    start(client, operator, db)
    start(client, operator, db)
    total = db.execute("SELECT count(*) FROM experiments").fetchone()[0]  # type: ignore[index]
    ids = [r[0] for r in db.execute("SELECT public_id FROM experiments ORDER BY id")]
    r = client.get("/api/v1/experiments", headers=viewer, params={"page": 2, "page_size": 1})
    body = r.json()
    assert (body["page"], body["page_size"], body["total"]) == (2, 1, total)
    assert [e["public_id"] for e in body["data"]] == [ids[1]]


@pytest.mark.parametrize(
    ("method", "path"), [("GET", ""), ("PUT", ""), ("PUT", "/stop"), ("DELETE", ""), ("GET", "/export/csv")]
)
def test_unknown_experiment_is_404(client: httpx.Client, operator: dict[str, str], method: str, path: str) -> None:
    r = client.request(
        method,
        f"/api/v1/experiments/nope{path}",
        headers=operator,
        json={"name": "x"} if method == "PUT" and not path else None,
    )
    assert r.status_code == 404 and r.json() == {"detail": "Experiment 'nope' not found."}


def test_delete_removes_only_its_datapoints(
    client: httpx.Client, operator: dict[str, str], db: psycopg.Connection
) -> None:
    exp = start(client, operator, db)
    ev = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'V', 'sensor') RETURNING id",
        (unique("ev"),),
    ).fetchone()[0]  # type: ignore[index]
    t = datetime.now(UTC)
    db.execute(
        "INSERT INTO datapoints (time, event_id, experiment_id, value) VALUES (%s, %s, %s, 1), (%s, %s, NULL, 2)",
        (t, ev, exp["id"], t + timedelta(seconds=1), ev),
    )
    r = client.delete(f"/api/v1/experiments/{exp['public_id']}", headers=operator)
    assert r.json() == {"status": "success", "message": "Experiment successfully deleted."}
    assert db.execute("SELECT value FROM datapoints WHERE event_id = %s", (ev,)).fetchall() == [(2.0,)]
    assert client.get(f"/api/v1/experiments/{exp['public_id']}", headers=operator).status_code == 404


def test_csv_export_is_byte_exact(
    client: httpx.Client, operator: dict[str, str], viewer: dict[str, str], db: psycopg.Connection
) -> None:
    name = unique("run 1/a")
    exp = start(client, operator, db, name)
    started = db.execute("SELECT started_on FROM experiments WHERE id = %s", (exp["id"],)).fetchone()[0]  # type: ignore[index]
    ev_name = unique('volt, "quoted"')
    ev = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'V', 'sensor')"
        " RETURNING id, public_id",
        (ev_name,),
    ).fetchone()
    assert ev is not None
    gone = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'V', 'sensor') RETURNING id",
        (unique("gone"),),
    ).fetchone()[0]  # type: ignore[index]
    t1 = started + timedelta(seconds=1, microseconds=125998 - started.microsecond)
    t2 = started.replace(microsecond=0) + timedelta(seconds=2)
    t3 = t2 + timedelta(microseconds=1)
    db.execute(
        "INSERT INTO datapoints (time, event_id, experiment_id, value) VALUES"
        " (%(t3)s, %(e)s, %(x)s, 1e-05), (%(t1)s, %(e)s, %(x)s, 5.0), (%(t2)s, %(e)s, %(x)s, 42.5),"
        " (%(t2)s, %(g)s, %(x)s, 7), (%(t1)s + interval '1 hour', %(e)s, NULL, 9)",
        {"t1": t1, "t2": t2, "t3": t3, "e": ev[0], "x": exp["id"], "g": gone},
    )
    db.execute("DELETE FROM events WHERE id = %s", (gone,))  # its row is left orphaned: inner join hides it

    def micros(t: datetime) -> int:
        return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)

    pid = ev[1]
    quoted = '"' + ev_name.replace('"', '""') + '"'
    expected = (
        "timestamp,event_name,event_public_id,value,unit,datapoint_public_id\r\n"
        f"{t1.isoformat()},{quoted},{pid},5.0,V,{pid}@{micros(t1)}\r\n"
        f"{t2.isoformat()},{quoted},{pid},42.5,V,{pid}@{micros(t2)}\r\n"
        f"{t3.isoformat()},{quoted},{pid},1e-05,V,{pid}@{micros(t3)}\r\n"
    ).encode()
    assert t1.isoformat().endswith(".125998+00:00") and "." not in t2.isoformat()

    r = client.get(f"/api/v1/experiments/{exp['public_id']}/export/csv", headers=viewer)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    safe = name.replace(" ", "_").replace("/", "-")
    assert r.headers["content-disposition"] == f'attachment; filename="experiment_{safe}_{exp["public_id"][:8]}.csv"'
    assert r.content == expected

    # Stopped: same rows (they lie inside [started_on, stopped_on]); the id in the last column finds the row.
    client.put(f"/api/v1/experiments/{exp['public_id']}/stop", headers=operator)
    db.execute("UPDATE experiments SET stopped_on = %s WHERE id = %s", (t3, exp["id"]))
    assert client.get(f"/api/v1/experiments/{exp['public_id']}/export/csv", headers=viewer).content == expected
    dp = client.get(f"/api/v1/datapoints/{pid}@{micros(t2)}", headers=viewer).json()
    assert (dp["value"], dp["experiment_public_id"]) == (42.5, exp["public_id"])


def test_csv_of_empty_experiment_is_header_only(
    client: httpx.Client, operator: dict[str, str], db: psycopg.Connection
) -> None:
    exp = start(client, operator, db)
    r = client.get(f"/api/v1/experiments/{exp['public_id']}/export/csv", headers=operator)
    assert r.content == b"timestamp,event_name,event_public_id,value,unit,datapoint_public_id\r\n"


def test_csv_streams_many_rows_in_order(client: httpx.Client, operator: dict[str, str], db: psycopg.Connection) -> None:
    exp = start(client, operator, db)
    ev = db.execute(
        "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 1, 'V', 'sensor') RETURNING id",
        (unique("many"),),
    ).fetchone()[0]  # type: ignore[index]
    db.execute(
        "INSERT INTO datapoints (time, event_id, experiment_id, value)"
        " SELECT e.started_on + g * interval '1 ms', %s, e.id, g FROM experiments e,"
        " generate_series(12000, 1, -1) g WHERE e.id = %s",
        (ev, exp["id"]),
    )
    with client.stream("GET", f"/api/v1/experiments/{exp['public_id']}/export/csv", headers=operator) as r:
        lines = b"".join(r.iter_bytes()).split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == 12002
    assert [float(line.split(b",")[3]) for line in lines[1:-1]] == [float(g) for g in range(1, 12001)]


@pytest.mark.parametrize(
    ("prefix", "ascii_prefix", "encoded_prefix"),
    [
        ('a"b\\c', "a_b_c", "a%22b%5Cc"),
        ("Prüfung 1", "Pr_fung_1", "Pr%C3%BCfung_1"),
        ("line\r\nX-Injected: 1", "line__X-Injected:_1", "line%0D%0AX-Injected%3A_1"),
    ],
)
def test_csv_filename_survives_unsafe_names(
    client: httpx.Client,
    operator: dict[str, str],
    db: psycopg.Connection,
    prefix: str,
    ascii_prefix: str,
    encoded_prefix: str,
) -> None:
    suffix = unique("")  # "-<hex>": unchanged by every rule
    exp = start(client, operator, db, prefix + suffix)
    r = client.get(f"/api/v1/experiments/{exp['public_id']}/export/csv", headers=operator)
    assert r.status_code == 200
    tail = f"{suffix}_{exp['public_id'][:8]}.csv"
    assert r.headers["content-disposition"] == (
        f"attachment; filename=\"experiment_{ascii_prefix}{tail}\"; filename*=UTF-8''experiment_{encoded_prefix}{tail}"
    )
    assert "x-injected" not in r.headers


def test_roles(client: httpx.Client, viewer: dict[str, str]) -> None:
    r = client.post("/api/v1/experiments", headers=viewer, json={"name": unique("v")})
    assert r.status_code == 403 and r.json() == {"detail": "Operator privileges required."}
    assert client.get("/api/v1/experiments").status_code == 401
