"""The spec §5 access matrix for every events/datapoints/experiments/logging/dashboards/plugins endpoint:
anonymous → 401, below the required role → 403 with the spec's message, otherwise the handler's answer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Server

LEVEL = {"viewer": 1, "operator": 2, "admin": 3}
DENIED = {"operator": "Operator privileges required.", "admin": "Admin privileges required."}

# (method, path, least role, JSON body, status the handler gives an allowed caller for this request)
ENDPOINTS: list[tuple[str, str, str, dict[str, Any] | None, int]] = [
    ("GET", "/events", "viewer", None, 200),
    ("POST", "/events", "operator", {}, 422),
    ("GET", "/events/nope", "viewer", None, 404),
    ("PUT", "/events/nope", "operator", {}, 404),
    ("DELETE", "/events/nope", "operator", None, 404),
    ("GET", "/datapoints", "viewer", None, 200),
    ("GET", "/datapoints/nope@1", "viewer", None, 404),
    ("DELETE", "/datapoints/nope@1", "operator", None, 404),
    ("GET", "/experiments", "viewer", None, 200),
    ("POST", "/experiments", "operator", {}, 422),
    ("GET", "/experiments/nope", "viewer", None, 404),
    ("PUT", "/experiments/nope", "operator", {}, 404),
    ("PUT", "/experiments/nope/stop", "operator", None, 404),
    ("GET", "/experiments/nope/export/csv", "viewer", None, 404),
    ("DELETE", "/experiments/nope", "operator", None, 404),
    ("GET", "/logging", "viewer", None, 200),
    ("POST", "/logging", "operator", {}, 422),
    ("GET", "/logging/nope", "viewer", None, 404),
    ("PUT", "/logging/nope", "operator", {}, 404),
    ("GET", "/dashboards", "viewer", None, 200),
    ("POST", "/dashboards", "operator", {}, 422),
    ("GET", "/dashboards/nope", "viewer", None, 404),
    ("PUT", "/dashboards/nope", "operator", {}, 404),
    ("DELETE", "/dashboards/nope", "operator", None, 404),
    ("POST", "/dashboards/nope/widgets", "operator", {}, 422),
    ("PUT", "/dashboards/nope/widgets/w", "operator", {}, 404),
    ("DELETE", "/dashboards/nope/widgets/w", "operator", None, 404),
    ("GET", "/plugins/available", "viewer", None, 200),
    ("GET", "/plugins/packages", "viewer", None, 200),
    ("POST", "/plugins/packages/upload", "admin", None, 422),
    ("DELETE", "/plugins/packages/nope", "admin", None, 404),
    ("GET", "/plugins", "viewer", None, 200),
    ("POST", "/plugins", "admin", {}, 422),
    ("GET", "/plugins/nope", "viewer", None, 404),
    ("PUT", "/plugins/nope", "admin", {}, 404),
    ("DELETE", "/plugins/nope", "admin", None, 404),
    ("GET", "/plugins/nope/channels", "viewer", None, 404),
    ("POST", "/plugins/nope/channels", "admin", {}, 422),
    ("PUT", "/plugins/nope/channels/m", "admin", {}, 404),
    ("DELETE", "/plugins/nope/channels/m", "admin", None, 404),
]


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    """One client for the module: building a client (its TLS context) costs more than these requests."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
def headers(request: pytest.FixtureRequest) -> dict[str, str]:
    return {} if request.param == "anonymous" else request.getfixturevalue(request.param)


@pytest.mark.parametrize("headers", ["anonymous", "viewer", "operator", "admin"], indirect=True)
@pytest.mark.parametrize(
    ("method", "path", "least", "body", "allowed"), ENDPOINTS, ids=[f"{m} {p}" for m, p, *_ in ENDPOINTS]
)
def test_access(
    client: httpx.Client,
    headers: dict[str, str],
    request: pytest.FixtureRequest,
    method: str,
    path: str,
    least: str,
    body: dict | None,
    allowed: int,
) -> None:
    role = request.node.callspec.params["headers"]
    r = client.request(method, f"/api/v1{path}", headers=headers, json=body)
    if role == "anonymous":
        assert r.status_code == 401
        assert r.json() == {"detail": "Authentication required."}
        assert r.headers["www-authenticate"] == "Bearer"
    elif LEVEL[role] < LEVEL[least]:
        assert r.status_code == 403
        assert r.json() == {"detail": DENIED[least]}
    else:
        assert r.status_code == allowed, r.text
        assert r.headers["content-type"] == "application/json"


def test_garbage_and_api_tokens(client: httpx.Client, operator: dict[str, str]) -> None:
    r = client.get("/api/v1/events", headers={"Authorization": "Bearer not-a-jwt"})
    assert r.status_code == 401 and r.json() == {"detail": "Invalid or expired token."}
    r = client.get("/api/v1/plugins", headers={"Authorization": "Bearer wm_fabricated"})
    assert r.status_code == 401 and r.json() == {"detail": "Invalid API token."}
    token = client.post("/api/v1/tokens", headers=operator, json={"name": "matrix"}).json()["token"]
    api = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/experiments", headers=api).status_code == 200
    assert client.post("/api/v1/logging", headers=api, json={"content": "via API token"}).status_code == 201
    assert client.post("/api/v1/plugins", headers=api, json={}).status_code == 403
