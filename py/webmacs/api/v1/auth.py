"""Login, logout and the current user (spec §3.4–§3.6)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, EmailStr, Field

from webmacs.deps import Conn, CurrentUser, SettingsDep
from webmacs.middleware import client_address
from webmacs.pagination import Status
from webmacs.repositories import users as users_repo
from webmacs.schemas import UserResponse, UserRole
from webmacs.services import login as login_service

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


@router.post(
    "/login",
    response_model=LoginResponse,
    responses={401: {"description": "Invalid email or password."}, 429: {"description": "Too many failed logins."}},
)
async def login(body: LoginRequest, conn: Conn, settings: SettingsDep, request: Request) -> LoginResponse:
    token, user = await login_service.login(
        conn, settings, email=body.email, password=body.password, peer=client_address(request)
    )
    return LoginResponse(access_token=token, public_id=user["public_id"], username=user["username"])


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
