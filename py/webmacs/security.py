"""Password hashing (bcrypt), JWTs (HS256 via pyjwt) and `wm_` API tokens."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import bcrypt
import jwt

API_TOKEN_PREFIX = "wm_"  # noqa: S105 - the public marker of API tokens, not a secret
# bcrypt only reads 72 bytes; bcrypt>=5 raises instead of truncating, so truncate explicitly.
_BCRYPT_MAX = 72


def hash_password(password: str, rounds: int = 12) -> str:
    return bcrypt.hashpw(password.encode()[:_BCRYPT_MAX], bcrypt.gensalt(rounds)).decode()


def verify_password(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode()[:_BCRYPT_MAX], password_hash.encode())
    except ValueError:
        return False


def create_access_token(*, user_id: int, role: str, key: str, algorithm: str, minutes: int) -> str:
    now = datetime.now(UTC)
    # `jti` makes every login's token distinct: without it two logins of one user within the same second
    # get the same string, and logging out one session (blacklisting that string) would end the other.
    claims = {
        "sub": str(user_id),
        "exp": now + timedelta(minutes=minutes),
        "iat": now,
        "role": role,
        "jti": secrets.token_urlsafe(12),
    }
    return jwt.encode(claims, key, algorithm=algorithm)


def decode_access_token(token: str, *, key: str, algorithm: str) -> dict[str, Any] | None:
    """Verified claims, or None for anything forged, expired, malformed or signed with another algorithm."""
    try:
        claims = jwt.decode(token, key, algorithms=[algorithm], options={"require": ["exp", "sub"]})
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.isdigit() or len(sub) > 18:
        return None
    return claims


def new_api_token() -> str:
    # 48 random bytes → 64 url-safe base64 characters (spec §3.7).
    return API_TOKEN_PREFIX + secrets.token_urlsafe(48)


def hash_api_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
