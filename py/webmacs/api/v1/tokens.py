"""API tokens (spec §3.7): `wm_` tokens shown once, stored as SHA-256."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field, field_validator

from webmacs.deps import Conn, CurrentUser
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import plugins as plugins_repo
from webmacs.repositories import users as users_repo
from webmacs.schemas import NO_NUL
from webmacs.security import hash_api_token, new_api_token

router = APIRouter(prefix="/tokens", tags=["tokens"])


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=255, pattern=NO_NUL)  # PostgreSQL text cannot hold NUL
    expires_at: datetime | None = None
    #: "full": the token acts as its user; "write": ingest only (REST, WebSocket, MQTT, line protocol).
    scope: Literal["full", "write"] = "full"
    #: Limit ingest to the events mapped to this plugin instance (points for other events are rejected).
    plugin_instance_public_id: str | None = Field(default=None, min_length=1, max_length=100, pattern=NO_NUL)

    @field_validator("expires_at")
    @classmethod
    def _representable_in_utc(cls, v: datetime | None) -> datetime | None:
        # 9999-12-31T23:00-05:00 is year 10000 in UTC: PostgreSQL stores it, Python cannot read it back.
        if v is not None and v.tzinfo is not None:
            try:
                v.astimezone(UTC)
            except OverflowError as e:
                raise ValueError("expires_at is out of range") from e
        return v


class TokenCreated(BaseModel):
    public_id: str
    name: str
    token: str
    expires_at: datetime | None
    created_at: datetime
    scope: str = "full"
    plugin_instance_public_id: str | None = None


class TokenResponse(BaseModel):
    public_id: str
    name: str
    last_used_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
    user_public_id: str
    scope: str
    plugin_instance_public_id: str | None


@router.get("", response_model=Page[TokenResponse])
async def list_tokens(user: CurrentUser, conn: Conn, paging: Paging) -> Page[TokenResponse]:
    total, rows = await users_repo.tokens_page(
        conn, user_id=None if user.admin else user.id, limit=paging.limit, offset=paging.offset
    )
    return Page.of(paging, total, [TokenResponse.model_validate(r) for r in rows])


@router.post("", response_model=TokenCreated, status_code=201)
async def create_token(body: TokenCreate, user: CurrentUser, conn: Conn) -> TokenCreated:
    instance_id = None
    if body.plugin_instance_public_id is not None:
        instance = await plugins_repo.find(conn, public_id=body.plugin_instance_public_id)
        if instance is None:
            raise HTTPException(404, "Plugin instance not found.")
        instance_id = instance["id"]
    token = new_api_token()
    row = await users_repo.create_token(
        conn,
        user_id=user.id,
        name=body.name,
        token_hash=hash_api_token(token),
        expires_at=body.expires_at,
        scope=body.scope,
        plugin_instance_id=instance_id,
    )
    # Echo expires_at as given (a naive value stays naive on create, as the reference does).
    return TokenCreated(
        public_id=row["public_id"],
        name=row["name"],
        token=token,
        expires_at=body.expires_at,
        created_at=row["created_at"],
        scope=row["scope"],
        plugin_instance_public_id=body.plugin_instance_public_id,
    )


@router.delete("/{public_id}", response_model=Status)
async def delete_token(public_id: str, user: CurrentUser, conn: Conn) -> Status:
    row = await users_repo.token_by_public_id(conn, public_id=public_id)
    if row is None:
        raise HTTPException(404, "API token not found.")
    if not user.admin and row["user_id"] != user.id:
        raise HTTPException(403, "Cannot delete another user's token.")
    await users_repo.delete_token(conn, token_id=row["id"])
    return Status.ok("API token deleted.")
