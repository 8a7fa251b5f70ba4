"""Influx line protocol in: the official client and Telegraf's documented bodies are stored; errors are Influx's."""

from __future__ import annotations

import base64
import gzip
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write.point import Point
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision

from tests.conftest import Server, bearer, make_settings, start_server, unique

NOW_NS = time.time_ns()


def device_token(client: httpx.Client, headers: dict[str, str], **extra: Any) -> str:
    r = client.post("/api/v1/tokens", headers=headers, json={"name": unique("lp"), **extra})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


@pytest.fixture
def token(client: httpx.Client, operator: dict[str, str]) -> str:
    return device_token(client, operator, scope="write")


def stored(db: psycopg.Connection, series: str) -> list[tuple[Any, float]]:
    return db.execute(
        "SELECT d.time, d.value FROM datapoints d JOIN events e ON e.id = d.event_id WHERE e.name = %s ORDER BY 1",
        (series,),
    ).fetchall()


def write(client: httpx.Client, body: bytes | str, token: str, v2: bool = True, **params: str) -> httpx.Response:
    path = "/api/v2/write" if v2 else "/write"
    query = {"org": "o", "bucket": "b"} if v2 else {"db": "telegraf"}
    query.update(params)
    return client.post(path, params=query, content=body, headers={"Authorization": f"Token {token}"})


def test_official_client_batches_are_stored(token: str, server: Server, db: psycopg.Connection) -> None:
    m = unique("rig")
    with InfluxDBClient(url=server.url, token=token, org="lab", enable_gzip=True) as c:
        w = c.write_api(write_options=SYNCHRONOUS)
        for batch in range(2):
            points = [
                Point(m)
                .tag("sensor", f"s{i % 3}")
                .field("temp", 20.0 + i)
                .field("count", i)
                .field("note", "text")
                .time(NOW_NS - (batch * 1000 + i) * 1_000_000_000, WritePrecision.NS)
                for i in range(1000)
            ]
            w.write(bucket="lab", record=points)
    for s in range(3):
        temps = stored(db, f"{m},sensor=s{s} temp")
        counts = stored(db, f"{m},sensor=s{s} count")
        expected = len([i for i in range(1000) if i % 3 == s]) * 2
        assert len(temps) == len(counts) == expected
    assert stored(db, f"{m},sensor=s0 note") == []
    # Auto-created events are attached to the "line-protocol" plugin instance (the phantom-data guard holds).
    row = db.execute(
        "SELECT p.instance_name, p.enabled FROM events e JOIN channel_mappings cm ON cm.event_public_id = e.public_id"
        " JOIN plugin_instances p ON p.id = cm.plugin_instance_id WHERE e.name = %s",
        (f"{m},sensor=s1 temp",),
    ).fetchone()
    assert row == ("line-protocol", True)


def test_precisions_and_values(client: httpx.Client, token: str, db: psycopg.Connection) -> None:
    m = unique("prec")
    seconds = NOW_NS // 1_000_000_000 - 60
    assert write(client, f"{m} v=1.5 {seconds}", token, precision="s").status_code == 204
    assert write(client, f"{m} i=-7i,u=9u,b=true,f=F {seconds * 1000 + 1}", token, precision="ms").status_code == 204
    assert write(client, f"{m} v=2 {seconds * 1_000_000 + 5}", token, v2=False, precision="u").status_code == 204
    values = {name: [v for _, v in stored(db, f"{m} {name}")] for name in ("v", "i", "u", "b", "f")}
    assert values == {"v": [1.5, 2.0], "i": [-7.0], "u": [9.0], "b": [1.0], "f": [0.0]}
    t = stored(db, f"{m} v")[0][0]
    assert int(t.timestamp()) == seconds


# From Telegraf's documentation (outputs.influxdb / influxdb_v2 send the metrics serialized as line protocol;
# https://docs.influxdata.com/telegraf/v1/data_formats/output/influx/ and the cpu/mem/system input examples).
TELEGRAF_BODY = """\
cpu,cpu=cpu0,host=localhost usage_guest=0,usage_guest_nice=0,usage_idle=99.75,usage_iowait=0,usage_irq=0,\
usage_nice=0,usage_softirq=0,usage_steal=0,usage_system=0.25,usage_user=0 {t}
mem,host=localhost active=2911477760i,available=13021601792i,available_percent=78.03,buffered=326766592i,\
cached=4030767104i,free=9117614080i,inactive=3606478848i,total=16687628288i,used=3664261120i,used_percent=21.95 {t}
system,host=localhost load1=0.49,load15=0.39,load5=0.46,n_cpus=8i,n_users=1i {t}
system,host=localhost uptime=1217i {t}
system,host=localhost uptime_format="0 days,  0:20" {t}
"""


def test_telegraf_documented_bodies_are_accepted(
    client: httpx.Client, token: str, db: psycopg.Connection, server: Server
) -> None:
    body = TELEGRAF_BODY.format(t=NOW_NS - 10_000_000_000)
    before = server.rt.lineproto.counters()["rejected"].get("string_field", 0)
    # outputs.influxdb (v1): u/p query parameters, gzip as Telegraf's content_encoding = "gzip" sends it.
    r = client.post(
        "/write",
        params={"db": "telegraf", "u": "telegraf", "p": token},
        content=gzip.compress(body.encode()),
        headers={"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"},
    )
    assert r.status_code == 204, r.text
    assert len(stored(db, "cpu,cpu=cpu0,host=localhost usage_idle")) >= 1
    assert stored(db, "mem,host=localhost total")[-1][1] == 16687628288.0
    assert server.rt.lineproto.counters()["rejected"]["string_field"] == before + 1
    # outputs.influxdb with basic auth, and outputs.influxdb_v2 (Token header): the same body again is absorbed
    # as duplicates (client timestamps), not an error.
    basic = base64.b64encode(f"telegraf:{token}".encode()).decode()
    r = client.post("/write", params={"db": "telegraf"}, content=body, headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 204, r.text
    assert write(client, body, token).status_code == 204
    assert len(stored(db, "system,host=localhost uptime")) == 1


@pytest.mark.parametrize(
    ("body", "line"),
    [
        (b"m v=1\nm\n", 2),
        (b"m v=1\n\n# comment\nm v=\n", 4),
        (b"m v=NaN", 1),
        (b"m v=1 12:00", 1),
        (b"m,t v=1", 1),
        (b'm v="unterminated', 1),
        (b"m\xff v=1", 1),
        (b"m v=99999999999999999999i", 1),
    ],
)
def test_malformed_lines_give_the_line_number(
    client: httpx.Client, token: str, db: psycopg.Connection, body: bytes, line: int
) -> None:
    m = unique("bad")
    r = write(client, f"{m} v=1\n".encode() + body, token)
    assert r.status_code == 400
    err = r.json()
    assert err["code"] == "invalid" and f"line {line + 1}:" in err["message"]
    assert stored(db, f"{m} v") == []  # nothing of a refused body is written
    r = write(client, body, token, v2=False)
    assert r.status_code == 400 and f"line {line}:" in r.json()["error"]


def test_gzip_bomb_and_broken_gzip(client: httpx.Client, token: str) -> None:
    bomb = gzip.compress(b"m v=1\n" * (8 * 1024 * 1024))  # 48 MiB inflated, ~50 KiB on the wire
    assert len(bomb) < 1024 * 1024
    r = client.post(
        "/api/v2/write", content=bomb, headers={"Authorization": f"Token {token}", "Content-Encoding": "gzip"}
    )
    assert r.status_code == 413 and r.json()["code"] == "request too large"
    broken = gzip.compress(b"m v=1\n")[:-6]
    r = client.post(
        "/api/v2/write", content=broken, headers={"Authorization": f"Token {token}", "Content-Encoding": "gzip"}
    )
    assert r.status_code == 400
    r = client.post(
        "/api/v2/write", content=b"x", headers={"Authorization": f"Token {token}", "Content-Encoding": "br"}
    )
    assert r.status_code == 415


def test_credentials(client: httpx.Client, token: str, admin_token: str, viewer: dict[str, str]) -> None:
    body = f"{unique('auth')} v=1"
    assert client.post("/api/v2/write", content=body).status_code == 401
    r = client.post("/api/v2/write", content=body, headers={"Authorization": "Token wm_nope"})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert client.post("/write", params={"u": "x", "p": "wrong"}, content=body).json() == {
        "error": "line protocol writes need a WebMACS API token (wm_…)"
    }
    # A JWT is no line-protocol credential; a viewer's token may not write.
    assert client.post("/api/v2/write", content=body, headers=bearer(admin_token)).status_code == 401
    viewer_token = device_token(client, viewer)
    assert write(client, body, viewer_token).status_code == 403
    assert client.post("/write", content=body, headers={"Authorization": "Basic %%%"}).status_code == 401
    # Bearer is accepted like Token.
    assert client.post("/api/v2/write", content=body, headers=bearer(token)).status_code == 204
    assert client.get("/ping").status_code == 204


def test_hostile_values_are_rejected_per_field(
    client: httpx.Client, token: str, db: psycopg.Connection, server: Server
) -> None:
    m = unique("hostile")
    far_future = NOW_NS + 3600 * 10**9
    counters = server.rt.lineproto.counters
    before = dict(counters()["rejected"])
    body = (
        f"{m} big=1.7e308,huge=1e999,neg=-9223372036854775808i,max=18446744073709551615u\n"
        f"{m} late=1 {far_future}\n"
        f"{m} old=1 -5\n"
        f"{m},tag=\\ sp\\,c\\=e v=3\n"
    )
    assert write(client, body, token).status_code == 204
    assert [v for _, v in stored(db, f"{m} big")] == [1.7e308]
    assert [v for _, v in stored(db, f"{m} neg")] == [-9223372036854775808.0]
    assert [v for _, v in stored(db, f"{m} max")] == [18446744073709551615.0]
    assert stored(db, f"{m} huge") == stored(db, f"{m} late") == stored(db, f"{m} old") == []
    assert len(stored(db, f"{m},tag=\\ sp\\,c\\=e v")) == 1
    after = counters()["rejected"]
    for reason in ("non_finite", "far_future_timestamp", "timestamp_too_old"):
        assert after.get(reason, 0) - before.get(reason, 0) == 1, reason
    assert write(client, f"{m} v=1", token, precision="h").status_code == 400
    # A very long line and a series too long to be an event name: refused or rejected, never a 500.
    r = write(client, f"{m} {'x' * 300}=1", token)
    assert r.status_code == 204
    # 100,000 digits overflow to infinity: a non-finite reject like 1e999, not an error.
    assert write(client, f"{m} w=" + "9" * 100_000, token).status_code == 204
    assert stored(db, f"{m} w") == []


def test_plugin_bound_token_writes_only_its_events(
    client: httpx.Client, operator: dict[str, str], db: psycopg.Connection, server: Server
) -> None:
    # A bound token creates its events on its own instance, and may not feed others' events.
    inst = db.execute(
        "INSERT INTO plugin_instances (plugin_id, instance_name) VALUES ('dev', %s) RETURNING id, public_id",
        (unique("inst"),),
    ).fetchone()
    assert inst is not None
    bound = device_token(client, operator, scope="write", plugin_instance_public_id=inst[1])
    free = device_token(client, operator, scope="write")
    theirs, mine = unique("theirs"), unique("mine")
    assert write(client, f"{theirs} v=1", free).status_code == 204
    before = server.rt.ingest.engine.stats()["rejected"]["not_permitted"]
    assert write(client, f"{theirs} v=2\n{mine} v=3", bound).status_code == 204
    assert [v for _, v in stored(db, f"{theirs} v")] == [1.0]
    assert [v for _, v in stored(db, f"{mine} v")] == [3.0]
    assert server.rt.ingest.engine.stats()["rejected"]["not_permitted"] == before + 1
    row = db.execute(
        "SELECT cm.plugin_instance_id FROM channel_mappings cm JOIN events e ON e.public_id = cm.event_public_id"
        " WHERE e.name = %s",
        (f"{mine} v",),
    ).fetchone()
    assert row == (inst[0],)


@pytest.fixture(scope="module")
def capped(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("lpcap")
    s = start_server(make_settings(db_url, tmp, webmacs_lp_max_auto_events=2))
    try:
        yield s
    finally:
        s.stop()


def test_auto_events_are_capped_per_token(capped: Server, operator: dict[str, str], db: psycopg.Connection) -> None:
    with httpx.Client(base_url=capped.url, timeout=30) as c:
        token = device_token(c, operator, scope="write")
        other = device_token(c, operator, scope="write")
        m = unique("cap")
        # The busiest series get the events the cap allows; the rest are rejected as unknown, counted.
        r = write(c, f"{m} a=1,b=2,c=3\n{m} a=4,b=5", token)
        assert r.status_code == 204
        assert len(stored(db, f"{m} a")) == 2 and len(stored(db, f"{m} b")) == 2
        assert stored(db, f"{m} c") == []
        assert capped.rt.lineproto.counters()["rejected"]["unknown_event"] == 1
        # Known series still take points; the cap is per token.
        assert write(c, f"{m} a=7,c=8", token).status_code == 204
        assert len(stored(db, f"{m} a")) == 3 and stored(db, f"{m} c") == []
        assert write(c, f"{m} c=9", other).status_code == 204
        assert [v for _, v in stored(db, f"{m} c")] == [9.0]


def test_metrics_count_line_protocol(client: httpx.Client, token: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def accepted() -> float:
        text = client.get("/metrics").text
        for f in text_string_to_metric_families(text):
            for s in f.samples:
                if s.name == "webmacs_lineproto_accepted_total":
                    return s.value
        return 0.0

    before = accepted()
    m = unique("metric")
    assert write(client, f'{m} a=1,b=2,s="x"\n{m} a=3', token).status_code == 204
    assert accepted() - before == 3


def test_a_body_larger_than_one_engine_chunk_is_stored_whole(
    client: httpx.Client, token: str, db: psycopg.Connection
) -> None:
    from webmacs.services.lineproto import CHUNK_POINTS

    m = unique("chunks")
    n = CHUNK_POINTS * 2 + 123
    base = NOW_NS - 10**12
    body = "\n".join(f"{m},k=v{i % 7} a={i} {base + i * 1000}" for i in range(n))
    assert write(client, body, token).status_code == 204
    total = sum(len(stored(db, f"{m},k=v{k} a")) for k in range(7))
    assert total == n
