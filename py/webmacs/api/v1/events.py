"""Events — sensor/actuator channel definitions (spec §4.1)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, StringConstraints

from webmacs.deps import CatalogWrites, Conn, CurrentUser, OperatorUser
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import events as events_repo
from webmacs.schemas import NO_NUL, Finite

router = APIRouter(prefix="/events", tags=["events"], dependencies=[CatalogWrites])

# PostgreSQL text cannot hold NUL; refusing it here keeps such input a 422 instead of a driver error.
Name = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=NO_NUL)]


class EventType(StrEnum):
    sensor = "sensor"
    actuator = "actuator"
    range = "range"
    cmd_button = "cmd_button"
    cmd_opened = "cmd_opened"
    cmd_closed = "cmd_closed"


class EventCreate(BaseModel):
    name: Name
    min_value: Finite
    max_value: Finite
    unit: Name
    type: EventType


class EventUpdate(BaseModel):
    name: Annotated[str, StringConstraints(max_length=255, pattern=NO_NUL)] | None = None
    min_value: Finite | None = None
    max_value: Finite | None = None
    unit: Name | None = None
    type: EventType | None = None


class EventResponse(BaseModel):
    public_id: str
    name: str
    min_value: float
    max_value: float
    unit: str
    type: EventType
    user_public_id: str | None


def to_response(row: dict[str, Any]) -> EventResponse:
    return EventResponse(
        public_id=row["public_id"],
        name=row["name"],
        min_value=row["min_value"],
        max_value=row["max_value"],
        unit=row["unit"],
        type=row["type"],
        user_public_id=row["user_public_id"],
    )


@router.get("", response_model=Page[EventResponse])
async def list_events(_: CurrentUser, conn: Conn, paging: Paging) -> Page[EventResponse]:
    total, rows = await events_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.post("", response_model=Status, status_code=201)
async def create_event(body: EventCreate, user: OperatorUser, conn: Conn, request: Request) -> Status:
    await events_repo.create(
        conn,
        name=body.name,
        min_value=body.min_value,
        max_value=body.max_value,
        unit=body.unit,
        type=body.type.value,
        user_public_id=user.public_id,
    )
    return Status.ok("Event successfully created.")


@router.get("/{public_id}", response_model=EventResponse)
async def get_event(public_id: str, _: CurrentUser, conn: Conn) -> EventResponse:
    return to_response(await events_repo.by_public_id(conn, public_id=public_id))


@router.put("/{public_id}", response_model=Status)
async def update_event(public_id: str, body: EventUpdate, _: OperatorUser, conn: Conn, request: Request) -> Status:
    # An explicit null for a NOT NULL column means "leave as is".
    changes = {k: v for k, v in body.model_dump(exclude_unset=True, mode="json").items() if v is not None}
    await events_repo.update(conn, public_id=public_id, changes=changes)
    return Status.ok("Event successfully updated.")


@router.delete("/{public_id}", response_model=Status)
async def delete_event(public_id: str, _: OperatorUser, conn: Conn, request: Request) -> Status:
    await events_repo.delete(conn, public_id=public_id)
    return Status.ok("Event successfully deleted.")
