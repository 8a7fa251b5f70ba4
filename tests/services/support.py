"""Helpers for tests that need their own database or server (dispatchers must not share one with others)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import psycopg

from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Server, bearer, login

T = TypeVar("T")


def fresh_database(db_url: str) -> str:
    """A new, empty database in the test cluster; returns its URL. Every server process on one database runs
    a webhook dispatcher, so a test that needs particular dispatcher settings needs a database of its own."""
    base, _, _ = db_url.rpartition("/")
    name = f"webmacs_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # generated identifier, not input
    return f"{base}/{name}"


def admin_headers(server: Server) -> dict[str, str]:
    with httpx.Client(base_url=server.url) as c:
        return bearer(login(c, ADMIN_EMAIL, ADMIN_PASSWORD))


def wait_until(probe: Callable[[], T | None], timeout: float = 15, interval: float = 0.05, what: str = "") -> T:
    """Poll `probe` until it returns something truthy (bounded); returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or probe}")
        time.sleep(interval)


def row(conn: psycopg.Connection, query: str, *params: Any) -> tuple[Any, ...] | None:
    return conn.execute(query, params).fetchone()
