"""Datapoint ingest over REST (spec §4.2, §6): single and batch create through the engine, latest values."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from webmacs.deps import CurrentUser, OperatorUser
from webmacs.errors import Conflict, NotFound, TooLarge, Unavailable
from webmacs.exceptions import FrameTooLargeError, InvalidFrameError, QueueFullError
from webmacs.pagination import Status
from webmacs.repositories.datapoints import datapoint_public_id
from webmacs.services.ingest import engine_of, time_of

router = APIRouter(prefix="/datapoints", tags=["datapoints"])

MAX_BATCH = 500
RETRY_AFTER_S = 1
QUEUE_FULL = "Ingest queue is full; retry later."


class DatapointCreate(BaseModel):
    # NaN/inf are refused here (the reference stores them); the engine refuses them on every path.
    model_config = ConfigDict(allow_inf_nan=False)

    value: float
    event_public_id: str
    timestamp: datetime | float | None = Field(
        default=None, description="Optional client time: RFC 3339, or epoch milliseconds. Server time otherwise."
    )


class DatapointBatch(BaseModel):
    datapoints: list[DatapointCreate] = Field(max_length=MAX_BATCH)


class LatestDatapoint(BaseModel):
    public_id: str
    value: float
    timestamp: datetime
    event_public_id: str
    experiment_public_id: str | None


# Per-entry reject reason → (field, pydantic error type, message) for the 422 list shape.
_REASON_ERRORS: dict[str, tuple[str | None, str, str]] = {
    "not_object": (None, "model_type", "Input should be a valid dictionary or instance of DatapointCreate"),
    "missing_value": ("value", "missing", "Field required"),
    "invalid_value": ("value", "float_parsing", "Input should be a valid number, unable to parse string as a number"),
    "non_finite": ("value", "finite_number", "Input should be a finite number"),
    "missing_event": ("event_public_id", "missing", "Field required"),
    "bad_timestamp": ("timestamp", "datetime_parsing", "Input should be a valid datetime (RFC 3339 or epoch ms)"),
    "far_future_timestamp": ("timestamp", "datetime_future", "Timestamp is more than 5 minutes in the future"),
}


def _validation_error(errors: list[dict[str, Any]]) -> RequestValidationError:
    return RequestValidationError(errors)


@router.post("", status_code=201, response_model=Status)
async def create_datapoint(body: DatapointCreate, _: OperatorUser, request: Request) -> Status:
    ingest = engine_of(request.app)
    time_us = _client_time_us(body.timestamp)
    try:
        receipt = ingest.engine.submit_points([(body.event_public_id, body.value, time_us)])
    except QueueFullError as e:
        raise Unavailable(QUEUE_FULL, retry_after=RETRY_AFTER_S) from e
    if receipt.accepted == 0:
        reasons = receipt.reasons
        if "unknown_event" in reasons:
            raise NotFound("Event not found.")
        if "inactive_event" in reasons:
            raise Conflict("Event is not linked to an enabled plugin instance.")
        reason = next(iter(reasons))
        field, typ, msg = _REASON_ERRORS[reason]
        raise _validation_error([{"type": typ, "loc": ["body", field], "msg": msg, "input": body.timestamp}])
    await ingest.wait_committed(receipt.ticket)
    return Status.ok("1 datapoint successfully created.")


def _client_time_us(ts: datetime | float | None) -> int | None:
    if ts is None:
        return None
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=time_of(0).tzinfo)
        return round((ts - time_of(0)).total_seconds() * 1_000_000)
    return round(ts * 1000)


def _batch_schema() -> dict[str, Any]:
    # The body is read raw (the engine parses it), so FastAPI cannot infer it: declare it. DatapointCreate
    # itself is in the components already (the single create uses it).
    schema = DatapointBatch.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@router.post("/batch", status_code=201, response_model=Status, openapi_extra=_batch_schema())
async def create_batch(request: Request, _: OperatorUser) -> Status:
    """Up to 500 datapoints in one transaction. Unknown events and events not linked to an enabled plugin
    instance are dropped silently (spec §4.2); a malformed entry fails the request (422)."""
    ingest = engine_of(request.app)
    body = await request.body()
    try:
        receipt = ingest.submit(body, strict=True)
    except InvalidFrameError as e:
        if "not a JSON object" in str(e):
            raise _validation_error(
                [
                    {
                        "type": "model_attributes_type",
                        "loc": ["body"],
                        "msg": "Input should be a valid dictionary or object to extract fields from",
                        "input": body.decode("utf-8", "replace")[:200],
                    }
                ]
            ) from e
        raise _validation_error(
            [
                {
                    "type": "json_invalid",
                    "loc": ["body", 0],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": str(e)},
                }
            ]
        ) from e
    except FrameTooLargeError as e:
        message = str(e)
        if message.startswith("Batch too large"):
            n = int(message.split("(", 1)[1].split(")", 1)[0])
            raise _validation_error(
                [
                    {
                        "type": "too_long",
                        "loc": ["body", "datapoints"],
                        "msg": f"List should have at most {MAX_BATCH} items after validation, not {n}",
                        "input": None,
                        "ctx": {"field_type": "List", "max_length": MAX_BATCH, "actual_length": n},
                    }
                ]
            ) from e
        raise TooLarge("Request body too large.") from e
    except QueueFullError as e:
        raise Unavailable(QUEUE_FULL, retry_after=RETRY_AFTER_S) from e
    if not receipt.has_datapoints:
        raise _validation_error(
            [{"type": "missing", "loc": ["body", "datapoints"], "msg": "Field required", "input": None}]
        )
    errors = []
    for index, reason in receipt.rejects:
        if reason not in _REASON_ERRORS:
            continue  # unknown / inactive events: dropped silently
        field, typ, msg = _REASON_ERRORS[reason]
        loc: list[str | int] = ["body", "datapoints", index]
        if field:
            loc.append(field)
        errors.append({"type": typ, "loc": loc, "msg": msg, "input": None})
    if errors:
        raise _validation_error(errors)
    await ingest.wait_committed(receipt.ticket)
    return Status.ok(f"{receipt.accepted} datapoints successfully created.")


@router.get("/latest", response_model=list[LatestDatapoint])
async def latest(_: CurrentUser, request: Request) -> list[LatestDatapoint]:
    """The latest datapoint of every event that has one (from the engine's cache, no query)."""
    rows = engine_of(request.app).engine.latest()
    return [
        LatestDatapoint(
            public_id=datapoint_public_id(event, time_of(us)),
            value=value,
            timestamp=time_of(us),
            event_public_id=event,
            experiment_public_id=experiment,
        )
        for event, value, us, experiment in rows
    ]
