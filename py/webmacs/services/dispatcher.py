"""Webhook dispatcher: a durable outbox worker that claims due `webhook_deliveries` rows and sends them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from webmacs.repositories import webhooks as webhooks_repo
from webmacs.runtime import Runtime
from webmacs.services import ssrf
from webmacs.settings import Settings

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("webmacs.dispatcher")

# A claimed row is leased for this long beyond the request timeout; a process that dies mid-send leaves the
# row to be claimed again by anyone once the lease runs out (at-least-once, never lost).
LEASE_MARGIN_S = 30.0


def sign(secret: str, timestamp: str, body: str) -> str:
    """Hex HMAC-SHA256 over "<timestamp>.<body>" (spec §9)."""
    return hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Outcome:
    ok: bool
    code: int | None
    error: str | None
    #: A policy refusal (SSRF guard): retrying cannot help, the delivery is dead-lettered at once.
    final: bool = False


class Dispatcher:
    def __init__(self, pool: AsyncConnectionPool, settings: Settings, database_url: str) -> None:
        self.pool = pool
        self.settings = settings
        self.database_url = database_url
        self.wake = asyncio.Event()
        self.inflight: dict[asyncio.Task[None], tuple[int, int]] = {}
        #: Made for the first delivery: httpx and a client's TLS context cost ~7 MB, which a server that sends no
        #: webhooks need not carry.
        self.client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="webhook-dispatcher"),
            asyncio.create_task(self._listen(), name="webhook-outbox-listen"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        # Bounded: a task that does not end within 5 s is left behind rather than holding up shutdown.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.inflight:
            # Let sends to responsive receivers finish; then give the rest back to the outbox.
            await asyncio.wait(list(self.inflight), timeout=5)
            for task, (row_id, attempts) in list(self.inflight.items()):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                with contextlib.suppress(Exception):
                    async with self.pool.connection() as conn:
                        await webhooks_repo.release_delivery(conn, delivery_id=row_id, attempts=attempts)
        if self.client is not None:
            await self.client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self.client is None:
            import httpx

            self.client = httpx.AsyncClient(
                timeout=self.settings.webmacs_webhook_timeout_s,
                follow_redirects=False,
                # An environment proxy would both defeat address pinning and leak deliveries elsewhere.
                trust_env=False,
                limits=httpx.Limits(max_connections=self.settings.webmacs_webhook_concurrency),
            )
        return self.client

    # --- the outbox loop ---

    async def _listen(self) -> None:
        """LISTEN on a dedicated connection (not from the pool) and turn notifications into wake-ups."""
        backoff = 1.0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
                try:
                    await webhooks_repo.listen_outbox(conn)
                    backoff = 1.0
                    self.wake.set()  # catch up on anything queued while not listening
                    async for _ in conn.notifies():
                        self.wake.set()
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("webhook outbox LISTEN connection failed (%s); retrying in %.0f s", e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _run(self) -> None:
        poll = self.settings.webmacs_webhook_poll_s
        while True:
            wait_s = poll
            try:
                free = self.settings.webmacs_webhook_concurrency - len(self.inflight)
                if free > 0:
                    for row in await self._claim(free):
                        self._spawn(row)
                    wait_s = await self._seconds_to_next_due(poll)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook outbox poll failed")
            # A small floor: rows another process has locked are "due" but not claimable; do not spin on them.
            wait_s = max(wait_s, 0.05)
            if not self.wake.is_set():
                # asyncio.timeout, not wait_for: no inner task whose cancellation a shutdown would wait on
                # (wait_for's inner task, cancelled right after it was created, hung shutdowns on 3.11).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self.wake.wait()
            self.wake.clear()

    async def _claim(self, n: int) -> list[dict[str, Any]]:
        lease = self.settings.webmacs_webhook_timeout_s + LEASE_MARGIN_S
        async with self.pool.connection() as conn:
            return await webhooks_repo.claim_due_deliveries(conn, limit=n, lease_s=lease)

    async def _seconds_to_next_due(self, poll: float) -> float:
        if len(self.inflight) >= self.settings.webmacs_webhook_concurrency:
            return poll  # a finishing delivery sets `wake`
        async with self.pool.connection() as conn:
            due = await webhooks_repo.seconds_to_next_due(conn)
        return poll if due is None else max(0.0, min(poll, due))

    def _spawn(self, row: dict[str, Any]) -> None:
        task = asyncio.create_task(self._deliver(row), name=f"webhook-delivery-{row['public_id']}")
        self.inflight[task] = (row["id"], row["attempts"])

        def done(t: asyncio.Task[None]) -> None:
            self.inflight.pop(t, None)
            if not self._stopping:
                self.wake.set()

        task.add_done_callback(done)

    # --- one attempt ---

    async def _deliver(self, row: dict[str, Any]) -> None:
        try:
            outcome = await self.attempt(row["url"], row["secret"], row["payload"])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never let one delivery take the worker down
            log.exception("webhook delivery %s crashed", row["public_id"])
            outcome = Outcome(False, None, f"Transport error: {type(e).__name__}")
        final = outcome.final or row["attempts"] >= self.settings.webmacs_webhook_max_attempts
        delays = self.settings.webmacs_webhook_retry_delays_s or [0.0]
        delay = delays[min(row["attempts"], len(delays)) - 1]
        async with self.pool.connection() as conn:
            if outcome.ok:
                await webhooks_repo.mark_delivered(
                    conn, delivery_id=row["id"], attempts=row["attempts"], code=outcome.code
                )
            else:
                await webhooks_repo.mark_failed(
                    conn,
                    delivery_id=row["id"],
                    attempts=row["attempts"],
                    code=outcome.code,
                    error=outcome.error,
                    final=final,
                    delay_s=delay,
                )
        if not outcome.ok:
            log.info(
                "webhook delivery %s attempt %d failed: %s%s",
                row["public_id"],
                row["attempts"],
                outcome.error,
                " (dead letter)" if final else "",
            )

    async def attempt(self, url: str, secret: str | None, body: str) -> Outcome:
        """POST `body` to `url` once (spec §9 headers), after vetting the address it will connect to."""
        import httpx

        try:
            target = await ssrf.vet(url, self.settings.webmacs_webhook_allow_hosts)
        except ssrf.Refused as e:
            return Outcome(False, None, f"Refused by SSRF guard: {e}", final=True)
        except ValueError as e:
            return Outcome(False, None, f"Refused: invalid URL ({e})", final=True)
        except ssrf.Unresolvable as e:
            return Outcome(False, None, f"Transport error: {e}")
        pinned_url, host_headers, extensions = ssrf.pinned_request_args(url, target)
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Webhook-Timestamp": timestamp, **host_headers}
        if secret:
            headers["X-Webhook-Signature"] = sign(secret, timestamp, body)
        cap = self.settings.webmacs_webhook_max_response_bytes
        client = self._http()
        request = client.build_request(
            "POST", pinned_url, content=body.encode(), headers=headers, extensions=extensions
        )
        try:
            # httpx's timeout bounds each read; this bounds the attempt, so a trickling receiver cannot hold
            # a delivery slot forever.
            async with asyncio.timeout(self.settings.webmacs_webhook_timeout_s):
                response = await client.send(request, stream=True)
                try:
                    read = 0
                    # Read (and drop) a bounded amount of the body so the connection can be reused.
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= cap:
                            break
                finally:
                    await response.aclose()
        except httpx.TimeoutException:
            return Outcome(False, None, "Timeout")
        except httpx.HTTPError as e:
            return Outcome(False, None, f"Transport error: {str(e) or type(e).__name__}")
        except TimeoutError:  # the whole-attempt deadline below
            return Outcome(False, None, "Timeout")
        if response.status_code < 300:
            return Outcome(True, response.status_code, None)
        return Outcome(False, response.status_code, f"HTTP {response.status_code}")


def install(rt: Runtime) -> None:
    async def start(rt: Runtime) -> None:
        rt.webhook_dispatcher = Dispatcher(rt.pool, rt.settings, rt.database_url)
        await rt.webhook_dispatcher.start()

    async def stop(rt: Runtime) -> None:
        if rt.webhook_dispatcher is not None:
            await rt.webhook_dispatcher.stop()

    rt.lifecycle.append((start, stop))
