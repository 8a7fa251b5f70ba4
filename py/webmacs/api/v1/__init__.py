"""REST routers under /api/v1, mounted by the app factory in the order below."""

from __future__ import annotations

from fastapi import APIRouter

from webmacs.api.v1 import (
    auth,
    dashboards,
    datapoints,
    events,
    experiments,
    ingest,
    logging,
    ota,
    plugins,
    rules,
    series,
    sso,
    tokens,
    users,
    webhooks,
)

# Order matters where paths overlap: `ingest` (POST /datapoints, /batch, GET /datapoints/latest) and `series`
# (POST /datapoints/series) come before `datapoints` (GET /datapoints/{id}).
ROUTERS = [
    auth.router,
    sso.router,
    tokens.router,
    users.router,
    ingest.router,
    series.router,
    datapoints.router,
    events.router,
    experiments.router,
    logging.router,
    dashboards.router,
    plugins.router,
    rules.router,
    webhooks.router,
    ota.router,
]


def api_router() -> APIRouter:
    root = APIRouter(prefix="/api/v1")
    for router in ROUTERS:
        root.include_router(router)
    return root
