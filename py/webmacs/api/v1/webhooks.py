"""Webhooks (spec §4.5, §9), admin only: CRUD with an SSRF check on the URL, and the delivery records."""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field, StringConstraints

from webmacs.deps import AdminUser, Conn, SettingsDep
from webmacs.errors import Unprocessable
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import webhooks as webhooks_repo
from webmacs.schemas import NO_NUL
from webmacs.services import ssrf
from webmacs.services.webhooks import WebhookEventType
from webmacs.settings import Settings

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

# PostgreSQL text cannot hold NUL: refuse it as invalid input instead of failing at the database.
Url = Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=r"^https?://[^\x00]*$")]
Secret = Annotated[str, StringConstraints(max_length=255, pattern=NO_NUL)]


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"
    dead_letter = "dead_letter"


class WebhookCreate(BaseModel):
    url: Url
    secret: Secret | None = None
    events: Annotated[list[WebhookEventType], Field(min_length=1)]
    enabled: bool = True


class WebhookUpdate(BaseModel):
    url: Url | None = None
    secret: Secret | None = None
    events: list[WebhookEventType] | None = None
    enabled: bool | None = None


class WebhookResponse(BaseModel):
    public_id: str
    url: str
    events: list[str]
    enabled: bool
    created_on: datetime
    user_public_id: str | None


class WebhookDeliveryResponse(BaseModel):
    public_id: str
    event_type: str
    status: str
    attempts: int
    last_error: str | None
    response_code: int | None
    created_on: datetime
    delivered_on: datetime | None


def _events(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def to_response(row: dict[str, Any]) -> WebhookResponse:
    return WebhookResponse(
        public_id=row["public_id"],
        url=row["url"],
        events=_events(row["events"]),
        enabled=row["enabled"],
        created_on=row["created_on"],
        user_public_id=row["user_public_id"],
    )


async def _check_url(url: str, settings: Settings) -> None:
    reason = await ssrf.vet_for_config(url, settings.webmacs_webhook_allow_hosts)
    if reason:
        raise Unprocessable(
            f"Webhook URL refused: {reason}. Private, loopback and link-local targets are "
            "blocked unless the host is in WEBMACS_WEBHOOK_ALLOW_HOSTS."
        )


@router.get("", response_model=Page[WebhookResponse])
async def list_webhooks(_: AdminUser, conn: Conn, paging: Paging) -> Page[WebhookResponse]:
    total, rows = await webhooks_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.post("", response_model=Status, status_code=201)
async def create_webhook(body: WebhookCreate, user: AdminUser, conn: Conn, settings: SettingsDep) -> Status:
    await _check_url(body.url, settings)
    events = json.dumps([e.value for e in body.events])
    await webhooks_repo.create(
        conn, url=body.url, secret=body.secret, events=events, enabled=body.enabled, user_public_id=user.public_id
    )
    return Status.ok("Webhook successfully created.")


@router.get("/{public_id}", response_model=WebhookResponse)
async def get_webhook(public_id: str, _: AdminUser, conn: Conn) -> WebhookResponse:
    return to_response(await webhooks_repo.by_public_id(conn, public_id=public_id))


@router.put("/{public_id}", response_model=Status)
async def update_webhook(
    public_id: str, body: WebhookUpdate, _: AdminUser, conn: Conn, settings: SettingsDep
) -> Status:
    current = await webhooks_repo.by_public_id(conn, public_id=public_id)
    changes = body.model_dump(exclude_unset=True)
    for key in ("url", "events", "enabled"):
        if key in changes and changes[key] is None:
            del changes[key]  # explicit null on a NOT NULL column means "leave as is"
    if "url" in changes:
        await _check_url(changes["url"], settings)
    if "events" in changes:
        changes["events"] = json.dumps([WebhookEventType(e).value for e in changes["events"]])
    await webhooks_repo.update(conn, webhook_id=current["id"], changes=changes)
    return Status.ok("Webhook successfully updated.")


@router.delete("/{public_id}", response_model=Status)
async def delete_webhook(public_id: str, _: AdminUser, conn: Conn) -> Status:
    await webhooks_repo.delete(conn, public_id=public_id)
    return Status.ok("Webhook successfully deleted.")


@router.get("/{public_id}/deliveries", response_model=Page[WebhookDeliveryResponse])
async def list_deliveries(
    public_id: str, _: AdminUser, conn: Conn, paging: Paging, status: DeliveryStatus | None = None
) -> Page[WebhookDeliveryResponse]:
    hook = await webhooks_repo.by_public_id(conn, public_id=public_id)
    total, rows = await webhooks_repo.deliveries_page(
        conn,
        webhook_id=hook["id"],
        status=status.value if status else None,
        limit=paging.limit,
        offset=paging.offset,
    )
    return Page.of(paging, total, [WebhookDeliveryResponse.model_validate(r) for r in rows])
