"""Plugin descriptors: what a device plugin declares (metadata and channels), and the built-in ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["input", "output", "bidirectional"]


@dataclass(frozen=True)
class Channel:
    """One I/O channel a plugin declares; becomes a channel mapping (and usually an event) per instance."""

    id: str
    name: str
    direction: Direction
    unit: str
    min_value: float
    max_value: float


@dataclass(frozen=True)
class PluginDescriptor:
    """A plugin class as the API knows it: `GET /plugins/available` metadata plus its declared channels."""

    id: str
    name: str
    version: str
    vendor: str
    description: str
    url: str
    channels: tuple[Channel, ...] = field(default=())
    #: Distribution that provides it (None for the built-ins); used to attribute uploaded packages.
    distribution: str | None = None

    def metadata(self) -> dict[str, str]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "vendor": self.vendor,
            "description": self.description,
            "url": self.url,
        }


def builtin() -> list[PluginDescriptor]:
    """The plugins every installation has, in the order `GET /plugins/available` lists them."""
    from webmacs.plugins.simulated import SIMULATED
    from webmacs.plugins.system import SYSTEM

    return [SIMULATED, SYSTEM]
