"""Experiments (spec §4.3, §13): start, rename, stop, delete, and the streamed CSV export."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, StringConstraints

from webmacs.deps import (
    CatalogWrites,
    Conn,
    CurrentUser,
    OperatorUser,
    ReadConn,
    ReaderUser,
    RuntimeDep,
    datapoints_deleted,
    read_dsn,
)
from webmacs.errors import Unavailable
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import experiments as experiments_repo
from webmacs.repositories import logs as logs_repo
from webmacs.schemas import NO_NUL
from webmacs.services import csv_export, webhooks

router = APIRouter(prefix="/experiments", tags=["experiments"], dependencies=[CatalogWrites])

# PostgreSQL text cannot hold NUL; refusing it here keeps such input a 422 instead of a driver error.


class ExperimentCreate(BaseModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=NO_NUL)]


class ExperimentUpdate(BaseModel):
    name: Annotated[str, StringConstraints(max_length=255, pattern=NO_NUL)] | None = None


class ExperimentResponse(BaseModel):
    public_id: str
    name: str
    started_on: datetime
    stopped_on: datetime | None
    user_public_id: str | None


def to_response(row: dict[str, Any]) -> ExperimentResponse:
    return ExperimentResponse(
        public_id=row["public_id"],
        name=row["name"],
        started_on=row["started_on"],
        stopped_on=row["stopped_on"],
        user_public_id=row["user_public_id"],
    )


@router.get("", response_model=Page[ExperimentResponse])
async def list_experiments(_: CurrentUser, conn: Conn, paging: Paging) -> Page[ExperimentResponse]:
    total, rows = await experiments_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.post("", response_model=Status, status_code=201)
async def start_experiment(body: ExperimentCreate, user: OperatorUser, conn: Conn, request: Request) -> Status:
    await experiments_repo.create(conn, name=body.name, user_public_id=user.public_id)
    await logs_repo.create(
        conn, content=f"Experiment '{body.name}' started.", logging_type="info", user_public_id=user.public_id
    )
    await webhooks.enqueue(conn, event_type="experiment.started", experiment=body.name)
    return Status.ok("Experiment successfully created.")


@router.get("/{public_id}", response_model=ExperimentResponse)
async def get_experiment(public_id: str, _: CurrentUser, conn: Conn) -> ExperimentResponse:
    return to_response(await experiments_repo.by_public_id(conn, public_id=public_id))


@router.put("/{public_id}", response_model=Status)
async def rename_experiment(
    public_id: str, body: ExperimentUpdate, _: OperatorUser, conn: Conn, request: Request
) -> Status:
    if body.name is None:
        await experiments_repo.by_public_id(conn, public_id=public_id)  # still 404 for an unknown id
    else:
        await experiments_repo.rename(conn, public_id=public_id, name=body.name)
    return Status.ok("Experiment successfully updated.")


@router.put("/{public_id}/stop", response_model=Status)
async def stop_experiment(public_id: str, user: OperatorUser, conn: Conn, request: Request) -> Status:
    experiment = await experiments_repo.stop(conn, public_id=public_id)
    await logs_repo.create(
        conn, content=f"Experiment '{experiment['name']}' stopped.", logging_type="info", user_public_id=user.public_id
    )
    await webhooks.enqueue(conn, event_type="experiment.stopped", experiment=experiment["name"])
    return Status.ok("Experiment successfully stopped.")


@router.get(
    "/{public_id}/export/csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "The experiment's datapoints as CSV."}},
)
async def export_csv(
    public_id: str, _: ReaderUser, conn: ReadConn, rt: RuntimeDep, request: Request
) -> StreamingResponse:
    experiment = await experiments_repo.by_public_id(conn, public_id=public_id)
    slots = rt.export_slots
    if not slots.try_acquire():
        raise Unavailable("Too many exports are running; retry later.", retry_after=5)
    body = csv_export.experiment_csv(
        read_dsn(request),
        experiment_id=experiment["id"],
        guard=rt.settings.webmacs_csv_formula_guard,
    )

    async def released() -> AsyncIterator[bytes]:
        try:
            async for piece in body:
                yield piece
        finally:
            slots.release()

    return StreamingResponse(
        released(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": csv_export.content_disposition(experiment["name"], experiment["public_id"]),
        },
    )


@router.delete("/{public_id}", response_model=Status)
async def delete_experiment(public_id: str, _: OperatorUser, conn: Conn, request: Request) -> Status:
    await experiments_repo.delete(conn, public_id=public_id)
    datapoints_deleted(request)  # its datapoints may include any event's latest value
    return Status.ok("Experiment successfully deleted.")
