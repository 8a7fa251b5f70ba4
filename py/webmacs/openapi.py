"""The OpenAPI document, completed in one place: the error answers every route can give (with the bodies they
really carry), the bearer security scheme, and the `Allow` header of 405 answers.

FastAPI documents a route's success answer and the validation 422. What else a route can answer follows from
what it depends on and what stands in front of it, so it is derived here from the route rather than written
on every route: credentials (401, and 403 for a role or an owner check), a path parameter (404), a body
(413 from the body limit, 409 for a write that collides with a unique name), the rate limit (429) and the
database (503, also the request deadline)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from webmacs import deps

SECURITY_SCHEME = "BearerAuth"
_AUTH_CALLS: set[Callable[..., Any]] = {
    deps.current_user,
    deps.operator_user,
    deps.admin_user,
    deps.ingest_user,
    deps.reader_user,
}
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_WRITE_METHODS = {"POST", "PUT", "PATCH"}

_ERROR = {
    "title": "ErrorDetail",
    "type": "object",
    "properties": {"detail": {"title": "Detail", "type": "string"}},
    "required": ["detail"],
    "description": 'Every error other than a request validation error: `{"detail": "<message>"}`.',
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}},
}
_DESCRIPTIONS = {
    400: "The request cannot be carried out as it stands.",
    401: "Missing, invalid, expired or revoked credentials.",
    403: "The credentials' role (or ownership) does not allow this.",
    404: "A resource the request names does not exist.",
    409: "The request collides with an existing resource (a unique name, a state).",
    413: "The request body is larger than allowed (refused while reading).",
    422: "The request does not validate: a list of errors (FastAPI's format), or one message.",
    429: "Too many requests: the rate limit or the failed-login throttle.",
    503: "Not now: the database is unavailable, a queue is full, or the request ran past its deadline.",
}
#: Statuses some routes answer beyond what `error_statuses` derives, by path prefix: a bad request (400) that
#: the service behind a GET decides (a bucket or range it cannot serve).
_EXTRA: dict[str, set[int]] = {
    "/api/v1/series": {400},
    "/api/v1/export": {400},
    "/api/v1/experiments": {400},
    "/api/v1/ota": {400},
    "/api/v1/plugins": {400},
    "/api/v1/auth/sso": {400},
}


def _calls(dependant: Any) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def authenticated(route: RouteContext) -> bool:
    return any(call in _AUTH_CALLS for call in _calls(route.dependant))


def _rate_limited(path: str, method: str) -> bool:
    # Mirrors middleware.RateLimitMiddleware.exempt (addresses aside: any client may be a counted one).
    if path.startswith(("/ws", "/health", "/api/v1/ota")):
        return False
    return not (path.startswith("/api/v1/datapoints") and method in ("GET", "POST"))


def error_statuses(route: RouteContext, method: str) -> set[int]:
    """The error statuses `route` can answer to `method`."""
    statuses = {503}
    path = str(route.path_format)
    dependant = route.dependant
    auth = authenticated(route)
    if _rate_limited(path, method):
        statuses.add(429)
    if auth:
        statuses |= {401, 403}
    if method in _BODY_METHODS:
        statuses.add(413)
    if method in _WRITE_METHODS:
        # A body that is not JSON (or not multipart) at all is FastAPI's 400; one that does not validate is 422
        # (uploads validate their multipart body themselves).
        statuses |= {400, 422}
    if dependant.path_params or dependant.query_params or dependant.body_params:
        statuses.add(422)
    # A resource named in the path, the query or the body may not exist; SSO answers 404 while it is off.
    named = dependant.path_params or (auth and (dependant.query_params or method in _WRITE_METHODS))
    if named or path.startswith("/api/v1/auth/sso"):
        statuses.add(404)
    if method in _WRITE_METHODS and auth:
        statuses.add(409)  # unique names, states that forbid the change
    for prefix, extra in _EXTRA.items():
        if path.startswith(prefix):
            statuses |= extra
    return statuses


def _error_response(status: int, existing: dict[str, Any] | None) -> dict[str, Any]:
    response: dict[str, Any] = dict(existing or {})
    response["description"] = existing.get("description", _DESCRIPTIONS[status]) if existing else _DESCRIPTIONS[status]
    if status == 422:
        schema: dict[str, Any] = {
            "oneOf": [
                {"$ref": "#/components/schemas/HTTPValidationError"},
                {"$ref": "#/components/schemas/ErrorDetail"},
            ]
        }
    else:
        schema = {"$ref": "#/components/schemas/ErrorDetail"}
    if status == 422 or "content" not in response:
        # FastAPI's 422 names only its list format; a route's own declaration with a body (the readiness
        # check's 503 answers its health report) stays.
        response["content"] = {"application/json": {"schema": schema}}
    if status in (429, 503):
        response["headers"] = {**response.get("headers", {}), **_RETRY_AFTER}
    if status == 401:
        response["headers"] = {
            **response.get("headers", {}),
            "WWW-Authenticate": {
                "description": "`Bearer` when no credentials were sent.",
                "schema": {"type": "string"},
            },
        }
    return response


def complete(app: FastAPI, schema: dict[str, Any]) -> dict[str, Any]:
    """Add the error answers, the security scheme and the shared error schemas to FastAPI's document."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["ErrorDetail"] = _ERROR
    schemas.setdefault(
        "HTTPValidationError",
        {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {"detail": {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}},
        },
    )
    validation = schemas.setdefault("ValidationError", {"type": "object"})
    # errors._bounded_error shortens a large `ctx` (and `input`) to a text excerpt.
    validation.setdefault("properties", {})["ctx"] = {
        "title": "Context",
        "anyOf": [{"type": "object"}, {"type": "string"}],
    }
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A JWT from `POST /api/v1/auth/login` (24 h), or an API token (`wm_…`, `POST /api/v1/tokens`).",
    }
    paths = schema.get("paths", {})
    # FastAPI nests included routers; their route contexts carry each route's full path and dependencies.
    for route in iter_route_contexts(app.routes):
        original = route.original_route
        if not isinstance(original, APIRoute) or not original.include_in_schema:
            continue
        item = paths.get(str(route.path_format))
        if item is None:
            continue
        for method in route.methods or ():
            operation = item.get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            declared = {int(code) for code in responses if code.isdigit() and int(code) in _DESCRIPTIONS}
            for status in sorted(error_statuses(route, method) | declared):
                responses[str(status)] = _error_response(status, responses.get(str(status)))
            if authenticated(route):
                operation["security"] = [{SECURITY_SCHEME: []}]
    return schema


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json, and answer 405 with every method of the path."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = complete(app, schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def _http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 405:
            headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))}
            exc = StarletteHTTPException(405, exc.detail, headers=headers)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, _http_error)


def allowed_methods(request: Request) -> list[str]:
    """The methods of the resource the request's path names. Starlette's 405 lists only the first matching
    route's; a path served by several routes (GET and PUT of one resource) must list them all. Where templates
    overlap (`/datapoints/latest` and `/datapoints/{public_id}`), the most specific one (fewest parameters) is the
    resource, as in the OpenAPI document."""
    by_template: dict[str, set[str]] = {}
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            template = str(getattr(route, "path_format", "") or "")
            by_template.setdefault(template, set()).update(getattr(route, "methods", None) or ())
    if not by_template:
        return []
    specific = min(by_template, key=lambda t: (t.count("{"), -len(t)))
    return sorted(by_template[specific])
