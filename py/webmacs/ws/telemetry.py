"""`/ws/controller/telemetry` (spec §7.2): controllers push frames; errors as frames, acks after commit."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from webmacs.exceptions import EngineClosedError, FrameTooLargeError, InvalidFrameError, QueueFullError
from webmacs.services.ingest import Ingest, engine_of
from webmacs.ws.auth import authenticate_websocket

router = APIRouter()

#: Close code for a frame that is not a JSON object (the reference drops the connection).
INVALID_PAYLOAD = 1007
NO_VALID = orjson.dumps({"type": "error", "message": "No valid datapoints in batch"}).decode()


def _no_valid_entry(reasons: dict[str, int], accepted: int) -> bool:
    # Entries for unknown or unlinked events are valid in shape and dropped silently (spec §7.2 step 5).
    return accepted == 0 and not reasons.get("unknown_event") and not reasons.get("inactive_event")


async def _sender(ws: WebSocket, ingest: Ingest, outbox: asyncio.Queue[tuple[int, str]]) -> None:
    """Send error frames and acks in frame order; an ack waits for its frame's commit."""
    while True:
        ticket, text = await outbox.get()
        if ticket:
            await ingest.wait_committed(ticket)
        await ws.send_text(text)


async def _submit(ingest: Ingest, frame: bytes) -> Any:
    while True:
        try:
            return ingest.submit(frame)
        except QueueFullError:
            # Back-pressure: stop reading this socket (TCP pushes back to the controller) until a batch commits.
            await ingest.next_commit()


@router.websocket("/ws/controller/telemetry")
async def telemetry(websocket: WebSocket) -> None:
    user = await authenticate_websocket(websocket)
    if user is None:
        return
    ingest = engine_of(websocket.app)
    outbox: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    sender = asyncio.create_task(_sender(websocket, ingest, outbox))
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            try:
                receipt = await _submit(ingest, data)
            except InvalidFrameError:
                await websocket.close(code=INVALID_PAYLOAD, reason="Frame is not a JSON object")
                break
            except FrameTooLargeError as e:
                outbox.put_nowait((0, orjson.dumps({"type": "error", "message": str(e)}).decode()))
                continue
            if receipt.total and not receipt.accepted and _no_valid_entry(receipt.reasons, receipt.accepted):
                outbox.put_nowait((0, NO_VALID))
            if receipt.seq is not None:
                ack = {"type": "ack", "seq": receipt.seq, "accepted": receipt.accepted, "rejected": receipt.rejected}
                outbox.put_nowait((receipt.ticket, orjson.dumps(ack).decode()))
            if sender.done():
                break  # the socket failed while sending
    except (WebSocketDisconnect, EngineClosedError):
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
