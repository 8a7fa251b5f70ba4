"""REST routers under /api/v1; `ROUTERS` lists every module mounted by the app factory."""

from __future__ import annotations

import importlib

from fastapi import APIRouter

# Each module defines `router`; order matters where paths overlap: `ingest` (POST /datapoints, /batch,
# GET /datapoints/latest) and `series` (POST /datapoints/series) come before `datapoints` (GET /datapoints/{id}).
ROUTER_MODULES = [
    "auth",
    "sso",
    "tokens",
    "users",
    "ingest",
    "series",
    "datapoints",
    "events",
    "experiments",
    "logging",
    "dashboards",
    "plugins",
    "rules",
    "webhooks",
    "ota",
]


def api_router() -> APIRouter:
    root = APIRouter(prefix="/api/v1")
    for name in ROUTER_MODULES:
        root.include_router(importlib.import_module(f"webmacs.api.v1.{name}").router)
    return root
