"""Poison input on every ingest path: extreme and malformed timestamps and values are each rejected with a
clear error, never a 5xx, a hang or a stuck queue, and a datapoint the same sender sends next is acknowledged.

One validation serves every path (the engine's `frame::check_time`): client timestamps from
1970-01-01T00:00:00Z to now + 5 minutes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from tests.conftest import ActiveEvent, Server, free_port, make_settings, start_server

I64_MIN, I64_MAX = -(2**63), 2**63 - 1

#: Timestamps (as JSON text) outside the accepted range or not timestamps at all, with the reason the engine
#: gives each.
BAD_TIMESTAMPS: list[tuple[str, str]] = [
    ("-300000000000000", "timestamp_too_old"),  # the poison: before 4713 BC, froze ingest before
    ("-1", "timestamp_too_old"),
    (str(I64_MIN), "timestamp_too_old"),
    (str(I64_MAX), "far_future_timestamp"),
    (str(2**64 + 1), "far_future_timestamp"),
    ("1e308", "far_future_timestamp"),
    ("-1e308", "timestamp_too_old"),
    ('"0000-01-01T00:00:00Z"', "timestamp_too_old"),
    ('"0001-01-01T00:00:00Z"', "timestamp_too_old"),
    ('"1969-12-31T23:59:59.999999Z"', "timestamp_too_old"),
    ('"9999-12-31T23:59:59Z"', "far_future_timestamp"),
    ('"10000-01-01T00:00:00Z"', "bad_timestamp"),
    ('"+275760-09-13T00:00:00Z"', "bad_timestamp"),
    ('"2030-99-99"', "bad_timestamp"),
    ('"' + "9" * 100_000 + '"', "bad_timestamp"),
    ("[1]", "bad_timestamp"),
    ('{"a": 1}', "bad_timestamp"),
    ("true", "bad_timestamp"),
]

BAD_VALUES: list[tuple[str, str]] = [
    ('"NaN"', "non_finite"),
    ('"-Infinity"', "non_finite"),
    ('"1e999"', "non_finite"),
    ('"' + "1" * 100_000 + '"', "non_finite"),  # parses to inf
    ('"12abc"', "invalid_value"),
    ("[1]", "invalid_value"),
    ("null", "missing_value"),
]


def entry(event: str, value: str = "1.5", timestamp: str | None = None) -> bytes:
    ts = "" if timestamp is None else f',"timestamp":{timestamp}'
    return f'{{"value":{value},"event_public_id":"{event}"{ts}}}'.encode()


@pytest.fixture(scope="module")
def native(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        make_settings(db_url, tmp_path_factory.mktemp("poison"), webmacs_telemetry_listen=f"127.0.0.1:{free_port()}")
    )
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def event(native: Server, make_active_event: Callable[..., ActiveEvent]) -> ActiveEvent:
    ev = make_active_event()
    native.refresh_catalog()
    return ev


def count(db: psycopg.Connection, event_id: int) -> int:
    row = db.execute("SELECT count(*) FROM datapoints WHERE event_id = %s", (event_id,)).fetchone()
    assert row is not None
    return int(row[0])


def rest_single(c: httpx.Client, headers: dict[str, str], body: bytes) -> httpx.Response:
    return c.post("/api/v1/datapoints", headers={**headers, "content-type": "application/json"}, content=body)


def rest_batch(c: httpx.Client, headers: dict[str, str], body: bytes) -> httpx.Response:
    return c.post(
        "/api/v1/datapoints/batch",
        headers={**headers, "content-type": "application/json"},
        content=b'{"datapoints":[' + body + b"]}",
    )


@pytest.mark.parametrize(("timestamp", "reason"), BAD_TIMESTAMPS, ids=[t[:30] for t, _ in BAD_TIMESTAMPS])
def test_rest_refuses_bad_timestamps_and_goes_on(
    native: Server, operator: dict[str, str], db: psycopg.Connection, event: ActiveEvent, timestamp: str, reason: str
) -> None:
    with httpx.Client(base_url=native.url, timeout=30) as c:
        for send in (rest_single, rest_batch):
            r = send(c, operator, entry(event.public_id, timestamp=timestamp))
            assert r.status_code == 422, (send.__name__, r.text[:300])
            (error,) = r.json()["detail"]
            assert error["loc"][-1] == "timestamp"
            # Error bodies never echo large input back.
            assert len(r.content) < 2000
            r = send(c, operator, entry(event.public_id))
            assert r.status_code == 201, r.text
    assert count(db, event.id) == 2


@pytest.mark.parametrize(("value", "reason"), BAD_VALUES, ids=[v[:20] for v, _ in BAD_VALUES])
def test_rest_refuses_bad_values_and_goes_on(
    native: Server, operator: dict[str, str], db: psycopg.Connection, event: ActiveEvent, value: str, reason: str
) -> None:
    with httpx.Client(base_url=native.url, timeout=30) as c:
        for send in (rest_single, rest_batch):
            r = send(c, operator, entry(event.public_id, value=value))
            assert r.status_code == 422, (send.__name__, r.text[:300])
            assert len(r.content) < 2000
            assert send(c, operator, entry(event.public_id)).status_code == 201
    assert count(db, event.id) == 2


def ws_urls(native: Server, token: str) -> list[str]:
    """The API's own port (handed over to the engine) and the engine's own port."""
    return [
        f"{native.url.replace('http://', 'ws://')}/ws/controller/telemetry?token={token}",
        f"ws://{native.rt.telemetry_listen}/ws/controller/telemetry?token={token}",
    ]


def ack(ws: ClientConnection) -> dict[str, Any]:
    return dict(orjson.loads(ws.recv(timeout=20)))


def test_websocket_refuses_every_poison_entry_and_goes_on(
    native: Server, admin_token: str, db: psycopg.Connection, event: ActiveEvent
) -> None:
    cases = [entry(event.public_id, timestamp=t) for t, _ in BAD_TIMESTAMPS]
    cases += [entry(event.public_id, value=v) for v, _ in BAD_VALUES]
    sent = 0
    for url in ws_urls(native, admin_token):
        with connect(url, open_timeout=10, proxy=None, max_size=None) as ws:
            for seq, bad in enumerate(cases):
                ws.send(b'{"seq":%d,"datapoints":[' % seq + bad + b"]}")
                assert ack(ws)["type"] == "error"  # "No valid datapoints in batch"
                assert ack(ws) == {"type": "ack", "seq": seq, "accepted": 0, "rejected": 1}
                ws.send(b'{"seq":%d,"datapoints":[' % (seq + 1000) + entry(event.public_id) + b"]}")
                assert ack(ws) == {"type": "ack", "seq": seq + 1000, "accepted": 1, "rejected": 0}
                sent += 1
    assert count(db, event.id) == sent


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe\xfd",  # not UTF-8
        b'{"datapoints": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",  # nested far beyond any parser's limit
        b"[" * 50_000,
        b'{"datapoints": "' + b"x" * 1_000_000 + b'"',  # unterminated
    ],
    ids=["invalid-utf8", "deep-nesting", "open-brackets", "unterminated"],
)
def test_malformed_frames_close_that_connection_only(
    native: Server, admin_token: str, event: ActiveEvent, payload: bytes
) -> None:
    from websockets.exceptions import ConnectionClosed

    for url in ws_urls(native, admin_token):
        with connect(url, open_timeout=10, proxy=None, max_size=None) as other:
            with connect(url, open_timeout=10, proxy=None, max_size=None) as ws:
                ws.send(payload)  # binary frame: bytes as they are
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=20)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
            other.send(b'{"seq":1,"datapoints":[' + entry(event.public_id) + b"]}")
            assert ack(other) == {"type": "ack", "seq": 1, "accepted": 1, "rejected": 0}


def test_invalid_utf8_text_frame_closes_1007(native: Server, admin_token: str) -> None:
    """A text frame must be UTF-8 (RFC 6455): the engine closes with 1007, logging no traceback."""
    import socket

    from websockets.exceptions import ConnectionClosed

    for url in ws_urls(native, admin_token):
        with connect(url, open_timeout=10, proxy=None) as ws:
            # Bypass the client library's own UTF-8 check: a masked text frame written by hand.
            payload = b"\xc3\x28"
            mask = b"\x01\x02\x03\x04"
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            sock: socket.socket = ws.socket
            sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"value": ' + b"[" * 50_000 + b"]" * 50_000 + b', "event_public_id": "x"}',
        b"\xff\xfe",
        b'{"value": 1, "event_public_id": "\xff"}',
        b'{"value": NaN, "event_public_id": "x"}',
        b'{"value": 1, "event_public_id": "x", "timestamp": NaN}',
        b'{"value": 1, "event_public_id": "x", "timestamp": Infinity}',
        b'{"value": 1e400, "event_public_id": "x"}',
    ],
    ids=["deep-array", "deep-value", "not-utf8", "not-utf8-in-string", "nan", "nan-ts", "inf-ts", "overflow"],
)
def test_rest_malformed_bodies_are_client_errors(native: Server, operator: dict[str, str], body: bytes) -> None:
    with httpx.Client(base_url=native.url, timeout=30) as c:
        r = rest_single(c, operator, body)
        # FastAPI parses the single create's body: what `json.loads` cannot decode at all (nesting beyond the
        # recursion limit, bytes that are not UTF-8) is its 400 "There was an error parsing the body".
        assert r.status_code in (400, 422), r.text[:300]
        assert len(r.content) < 4000
        r = rest_batch(c, operator, body)
        assert r.status_code == 422, r.text[:300]
        assert len(r.content) < 4000


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.datetimes().map(lambda d: d.isoformat())
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(
        st.tuples(
            st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12) | st.integers(-(2**70), 2**70),
            _json_scalars,
        ),
        min_size=1,
        max_size=20,
    )
)
def test_any_batch_is_201_or_422_and_what_is_acked_is_stored(
    native: Server, operator: dict[str, str], db: psycopg.Connection, event: ActiveEvent, values: list[Any]
) -> None:
    before = count(db, event.id)
    duplicates = native.rt.ingest.engine.stats()["duplicates"]
    points = [{"value": v, "event_public_id": event.public_id, "timestamp": t} for v, t in values]
    # Python's json (not orjson): integers beyond 64 bits are sent as they are.
    body = json.dumps({"datapoints": points}).encode()
    with httpx.Client(base_url=native.url, timeout=30) as c:
        r = c.post("/api/v1/datapoints/batch", headers={**operator, "content-type": "application/json"}, content=body)
    assert r.status_code in (201, 422), r.text[:300]
    stored = count(db, event.id) - before
    if r.status_code == 201:
        # A client timestamp an earlier example already stored is a duplicate: acknowledged, kept once.
        again = native.rt.ingest.engine.stats()["duplicates"] - duplicates
        assert r.json()["message"] == f"{stored + again} datapoints successfully created."
    else:
        assert stored == 0
