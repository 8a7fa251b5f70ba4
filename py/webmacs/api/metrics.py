"""`GET /metrics` for Prometheus: the engine's counters read at scrape time, API request counts and latency by
route template, the database pool, the webhook outbox and the live stream (text format; OpenMetrics on request).

Nothing here runs on the ingest path: the engine's atomic counters are copied when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from fastapi.routing import iter_route_contexts
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webmacs.deps import get_runtime, get_settings
from webmacs.repositories import webhooks as webhooks_repo

router = APIRouter(tags=["metrics"])

# Engine counters exported as Prometheus counters (the rest of `Engine.stats()` are gauges or the summary).
_ENGINE_COUNTERS = {
    "frames": "Frames (requests, WebSocket messages, line-protocol chunks) submitted to the engine",
    "frames_refused": "Frames refused as a whole (not JSON, too large)",
    "accepted": "Datapoints accepted for writing",
    "written": "Datapoints written to the database",
    "duplicates": "Datapoints dropped as duplicates of stored (event, time) pairs",
    "batches": "Batches committed",
    "bisections": "Extra transactions spent isolating rows the database refused",
    "retries": "Batch write retries after transient failures",
    "reconnects": "Writer reconnections to the database",
    "queue_full": "Frames refused because the ingest queue was full",
    "broadcast_dropped": "Live-view updates dropped by the broadcast throttle",
}


@dataclass
class Snapshot:
    """What one scrape reports, gathered before the registry is rendered."""

    engine: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    websockets: dict[str, int] = field(default_factory=dict)
    pool: dict[str, int] = field(default_factory=dict)
    outbox: dict[str, int] = field(default_factory=dict)
    lineproto: dict[str, Any] = field(default_factory=dict)


class ScrapeCollector(Collector):
    """Turns the current scrape's snapshot into metric families (custom Collector: no state between scrapes)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        for name, doc in _ENGINE_COUNTERS.items():
            if name in s.engine:
                yield CounterMetricFamily(f"webmacs_engine_{name}", doc, value=s.engine[name])
        by_protocol = s.engine.get("by_protocol", {})
        if by_protocol:
            frames = CounterMetricFamily(
                "webmacs_ingest_frames", "Frames through the engine's pipeline, by protocol", labels=["protocol"]
            )
            points = CounterMetricFamily(
                "webmacs_ingest_datapoints",
                "Datapoints accepted or rejected, by protocol (rest, websocket, mqtt, line_protocol)",
                labels=["protocol", "outcome"],
            )
            for protocol, c in sorted(by_protocol.items()):
                frames.add_metric([protocol], c["frames"])
                points.add_metric([protocol, "accepted"], c["accepted"])
                points.add_metric([protocol, "rejected"], c["rejected"])
            yield frames
            yield points
        rejected = CounterMetricFamily(
            "webmacs_engine_rejected", "Datapoints rejected, by reason (every protocol)", labels=["reason"]
        )
        for reason, n in sorted(s.engine.get("rejected", {}).items()):
            rejected.add_metric([reason], n)
        yield rejected
        if "batches" in s.engine:
            flush = SummaryMetricFamily("webmacs_engine_copy_seconds", "Time to COPY and commit one batch", labels=[])
            flush.add_metric([], count_value=s.engine["batches"], sum_value=s.engine.get("flush_us_total", 0) / 1e6)
            yield flush
            yield GaugeMetricFamily(
                "webmacs_engine_copy_max_seconds", "Longest batch COPY so far", value=s.engine["flush_us_max"] / 1e6
            )
        if s.health:
            yield GaugeMetricFamily(
                "webmacs_engine_queue_depth", "Datapoints queued for writing", value=s.health["queue_depth"]
            )
            yield GaugeMetricFamily(
                "webmacs_engine_oldest_unacked_seconds",
                "Age of the oldest accepted datapoint not yet committed (0 when none)",
                value=s.health["oldest_unacked_s"] or 0.0,
            )
            yield GaugeMetricFamily(
                "webmacs_engine_writer_failing_seconds",
                "How long the writers have been failing (0 when writing works)",
                value=s.health["writer_failing_s"] or 0.0,
            )
            yield GaugeMetricFamily(
                "webmacs_engine_batches_in_flight", "Batches being written", value=s.health["batches_in_flight"]
            )
        ws = s.websockets
        if ws:
            yield GaugeMetricFamily(
                "webmacs_ws_telemetry_sessions", "Open telemetry WebSockets", value=ws.get("telemetry_sessions", 0)
            )
            yield GaugeMetricFamily(
                "webmacs_live_subscribers", "Live-stream subscribers", value=ws.get("subscribers", 0)
            )
            yield CounterMetricFamily(
                "webmacs_live_subscribers_dropped",
                "Live-stream subscribers dropped for falling behind",
                value=ws.get("subscribers_dropped", 0),
            )
        if s.pool:
            pool = GaugeMetricFamily("webmacs_db_pool_connections", "API connection pool", labels=["state"])
            pool.add_metric(["size"], s.pool.get("pool_size", 0))
            pool.add_metric(["available"], s.pool.get("pool_available", 0))
            pool.add_metric(["waiting"], s.pool.get("requests_waiting", 0))
            yield pool
        if s.outbox:
            outbox = GaugeMetricFamily("webmacs_webhook_deliveries", "Webhook deliveries by state", labels=["state"])
            for state in ("pending", "dead_letter"):
                outbox.add_metric([state], s.outbox.get(state, 0))
            yield outbox
        lp = s.lineproto
        if lp:
            yield CounterMetricFamily(
                "webmacs_lineproto_requests", "Line-protocol write requests answered", value=lp["requests"]
            )
            yield CounterMetricFamily(
                "webmacs_lineproto_accepted", "Line-protocol points accepted for writing", value=lp["accepted"]
            )
            lp_rejected = CounterMetricFamily(
                "webmacs_lineproto_rejected", "Line-protocol points or fields rejected, by reason", labels=["reason"]
            )
            for reason, n in sorted(lp["rejected"].items()):
                lp_rejected.add_metric([reason], n)
            yield lp_rejected
            yield CounterMetricFamily(
                "webmacs_lineproto_events_created", "Events created for unknown series", value=lp["events_created"]
            )


class Metrics:
    """The app's registry: request metrics (updated by the middleware) and the scrape-time collector."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "webmacs_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "webmacs_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.scrape = ScrapeCollector()
        self.registry.register(self.scrape)
        self.lock = asyncio.Lock()


class MetricsMiddleware:
    """Counts every HTTP request by its route template (`/api/v1/events/{public_id}`, never the raw path, so
    the label set stays bounded); unmatched paths count as `<unmatched>`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._templates: dict[tuple[Any, frozenset[str]], str] | None = None

    def _template(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:
            return "<unmatched>"
        if self._templates is None:
            # Routes of included routers know only their own path; FastAPI's route contexts have the full one.
            # Keyed by endpoint and methods (route objects may be rebuilt); the routes are fixed once the app serves.
            self._templates = {}
            for ctx in iter_route_contexts(scope["app"].routes):
                original = ctx.original_route
                if ctx.path_format:
                    key = (getattr(original, "endpoint", None), frozenset(getattr(original, "methods", None) or ()))
                    self._templates.setdefault(key, ctx.path_format)
        key = (getattr(route, "endpoint", None), frozenset(getattr(route, "methods", None) or ()))
        return self._templates.get(key) or getattr(route, "path", None) or "<unmatched>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            template = self._template(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)


def _authorized(request: Request, token: str) -> bool:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


async def _snapshot(request: Request) -> Snapshot:
    rt = get_runtime(request)
    snap = Snapshot()
    ingest = rt.ingest_
    if ingest is not None:
        snap.engine = ingest.engine.stats()
        snap.health = ingest.engine.health()
        snap.websockets = ingest.engine.websocket_stats()
    if rt.lineproto_ is not None:
        snap.lineproto = rt.lineproto_.counters()
    pool = rt.pool
    snap.pool = pool.get_stats()
    try:
        async with pool.connection(timeout=2) as conn:
            snap.outbox = await webhooks_repo.outbox_counts(conn)
    except Exception:  # a scrape reports what it can; the database's state is in /health
        snap.outbox = {}
    return snap


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    settings = get_settings(request)
    if settings.webmacs_metrics_token and not _authorized(request, settings.webmacs_metrics_token):
        raise HTTPException(401, "Authentication required.", headers={"WWW-Authenticate": "Bearer"})
    m = get_runtime(request).metrics
    snap = await _snapshot(request)
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    async with m.lock:
        m.scrape.snapshot = snap
        body = encoder(m.registry)
    return Response(body, media_type=content_type)
