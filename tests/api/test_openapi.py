"""/openapi.json tells the truth: declared error statuses with their real bodies, a bearer security scheme, and
405 answers whose `Allow` lists the path's methods."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Server

METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture(scope="module")
def schema(server: Server) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/openapi.json", timeout=30)
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, item in schema["paths"].items() for m, op in item.items() if m in METHODS]


def test_bearer_security_scheme_on_authenticated_operations(schema: dict[str, Any]) -> None:
    scheme = schema["components"]["securitySchemes"]["BearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    ops = {(p, m): op for p, m, op in _operations(schema)}
    assert ops[("/api/v1/events", "get")]["security"] == [{"BearerAuth": []}]
    assert ops[("/api/v1/datapoints/batch", "post")]["security"] == [{"BearerAuth": []}]
    for public in (("/health", "get"), ("/api/v1/auth/login", "post")):
        assert "security" not in ops[public]
    for _, _, op in _operations(schema):
        if "security" in op:
            assert {"401", "403"} <= op["responses"].keys()


def test_every_operation_declares_its_errors_with_their_bodies(schema: dict[str, Any]) -> None:
    error = {"$ref": "#/components/schemas/ErrorDetail"}
    assert schema["components"]["schemas"]["ErrorDetail"]["properties"]["detail"]["type"] == "string"
    for path, method, op in _operations(schema):
        responses = op["responses"]
        assert "503" in responses, (path, method)
        assert "Retry-After" in responses["503"]["headers"]
        if "{" in path:
            assert "404" in responses, (path, method)
        if method in ("post", "put", "patch"):
            assert {"400", "413", "422"} <= responses.keys(), (path, method)
        for status, response in responses.items():
            if not status.startswith(("4", "5")):
                continue
            body = response["content"]["application/json"]["schema"]
            if (path, status) == ("/health/ready", "503"):
                assert body == {"$ref": "#/components/schemas/HealthResponse"}  # the health report, not a detail
            elif status == "422":
                # FastAPI's list of errors, or one message (a domain check such as "start must be before end").
                assert error in body["oneOf"] and {"$ref": "#/components/schemas/HTTPValidationError"} in body["oneOf"]
            else:
                assert body == error, (path, method, status)


def _declared(schema: dict[str, Any], path: str, method: str, status: int) -> bool:
    return str(status) in schema["paths"][path][method]["responses"]


def test_real_error_answers_are_declared(
    schema: dict[str, Any], client: httpx.Client, admin: dict[str, str], viewer: dict[str, str]
) -> None:
    cases = [
        ("/api/v1/events", "get", client.get("/api/v1/events")),  # 401
        ("/api/v1/users", "post", client.post("/api/v1/users", headers=viewer, json={})),  # 403 or 422
        ("/api/v1/events/{public_id}", "get", client.get("/api/v1/events/nope", headers=admin)),  # 404
        ("/api/v1/events", "post", client.post("/api/v1/events", headers=admin, content=b"\xff{")),  # 400
        ("/api/v1/series", "get", client.get("/api/v1/series", headers=admin, params={"events": "x"})),  # 422
    ]
    for path, method, r in cases:
        assert r.status_code >= 400
        assert _declared(schema, path, method, r.status_code), (path, method, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str | list)


def test_405_allow_lists_every_method_of_the_path(client: httpx.Client, admin: dict[str, str]) -> None:
    r = client.patch("/api/v1/events/some-id", headers=admin, json={})
    assert r.status_code == 405 and r.json() == {"detail": "Method Not Allowed"}
    assert [m.strip() for m in r.headers["allow"].split(",")] == ["DELETE", "GET", "PUT"]
    # A path that a more general template also matches: the specific resource's methods, as documented.
    r = client.request("OPTIONS", "/api/v1/datapoints/latest", headers=admin)
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    r = client.delete("/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
