"""Typed FastAPI dependencies: settings, a pooled connection in a transaction, the current user by role."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, cast

from fastapi import Depends, HTTPException, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from webmacs import runtime
from webmacs.db.replicas import ReadRouter, ReadTarget
from webmacs.repositories import users as users_repo
from webmacs.runtime import Runtime
from webmacs.security import API_TOKEN_PREFIX, MAX_TOKEN_CHARS, hash_api_token, inspect_access_token
from webmacs.services.ingest import Ingest
from webmacs.settings import Settings

ROLE_LEVEL = {"viewer": 1, "operator": 2, "admin": 3}


def get_runtime(request: Request) -> Runtime:
    return runtime.of(request.app)


def get_ingest(request: Request) -> Ingest:
    """The running ingest engine (NotStarted outside the lifespan)."""
    return get_runtime(request).ingest


def get_settings(request: Request) -> Settings:
    return get_runtime(request).settings


def get_pool(request: Request) -> AsyncConnectionPool:
    return get_runtime(request).pool


async def _conn(request: Request) -> AsyncIterator[AsyncConnection]:
    # The transaction commits when the handler returns and before the response is sent
    # (scope="function"): a success is never reported for a write that then fails to commit.
    rt = get_runtime(request)
    async with rt.pool.connection() as conn:
        yield conn
    # Committed. A handler that changed what the ingest catalog is built from asked for a refresh; doing it
    # here, before the response, means the client's next ingest already sees the change. (Other processes
    # learn of it through the `webmacs_catalog` NOTIFY the tables' triggers send.)
    if getattr(request.state, "catalog_changed", False):
        await rt.catalog_refresh()
    if getattr(request.state, "datapoints_deleted", False):
        ingest = rt.ingest_
        if ingest is not None:
            # /datapoints/latest is served from the engine's cache: reload it for what was deleted.
            await ingest.datapoints_deleted(request.state.datapoints_deleted_events)


def _catalog_writes(request: Request) -> None:
    """Every successful write through a route that carries this refreshes the ingest catalog once it has
    committed (see `_conn`): events, mappings, plugin instances, experiments, rules, and what cascades to them."""
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        request.state.catalog_changed = True


#: The one way a route says that its writes change what the ingest catalog is built from (as a router's or a
#: route's `dependencies=[CatalogWrites]`).
CatalogWrites = Depends(_catalog_writes)


def datapoints_deleted(request: Request, event_public_ids: list[str] | None = None) -> None:
    """Mark this request as having deleted datapoints (of these events; None = possibly any event)."""
    previous = getattr(request.state, "datapoints_deleted_events", [])
    request.state.datapoints_deleted = True
    request.state.datapoints_deleted_events = (
        None if event_public_ids is None or previous is None else [*previous, *event_public_ids]
    )


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
Conn = Annotated[AsyncConnection, Depends(_conn, scope="function")]


@dataclass(frozen=True)
class User:
    id: int
    public_id: str
    email: str
    username: str
    role: str
    registered_on: datetime
    sso_provider: str | None
    #: The raw bearer credential.
    token: str
    #: The API token's id, or None for a JWT.
    token_id: int | None = None
    #: The JWT's id (what logout revokes), or None.
    jti: str | None = None
    #: "full" (acts as the user) or "write" (an ingest-only device token).
    scope: str = "full"
    #: A token bound to one plugin instance may only feed the events mapped to it (the instance's id).
    plugin_instance_id: int | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def at_least(self, role: str) -> bool:
        return ROLE_LEVEL.get(self.role, 0) >= ROLE_LEVEL[role]

    @property
    def ingest_source(self) -> int:
        """The sender this request counts as for the ingest queue's fair shares: its token."""
        return (1 << 40) | self.token_id if self.token_id is not None else self.id

    @classmethod
    def from_row(
        cls,
        row: dict[str, Any],
        token: str,
        *,
        token_id: int | None = None,
        jti: str | None = None,
        scope: str = "full",
        plugin_instance_id: int | None = None,
    ) -> User:
        return cls(
            id=row["id"],
            public_id=row["public_id"],
            email=row["email"],
            username=row["username"],
            role=row["role"],
            registered_on=row["registered_on"],
            sso_provider=row["sso_provider"],
            token=token,
            token_id=token_id,
            jti=jti,
            scope=scope,
            plugin_instance_id=plugin_instance_id,
        )


class AuthError(Exception):
    """Credential failure with the spec's HTTP detail and WebSocket close reason."""

    def __init__(self, detail: str, ws_reason: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.ws_reason = ws_reason


async def authenticate(conn: AsyncConnection, settings: Settings, token: str) -> User:
    """Resolve a bearer credential (JWT or `wm_` API token) to its user, or raise AuthError (spec §3.1, §7)."""
    if token.startswith(API_TOKEN_PREFIX):
        row = await users_repo.token_owner(conn, token_hash=hash_api_token(token))
        if row is None:
            raise AuthError("Invalid API token.", "Invalid API token")
        if row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
            raise AuthError("API token has expired.", "API token expired")
        user = await users_repo.by_id(conn, user_id=row["user_id"]) if row["u_id"] is not None else None
        if user is None:
            raise AuthError("Token owner not found.", "User not found")
        await users_repo.touch_token(conn, token_id=row["token_id"])
        return User.from_row(
            user, token, token_id=row["token_id"], scope=row["scope"], plugin_instance_id=row["plugin_instance_id"]
        )
    claims = inspect_access_token(token, key=settings.secret_key_effective, algorithm=settings.algorithm)
    # HTTP checks revocation before expiry (spec §3.1). Revocation is by the token's `jti`, or by its exact
    # text for rows and tokens without one; only canonical spellings are genuine, so no other text passes.
    if len(token) <= MAX_TOKEN_CHARS and await users_repo.is_blacklisted(
        conn, jti=claims.jti if claims else None, token=token
    ):
        raise AuthError("Token has been revoked.", "Token has been revoked")
    if claims is None or not claims.current:
        raise AuthError("Invalid or expired token.", "Invalid or expired token")
    user = await users_repo.by_id(conn, user_id=claims.user_id)
    if user is None:
        raise AuthError("User not found.", "User not found")
    return User.from_row(user, token, jti=claims.jti)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        raise HTTPException(401, "Authentication required.", headers={"WWW-Authenticate": "Bearer"})
    return credentials


async def current_user(request: Request, conn: Conn, settings: SettingsDep) -> User:
    token = _bearer(request)
    try:
        user = await authenticate(conn, settings, token)
    except AuthError as e:
        raise HTTPException(401, e.detail) from e
    request.state.user_id = user.public_id  # for the access log
    if user.scope == "write":
        # A device token: ingest routes authenticate through `ingest_user`, everything else is refused.
        raise HTTPException(403, "This API token may only write datapoints.")
    return user


async def operator_user(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.at_least("operator"):
        raise HTTPException(403, "Operator privileges required.")
    return user


async def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if not user.admin:
        raise HTTPException(403, "Admin privileges required.")
    return user


async def _authenticated_briefly(request: Request, settings: Settings) -> User:
    """The caller, authenticated on a primary connection that goes back to the pool at once."""
    token = _bearer(request)
    try:
        async with get_pool(request).connection(timeout=10) as conn:
            user = await authenticate(conn, settings, token)
    except AuthError as e:
        raise HTTPException(401, e.detail) from e
    request.state.user_id = user.public_id  # for the access log
    return user


async def ingest_user(request: Request, settings: SettingsDep) -> User:
    """An operator for the ingest routes: a request waiting for its datapoints to be written holds no pooled
    connection, so a stalled write can never starve login and CRUD of connections."""
    user = await _authenticated_briefly(request, settings)
    if not user.at_least("operator"):
        raise HTTPException(403, "Operator privileges required.")
    return user


async def reader_user(request: Request, settings: SettingsDep) -> User:
    """Any signed-in user, for the analyst reads: they hold a read connection (a replica's when one is fresh
    enough), not a primary one as well."""
    user = await _authenticated_briefly(request, settings)
    if user.scope == "write":
        raise HTTPException(403, "This API token may only write datapoints.")
    return user


def get_reads(request: Request) -> ReadRouter:
    return get_runtime(request).reads


async def _read_conn(request: Request) -> AsyncIterator[AsyncConnection]:
    reads = get_reads(request)
    async with reads.connection(reads.choose()) as (conn, target):
        # COPYs of an export run on connections of their own: to the same place (see read_dsn).
        request.state.read_target = target
        yield conn


def read_dsn(request: Request) -> str:
    """Where this request's own COPY connections read: the place its ReadConn reads, else the primary."""
    target = cast(ReadTarget | None, getattr(request.state, "read_target", None))
    return target.url if target is not None else get_runtime(request).database_url


CurrentUser = Annotated[User, Depends(current_user)]
ReaderUser = Annotated[User, Depends(reader_user)]
#: A connection for analyst reads (series, exports, datapoint lists): a replica within the staleness bound, else
#: the primary. Nothing that writes, or must read its own writes, uses it.
ReadConn = Annotated[AsyncConnection, Depends(_read_conn, scope="function")]
IngestUser = Annotated[User, Depends(ingest_user)]
OperatorUser = Annotated[User, Depends(operator_user)]
AdminUser = Annotated[User, Depends(admin_user)]
