"""Login, logout and the current user (spec §3.4–§3.6)."""

from __future__ import annotations

import asyncio
import functools
import secrets

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, EmailStr, Field

from webmacs.deps import Conn, CurrentUser, SettingsDep
from webmacs.pagination import Status
from webmacs.repositories import logs as logs_repo
from webmacs.repositories import users as users_repo
from webmacs.schemas import UserResponse, UserRole
from webmacs.security import create_access_token, hash_password, verify_password

router = APIRouter(prefix="/auth", tags=["auth"])


class LoginRequest(BaseModel):
    email: EmailStr
    password: str = Field(min_length=1, max_length=4096)


class LoginResponse(BaseModel):
    status: str = "success"
    message: str = "Successfully logged in."
    access_token: str
    public_id: str
    username: str


@router.post("/login", response_model=LoginResponse)
async def login(body: LoginRequest, conn: Conn, settings: SettingsDep) -> LoginResponse:
    user = await users_repo.by_email(conn, email=body.email)
    # Verify against a dummy hash for unknown emails too, so timing does not reveal which emails exist.
    stored = user["password_hash"] if user else _dummy_hash(settings.webmacs_bcrypt_rounds)
    ok = await asyncio.to_thread(verify_password, body.password, stored)
    if user is None or not ok:
        raise HTTPException(401, "Invalid email or password.")
    token = create_access_token(
        user_id=user["id"],
        role=user["role"],
        key=settings.secret_key_effective,
        algorithm=settings.algorithm,
        minutes=settings.access_token_expire_minutes,
    )
    await logs_repo.create(
        conn, content=f"User '{user['username']}' logged in.", logging_type="info", user_public_id=user["public_id"]
    )
    return LoginResponse(access_token=token, public_id=user["public_id"], username=user["username"])


@functools.cache
def _dummy_hash(rounds: int) -> str:
    """A hash of a random secret: makes the unknown-email path as slow as the known one."""
    return hash_password(secrets.token_hex(16), rounds)


@router.post("/logout", response_model=Status)
async def logout(user: CurrentUser, conn: Conn) -> Status:
    if user.token_id is None:  # API tokens are not subject to logout (spec §3.5)
        await users_repo.blacklist(conn, jti=user.jti, token=user.token)
    return Status.ok("Successfully logged out.")


@router.get("/me", response_model=UserResponse)
async def me(user: CurrentUser) -> UserResponse:
    return UserResponse(
        public_id=user.public_id,
        email=user.email,
        username=user.username,
        role=UserRole(user.role),
        admin=user.admin,
        registered_on=user.registered_on,
        sso_provider=user.sso_provider,
    )
