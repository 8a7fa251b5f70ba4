"""REST routers under /api/v1; `ROUTERS` lists every module mounted by the app factory."""

from __future__ import annotations

import importlib

from fastapi import APIRouter

# Each module defines `router`; a module missing from this list is not served.
ROUTER_MODULES = [
    "auth",
    "tokens",
    "users",
]


def api_router() -> APIRouter:
    root = APIRouter(prefix="/api/v1")
    for name in ROUTER_MODULES:
        module = importlib.import_module(f"webmacs.api.v1.{name}")
        root.include_router(module.router)
    return root
