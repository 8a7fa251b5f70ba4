"""The audit log (spec §4.4, §14): list newest first, create, get, mark read. No delete (405)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, StringConstraints

from webmacs.deps import Conn, CurrentUser, OperatorUser
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import logs as logs_repo
from webmacs.schemas import NO_NUL

router = APIRouter(prefix="/logging", tags=["logging"])

# PostgreSQL text cannot hold NUL; refusing it here keeps such input a 422 instead of a driver error.


class LoggingType(StrEnum):
    error = "error"
    warning = "warning"
    info = "info"


class StatusType(StrEnum):
    read = "read"
    unread = "unread"


class LogEntryCreate(BaseModel):
    content: Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=NO_NUL)]
    logging_type: LoggingType = LoggingType.info


class LogEntryUpdate(BaseModel):
    status_type: StatusType | None = None
    content: Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL)] | None = None


class LogEntryResponse(BaseModel):
    public_id: str
    content: str
    logging_type: LoggingType | None
    status_type: StatusType
    created_on: datetime
    user_public_id: str | None


def to_response(row: dict[str, Any]) -> LogEntryResponse:
    return LogEntryResponse(
        public_id=row["public_id"],
        content=row["content"],
        logging_type=row["logging_type"],
        status_type=row["status_type"],
        created_on=row["created_on"],
        user_public_id=row["user_public_id"],
    )


@router.get("", response_model=Page[LogEntryResponse])
async def list_log_entries(_: CurrentUser, conn: Conn, paging: Paging) -> Page[LogEntryResponse]:
    total, rows = await logs_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.post("", response_model=Status, status_code=201)
async def create_log_entry(body: LogEntryCreate, user: OperatorUser, conn: Conn) -> Status:
    await logs_repo.create(
        conn, content=body.content, logging_type=body.logging_type.value, user_public_id=user.public_id
    )
    return Status.ok("Log entry successfully created.")


@router.get("/{public_id}", response_model=LogEntryResponse)
async def get_log_entry(public_id: str, _: CurrentUser, conn: Conn) -> LogEntryResponse:
    return to_response(await logs_repo.by_public_id(conn, public_id=public_id))


@router.put("/{public_id}", response_model=Status)
async def update_log_entry(public_id: str, body: LogEntryUpdate, _: OperatorUser, conn: Conn) -> Status:
    # An explicit null for a NOT NULL column means "leave as is".
    changes = {k: v for k, v in body.model_dump(exclude_unset=True, mode="json").items() if v is not None}
    await logs_repo.update(conn, public_id=public_id, changes=changes)
    return Status.ok("LogEntry successfully updated.")
