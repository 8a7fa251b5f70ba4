"""Users (spec §3.8): admin CRUD, self-service profile updates."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, EmailStr, StringConstraints

from webmacs.deps import AdminUser, CatalogWrites, Conn, CurrentUser, SettingsDep
from webmacs.pagination import Page, Paging, Status
from webmacs.repositories import users as users_repo
from webmacs.schemas import NO_NUL, UserResponse, UserRole
from webmacs.security import hash_password

router = APIRouter(prefix="/users", tags=["users"])

# PostgreSQL text cannot hold NUL: refuse it as invalid input rather than fail at the database.
Username = Annotated[str, StringConstraints(min_length=2, max_length=50, pattern=NO_NUL)]
Password = Annotated[str, StringConstraints(min_length=8, max_length=1024)]


class UserCreate(BaseModel):
    email: EmailStr
    username: Username
    password: Password
    role: UserRole = UserRole.viewer


class UserUpdate(BaseModel):
    email: EmailStr | None = None
    username: Username | None = None
    password: Password | None = None
    role: UserRole | None = None


def to_response(row: dict[str, Any]) -> UserResponse:
    return UserResponse(
        public_id=row["public_id"],
        email=row["email"],
        username=row["username"],
        role=row["role"],
        admin=row["role"] == "admin",
        registered_on=row["registered_on"],
        sso_provider=row["sso_provider"],
    )


@router.get("", response_model=Page[UserResponse])
async def list_users(_: AdminUser, conn: Conn, paging: Paging) -> Page[UserResponse]:
    total, rows = await users_repo.page(conn, limit=paging.limit, offset=paging.offset)
    return Page.of(paging, total, [to_response(r) for r in rows])


@router.post("", response_model=Status, status_code=201)
async def create_user(body: UserCreate, _: AdminUser, conn: Conn, settings: SettingsDep) -> Status:
    ph = await asyncio.to_thread(hash_password, body.password, settings.webmacs_bcrypt_rounds)
    await users_repo.create(conn, email=body.email, username=body.username, password_hash=ph, role=body.role.value)
    return Status.ok("User successfully created.")


@router.get("/{public_id}", response_model=UserResponse)
async def get_user(public_id: str, _: CurrentUser, conn: Conn) -> UserResponse:
    return to_response(await users_repo.by_public_id(conn, public_id=public_id))


@router.put("/{public_id}", response_model=Status)
async def update_user(public_id: str, body: UserUpdate, user: CurrentUser, conn: Conn, settings: SettingsDep) -> Status:
    if not user.admin and public_id != user.public_id:
        raise HTTPException(403, "You can only update your own profile.")
    target = await users_repo.by_public_id(conn, public_id=public_id)
    # Explicit null on a NOT NULL column means "leave as is" — so `"role": null` is no role change either.
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    if "role" in changes and not user.admin:
        raise HTTPException(403, "Only admins can change user roles.")
    if "password" in changes:
        changes["password_hash"] = await asyncio.to_thread(
            hash_password, changes.pop("password"), settings.webmacs_bcrypt_rounds
        )
    if "role" in changes:
        changes["role"] = UserRole(changes["role"]).value
    await users_repo.update(conn, user_id=target["id"], changes=changes)
    return Status.ok("User successfully updated.")


# The user's events, experiments, rules and plugin instances go with them (spec §1 cascades).
@router.delete("/{public_id}", response_model=Status, dependencies=[CatalogWrites])
async def delete_user(public_id: str, _: AdminUser, conn: Conn, request: Request) -> Status:
    await users_repo.delete(conn, public_id=public_id)
    return Status.ok("User successfully deleted.")
