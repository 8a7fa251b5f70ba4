"""WebMACS-TS: a time-series-first, WebMACS-compatible backend with a Rust ingestion engine."""

from importlib import metadata

from webmacs._core import __version__ as core_version

#: The WebMACS API version this server is compatible with (reported by /health and /ota/check).
__version__ = "2.0.0"


def package_version() -> str:
    """The installed distribution's version (`webmacs --version`), from its metadata."""
    try:
        return metadata.version("webmacs-ts")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


__all__ = ["__version__", "core_version", "package_version"]
