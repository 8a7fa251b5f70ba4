"""The middleware every HTTP request passes (spec §15): rate limit, CORS, X-Request-ID."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, make_settings, start_server

LIMIT = 3
TOO_MANY = b'{"detail":"Too many requests. Please try again later."}'
ME = "/api/v1/auth/me"
# Documentation addresses (RFC 5737): public-looking keys for the limiter. Requests stay on loopback;
# X-Forwarded-For only decides which bucket a request is counted in.
_hosts = itertools.count(1)


def public_key() -> str:
    """A client key no other test has used, so each test starts with an empty window."""
    return f"203.0.113.{next(_hosts)}"


@pytest.fixture(scope="module")
def limited(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A second server with a limit of 3 requests per minute."""
    tmp: Path = tmp_path_factory.mktemp("limited")
    server = start_server(make_settings(db_url, tmp, rate_limit_per_minute=LIMIT))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            yield c
    finally:
        server.stop()


def from_client(key: str) -> dict[str, str]:
    return {"X-Forwarded-For": key}


def exhaust(client: httpx.Client, key: str) -> None:
    for _ in range(LIMIT):
        assert client.get(ME, headers=from_client(key)).status_code == 401


# --- rate limit (§15.3) ---


def test_fourth_request_in_a_minute_is_429(limited: httpx.Client) -> None:
    key = public_key()
    exhaust(limited, key)
    r = limited.get(ME, headers=from_client(key))
    assert r.status_code == 429
    assert r.content == TOO_MANY
    assert r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == "60"
    assert not [h for h in r.headers if h.lower().startswith("x-ratelimit")]
    # Every path counts against the same key, and other keys are unaffected.
    assert limited.post("/api/v1/auth/login", headers=from_client(key), json={}).status_code == 429
    assert limited.get(ME, headers=from_client(public_key())).status_code == 401


def test_limit_applies_to_ipv6_clients(limited: httpx.Client) -> None:
    key = "2001:db8::7"
    exhaust(limited, key)
    assert limited.get(ME, headers=from_client(key)).status_code == 429


def test_health_is_never_limited_nor_counted(limited: httpx.Client) -> None:
    key = public_key()
    for _ in range(LIMIT * 3):
        assert limited.get("/health", headers=from_client(key)).status_code == 200
    # None of those used up the window.
    exhaust(limited, key)
    assert limited.get("/health", headers=from_client(key)).status_code == 200
    assert limited.get(ME, headers=from_client(key)).status_code == 429


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/datapoints"),
        ("GET", "/api/v1/datapoints/latest"),
        ("POST", "/api/v1/datapoints"),
        ("POST", "/api/v1/datapoints/batch"),
        ("GET", "/api/v1/ota/check"),
        ("DELETE", "/api/v1/ota/anything"),
        ("GET", "/ws/datapoints/stream"),
    ],
)
def test_exempt_paths_are_not_limited(limited: httpx.Client, method: str, path: str) -> None:
    key = public_key()
    for _ in range(LIMIT * 2):
        r = limited.request(method, path, headers=from_client(key))
        assert r.status_code != 429
    exhaust(limited, key)  # and they did not count


def test_deleting_datapoints_is_limited(limited: httpx.Client) -> None:
    key = public_key()
    for _ in range(LIMIT):
        assert limited.delete("/api/v1/datapoints/some-id", headers=from_client(key)).status_code != 429
    assert limited.delete("/api/v1/datapoints/some-id", headers=from_client(key)).status_code == 429


@pytest.mark.parametrize("key", ["10.1.2.3", "127.0.0.1", "192.168.0.5", "172.16.0.1", "172.31.255.254"])
def test_private_range_clients_are_exempt(limited: httpx.Client, key: str) -> None:
    for _ in range(LIMIT * 2):
        assert limited.get(ME, headers=from_client(key)).status_code == 401


@pytest.mark.parametrize("key", ["172.32.0.1", "172.15.0.1", "11.0.0.1", "192.169.0.1"])
def test_lookalikes_of_private_ranges_are_limited(limited: httpx.Client, key: str) -> None:
    exhaust(limited, key)
    assert limited.get(ME, headers=from_client(key)).status_code == 429


def test_only_the_first_forwarded_address_is_the_key(limited: httpx.Client) -> None:
    public = public_key()
    # A public client behind a private proxy is limited…
    exhaust(limited, f"{public} , 10.0.0.1")
    assert limited.get(ME, headers=from_client(f"{public},10.0.0.9")).status_code == 429
    # …and a private first entry is exempt whatever follows.
    for _ in range(LIMIT * 2):
        assert limited.get(ME, headers=from_client(f"10.0.0.2, {public}")).status_code == 401


def test_x_real_ip_is_the_key_without_x_forwarded_for(limited: httpx.Client) -> None:
    key = public_key()
    for _ in range(LIMIT):
        assert limited.get(ME, headers={"X-Real-IP": key}).status_code == 401
    assert limited.get(ME, headers={"X-Real-IP": key}).status_code == 429
    # X-Forwarded-For wins over X-Real-IP.
    assert limited.get(ME, headers={"X-Real-IP": key, "X-Forwarded-For": public_key()}).status_code == 401


def test_loopback_peer_without_headers_is_exempt(limited: httpx.Client) -> None:
    for _ in range(LIMIT * 2):
        assert limited.get(ME).status_code == 401


def test_429_keeps_cors_and_request_id_headers(limited: httpx.Client) -> None:
    key = public_key()
    exhaust(limited, key)
    r = limited.get(ME, headers={**from_client(key), "Origin": "http://localhost:5173"})
    assert r.status_code == 429
    assert r.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["x-request-id"]


# --- CORS (§15.2) ---


@pytest.mark.parametrize("origin", ["http://localhost:5173", "http://localhost:3000"])
def test_preflight_from_an_allowed_origin(client: httpx.Client, origin: str) -> None:
    r = client.options(
        "/api/v1/auth/login",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["access-control-max-age"] == "600"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert r.headers["x-request-id"]


def test_preflight_from_another_origin_is_400(client: httpx.Client) -> None:
    r = client.options(
        "/api/v1/auth/login",
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
        },
    )
    assert r.status_code == 400
    assert r.text == "Disallowed CORS origin"
    assert "access-control-allow-origin" not in r.headers
    assert r.headers["x-request-id"]


def test_simple_request_from_an_allowed_origin_gets_cors_headers(client: httpx.Client) -> None:
    r = client.get("/health", headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# --- X-Request-ID (§15.1) ---


def _request_id(r: httpx.Response) -> str:
    rid = r.headers.get_list("x-request-id")
    assert len(rid) == 1, rid
    assert len(rid[0]) == 36 and rid[0].count("-") == 4  # a UUID4 string
    return rid[0]


def test_request_id_on_errors_and_redirects(client: httpx.Client, admin: dict[str, str], limited: httpx.Client) -> None:
    key = public_key()
    exhaust(limited, key)
    responses = {
        404: client.get("/no-such-route"),
        405: client.delete("/health"),
        422: client.post("/api/v1/auth/login", json={}),
        307: client.get("/api/v1/users/", headers=admin),
        401: client.get(ME),
        429: limited.get(ME, headers=from_client(key)),
    }
    ids = set()
    for status, r in responses.items():
        assert r.status_code == status
        ids.add(_request_id(r))
    assert len(ids) == len(responses)
    assert responses[405].json() == {"detail": "Method Not Allowed"}


def test_client_request_id_is_replaced(client: httpx.Client) -> None:
    r = client.get("/health", headers={"X-Request-ID": "chosen-by-client"})
    assert _request_id(r) != "chosen-by-client"


def test_request_ids_differ_per_request(server: Server) -> None:
    with httpx.Client(base_url=server.url) as c:
        assert len({_request_id(c.get("/health")) for _ in range(5)}) == 5
