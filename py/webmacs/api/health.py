"""`GET /health` (spec §17): public, never rate limited, always 200; `GET /health/ready`: 503 when not ready.

Both tell the truth about ingest too: the age of the oldest accepted datapoint not yet written, the queue, and
whether the engine's writers are failing. A writer that stalls shows as degraded within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import webmacs
from webmacs.deps import get_runtime
from webmacs.repositories import datapoints as datapoints_repo
from webmacs.runtime import Runtime

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

#: The database probe's deadline: a database that does not answer is reported, not waited for.
DB_PROBE_TIMEOUT_S = 5.0


class IngestHealth(BaseModel):
    status: str
    queue_depth: int
    oldest_unacked_s: float | None
    writer_failing_s: float | None
    batches_in_flight: int


class ReplicaHealth(BaseModel):
    replica: str
    #: Provably within WEBMACS_READ_MAX_STALENESS_S of the primary: analyst reads go there.
    usable: bool
    staleness_s: float | None
    error: str | None


class HealthResponse(BaseModel):
    status: str
    version: str
    database: str
    last_datapoint: datetime | None
    uptime_seconds: float
    ingest: IngestHealth | None = None
    #: Only with WEBMACS_READ_DATABASE_URL. A stale replica does not degrade the status: reads use the primary.
    read_replicas: list[ReplicaHealth] | None = None


def _ingest_health(rt: Runtime) -> IngestHealth | None:
    if rt.ingest_ is None:
        return None
    h: dict[str, Any] = rt.ingest_.engine.health()
    limit = rt.settings.webmacs_health_max_unacked_s
    stalled = (h["oldest_unacked_s"] or 0.0) > limit or (h["writer_failing_s"] or 0.0) > 0.0
    status = "closing" if h["closing"] else ("degraded" if stalled else "ok")
    return IngestHealth(
        status=status,
        queue_depth=h["queue_depth"],
        oldest_unacked_s=None if h["oldest_unacked_s"] is None else round(h["oldest_unacked_s"], 3),
        writer_failing_s=None if h["writer_failing_s"] is None else round(h["writer_failing_s"], 1),
        batches_in_flight=h["batches_in_flight"],
    )


async def _probe(request: Request) -> HealthResponse:
    rt = get_runtime(request)
    database, last = "ok", None

    async def read() -> datetime | None:
        async with rt.pool.connection(timeout=DB_PROBE_TIMEOUT_S) as conn:
            return await datapoints_repo.last_time(conn)

    try:
        last = await asyncio.wait_for(read(), DB_PROBE_TIMEOUT_S)
    except Exception as e:  # any failure to reach the database is reported, not raised
        log.warning("health check: database unavailable: %s", e)
        database = "error"
    ingest = _ingest_health(rt)
    ok = database == "ok" and (ingest is None or ingest.status == "ok")
    return HealthResponse(
        status="ok" if ok else "degraded",
        version=webmacs.__version__,
        database=database,
        last_datapoint=last,
        uptime_seconds=round(time.monotonic() - rt.started_at, 1),
        ingest=ingest,
        read_replicas=[ReplicaHealth(**r) for r in rt.reads.status()] if rt.reads.replicas else None,
    )


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> HealthResponse:
    return await _probe(request)


@router.get("/health/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def ready(request: Request) -> Any:
    """For load balancers and orchestrators: 200 when the database answers and ingest keeps up, else 503."""
    body = await _probe(request)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.status == "ok" else 503)
