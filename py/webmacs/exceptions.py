"""Exceptions raised by the engine (`webmacs._core`), re-exported as the public hierarchy."""

from webmacs._core import CoreException, FrameTooLargeError, InvalidFrameError

__all__ = ["CoreException", "FrameTooLargeError", "InvalidFrameError"]
