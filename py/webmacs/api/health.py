"""`GET /health` (spec §17): public, never rate limited, always 200."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel

import webmacs

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


# The hypertable's only index is (event_id, time): a plain max(time) scans every chunk (350 ms at 3 M rows,
# growing with the table, on every health probe). One backward index probe per event, newest chunk first,
# answers in milliseconds whatever the size. Datapoints never outlive their event (deleted together).
_LAST_DATAPOINT = "SELECT max((SELECT max(d.time) FROM datapoints d WHERE d.event_id = e.id)) FROM events e"


class HealthResponse(BaseModel):
    status: str
    version: str
    database: str
    last_datapoint: datetime | None
    uptime_seconds: float


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    state = request.app.state
    database, last = "ok", None
    try:
        async with state.pool.connection(timeout=5) as conn:
            cur = await conn.execute(_LAST_DATAPOINT)
            row = await cur.fetchone()
            last = row[0] if row else None
    except Exception as e:  # any failure to reach the database is reported, not raised
        log.warning("health check: database unavailable: %s", e)
        database = "error"
    return HealthResponse(
        status="ok" if database == "ok" else "degraded",
        version=webmacs.__version__,
        database=database,
        last_datapoint=last,
        uptime_seconds=round(time.monotonic() - state.started_at, 1),
    )
