"""Threshold rules (spec §4.6, §8), operator+ for everything, with optional hysteresis (clear threshold)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StringConstraints, model_validator

from webmacs.deps import CatalogWrites, Conn, OperatorUser
from webmacs.errors import Unprocessable
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import rules as rules_repo
from webmacs.schemas import NO_NUL, Finite
from webmacs.services.webhooks import WebhookEventType

router = APIRouter(prefix="/rules", tags=["rules"], dependencies=[CatalogWrites])


class RuleOperator(StrEnum):
    gt = "gt"
    lt = "lt"
    eq = "eq"
    gte = "gte"
    lte = "lte"
    between = "between"
    not_between = "not_between"


class RuleActionType(StrEnum):
    webhook = "webhook"
    log = "log"


# PostgreSQL text cannot hold NUL: refuse it as invalid input instead of failing at the database.
Name = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=NO_NUL)]
EventId = Annotated[str, StringConstraints(pattern=NO_NUL)]


# NaN and infinities would make every comparison false (or true) forever.
Level = Finite
# cooldown_seconds is an int4 column.
Cooldown = Annotated[int, Field(ge=0, le=2**31 - 1)]

RANGE_OPERATORS = {RuleOperator.between, RuleOperator.not_between}
HIGH_REQUIRED = "threshold_high is required for between/not_between operators"
HIGH_BELOW = "threshold_high must be >= threshold"


def hysteresis_error(operator: str, threshold: float, clear_threshold: float | None) -> str | None:
    """Why `clear_threshold` does not fit the rule, or None. The value must lie on the non-firing side of
    the threshold (or on it), so that clearing is possible at all; eq and ranges have no such side."""
    if clear_threshold is None:
        return None
    if operator in ("gt", "gte") and clear_threshold > threshold:
        return "clear_threshold must be <= threshold for gt/gte operators"
    if operator in ("lt", "lte") and clear_threshold < threshold:
        return "clear_threshold must be >= threshold for lt/lte operators"
    if operator in ("eq", "between", "not_between"):
        return "clear_threshold must be null for eq/between/not_between operators"
    return None


class RuleCreate(BaseModel):
    name: Name
    event_public_id: EventId
    operator: RuleOperator
    threshold: Level
    threshold_high: Level | None = None
    action_type: RuleActionType
    webhook_event_type: WebhookEventType | None = None
    enabled: bool = True
    cooldown_seconds: Cooldown = 60
    #: Hysteresis (beyond the reference): after firing, re-arm only once the value has cleared this level.
    clear_threshold: Level | None = None
    #: Hysteresis without a separate level: re-arm once the condition is false again.
    rearm_on_clear: bool = False

    @model_validator(mode="after")
    def _check(self) -> RuleCreate:
        if self.operator in RANGE_OPERATORS:
            if self.threshold_high is None:
                raise ValueError(HIGH_REQUIRED)
            if self.threshold_high < self.threshold:
                raise ValueError(HIGH_BELOW)
        err = hysteresis_error(self.operator.value, self.threshold, self.clear_threshold)
        if err:
            raise ValueError(err)
        return self


class RuleUpdate(BaseModel):
    name: Name | None = None
    event_public_id: EventId | None = None
    operator: RuleOperator | None = None
    threshold: Level | None = None
    threshold_high: Level | None = None
    action_type: RuleActionType | None = None
    webhook_event_type: WebhookEventType | None = None
    enabled: bool | None = None
    cooldown_seconds: Cooldown | None = None
    clear_threshold: Level | None = None
    rearm_on_clear: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> RuleUpdate:
        # Only what the body alone decides (as the reference); the merged rule is checked in the handler.
        if self.operator in RANGE_OPERATORS and self.threshold is not None:
            if self.threshold_high is None:
                raise ValueError(HIGH_REQUIRED)
            if self.threshold_high < self.threshold:
                raise ValueError(HIGH_BELOW)
        return self


class RuleResponse(BaseModel):
    public_id: str
    name: str
    event_public_id: str
    operator: RuleOperator
    threshold: float
    threshold_high: float | None
    action_type: RuleActionType
    webhook_event_type: str | None
    enabled: bool
    cooldown_seconds: int
    last_triggered_at: datetime | None
    created_on: datetime
    user_public_id: str | None
    clear_threshold: float | None
    rearm_on_clear: bool


def to_response(row: dict[str, Any]) -> RuleResponse:
    return RuleResponse.model_validate({k: row[k] for k in RuleResponse.model_fields})


# Columns that may not be NULL: an explicit null in a PUT body means "leave as is" (as for users).
_NOT_NULL = {
    "name",
    "event_public_id",
    "operator",
    "threshold",
    "action_type",
    "enabled",
    "cooldown_seconds",
    "rearm_on_clear",
}


@router.get("", response_model=Page[RuleResponse])
async def list_rules(_: OperatorUser, conn: Conn, paging: Paging) -> Page[RuleResponse]:
    total, rows = await rules_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.post("", response_model=Status, status_code=201)
async def create_rule(body: RuleCreate, user: OperatorUser, conn: Conn, request: Request) -> Status:
    await rules_repo.create(conn, values=body.model_dump(mode="json"), user_public_id=user.public_id)
    return Status.ok("Rule successfully created.")


@router.get("/{public_id}", response_model=RuleResponse)
async def get_rule(public_id: str, _: OperatorUser, conn: Conn) -> RuleResponse:
    return to_response(await rules_repo.by_public_id(conn, public_id=public_id))


@router.put("/{public_id}", response_model=Status)
async def update_rule(public_id: str, body: RuleUpdate, _: OperatorUser, conn: Conn, request: Request) -> Status:
    current = await rules_repo.by_public_id(conn, public_id=public_id)
    changes = {
        k: v for k, v in body.model_dump(mode="json", exclude_unset=True).items() if not (v is None and k in _NOT_NULL)
    }
    merged = {**current, **changes}
    if merged["operator"] in RANGE_OPERATORS and merged["threshold_high"] is None:
        raise Unprocessable("threshold_high required for between/not_between operators")
    if merged["threshold_high"] is not None and merged["threshold_high"] < merged["threshold"]:
        raise Unprocessable(HIGH_BELOW)
    err = hysteresis_error(merged["operator"], merged["threshold"], merged["clear_threshold"])
    if err:
        raise Unprocessable(err)
    await rules_repo.update(conn, rule_id=current["id"], changes=changes)
    return Status.ok("Rule successfully updated.")


@router.delete("/{public_id}", response_model=Status)
async def delete_rule(public_id: str, _: OperatorUser, conn: Conn, request: Request) -> Status:
    await rules_repo.delete(conn, public_id=public_id)
    return Status.ok("Rule successfully deleted.")
