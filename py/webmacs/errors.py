"""Domain errors raised by repositories and services; mapped to HTTP in one place (`install_handlers`)."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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
    """The ingest queue is full; the client should retry after `retry_after` seconds."""

    status_code = 503

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


def install_handlers(app: FastAPI) -> None:
    async def _domain(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DomainError)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    async def _validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    app.add_exception_handler(DomainError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)


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
