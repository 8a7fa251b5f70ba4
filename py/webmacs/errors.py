"""Domain errors raised by repositories and services; mapped to HTTP in one place (`install_handlers`)."""

from __future__ import annotations

import logging
import math
import reprlib
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout

log = logging.getLogger("webmacs.errors")


class DomainError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    status_code = 404

    @classmethod
    def entity(cls, entity: str, public_id: str) -> NotFound:
        return cls(f"{entity} '{public_id}' not found.")


class Conflict(DomainError):
    status_code = 409

    @classmethod
    def exists(cls, entity: str) -> Conflict:
        return cls(f"{entity} already exists.")


class Forbidden(DomainError):
    status_code = 403


class BadRequest(DomainError):
    status_code = 400


class Unprocessable(DomainError):
    status_code = 422


class TooLarge(DomainError):
    status_code = 413


class Unavailable(DomainError):
    """Not now (a full queue, a stalled write, too many exports): retry after `retry_after` seconds."""

    status_code = 503

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class TooManyRequests(Unavailable):
    """Throttled (failed logins): retry after `retry_after` seconds."""

    status_code = 429


def install_handlers(app: FastAPI) -> None:
    async def _domain(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DomainError)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    async def _validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [_bounded_error(e) for e in exc.errors()[:MAX_ERRORS]]
        return JSONResponse({"detail": _json_safe(jsonable_encoder(errors))}, status_code=422)

    async def _database(_: Request, exc: Exception) -> JSONResponse:
        # The database is unreachable or stopped answering (a pool timeout, a lost connection): not a bug of
        # the request, and not a 500. The details stay in the log.
        log.warning("database unavailable: %s", exc)
        return JSONResponse(
            {"detail": "Database unavailable; retry later."}, status_code=503, headers={"Retry-After": "5"}
        )

    app.add_exception_handler(DomainError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(psycopg.OperationalError, _database)
    app.add_exception_handler(PoolTimeout, _database)


#: 422 answers list at most this many errors, and echo at most this many characters of an offending input.
MAX_ERRORS = 100
MAX_ECHO = 100
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 4, 4, 4
_REPR.maxstring = _REPR.maxother = MAX_ECHO


def _small(value: Any, budget: list[int], depth: int = 0) -> bool:
    """Whether `value` is small enough to echo as it is (walks at most a few levels and items)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > 3:
        return False
    if isinstance(value, str | bytes):
        budget[0] -= len(value) // 8
        return len(value) <= MAX_ECHO and budget[0] >= 0
    if isinstance(value, dict):
        return len(value) <= 8 and all(
            _small(k, budget, depth + 1) and _small(v, budget, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return len(value) <= 8 and all(_small(v, budget, depth + 1) for v in value)
    return True


def _bounded_error(error: Any) -> Any:
    """An error entry whose `input` (and `ctx`) echo at most a short excerpt of what the client sent: a 422
    must not hand a huge body back (and grow the server while encoding it)."""
    if not isinstance(error, dict):
        return error
    out = dict(error)
    for key in ("input", "ctx"):
        if isinstance(out.get(key), bytes):
            # A body that is not UTF-8 (sent without a JSON content type): echoed as text, never a 500.
            out[key] = out[key].decode("utf-8", "replace")
        if key in out and not _small(out[key], [64]):
            out[key] = _REPR.repr(out[key])[: MAX_ECHO * 2]
    return out


def _json_safe(value: Any) -> Any:
    """FastAPI echoes the offending input in 422 details; a NaN/Infinity literal there would make the
    error response itself unserialisable (a 500). Non-finite floats are reported as strings instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
