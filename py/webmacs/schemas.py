"""Pydantic request/response models shared across routers (resource-specific ones live with their router)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

#: PostgreSQL text cannot hold NUL: string fields refuse it as invalid input (422) instead of failing at the driver.
NO_NUL = r"^[^\x00]*$"

#: A float that must be finite. NaN/Infinity literals in a body fail validation; the 422 handler reports them
#: as text (errors.install_handlers), since JSON cannot carry them.
Finite = Annotated[float, Field(allow_inf_nan=False)]


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
