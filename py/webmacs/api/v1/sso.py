"""SSO / OIDC login (spec §3.10): config, authorize, callback, one-time code exchange — all public."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel

from webmacs.deps import Conn, SettingsDep, get_runtime
from webmacs.errors import BadRequest
from webmacs.security import create_access_token
from webmacs.services import sso

router = APIRouter(prefix="/auth/sso", tags=["sso"])

AUTHORIZE_PATH = "/api/v1/auth/sso/authorize"
# Redirect responses carry a state or a one-time code: keep them out of caches.
NO_STORE = {"Cache-Control": "no-store"}


def get_sso_state(request: Request) -> sso.SsoState:
    return get_runtime(request).sso


SsoStateDep = Annotated[sso.SsoState, Depends(get_sso_state)]


class SsoConfig(BaseModel):
    enabled: bool
    provider_name: str
    authorize_url: str


class ExchangeRequest(BaseModel):
    code: str


class ExchangeResponse(BaseModel):
    access_token: str


@router.get("/config", response_model=SsoConfig)
async def config(settings: SettingsDep) -> SsoConfig:
    if not settings.oidc_enabled:
        return SsoConfig(enabled=False, provider_name="", authorize_url="")
    return SsoConfig(enabled=True, provider_name=settings.oidc_provider_name, authorize_url=AUTHORIZE_PATH)


@router.get("/authorize", status_code=307, response_class=RedirectResponse)
async def authorize(settings: SettingsDep, state: SsoStateDep) -> RedirectResponse:
    return RedirectResponse(await sso.authorization_url(state, settings), status_code=307, headers=NO_STORE)


@router.get("/callback", status_code=307, response_class=RedirectResponse)
async def callback(
    code: str, state: str, conn: Conn, settings: SettingsDep, sso_state: SsoStateDep
) -> RedirectResponse:
    target = await sso.complete_login(sso_state, conn, settings, code=code, state_token=state)
    return RedirectResponse(target, status_code=307, headers=NO_STORE)


@router.post("/exchange", response_model=ExchangeResponse)
async def exchange(body: ExchangeRequest, settings: SettingsDep, state: SsoStateDep, conn: Conn) -> ExchangeResponse:
    redeemed = await state.redeem_code(conn, body.code)
    if redeemed is None:
        raise BadRequest("Invalid or expired SSO authorization code.")
    user_id, role = redeemed
    token = create_access_token(
        user_id=user_id,
        role=role,
        key=settings.secret_key_effective,
        algorithm=settings.algorithm,
        minutes=settings.access_token_expire_minutes,
    )
    return ExchangeResponse(access_token=token)
