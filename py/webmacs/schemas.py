"""Pydantic request/response models shared across routers (resource-specific ones live with their router)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class UserRole(StrEnum):
    admin = "admin"
    operator = "operator"
    viewer = "viewer"


class ApiModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class UserResponse(ApiModel):
    public_id: str
    email: str
    username: str
    role: UserRole
    admin: bool
    registered_on: datetime | None
    sso_provider: str | None = None
