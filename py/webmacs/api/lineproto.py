"""Influx-compatible write endpoints: `POST /api/v2/write` (InfluxDB 2) and `POST /write` (InfluxDB 1), what
Telegraf's `outputs.influxdb_v2` / `outputs.influxdb` and the official clients send.

Credentials are WebMACS API tokens, in Influx's spellings: `Authorization: Token wm_…` (or `Bearer`), and for v1
also `?u=…&p=wm_…` or basic auth with the token as password. 204 once the points are committed; errors are
Influx-shaped JSON (v2 `{"code", "message"}`, v1 `{"error"}`)."""

from __future__ import annotations

import asyncio
import base64
import binascii

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from webmacs.deps import AuthError, User, authenticate, get_pool, get_runtime, get_settings
from webmacs.exceptions import EngineClosedError, LineProtocolError
from webmacs.security import API_TOKEN_PREFIX
from webmacs.services.ingest import CommitTimeout
from webmacs.services.lineproto import BadBody, BodyTooLarge, gunzip

router = APIRouter(tags=["line protocol"])

#: Points one request may carry (a Telegraf batch is 1000 metrics of a few fields each).
MAX_POINTS = 1_000_000
_PRECISIONS = {"ns", "n", "us", "u", "ms", "s"}


class WriteError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error(v2: bool, e: WriteError) -> JSONResponse:
    body = {"code": e.code, "message": e.message} if v2 else {"error": e.message}
    headers = {"WWW-Authenticate": 'Token realm="webmacs"'} if e.status == 401 else None
    if e.status == 503:
        headers = {"Retry-After": "5"}
    return JSONResponse(body, status_code=e.status, headers=headers)


def _credential(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() in ("token", "bearer") and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            _, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise WriteError(401, "unauthorized", "malformed basic credentials") from None
        return password
    password = request.query_params.get("p", "")
    if password:
        return password
    raise WriteError(401, "unauthorized", "authorization is required (Token wm_…)")


async def _user(request: Request) -> User:
    token = _credential(request)
    if not token.startswith(API_TOKEN_PREFIX):
        raise WriteError(401, "unauthorized", "line protocol writes need a WebMACS API token (wm_…)")
    try:
        async with get_pool(request).connection(timeout=10) as conn:
            user = await authenticate(conn, get_settings(request), token)
    except AuthError as e:
        raise WriteError(401, "unauthorized", e.detail) from e
    if not user.at_least("operator"):
        raise WriteError(403, "forbidden", "operator privileges required")
    return user


async def _write(request: Request, precision: str) -> None:
    if precision not in _PRECISIONS:
        raise WriteError(400, "invalid", f"invalid precision {precision[:20]!r} (ns, us, ms or s)")
    user = await _user(request)
    settings = get_settings(request)
    limit = settings.webmacs_lp_max_body_bytes
    body = await request.body()
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding == "gzip":
        try:
            body = await asyncio.to_thread(gunzip, body, limit)
        except BodyTooLarge as e:
            raise WriteError(413, "request too large", str(e)) from e
        except BadBody as e:
            raise WriteError(400, "invalid", str(e)) from e
    elif encoding not in ("", "identity"):
        raise WriteError(415, "invalid", f"unsupported content encoding {encoding[:20]!r}")
    if len(body) > limit:
        raise WriteError(413, "request too large", f"body exceeds {limit} bytes")
    lp = get_runtime(request).lineproto
    try:
        batch = await lp.parse(body, "us" if precision == "u" else "ns" if precision == "n" else precision, MAX_POINTS)
    except LineProtocolError as e:
        lp.rejected["bad_line"] += 1
        if e.line == 0:
            raise WriteError(413, "request too large", str(e)) from e
        raise WriteError(400, "invalid", f"unable to parse body: {e}") from e
    try:
        await lp.write(batch, user)
    except CommitTimeout as e:
        raise WriteError(503, "unavailable", f"points not written within {e.waited_s:g} s; retry") from e
    except EngineClosedError as e:
        raise WriteError(503, "unavailable", "server is shutting down; retry") from e


@router.post("/api/v2/write", status_code=204, response_class=Response)
async def write_v2(request: Request, precision: str = "ns", org: str = "", bucket: str = "") -> Response:
    """InfluxDB 2 write: `org` and `bucket` are accepted and ignored (every point goes to the datapoints table)."""
    try:
        await _write(request, precision)
    except WriteError as e:
        return _error(True, e)
    return Response(status_code=204)


@router.post("/write", status_code=204, response_class=Response)
async def write_v1(request: Request, precision: str = "ns", db: str = "") -> Response:
    """InfluxDB 1 write: `db` (and `rp`) are accepted and ignored."""
    try:
        await _write(request, precision)
    except WriteError as e:
        return _error(False, e)
    return Response(status_code=204)


@router.api_route("/ping", methods=["GET", "HEAD"], status_code=204, response_class=Response, include_in_schema=False)
async def ping() -> Response:
    """What Influx clients and Telegraf probe before writing."""
    return Response(status_code=204, headers={"X-Influxdb-Version": "1.8-webmacs"})
