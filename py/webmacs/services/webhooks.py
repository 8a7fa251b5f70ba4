"""Outgoing webhooks (spec §9) as a durable outbox: deliveries are rows first, sent by the dispatcher."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from psycopg import AsyncConnection

from webmacs.repositories import webhooks as webhooks_repo


class WebhookEventType(StrEnum):
    """What a webhook subscribes to (spec §2); `system.health_changed` is accepted but never emitted."""

    sensor_threshold_exceeded = "sensor.threshold_exceeded"
    sensor_reading = "sensor.reading"
    experiment_started = "experiment.started"
    experiment_stopped = "experiment.stopped"
    system_health_changed = "system.health_changed"


def build_payload(event_type: str, **extras: Any) -> str:
    """The exact body sent and stored: Python `json.dumps` defaults, as the reference (spec §9)."""
    payload: dict[str, Any] = {"type": event_type, "time": datetime.now(UTC).isoformat()}
    payload.update({k: v for k, v in extras.items() if v is not None})
    return json.dumps(payload)


async def enqueue(conn: AsyncConnection, *, event_type: str, **extras: Any) -> int:
    """Record one pending delivery per enabled webhook subscribed to `event_type`, in the caller's
    transaction (so an experiment start and its webhook commit together). Returns the number queued."""
    return await webhooks_repo.enqueue_deliveries(
        conn, event_type=event_type, payload=build_payload(event_type, **extras)
    )
