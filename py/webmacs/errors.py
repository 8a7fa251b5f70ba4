"""Domain errors raised by repositories and services; mapped to HTTP in one place (`install_handlers`)."""

from __future__ import annotations

from fastapi import FastAPI, Request
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

    app.add_exception_handler(DomainError, _domain)
