"""Analyst reads on PostgreSQL streaming replicas, with a measured staleness bound.

Every `interval` seconds the primary's flushed WAL position is sampled with the time just before the sample; a
replica that has replayed up to a sample's position holds everything the primary had committed at that time. A
replica's *staleness* is the age of the newest sample it has replayed. Reads go, round-robin, to the replicas whose
staleness is within the bound; when none is (a replica lagging, paused, down or promoted), to the primary. The
bound therefore holds whatever the replication does: at worst reads cost the primary what they cost without
replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from webmacs.db import POOL_OPTIONS

log = logging.getLogger(__name__)

#: How long a read waits for a replica connection before it goes to the primary instead.
REPLICA_CONNECT_WAIT_S = 2.0


def parse_lsn(text: str) -> int:
    """`16/B374D848` → a comparable integer."""
    hi, lo = text.split("/", 1)
    return (int(hi, 16) << 32) | int(lo, 16)


def _where(url: str) -> str:
    """host:port/db of a URL, for logs and /health (never the credentials)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'local'}:{parts.port or 5432}{parts.path}"


@dataclass
class Replica:
    url: str
    pool: AsyncConnectionPool
    #: monotonic time of the newest primary sample this replica is known to have replayed (-inf: never/unknown).
    fresh_at: float = float("-inf")
    error: str | None = None

    def staleness(self, now: float) -> float:
        return now - self.fresh_at


@dataclass
class ReadTarget:
    """Where one request reads: a pool for its queries and the DSN for COPYs on connections of their own."""

    pool: AsyncConnectionPool
    url: str
    replica: Replica | None = None


@dataclass
class ReadRouter:
    primary: AsyncConnectionPool
    primary_url: str
    max_staleness_s: float
    replicas: list[Replica] = field(default_factory=list)
    interval_s: float = 1.0
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _task: asyncio.Task[None] | None = None

    @classmethod
    def build(
        cls, primary: AsyncConnectionPool, primary_url: str, urls: list[str], max_staleness_s: float, pool_size: int
    ) -> ReadRouter:
        replicas = [
            Replica(
                url,
                AsyncConnectionPool(
                    url,
                    min_size=1,
                    max_size=pool_size,
                    open=False,
                    kwargs={"options": POOL_OPTIONS, "application_name": "webmacs-read"},
                    timeout=REPLICA_CONNECT_WAIT_S,
                    # A replica restarts independently of the primary: a pooled connection it has since dropped
                    # is found at checkout (one round trip), not by the request's query.
                    check=AsyncConnectionPool.check_connection,
                    name=f"webmacs-read-{i}",
                ),
            )
            for i, url in enumerate(urls)
        ]
        # Sample often enough that a healthy replica is usable well inside the bound.
        return cls(primary, primary_url, max_staleness_s, replicas, interval_s=min(1.0, max_staleness_s / 4))

    async def open(self) -> None:
        if not self.replicas:
            return
        for r in self.replicas:
            # A replica that is down at start-up must not stop the server: reads use the primary meanwhile.
            await r.pool.open(wait=False)
        await self.measure()
        self._task = asyncio.create_task(self._watch(), name="webmacs-read-replicas")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for r in self.replicas:
            await r.pool.close()

    def choose(self) -> ReadTarget:
        now = time.monotonic()
        usable = [r for r in self.replicas if r.staleness(now) <= self.max_staleness_s]
        if not usable:
            return ReadTarget(self.primary, self.primary_url)
        r = usable[next(self._turn) % len(usable)]
        return ReadTarget(r.pool, r.url, r)

    def status(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for r in self.replicas:
            age = r.staleness(now)
            out.append(
                {
                    "replica": _where(r.url),
                    "usable": age <= self.max_staleness_s,
                    "staleness_s": round(age, 3) if age != float("inf") else None,
                    "error": r.error,
                }
            )
        return out

    def unusable(self, replica: Replica, reason: str) -> None:
        if replica.error != reason:
            log.warning("read replica %s not used: %s", _where(replica.url), reason)
        replica.fresh_at = float("-inf")
        replica.error = reason

    async def measure(self) -> None:
        """One round: sample the primary, then see how far each replica has replayed."""
        taken = time.monotonic()
        try:
            async with self.primary.connection(timeout=self.interval_s * 5) as conn:
                row = await (await conn.execute("SELECT pg_current_wal_flush_lsn()::text")).fetchone()
        except (psycopg.Error, PoolTimeout) as e:
            # Without a primary sample no replica can prove it is fresh; existing proofs simply age.
            log.debug("read replicas: primary WAL position unavailable: %s", e)
            return
        if row is not None:
            self._samples.append((taken, parse_lsn(row[0])))
        horizon = taken - 2 * self.max_staleness_s - 10 * self.interval_s
        while len(self._samples) > 1 and self._samples[0][0] < horizon:
            self._samples.popleft()
        for r in self.replicas:
            await self._check(r)

    async def _check(self, r: Replica) -> None:
        try:
            async with r.pool.connection(timeout=self.interval_s * 2) as conn:
                cur = await conn.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as e:
            self.unusable(r, f"unreachable: {type(e).__name__}")
            return
        if row is None or not row[0] or row[1] is None:
            # Promoted (or not a standby at all): its history may have forked from the primary's.
            self.unusable(r, "not a streaming replica (pg_is_in_recovery() is false)")
            return
        replayed = parse_lsn(row[1])
        newest = max((t for t, lsn in self._samples if lsn <= replayed), default=None)
        if newest is not None and newest > r.fresh_at:
            r.fresh_at = newest
            if r.error is not None:
                log.info("read replica %s in use again", _where(r.url))
            r.error = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.measure()
            except Exception:  # a watcher that dies would silently pin reads to stale proofs
                log.exception("read replica check failed")

    @contextlib.asynccontextmanager
    async def connection(self, target: ReadTarget) -> AsyncIterator[tuple[AsyncConnection, ReadTarget]]:
        """A connection of `target`; a replica that cannot give one in time is skipped for the primary."""
        async with contextlib.AsyncExitStack() as stack:
            conn: AsyncConnection | None = None
            if target.replica is not None:
                try:
                    conn = await stack.enter_async_context(target.pool.connection(timeout=REPLICA_CONNECT_WAIT_S))
                except (psycopg.OperationalError, PoolTimeout) as e:
                    self.unusable(target.replica, f"unreachable: {type(e).__name__}")
                    target = ReadTarget(self.primary, self.primary_url)
            if conn is None:
                conn = await stack.enter_async_context(self.primary.connection())
            yield conn, target
