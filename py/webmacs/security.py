"""Password hashing (bcrypt), JWTs (HMAC: HS256/384/512) and `wm_` API tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import bcrypt

from webmacs._core import inspect_jwt
from webmacs.exceptions import ConfigError

API_TOKEN_PREFIX = "wm_"  # noqa: S105 - a prefix, not a secret
#: A credential longer than this is refused without looking at it (ours are ~250 characters).
MAX_TOKEN_CHARS = 4096
# bcrypt only reads 72 bytes; bcrypt>=5 raises instead of truncating, so truncate explicitly.
_BCRYPT_MAX = 72
#: The algorithms tokens are signed with: the HMAC ones, the only ones the engine's check (`inspect_jwt`) knows.
_HMAC_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def hash_password(password: str, rounds: int = 12) -> str:
    return bcrypt.hashpw(password.encode()[:_BCRYPT_MAX], bcrypt.gensalt(rounds)).decode()


def verify_password(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode()[:_BCRYPT_MAX], password_hash.encode())
    except ValueError:
        return False


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def create_access_token(*, user_id: int, role: str, key: str, algorithm: str, minutes: int) -> str:
    """A signed JWT, byte for byte what `jwt.encode(claims, key, algorithm)` of pyjwt writes (sorted compact
    header, compact claims, integer times). Signed here with the standard library: pyjwt imports cryptography
    (~10 MB of the server's memory) for algorithms the product does not accept."""
    digest = _HMAC_DIGESTS.get(algorithm)
    if digest is None:
        raise ConfigError(f"JWT algorithm {algorithm!r} is not supported (HS256, HS384, HS512)")
    # Whole seconds, as pyjwt writes datetimes (the fraction is dropped).
    now = int(datetime.now(UTC).timestamp())
    # `jti` makes every login's token distinct: without it two logins of one user within the same second
    # get the same string, and logging out one session (blacklisting that string) would end the other.
    claims = {
        "sub": str(user_id),
        "exp": now + minutes * 60,
        "iat": now,
        "role": role,
        "jti": secrets.token_urlsafe(12),
    }
    header = json.dumps({"alg": algorithm, "typ": "JWT"}, separators=(",", ":")).encode()
    payload = json.dumps(claims, separators=(",", ":")).encode()
    signing_input = _b64url(header) + b"." + _b64url(payload)
    signature = hmac.new(key.encode(), signing_input, digest).digest()
    return (signing_input + b"." + _b64url(signature)).decode()


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    #: What logout revokes; None for tokens issued without one (revoked by their text).
    jti: str | None
    exp: float
    #: Not expired, and not used before its `nbf`/`iat`.
    current: bool


def inspect_access_token(token: str, *, key: str, algorithm: str) -> TokenClaims | None:
    """The claims of a genuine token (our key and algorithm, canonical base64url, well-formed claims), valid
    now or not; None for anything forged, malformed or spelled non-canonically. One JWT check for the whole
    product: the engine's WebSocket server uses the same Rust code."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        found = inspect_jwt(token, secret_key=key, algorithm=algorithm)
    except ConfigError:
        return None
    if found is None:
        return None
    user_id, jti, exp, current = found
    return TokenClaims(user_id=user_id, jti=jti, exp=exp, current=current)


def decode_access_token(token: str, *, key: str, algorithm: str) -> TokenClaims | None:
    """Claims of a token that is genuine and valid now, or None."""
    claims = inspect_access_token(token, key=key, algorithm=algorithm)
    return claims if claims is not None and claims.current else None


def new_api_token() -> str:
    # 48 random bytes → 64 url-safe base64 characters (spec §3.7).
    return API_TOKEN_PREFIX + secrets.token_urlsafe(48)


def hash_api_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
