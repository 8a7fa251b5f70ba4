"""Unix-epoch microseconds ⇄ aware UTC datetimes, exactly (integer arithmetic, never a float): the engine, the
datapoint ids, the series packing and the importer all count time this way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: PostgreSQL's epoch (2000-01-01) in µs after the Unix epoch: `timestamptz_send` counts from it.
PG_EPOCH_US = 946_684_800_000_000
_MICROSECOND = timedelta(microseconds=1)


def to_micros(time: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    return (time - EPOCH) // _MICROSECOND


def from_micros(us: int) -> datetime:
    """The aware UTC datetime `us` microseconds after the epoch (OverflowError outside years 1–9999)."""
    return EPOCH + timedelta(microseconds=us)
