"""Password login (spec §3.4) with failed attempts throttled per account and per client address."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
from typing import Any

from psycopg import AsyncConnection

from webmacs.errors import DomainError, TooManyRequests
from webmacs.repositories import logs as logs_repo
from webmacs.repositories import users as users_repo
from webmacs.security import create_access_token, hash_password, verify_password
from webmacs.settings import Settings

log = logging.getLogger("webmacs.login")


class InvalidCredentials(DomainError):
    status_code = 401

    def __init__(self) -> None:
        super().__init__("Invalid email or password.")


@functools.cache
def _dummy_hash(rounds: int) -> str:
    """A hash of a random secret: makes the unknown-email path as slow as the known one."""
    return hash_password(secrets.token_hex(16), rounds)


async def login(
    conn: AsyncConnection, settings: Settings, *, email: str, password: str, peer: str
) -> tuple[str, dict[str, Any]]:
    """A new access token and the user, or InvalidCredentials / TooManyRequests.

    Failures are counted per account (the email as given, whether or not it exists: the throttle must not tell
    which accounts exist) and per client address; over either limit the password is not even checked."""
    window = settings.webmacs_login_window_s
    by_account, by_peer, retry_in = await users_repo.login_failures(conn, account=email, peer=peer, window_s=window)
    if by_account >= settings.webmacs_login_max_failures_account or by_peer >= settings.webmacs_login_max_failures_peer:
        log.warning("login throttled for %s from %s", email, peer)
        raise TooManyRequests("Too many failed logins; try again later.", retry_after=max(1, math.ceil(retry_in)))
    user = await users_repo.by_email(conn, email=email)
    # Verify against a dummy hash for unknown emails too, so timing does not reveal which emails exist.
    stored = user["password_hash"] if user else _dummy_hash(settings.webmacs_bcrypt_rounds)
    ok = await asyncio.to_thread(verify_password, password, stored)
    if user is None or not ok:
        await users_repo.record_login_failure(conn, account=email, peer=peer)
        # Committed now: the failed request's transaction is otherwise rolled back with the error.
        await conn.commit()
        raise InvalidCredentials
    await users_repo.clear_login_failures(conn, account=email)
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
    return token, user
