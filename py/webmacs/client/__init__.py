"""A Python client for WebMACS-TS: `Controller` streams telemetry, `Client` speaks the REST API."""

from webmacs.client.controller import Controller, ControllerStats, SpoolFull, telemetry_url
from webmacs.client.http import ApiError, Client

__all__ = ["ApiError", "Client", "Controller", "ControllerStats", "SpoolFull", "telemetry_url"]
