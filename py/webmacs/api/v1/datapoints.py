"""Datapoints read side (spec §4.2): list, get and delete by the derived id `<event public_id>@<µs>`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from webmacs.deps import Conn, OperatorUser, ReadConn, ReaderUser, datapoints_deleted
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import datapoints as datapoints_repo

router = APIRouter(prefix="/datapoints", tags=["datapoints"])


class DatapointResponse(BaseModel):
    public_id: str
    value: float
    timestamp: datetime
    event_public_id: str
    experiment_public_id: str | None


def to_response(row: dict[str, Any]) -> DatapointResponse:
    """From a row with `time`, `value`, `event_public_id`, `experiment_public_id` (public_id is derived)."""
    return DatapointResponse(
        public_id=datapoints_repo.datapoint_public_id(row["event_public_id"], row["time"]),
        value=row["value"],
        timestamp=row["time"],
        event_public_id=row["event_public_id"],
        experiment_public_id=row["experiment_public_id"],
    )


@router.get("", response_model=Page[DatapointResponse])
async def list_datapoints(_: ReaderUser, conn: ReadConn, paging: Paging) -> Page[DatapointResponse]:
    total, rows = await datapoints_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.get("/{public_id}", response_model=DatapointResponse)
async def get_datapoint(public_id: str, _: ReaderUser, conn: ReadConn) -> DatapointResponse:
    return to_response(await datapoints_repo.by_public_id(conn, public_id=public_id))


@router.delete("/{public_id}", response_model=Status)
async def delete_datapoint(public_id: str, _: OperatorUser, conn: Conn, request: Request) -> Status:
    await datapoints_repo.delete(conn, public_id=public_id)
    parsed = datapoints_repo.parse_datapoint_public_id(public_id)
    datapoints_deleted(request, [parsed[0]] if parsed else None)
    return Status.ok("Datapoint successfully deleted.")
