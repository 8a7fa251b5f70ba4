"""A TCP fault proxy between the server and PostgreSQL, driven by the tests (test scaffolding only).

Every connection is classified by the `application_name` in its PostgreSQL startup packet: the engine's own
connections (`webmacs-ingest-*`, `webmacs-ws-*`, `webmacs-export`) are "engine", everything else "api". Per class
the proxy passes traffic, holds it (a blackhole: bytes are neither forwarded nor refused, connections stay
open), delays it, or refuses new connections; `reset()` kills the class's open connections with a TCP RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "blackhole", "refuse"]
_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104
_PROTOCOL_3 = 196608


def classify(application_name: str) -> str:
    return "engine" if application_name.startswith(("webmacs-ingest", "webmacs-ws", "webmacs-export")) else "api"


@dataclass
class _Conn:
    kind: str
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter


@dataclass
class FaultProxy:
    target_port: int
    port: int = 0
    modes: dict[str, Mode] = field(default_factory=lambda: {"engine": "pass", "api": "pass"})
    delay_s: dict[str, float] = field(default_factory=lambda: {"engine": 0.0, "api": 0.0})
    connections: list[_Conn] = field(default_factory=list)
    accepted: dict[str, int] = field(default_factory=lambda: {"engine": 0, "api": 0})

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.flowing = {kind: asyncio.Event() for kind in ("engine", "api")}
            for event in self.flowing.values():
                event.set()
            server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
            self.port = server.sockets[0].getsockname()[1]
            self._server = server
            ready.set()
            self.loop.run_forever()
            # Stopped: close what the loop owns (its self-pipe, the listening socket).
            self.loop.run_until_complete(self._server.wait_closed())
            self.loop.close()

        self.thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def url(self, db_url: str) -> str:
        """`db_url` pointed at the proxy."""
        return db_url.replace(f":{self.target_port}/", f":{self.port}/")

    def set(self, mode: Mode, *kinds: str, delay_s: float | None = None) -> None:
        done = threading.Event()

        def apply() -> None:
            for kind in kinds or ("engine", "api"):
                self.modes[kind] = mode
                if delay_s is not None:
                    self.delay_s[kind] = delay_s
                if mode == "blackhole":
                    self.flowing[kind].clear()
                else:
                    self.flowing[kind].set()
            done.set()

        self.loop.call_soon_threadsafe(apply)
        done.wait(10)

    def reset(self, *kinds: str) -> int:
        """Abort the open connections of these classes with a TCP RST (both sides); returns how many."""
        kinds = kinds or ("engine", "api")
        done = threading.Event()
        count = [0]

        def kill() -> None:
            for c in [c for c in self.connections if c.kind in kinds]:
                for w in (c.client, c.server):
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    w.transport.abort()
                self.connections.remove(c)
                count[0] += 1
            done.set()

        self.loop.call_soon_threadsafe(kill)
        done.wait(10)
        return count[0]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.reset()
            self.loop.call_soon_threadsafe(self._server.close)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    # -- the relay ------------------------------------------------------------------------------------
    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            c_writer.close()
            return
        kind = "api"
        try:
            # Pass SSL/GSS negotiation through until the startup packet, which names the application.
            while True:
                head = await c_reader.readexactly(8)
                length, code = struct.unpack("!ii", head)
                rest = await c_reader.readexactly(length - 8)
                if code in (_SSL_REQUEST, _GSS_REQUEST):
                    s_writer.write(head + rest)
                    await s_writer.drain()
                    c_writer.write(await s_reader.readexactly(1))
                    await c_writer.drain()
                    continue
                if code == _PROTOCOL_3:
                    parts = rest.split(b"\0")
                    params = dict(zip(parts[0::2], parts[1::2], strict=False))
                    kind = classify(params.get(b"application_name", b"").decode(errors="replace"))
                s_writer.write(head + rest)
                break
        except (asyncio.IncompleteReadError, ConnectionError, struct.error):
            c_writer.close()
            s_writer.close()
            return
        self.accepted[kind] += 1
        if self.modes[kind] == "refuse":
            c_writer.transport.abort()
            s_writer.transport.abort()
            return
        conn = _Conn(kind, c_writer, s_writer)
        self.connections.append(conn)
        await asyncio.gather(
            self._pump(kind, c_reader, s_writer), self._pump(kind, s_reader, c_writer), return_exceptions=True
        )
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)
        for w in (c_writer, s_writer):
            w.close()

    async def _pump(self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            # Held, not dropped: bytes read during a blackhole are delivered once it ends (a stalled network
            # path, not a lost one); the connection itself stays open.
            await self.flowing[kind].wait()
            if self.delay_s[kind]:
                await asyncio.sleep(self.delay_s[kind])
            writer.write(data)
            await writer.drain()


def timed(fn: object) -> tuple[object, float]:
    """Call `fn()` and return its result (or the exception) and the seconds it took."""
    started = time.monotonic()
    try:
        result = fn()  # type: ignore[operator]
    except Exception as e:
        result = e
    return result, time.monotonic() - started
