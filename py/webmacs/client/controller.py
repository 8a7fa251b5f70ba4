"""`Controller`: WebSocket telemetry with batching, `seq`/ack tracking, reconnects and a bounded spool."""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

TELEMETRY_PATH = "/ws/controller/telemetry"
#: The server refuses a frame of more datapoints than this as a whole (spec: "Batch too large"), without an ack.
MAX_FRAME_POINTS = 500


class SpoolFull(RuntimeError):
    """`send` waited longer than its timeout for room in the spool (the server is away or too slow)."""


@dataclass(frozen=True, slots=True)
class _Point:
    event_public_id: str
    value: float
    timestamp_us: int

    def entry(self) -> dict[str, Any]:
        secs, micros = divmod(self.timestamp_us, 1_000_000)
        stamp = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return {"event_public_id": self.event_public_id, "value": self.value, "timestamp": f"{stamp}.{micros:06d}Z"}


@dataclass
class ControllerStats:
    """What the controller has seen so far (a snapshot)."""

    #: Points the server acknowledged as stored (duplicates of a resend count once per ack).
    accepted: int = 0
    #: Points the server refused (invalid value, unknown event…); they are not retried.
    rejected: int = 0
    #: Points waiting in the spool: not yet sent, or sent and not yet acknowledged.
    spooled: int = 0
    #: Successful connections after the first.
    reconnects: int = 0
    #: Frames sent again after a reconnect because their ack never came.
    resent_frames: int = 0
    #: The last error frame or connection failure, for diagnostics.
    last_error: str | None = None


def telemetry_url(base_url: str, token: str) -> str:
    """The WebSocket URL of the telemetry route for an API base URL (`http(s)://host:port` or `ws(s)://…`)."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: expected http, https, ws or wss")
    path = parts.path.rstrip("/")
    if not path.endswith(TELEMETRY_PATH):
        path += TELEMETRY_PATH
    return urlunsplit((scheme, parts.netloc, path, urlencode({"token": token}), ""))


class Controller:
    """Stream datapoints to `/ws/controller/telemetry` from a background thread.

    `send` stamps each point with a client timestamp (strictly increasing per event) and puts it in the spool;
    the thread batches spooled points into frames of at most `batch_size` (at most 500, the server's limit) or
    what arrived within `linger_s`, each with a `seq`, and keeps them until their ack arrives. On a lost
    connection (server restart, network) it
    reconnects with exponential backoff (`backoff_s` doubling up to `max_backoff_s`, with jitter) and sends the
    unacknowledged frames again: the server deduplicates them by (event, client timestamp), so an acked point is
    stored exactly once and a point is only dropped from the spool once acked.

    The spool is in memory and bounded by `spool_capacity` points: when full, `send` blocks up to its `timeout`
    and then raises `SpoolFull`. Points survive a server restart, not a restart of this process; call
    `flush()` before exiting to wait for every ack.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        batch_size: int = MAX_FRAME_POINTS,
        linger_s: float = 0.05,
        window: int = 32,
        spool_capacity: int = 1_000_000,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        open_timeout_s: float = 10.0,
    ) -> None:
        if not 1 <= batch_size <= MAX_FRAME_POINTS or window < 1 or spool_capacity < batch_size:
            raise ValueError(f"batch_size must be 1..{MAX_FRAME_POINTS}, window >= 1 and spool_capacity >= batch_size")
        self._url = telemetry_url(url, token)
        self._batch_size = batch_size
        self._linger = linger_s
        self._window = window
        self._capacity = spool_capacity
        self._backoff = (backoff_s, max_backoff_s)
        self._open_timeout = open_timeout_s
        self._lock = threading.Condition()
        self._pending: deque[_Point] = deque()
        self._in_flight: OrderedDict[int, list[_Point]] = OrderedDict()
        self._next_key = 1
        self._spooled = 0
        self._last_us: dict[str, int] = {}
        self._stats = ControllerStats()
        self._closing = False
        self._stopped = False
        self._stop = threading.Event()  # wakes the backoff sleep on close (sends must not shorten it)
        self._thread = threading.Thread(target=self._run, name="webmacs-controller", daemon=True)
        self._thread.start()

    # --- the caller's side -------------------------------------------------------------------------------

    def send(
        self, event_public_id: str, value: float, timestamp: datetime | None = None, *, timeout: float | None = None
    ) -> None:
        """Spool one point. `timestamp` (aware, or naive UTC) defaults to now; the controller keeps
        auto-stamped times strictly increasing per event so no two points share the server's dedup key."""
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"value must be finite, got {value!r}")
        if not event_public_id:
            raise ValueError("event_public_id must be a non-empty string")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._spooled >= self._capacity:
                if self._stopped:
                    raise RuntimeError("the controller is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise SpoolFull(f"spool holds {self._spooled} unacknowledged points")
                self._lock.wait(left)
            if self._closing:
                raise RuntimeError("the controller is closed")
            if timestamp is None:
                us = max(time.time_ns() // 1000, self._last_us.get(event_public_id, 0) + 1)
                self._last_us[event_public_id] = us
            else:
                aware = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
                delta = aware - datetime(1970, 1, 1, tzinfo=UTC)
                us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
            self._pending.append(_Point(event_public_id, value, us))
            self._spooled += 1
            self._lock.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point sent so far is acknowledged (or rejected); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._lock.notify_all()
            while self._spooled > 0 and not self._stopped:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left if left is not None else 0.5)
            return self._spooled == 0

    @property
    def stats(self) -> ControllerStats:
        with self._lock:
            s = ControllerStats(**vars(self._stats))
            s.spooled = self._spooled
            return s

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush (up to `timeout`), then stop the thread. True when nothing was left unacknowledged."""
        flushed = self.flush(timeout)
        with self._lock:
            self._closing = True
            self._stopped = True
            self._lock.notify_all()
        self._stop.set()
        self._thread.join(timeout=10)
        return flushed

    def __enter__(self) -> Controller:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- the thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff[0]
        connected_before = False
        while True:
            with self._lock:
                if self._stopped:
                    return
            try:
                with connect(self._url, open_timeout=self._open_timeout, max_size=None, compression=None) as ws:
                    delay = self._backoff[0]
                    with self._lock:
                        if connected_before:
                            self._stats.reconnects += 1
                        connected_before = True
                    self._session(ws)
                    continue
            except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
                self._note_error(f"connection: {e}" if connected_before else f"connect: {e}")
            except Exception as e:  # the thread must outlive any surprise; it is recorded
                self._note_error(f"unexpected: {e!r}")
            self._stop.wait(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
            delay = min(delay * 2, self._backoff[1])

    def _note_error(self, message: str) -> None:
        with self._lock:
            self._stats.last_error = message

    def _session(self, ws: ClientConnection) -> None:
        seq = 0
        frames: dict[int, int] = {}  # this connection's seq → the spool's frame key
        with self._lock:
            resend = list(self._in_flight.items())
            if resend:
                self._stats.resent_frames += len(resend)
        for key, points in resend:
            seq += 1
            frames[seq] = key
            ws.send(orjson.dumps({"seq": seq, "datapoints": [p.entry() for p in points]}))
        while True:
            batch: list[_Point] = []
            with self._lock:
                if self._stopped:
                    return
                room = len(frames) < self._window
                if room and self._pending:
                    # Give a small batch up to `linger_s` to grow.
                    deadline = time.monotonic() + self._linger
                    while len(self._pending) < self._batch_size and not self._stopped:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._lock.wait(left)
                    while self._pending and len(batch) < self._batch_size:
                        batch.append(self._pending.popleft())
                    if batch:
                        key = self._next_key
                        self._next_key += 1
                        self._in_flight[key] = batch
            if batch:
                seq += 1
                frames[seq] = key
                ws.send(orjson.dumps({"seq": seq, "datapoints": [p.entry() for p in batch]}))
                timeout = 0.0 if len(frames) < self._window else 0.2
            else:
                timeout = 0.05
            self._read_replies(ws, frames, timeout)

    def _read_replies(self, ws: ClientConnection, frames: dict[int, int], timeout: float) -> None:
        while True:
            try:
                raw = ws.recv(timeout=timeout)
            except TimeoutError:
                return
            timeout = 0.0
            try:
                msg = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "ack" and isinstance(msg.get("seq"), int):
                key = frames.pop(msg["seq"], None)
                with self._lock:
                    points = self._in_flight.pop(key, None) if key is not None else None
                    if points is not None:
                        self._spooled -= len(points)
                        self._stats.accepted += int(msg.get("accepted", 0))
                        self._stats.rejected += int(msg.get("rejected", 0))
                        self._lock.notify_all()
            elif msg.get("type") == "error":
                self._note_error(str(msg.get("message")))
