"""WebSocket authentication (spec §7): accept, resolve the `token` query parameter, or close with 1008."""

from __future__ import annotations

from fastapi import WebSocket

from webmacs.deps import AuthError, User, authenticate
from webmacs.security import API_TOKEN_PREFIX, decode_access_token
from webmacs.settings import Settings

#: Close code for a policy violation; every authentication failure uses it (spec §7).
POLICY_VIOLATION = 1008


async def authenticate_websocket(websocket: WebSocket) -> User | None:
    """Accept the socket and return its user; on failure close it with 1008 and the spec's reason, return None.

    The upgrade is accepted before authenticating (as the reference does) so that clients see a close
    frame with a reason rather than a refused handshake.
    """
    await websocket.accept()
    token = (websocket.query_params.get("token") or "").strip()
    if not token:
        await websocket.close(code=POLICY_VIOLATION, reason="Authentication required")
        return None
    settings: Settings = websocket.app.state.settings
    # WebSockets decode the JWT before consulting the blacklist (spec §7), unlike HTTP (§3.1), so an
    # expired token that was also logged out reads "Invalid or expired token" here.
    if (
        not token.startswith(API_TOKEN_PREFIX)
        and decode_access_token(token, key=settings.secret_key_effective, algorithm=settings.algorithm) is None
    ):
        await websocket.close(code=POLICY_VIOLATION, reason="Invalid or expired token")
        return None
    try:
        # Leaving the block commits: an API token's last_used_at update is kept.
        async with websocket.app.state.pool.connection() as conn:
            user = await authenticate(conn, settings, token)
    except AuthError as e:
        await websocket.close(code=POLICY_VIOLATION, reason=e.ws_reason)
        return None
    return user
