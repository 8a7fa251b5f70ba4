"""Exceptions raised by the engine (`webmacs._core`), re-exported as the public hierarchy."""

from webmacs._core import (
    ConfigError,
    CoreException,
    DatabaseError,
    EngineClosedError,
    FrameTooLargeError,
    InvalidDataError,
    InvalidFrameError,
    LineProtocolError,
    QueueFullError,
)

__all__ = [
    "ConfigError",
    "CoreException",
    "DatabaseError",
    "EngineClosedError",
    "FrameTooLargeError",
    "InvalidDataError",
    "InvalidFrameError",
    "LineProtocolError",
    "QueueFullError",
]
