"""`/ws/datapoints/stream` (spec §7.1): live datapoint broadcasts to dashboards; ping → pong."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from webmacs.services.ingest import engine_of
from webmacs.ws.auth import authenticate_websocket

router = APIRouter()

CONNECTED = orjson.dumps({"type": "connected", "message": "Subscribed to live datapoint stream."}).decode()
PONG = orjson.dumps({"type": "pong"}).decode()
INVALID_PAYLOAD = 1007


@router.websocket("/ws/datapoints/stream")
async def stream(websocket: WebSocket) -> None:
    user = await authenticate_websocket(websocket)
    if user is None:
        return
    ingest = engine_of(websocket.app)
    await websocket.send_text(CONNECTED)
    ingest.subscribers.add(websocket)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("bytes") or (message.get("text") or "").encode()
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                await websocket.close(code=INVALID_PAYLOAD, reason="Message is not a JSON object")
                break
            if obj.get("type") == "ping":
                await websocket.send_text(PONG)
    except WebSocketDisconnect:
        pass
    finally:
        ingest.subscribers.discard(websocket)
