"""WebMACS-TS: a time-series-first, WebMACS-compatible backend with a Rust ingestion engine."""

from webmacs._core import __version__ as core_version

#: The WebMACS API version this server is compatible with (reported by /health and /ota/check).
__version__ = "2.0.0"

__all__ = ["__version__", "core_version"]
