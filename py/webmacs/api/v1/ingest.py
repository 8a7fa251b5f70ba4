"""Datapoint ingest over REST (spec §4.2, §6): single and batch create through the engine, latest values.

Both creates hand the body's bytes to the engine, which parses and validates them (the same function for every
protocol). The request then waits, holding no pooled connection, until its rows are written: 201 after the
commit, 503 when the database does not take them within `WEBMACS_INGEST_ACK_TIMEOUT_S`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from webmacs._core import Receipt
from webmacs.deps import CurrentUser, IngestUser, User, get_ingest
from webmacs.epoch import from_micros
from webmacs.errors import Conflict, Forbidden, NotFound, TooLarge, Unavailable
from webmacs.exceptions import EngineClosedError, FrameTooLargeError, InvalidFrameError, QueueFullError
from webmacs.pagination import Status
from webmacs.repositories.datapoints import datapoint_public_id
from webmacs.services.ingest import CommitTimeout, Ingest

router = APIRouter(prefix="/datapoints", tags=["datapoints"])

MAX_BATCH = 500
RETRY_AFTER_S = 1
QUEUE_FULL = "Ingest queue is full; retry later."
QUEUE_SHARE_FULL = "Ingest queue is full for this sender; retry later."


class DatapointCreate(BaseModel):
    # NaN/inf are refused here (the reference stores them); the engine refuses them on every path.
    model_config = ConfigDict(allow_inf_nan=False)

    value: float
    event_public_id: str
    # Any JSON value: the engine parses and range-checks it (1970-01-01 .. now + 5 min), as on every path.
    timestamp: Any = Field(
        default=None,
        description="Optional client time: RFC 3339, or epoch milliseconds (1970-01-01 to now + 5 min). "
        "Server time otherwise.",
        json_schema_extra={"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}, {"type": "null"}]},
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
    "timestamp_too_old": ("timestamp", "datetime_past", "Timestamp is before 1970-01-01T00:00:00Z"),
}


def _submit(ingest: Ingest, frame: bytes, user: User) -> Receipt:
    try:
        return ingest.submit(frame, strict=True, source=user.ingest_source, instance=user.plugin_instance_id)
    except QueueFullError as e:
        raise Unavailable(QUEUE_SHARE_FULL if e.share else QUEUE_FULL, retry_after=RETRY_AFTER_S) from e
    except EngineClosedError as e:
        raise Unavailable("Server is shutting down; retry later.", retry_after=RETRY_AFTER_S) from e


def _fault(last_error: str | None) -> str:
    """What to tell a client about a write that did not happen in time (no internals beyond the kind of fault)."""
    text = (last_error or "").lower()
    if "53100" in text or "no space left" in text or "disk full" in text:
        return "the database is out of disk space"
    if "no answer" in text or "timed out" in text:
        return "the database is not answering"
    if last_error:
        return "the database is unavailable"
    return "the database is overloaded"


async def _written(ingest: Ingest, receipt: Receipt) -> list[tuple[int, str, str]]:
    """Wait for the receipt's rows to be written; returns the entries the database refused."""
    try:
        await ingest.wait_committed(receipt.ticket)
    except CommitTimeout as e:
        raise Unavailable(
            f"Datapoints not written within {e.waited_s:g} s: {_fault(e.last_error)}. They stay queued and may "
            "still be stored; resend with client timestamps to avoid duplicates.",
            retry_after=5,
        ) from e
    except EngineClosedError as e:
        raise Unavailable("Server shut down before the datapoints were written; retry.", retry_after=5) from e
    return receipt.refused()


def _refusal_errors(refused: list[tuple[int, str, str]], loc: list[str | int]) -> list[dict[str, Any]]:
    return [
        {
            "type": "database_refused",
            "loc": [*loc, index] if len(loc) > 1 else loc,
            "msg": f"The database refused the datapoint: {message}",
            "input": None,
            "ctx": {"sqlstate": sqlstate},
        }
        for index, sqlstate, message in refused
    ]


@router.post("", status_code=201, response_model=Status)
async def create_datapoint(body: DatapointCreate, user: IngestUser, request: Request) -> Status:
    ingest = get_ingest(request)
    # The body was valid JSON holding one object (FastAPI parsed it): as the one entry of a frame, the engine
    # validates it exactly as it validates every other datapoint.
    raw = await request.body()
    receipt = _submit(ingest, b'{"datapoints":[' + raw + b"]}", user)
    if receipt.accepted == 0:
        reasons = receipt.reasons
        if "unknown_event" in reasons:
            raise NotFound("Event not found.")
        if "inactive_event" in reasons:
            raise Conflict("Event is not linked to an enabled plugin instance.")
        if "not_permitted" in reasons:
            raise Forbidden("This API token may not write to this event.")
        reason = next(iter(reasons), "invalid_value")
        field, typ, msg = _REASON_ERRORS.get(reason, (None, reason, reason))
        raise RequestValidationError(
            [{"type": typ, "loc": ["body", field] if field else ["body"], "msg": msg, "input": body.timestamp}]
        )
    refused = await _written(ingest, receipt)
    if refused:
        raise RequestValidationError(_refusal_errors(refused, ["body"]))
    return Status.ok("1 datapoint successfully created.")


def _batch_schema() -> dict[str, Any]:
    # The body is read raw (the engine parses it), so FastAPI cannot infer it: declare it. DatapointCreate
    # itself is in the components already (the single create uses it).
    schema = DatapointBatch.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class BatchStatus(Status):
    #: Entries the database refused when they were written (only present when some were).
    rejected: int | None = None


@router.post(
    "/batch",
    status_code=201,
    response_model=BatchStatus,
    response_model_exclude_none=True,
    openapi_extra=_batch_schema(),
)
async def create_batch(request: Request, user: IngestUser) -> BatchStatus:
    """Up to 500 datapoints in one transaction. Unknown events and events not linked to an enabled plugin
    instance are dropped silently (spec §4.2); a malformed entry fails the request (422). Entries the database
    refuses when they are written are counted in `rejected`; the others are stored."""
    ingest = get_ingest(request)
    body = await request.body()
    try:
        receipt = _submit(ingest, body, user)
    except InvalidFrameError as e:
        if e.code == "not_object":
            raise RequestValidationError(
                [
                    {
                        "type": "model_attributes_type",
                        "loc": ["body"],
                        "msg": "Input should be a valid dictionary or object to extract fields from",
                        "input": body[:200].decode("utf-8", "replace"),
                    }
                ]
            ) from e
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ["body", 0],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": str(e)[:200]},
                }
            ]
        ) from e
    except FrameTooLargeError as e:
        if e.code == "too_many":
            raise RequestValidationError(
                [
                    {
                        "type": "too_long",
                        "loc": ["body", "datapoints"],
                        "msg": f"List should have at most {MAX_BATCH} items after validation, not {e.count}",
                        "input": None,
                        "ctx": {"field_type": "List", "max_length": MAX_BATCH, "actual_length": e.count},
                    }
                ]
            ) from e
        raise TooLarge("Request body too large.") from e
    if not receipt.has_datapoints:
        raise RequestValidationError(
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
        raise RequestValidationError(errors)
    refused = await _written(ingest, receipt)
    # Never a 4xx once other rows are stored: the refused ones are counted instead.
    stored = receipt.accepted - len(refused)
    return BatchStatus(
        status="success", message=f"{stored} datapoints successfully created.", rejected=len(refused) or None
    )


@router.get("/latest", response_model=list[LatestDatapoint])
async def latest(_: CurrentUser, request: Request) -> list[LatestDatapoint]:
    """The latest datapoint of every event that has one (from the engine's cache, no query)."""
    rows = get_ingest(request).engine.latest()
    return [
        LatestDatapoint(
            public_id=datapoint_public_id(event, from_micros(us)),
            value=value,
            timestamp=from_micros(us),
            event_public_id=event,
            experiment_public_id=experiment,
        )
        for event, value, us, experiment in rows
    ]
