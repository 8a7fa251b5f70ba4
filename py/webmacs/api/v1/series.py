"""Analyst path: `POST /datapoints/series` (spec §4.2), bucketed `GET /series`, CSV/Parquet exports, storage."""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable, Generator
from datetime import UTC, datetime, tzinfo
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from psycopg import AsyncConnection
from pydantic import BaseModel, Field

from webmacs.api.v1.datapoints import DatapointResponse
from webmacs.deps import AdminUser, Conn, ReadConn, ReaderUser, RuntimeDep, SettingsDep, get_runtime, read_dsn
from webmacs.errors import NotFound, Unavailable, Unprocessable
from webmacs.repositories import events as events_repo
from webmacs.repositories import experiments as experiments_repo
from webmacs.repositories.datapoints import datapoint_public_id
from webmacs.services import csv_export, retention
from webmacs.services import export as export_service
from webmacs.services import series as series_service
from webmacs.services.series import Agg, Mode, Point

router = APIRouter(tags=["series"])

ORJSON_OPTS = orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body, option=ORJSON_OPTS), media_type="application/json")


async def _experiment_ids(conn: AsyncConnection, points: list[Point]) -> dict[int, str]:
    ids = sorted({p.experiment_id for p in points if p.experiment_id is not None})
    if not ids:
        return {}
    return await experiments_repo.public_ids(conn, ids=ids)


# --- POST /datapoints/series (spec §4.2) ---------------------------------------------------------------------


class SeriesRequest(BaseModel):
    event_public_ids: list[str] = Field(min_length=1, max_length=20)
    minutes: int = Field(default=60, ge=1, le=14400)
    max_points: int = Field(default=500, ge=10, le=2000)
    #: Not in WebMACS: how to thin a series longer than max_points. Default: the reference striding.
    mode: Mode = "stride"


@router.post("/datapoints/series", response_model=dict[str, list[DatapointResponse]])
async def datapoint_series(body: SeriesRequest, _: ReaderUser, conn: ReadConn) -> Response:
    events = await events_repo.by_public_ids(conn, public_ids=body.event_public_ids)
    picked: dict[str, list[Point]] = {}
    for public_id in body.event_public_ids:
        event = events.get(public_id)
        if event is None:
            picked[public_id] = []
            continue
        packed = await series_service.recent(conn, event_id=event["id"], minutes=body.minutes)
        picked[public_id] = series_service.downsample(packed, body.max_points, body.mode)
    experiments = await _experiment_ids(conn, [p for points in picked.values() for p in points])
    out: dict[str, list[dict[str, Any]]] = {}
    for public_id, points in picked.items():
        rows = out[public_id] = []
        for p in points:
            time = p.time
            rows.append(
                {
                    "public_id": datapoint_public_id(public_id, time),
                    "value": p.value,
                    "timestamp": time,
                    "event_public_id": public_id,
                    "experiment_public_id": experiments.get(p.experiment_id) if p.experiment_id else None,
                }
            )
    return _json(out)


# --- GET /series (bucketed aggregates over an absolute range) ------------------------------------------------


class SeriesEvent(BaseModel):
    name: str
    unit: str
    #: `[time, value]` pairs, time ascending; time is the bucket start (or the datapoint's time without a
    #: bucket) in ISO 8601 with the offset of `tz`.
    points: list[tuple[datetime, float]]


class SeriesResponse(BaseModel):
    start: datetime
    end: datetime
    bucket: str | None
    agg: Agg | None
    tz: str
    mode: Mode | None
    max_points: int | None
    events: dict[str, SeriesEvent]


def zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise Unprocessable(f"Unknown time zone '{tz}'.") from e


def _aware(moment: datetime, tz: tzinfo) -> datetime:
    """RFC 3339 times carry their offset; a naive one is read in `tz`."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)


@router.get("/series", response_model=SeriesResponse)
async def series(
    _: ReaderUser,
    conn: ReadConn,
    settings: SettingsDep,
    events: Annotated[list[str], Query(min_length=1, max_length=20)],
    start: datetime,
    end: datetime,
    bucket: str | None = None,
    agg: Agg = "avg",
    tz: str = "UTC",
    mode: Mode | None = None,
    max_points: Annotated[int | None, Query(ge=10, le=100_000)] = None,
) -> Response:
    """Each event's datapoints in [start, end): aggregated per `bucket` (`1m`, `15 minutes`, `1 day`, `1mo` …,
    aligned in `tz`, so day buckets follow DST) with `agg`; then, if `max_points` or `mode` is given, thinned
    to at most `max_points` (default 1000) by `mode` (default `stride`). Without `bucket`, raw datapoints."""
    zone_info = zone(tz)
    start, end = _aware(start, zone_info), _aware(end, zone_info)
    if start >= end:
        raise Unprocessable("start must be before end.")
    parsed = None
    if bucket is not None:
        parsed = series_service.parse_bucket(bucket)
        if parsed is None:
            raise Unprocessable(
                f"Invalid bucket '{bucket}': use a positive count and a unit, e.g. 1m, 15 minutes, 1 day."
            )
        if (end - start).total_seconds() / parsed.nominal_seconds > series_service.MAX_BUCKETS and max_points is None:
            raise Unprocessable(
                f"More than {series_service.MAX_BUCKETS} buckets per event: widen the bucket or pass max_points."
            )
    known = await events_repo.by_public_ids(conn, public_ids=events)
    for public_id in events:
        if public_id not in known:
            raise NotFound.entity("Event", public_id)
    thin = max_points is not None or mode is not None
    out: dict[str, Any] = {}
    for public_id in dict.fromkeys(events):
        event = known[public_id]
        pairs = await series_service.event_points(
            conn,
            event_id=event["id"],
            label=public_id,
            start=start,
            end=end,
            bucket=parsed,
            agg=agg,
            tz=tz,
            zone=zone_info,
            mode=mode,
            max_points=max_points,
            preselect=settings.webmacs_series_preselect,
            cells=settings.webmacs_series_cells,
        )
        out[public_id] = {"name": event["name"], "unit": event["unit"], "points": pairs}
    return _json(
        {
            "start": start,
            "end": end,
            "bucket": parsed.interval if parsed else None,
            "agg": agg if parsed else None,
            "tz": tz,
            "mode": (mode or "stride") if thin else None,
            "max_points": (max_points or 1000) if thin else None,
            "events": out,
        }
    )


# --- exports -------------------------------------------------------------------------------------------------


#: Encoded pieces (one per frame) an export may produce ahead of the client: encoding overlaps sending, and
#: memory stays bounded.
EXPORT_QUEUE = 1
#: What the producer thread hands over: an encoded piece, the exception that ended the export, or None at the end.
_Piece = bytes | Exception | None


def _produce(body: Generator[bytes, None, None], pieces: queue.Queue[_Piece], stop: threading.Event) -> None:
    """Run the export generator on this one thread (one thread's allocations: the process does not grow an
    allocator arena per worker thread it happens to run on) until it ends or the consumer is gone."""

    def offer(item: _Piece) -> bool:
        while not stop.is_set():
            try:
                pieces.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    try:
        for piece in body:
            if not offer(piece):
                return
        offer(None)
    except Exception as e:  # handed to the response, which raises it
        offer(e)
    finally:
        body.close()


async def _drain(body: Generator[bytes, None, None], release: Callable[[], None]) -> AsyncIterator[bytes]:
    """Stream the blocking export generator, run by a producer thread of its own at most EXPORT_QUEUE pieces
    ahead of the client (backpressure); the producer stops and closes it however the response ends."""
    pieces: queue.Queue[_Piece] = queue.Queue(maxsize=EXPORT_QUEUE)
    stop = threading.Event()
    threading.Thread(target=_produce, args=(body, pieces, stop), name="webmacs-export", daemon=True).start()
    try:
        while True:
            piece = await anyio.to_thread.run_sync(pieces.get)
            if piece is None:
                return
            if isinstance(piece, Exception):
                raise piece
            if piece:
                yield piece
    finally:
        stop.set()
        release()


def _export_response(
    request: Request, sel: export_service.Selection, fmt: export_service.Format, tz: str | None, stem: str
) -> StreamingResponse:
    rt = get_runtime(request)
    settings = rt.settings
    slots = rt.export_slots
    if not slots.try_acquire():
        raise Unavailable("Too many exports are running; retry later.", retry_after=5)
    body = export_service.stream(
        read_dsn(request),
        sel,
        fmt,
        tz=tz,
        chunk_rows=settings.webmacs_export_chunk_rows,
        sort_rows=settings.webmacs_export_sort_rows,
        guard=settings.webmacs_csv_formula_guard,
    )
    return StreamingResponse(
        _drain(body, slots.release),
        media_type=export_service.CONTENT_TYPES[fmt],
        headers={"Content-Disposition": export_service.content_disposition(stem, fmt)},
    )


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/csv": {}, "application/vnd.apache.parquet": {}, "application/vnd.apache.arrow.stream": {}}
        }
    },
)
async def export_events(
    request: Request,
    _: ReaderUser,
    conn: ReadConn,
    events: Annotated[list[str], Query(min_length=1, max_length=1000)],
    start: datetime | None = None,
    end: datetime | None = None,
    format: Literal["csv", "parquet", "arrow"] = "csv",
    tz: str | None = None,
) -> StreamingResponse:
    """The events' datapoints in [start, end) (open-ended when omitted), ordered by time then event (ties of
    time in the order of the events' creation), columns `time, event_public_id, event_name, unit, value,
    experiment_public_id`. CSV times are ISO 8601 in `tz`
    (default UTC); Parquet and Arrow (an IPC stream, string columns dictionary-encoded) times are
    timestamp[us, UTC]."""
    zone_info = zone(tz) if tz else UTC
    start = _aware(start, zone_info) if start else None
    end = _aware(end, zone_info) if end else None
    if start and end and start >= end:
        raise Unprocessable("start must be before end.")
    known = await events_repo.by_public_ids(conn, public_ids=events)
    for public_id in events:
        if public_id not in known:
            raise NotFound.entity("Event", public_id)
    sel = export_service.Selection(event_ids=tuple(sorted({e["id"] for e in known.values()})), start=start, end=end)
    stem = "datapoints" + "".join(f"_{t.astimezone(UTC):%Y%m%dT%H%M%SZ}" for t in (start, end) if t)
    return _export_response(request, sel, format, tz, stem)


@router.get(
    "/experiments/{public_id}/export/parquet",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/vnd.apache.parquet": {}}}},
)
async def export_experiment_parquet(
    public_id: str, request: Request, _: ReaderUser, conn: ReadConn
) -> StreamingResponse:
    """The experiment's datapoints (of events that still exist) as Parquet, ordered by time then event. Rows are
    selected by their experiment tag, as in the CSV export: also those with a time outside the experiment's span."""
    return await _export_experiment(public_id, request, conn, "parquet")


@router.get(
    "/experiments/{public_id}/export/arrow",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/vnd.apache.arrow.stream": {}}}},
)
async def export_experiment_arrow(public_id: str, request: Request, _: ReaderUser, conn: ReadConn) -> StreamingResponse:
    """As `/export/parquet`, as an Arrow IPC stream (string columns dictionary-encoded)."""
    return await _export_experiment(public_id, request, conn, "arrow")


async def _export_experiment(
    public_id: str, request: Request, conn: AsyncConnection, fmt: export_service.Format
) -> StreamingResponse:
    experiment = await experiments_repo.by_public_id(conn, public_id=public_id)
    sel = export_service.Selection(experiment_id=experiment["id"])
    stem = csv_export.experiment_stem(experiment["name"], experiment["public_id"])
    return _export_response(request, sel, fmt, None, stem)


# --- storage (admin) -----------------------------------------------------------------------------------------


@router.get("/admin/storage", response_model=retention.StorageReport)
async def storage(rt: RuntimeDep, _: AdminUser, conn: Conn) -> retention.StorageReport:
    """Size, chunks, row estimate, TimescaleDB license and the retention/compression policies in force."""
    return await retention.storage_report(conn, rt.settings, rt.retention)
