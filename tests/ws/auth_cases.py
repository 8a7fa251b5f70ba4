"""Credential cases both WebSocket authenticators (Python `ws.auth` and the Rust listener) must refuse alike."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import jwt

#: Query strings without a usable token → 1008 "Authentication required".
MISSING_TOKEN_QUERIES = [None, "token=", "token=%20%20", "other=1"]

#: Undecodable, wrong-key and `alg: none` JWTs → 1008 "Invalid or expired token".
FORGED_TOKENS = [
    "garbage",
    "a.b.c",
    "nul%00byte",
    jwt.encode(
        {"sub": "1", "exp": datetime.now(UTC) + timedelta(hours=1)},
        "another-key-of-good-length-0123456789ab",
        algorithm="HS256",
    ),
    jwt.encode({"sub": "1", "exp": datetime.now(UTC) + timedelta(hours=1)}, "", algorithm="none"),
]
