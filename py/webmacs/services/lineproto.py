"""Influx line protocol into the engine: parse in Rust, map series to events (creating them when allowed), queue
the parsed points through the same engine path as every protocol, and return once they are committed."""

from __future__ import annotations

import asyncio
import collections
import logging
import zlib
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from webmacs._core import LineBatch, Receipt, parse_lines
from webmacs.deps import User
from webmacs.exceptions import QueueFullError
from webmacs.repositories import lineproto as lineproto_repo
from webmacs.runtime import Runtime
from webmacs.services.ingest import CommitTimeout, Ingest

log = logging.getLogger("webmacs.lineproto")

#: Points per engine submission: well inside one sender's share of the ingest queue.
CHUNK_POINTS = 5000
#: Bodies larger than this are parsed on a worker thread (the loop is not held for a large body).
INLINE_PARSE_BYTES = 256 * 1024
#: Series names cached per process (series → event public id).
MAX_CACHED_SERIES = 100_000
#: An event name holds at most this many characters: longer series cannot become events.
MAX_SERIES_CHARS = 255


class BodyTooLarge(Exception):
    """The body (after decompression) is over the limit."""


class BadBody(Exception):
    """The body cannot be decoded (a broken gzip stream)."""


@dataclass(frozen=True)
class WriteResult:
    accepted: int
    rejected: dict[str, int]


def gunzip(body: bytes, limit: int) -> bytes:
    """Decompress a gzip body, refusing (BodyTooLarge) as soon as it passes `limit` bytes: a bomb is never
    inflated beyond the limit."""
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadBody(f"invalid gzip body: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise BodyTooLarge(f"decompressed body exceeds {limit} bytes")
    if not d.eof:
        raise BadBody("truncated gzip body")
    return out


class LineProtocol:
    """One per app: the series cache and the counters `/metrics` reports."""

    def __init__(self, ingest: Ingest, pool: AsyncConnectionPool, *, auto_events: bool, max_auto_events: int) -> None:
        self.ingest = ingest
        self.pool = pool
        self.auto_events = auto_events
        self.max_auto_events = max_auto_events
        self._series: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.requests = 0
        self.accepted = 0
        self.rejected: collections.Counter[str] = collections.Counter()
        self.events_created = 0

    def counters(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "events_created": self.events_created,
        }

    async def parse(self, body: bytes, precision: str, max_points: int) -> LineBatch:
        if len(body) <= INLINE_PARSE_BYTES:
            return parse_lines(body, precision, max_points)
        return await asyncio.to_thread(parse_lines, body, precision, max_points)

    async def write(self, batch: LineBatch, user: User) -> WriteResult:
        """Queue the batch's points and wait until they are committed (CommitTimeout when they are not in time)."""
        self.requests += 1
        events = await self._events(batch.series, batch.series_counts(), user)
        rejected: collections.Counter[str] = collections.Counter(batch.rejects)
        accepted = 0
        queued: list[Receipt] = []
        for start in range(0, batch.points, CHUNK_POINTS):
            end = min(start + CHUNK_POINTS, batch.points)
            receipt = await self._submit(batch, events, start, end, with_rejects=start == 0, user=user)
            accepted += receipt.accepted
            rejected.update(receipt.reasons)
            if receipt.accepted:
                queued.append(receipt)
        if batch.points == 0 and batch.rejects:
            # Nothing to queue, but what was rejected is counted by the engine like every other rejection.
            await self._submit(batch, events, 0, 0, with_rejects=True, user=user)
        if "unknown_event" in rejected:
            self._series.clear()  # a mapped event may have been deleted: look the series up again next time
        if queued:
            # Tickets commit in order: the last one committed means every chunk did.
            await self.ingest.wait_committed(queued[-1].ticket)
            refused = sum(len(r.refused()) for r in queued)
            if refused:
                rejected["database_refused"] += refused
                accepted -= refused
        self.accepted += accepted
        self.rejected.update(rejected)
        return WriteResult(accepted=accepted, rejected=dict(rejected))

    async def _submit(
        self, batch: LineBatch, events: list[str | None], start: int, end: int, *, with_rejects: bool, user: User
    ) -> Receipt:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ingest.ack_timeout_s
        while True:
            try:
                return self.ingest.engine.submit_lines(
                    batch,
                    events,
                    start,
                    end,
                    with_rejects=with_rejects,
                    source=user.ingest_source,
                    instance=user.plugin_instance_id,
                )
            except QueueFullError:
                if loop.time() >= deadline:
                    raise CommitTimeout(self.ingest.ack_timeout_s, "ingest queue is full") from None
                await self.ingest.next_commit(timeout=1.0)

    async def _events(self, series: list[str], counts: list[int], user: User) -> list[str | None]:
        """Each series' event public id (None: no event and none may be created)."""
        found = {s: self._series[s] for s in series if s in self._series}
        missing = [s for s in series if s not in found]
        if missing:
            async with self.pool.connection() as conn:
                found.update(await lineproto_repo.lookup(conn, series=missing))
            missing = [s for s in series if s not in found]
        if missing and self.auto_events and user.token_id is not None:
            # The busiest unknown series first, when the cap allows only some.
            by_points = dict(zip(series, counts, strict=True))
            missing.sort(key=lambda s: -by_points[s])
            created = await self._create(missing, user)
            if created:
                found.update(created)
                await self.ingest.refresh_catalog()
        for s, public_id in found.items():
            self._series[s] = public_id
            self._series.move_to_end(s)
        while len(self._series) > MAX_CACHED_SERIES:
            self._series.popitem(last=False)
        return [found.get(s) for s in series]

    async def _create(self, missing: list[str], user: User) -> dict[str, str]:
        assert user.token_id is not None  # checked by the caller
        created: dict[str, str] = {}
        async with self.pool.connection() as conn:
            room = self.max_auto_events - await lineproto_repo.created_by(conn, token_id=user.token_id)
            if room <= 0:
                return created
            instance = user.plugin_instance_id or await lineproto_repo.default_instance(conn)
            for s in missing:
                if len(created) >= room:
                    break
                if len(s) > MAX_SERIES_CHARS:
                    continue
                public_id = await lineproto_repo.create_event(
                    conn, series=s, instance_id=instance, token_id=user.token_id, user_public_id=user.public_id
                )
                if public_id is not None:
                    created[s] = public_id
        if created:
            self.events_created += len(created)
            log.info("line protocol: created %d events for new series", len(created))
        # Series whose event appeared concurrently under the same name.
        rest = [s for s in missing if s not in created and len(s) <= MAX_SERIES_CHARS]
        if rest and len(created) < len(missing):
            async with self.pool.connection() as conn:
                created.update(await lineproto_repo.lookup(conn, series=rest))
        return created


def install(rt: Runtime) -> None:
    async def start(rt: Runtime) -> None:
        settings = rt.settings
        rt.lineproto_ = LineProtocol(
            rt.ingest,
            rt.pool,
            auto_events=settings.webmacs_lp_auto_events,
            max_auto_events=settings.webmacs_lp_max_auto_events,
        )

    async def stop(rt: Runtime) -> None:
        return None

    rt.lifecycle.append((start, stop))
