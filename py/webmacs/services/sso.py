"""OIDC single sign-on (spec §3.10): discovery, signed PKCE state, code exchange, user resolution, one-time codes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from psycopg import AsyncConnection
from pydantic.networks import validate_email

from webmacs.errors import BadRequest, DomainError, Forbidden, NotFound
from webmacs.repositories import logs as logs_repo
from webmacs.repositories import sso as sso_repo
from webmacs.repositories import users as users_repo
from webmacs.security import hash_password
from webmacs.settings import Settings

# httpx and pyjwt (which loads cryptography) are imported where SSO uses them: together ~15 MB of every server's
# memory, and most servers never talk to an identity provider.
if TYPE_CHECKING:
    import httpx

STATE_ISSUER = "webmacs-sso"
STATE_TTL_S = 600
DISCOVERY_TTL_S = 3600.0
CODE_TTL_S = 60.0
HTTP_TIMEOUT_S = 10.0
USERNAME_MAX = 50  # users.username is varchar(50)

_NOT_USERNAME = re.compile(r"[^A-Za-z0-9._-]")
_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


class Misconfigured(DomainError):
    status_code = 500


class BadGateway(DomainError):
    status_code = 502


EXCHANGE_FAILED = "Failed to exchange authorization code with identity provider."
USERINFO_FAILED = "Failed to fetch user information from identity provider."


@dataclass
class SsoState:
    """SSO state: the per-process discovery cache; the one-time codes handed to the frontend live in the
    database (any process redeems what another issued)."""

    code_ttl_s: float = CODE_TTL_S
    discovery_ttl_s: float = DISCOVERY_TTL_S
    #: issuer URL → (fetched at, monotonic; discovery document)
    discovery: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)

    async def issue_code(self, conn: AsyncConnection, user_id: int, role: str) -> str:
        """A one-time code for the frontend to exchange for a token; only its hash is stored, in the database,
        so any server process can redeem it."""
        code = secrets.token_urlsafe(48)
        await sso_repo.store_code(conn, code_hash=_digest(code), user_id=user_id, role=role, ttl_s=self.code_ttl_s)
        return code

    async def redeem_code(self, conn: AsyncConnection, code: str) -> tuple[int, str] | None:
        """(user id, role) for a live code, which is used up; None for an unknown, used or expired code."""
        return await sso_repo.take_code(conn, code_hash=_digest(code))


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


# --- configuration ---


def require_configured(settings: Settings) -> None:
    if not settings.oidc_enabled:
        raise NotFound("SSO is not enabled.")
    if not settings.oidc_issuer_url or not settings.oidc_client_id:
        raise Misconfigured("SSO is enabled but OIDC_ISSUER_URL or OIDC_CLIENT_ID is missing.")


def redirect_uri(settings: Settings) -> str:
    if settings.oidc_redirect_uri:
        return settings.oidc_redirect_uri
    scheme = "https" if settings.env == "production" else "http"
    wildcard = ("", "0.0.0.0", "::")  # noqa: S104 - recognised to be replaced, nothing binds here
    host = settings.backend_host if settings.backend_host not in wildcard else "localhost"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.backend_port}/api/v1/auth/sso/callback"


def frontend_url(settings: Settings) -> str:
    # Never derived from the request: the post-login redirect target is configuration only.
    if settings.oidc_frontend_url:
        return settings.oidc_frontend_url.rstrip("/")
    if settings.cors_origins:
        return settings.cors_origins[0].rstrip("/")
    return "http://localhost:5173"


# --- talking to the identity provider ---


def _client() -> httpx.AsyncClient:
    import httpx

    # The issuer is operator-configured (no SSRF guard), but redirects are never followed: every endpoint
    # must answer where the discovery document says it does.
    return httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, follow_redirects=False)


def _json_object(r: httpx.Response) -> dict[str, Any] | None:
    try:
        body = r.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _endpoint(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if isinstance(value, str) and urlsplit(value).scheme in ("http", "https") and urlsplit(value).netloc:
        return value
    return None


async def discovery(state: SsoState, settings: Settings) -> dict[str, Any]:
    """The issuer's OpenID configuration, cached for an hour (only successful fetches are cached)."""
    issuer = settings.oidc_issuer_url.rstrip("/")
    now = time.monotonic()
    cached = state.discovery.get(issuer)
    if cached is not None and now - cached[0] < state.discovery_ttl_s:
        return cached[1]
    import httpx

    failed = BadGateway("Failed to load the identity provider's OpenID configuration.")
    try:
        async with _client() as client:
            r = await client.get(issuer + "/.well-known/openid-configuration")
    except httpx.HTTPError as e:
        raise failed from e
    doc = _json_object(r) if r.status_code == 200 else None
    if doc is None or _endpoint(doc, "authorization_endpoint") is None or _endpoint(doc, "token_endpoint") is None:
        raise failed
    state.discovery[issuer] = (now, doc)
    return doc


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def sign_state(settings: Settings, verifier: str) -> str:
    import jwt

    now = datetime.now(UTC)
    claims = {
        "iss": STATE_ISSUER,
        "nonce": secrets.token_urlsafe(16),
        "cv": verifier,
        "iat": now,
        "exp": now + timedelta(seconds=STATE_TTL_S),
    }
    return jwt.encode(claims, settings.secret_key_effective, algorithm="HS256")


def verify_state(settings: Settings, state: str) -> str:
    """The PKCE verifier carried by a valid state, or 400."""
    import jwt

    try:
        claims = jwt.decode(
            state,
            settings.secret_key_effective,
            algorithms=["HS256"],
            issuer=STATE_ISSUER,
            options={"require": ["exp", "iat", "iss", "cv"]},
        )
    except (jwt.PyJWTError, ValueError, TypeError) as e:
        raise BadRequest("Invalid or expired SSO state.") from e
    verifier = claims.get("cv")
    if not isinstance(verifier, str) or not _PKCE_VERIFIER.fullmatch(verifier):
        raise BadRequest("Invalid or expired SSO state.")
    return verifier


async def authorization_url(state: SsoState, settings: Settings) -> str:
    require_configured(settings)
    doc = await discovery(state, settings)
    endpoint = _endpoint(doc, "authorization_endpoint")
    assert endpoint is not None  # discovery() only caches documents that have it
    verifier, challenge = _pkce_pair()
    params = {
        "response_type": "code",
        "client_id": settings.oidc_client_id,
        "redirect_uri": redirect_uri(settings),
        "scope": settings.oidc_scopes,
        "state": sign_state(settings, verifier),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    # Keep any query the IdP put into its endpoint URL (some carry a tenant or policy parameter).
    parts = urlsplit(endpoint)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    return urlunsplit(parts._replace(query=urlencode([*query, *params.items()])))


async def fetch_userinfo(state: SsoState, settings: Settings, code: str, verifier: str) -> dict[str, Any]:
    """Exchange the authorization code (with the PKCE verifier) and read the user's claims."""
    import httpx

    doc = await discovery(state, settings)
    token_endpoint = _endpoint(doc, "token_endpoint")
    assert token_endpoint is not None  # discovery() only caches documents that have it
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri(settings),
        "client_id": settings.oidc_client_id,
        "code_verifier": verifier,
    }
    # client_secret_basic (the OAuth default); RFC 6749 §2.3.1 form-encodes both parts first.
    headers = {"Accept": "application/json"}
    if settings.oidc_client_secret:  # without one this is a public client (PKCE only)
        pair = f"{quote(settings.oidc_client_id, safe='')}:{quote(settings.oidc_client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    async with _client() as client:
        try:
            r = await client.post(token_endpoint, data=form, headers=headers)
        except httpx.HTTPError as e:
            raise BadGateway(EXCHANGE_FAILED) from e
        tokens = _json_object(r) if r.status_code == 200 else None
        access_token = tokens.get("access_token") if tokens else None
        if not isinstance(access_token, str) or not access_token:
            raise BadGateway(EXCHANGE_FAILED)
        userinfo_endpoint = _endpoint(doc, "userinfo_endpoint")
        if userinfo_endpoint is None:
            raise BadGateway("Identity provider does not expose a userinfo endpoint.")
        try:
            r = await client.get(
                userinfo_endpoint, headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
            )
        except httpx.HTTPError as e:
            raise BadGateway(USERINFO_FAILED) from e
    info = _json_object(r) if r.status_code == 200 else None
    if info is None:
        raise BadGateway(USERINFO_FAILED)
    return info


# --- who logged in ---


@dataclass(frozen=True)
class Identity:
    subject: str
    email: str
    email_verified: bool
    #: preferred_username, else name, else the email's local part (unsanitised)
    username_hint: str


def identity(info: dict[str, Any]) -> Identity:
    email = info.get("email")
    if not isinstance(email, str) or not email.strip():
        raise BadRequest(
            "Identity provider did not return an email address. "
            "Ensure the 'email' scope is requested and the user has a verified email."
        )
    sub = info.get("sub")
    if isinstance(sub, int) and not isinstance(sub, bool):
        sub = str(sub)
    if not isinstance(sub, str) or not sub:
        raise BadRequest("Identity provider did not return a subject identifier.")
    if len(sub) > 255 or "\x00" in sub:  # users.sso_subject_id is varchar(255)
        raise BadRequest("Identity provider returned an unusable subject identifier.")
    email = _normalise_email(email.strip())
    if len(email) > 255 or "\x00" in email:
        raise BadRequest("Identity provider returned an unusable email address.")
    verified = info.get("email_verified")
    # Some IdPs send the claim as a string; bool("false") would be True.
    verified = verified is True or (isinstance(verified, str) and verified.strip().lower() == "true")
    hint = (
        next(
            (v.strip() for v in (info.get("preferred_username"), info.get("name")) if isinstance(v, str) and v.strip()),
            "",
        )
        or email.split("@", 1)[0]
    )
    return Identity(subject=sub, email=email, email_verified=verified, username_hint=hint)


def _normalise_email(email: str) -> str:
    # The same normalisation as stored and login emails (domain lower-cased), so linking finds the account.
    try:
        return validate_email(email)[1]
    except ValueError:
        return email


def sanitise_username(raw: str) -> str:
    """Keep [A-Za-z0-9._-], at most 50 characters; `sso_user_<6 hex>` when nothing is left."""
    return _NOT_USERNAME.sub("", raw)[:USERNAME_MAX] or f"sso_user_{secrets.token_hex(3)}"


async def _free_username(conn: AsyncConnection, raw: str) -> str:
    username = sanitise_username(raw)
    if await sso_repo.username_taken(conn, username=username):
        username = f"{username[: USERNAME_MAX - 7]}_{secrets.token_hex(3)}"
    return username


async def resolve_user(conn: AsyncConnection, settings: Settings, who: Identity) -> dict[str, Any]:
    """The local user for this identity: already linked, linked now by verified email, or created."""
    provider = settings.oidc_provider_name
    user = await sso_repo.by_identity(conn, provider=provider, subject=who.subject)
    if user is not None:
        return user
    user = await users_repo.by_email(conn, email=who.email)
    if user is not None:
        if not who.email_verified:
            raise Forbidden("Cannot link SSO account: the identity provider has not verified this email address.")
        if user["role"] == "admin":
            # Whoever controls the IdP account must not get an admin account by email alone.
            raise Forbidden(
                "Cannot automatically link an admin account to SSO. An administrator must manually link this account."
            )
        return await sso_repo.link(conn, user_id=user["id"], provider=provider, subject=who.subject)
    if not settings.oidc_auto_create_users:
        raise Forbidden(
            "No local account found and automatic user creation is disabled. "
            "Ask an administrator to create your account first."
        )
    if not who.email_verified:
        raise Forbidden("Cannot create account: the identity provider has not verified this email address.")
    # SSO users never log in with a password; a random one keeps the column's meaning (bcrypt hash).
    password_hash = await asyncio.to_thread(hash_password, secrets.token_urlsafe(32), settings.webmacs_bcrypt_rounds)
    return await sso_repo.create(
        conn,
        email=who.email,
        username=await _free_username(conn, who.username_hint),
        password_hash=password_hash,
        role=settings.oidc_default_role,
        provider=provider,
        subject=who.subject,
    )


async def complete_login(
    state: SsoState, conn: AsyncConnection, settings: Settings, *, code: str, state_token: str
) -> str:
    """The callback: verify the state, talk to the IdP, resolve the user, log it; the frontend redirect URL."""
    require_configured(settings)
    verifier = verify_state(settings, state_token)
    who = identity(await fetch_userinfo(state, settings, code, verifier))
    user = await resolve_user(conn, settings, who)
    await logs_repo.create(
        conn,
        content=f"User '{user['username']}' logged in via SSO ({settings.oidc_provider_name}).",
        logging_type="info",
        user_public_id=user["public_id"],
    )
    one_time = await state.issue_code(conn, user["id"], user["role"])
    return f"{frontend_url(settings)}/sso-callback?{urlencode({'code': one_time})}"
