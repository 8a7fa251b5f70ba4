"""Pieces both benchmarks share: a server subprocess on the bench cluster, event setup, row counts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

SECRET = "bench-secret-key-that-is-long-enough-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_events(url: str, n: int, prefix: str) -> list[tuple[int, str]]:
    """`n` events mapped to one enabled plugin instance (so the engine accepts their datapoints)."""
    with psycopg.connect(url, autocommit=True) as db:
        pi = db.execute(
            "INSERT INTO plugin_instances (plugin_id, instance_name, enabled) VALUES ('simulated', %s,"
            " true) RETURNING id",
            (prefix,),
        ).fetchone()
        assert pi is not None
        events = []
        for i in range(n):
            ev = db.execute(
                "INSERT INTO events (name, min_value, max_value, unit, type) VALUES (%s, 0, 100, 'u',"
                " 'sensor') RETURNING id, public_id",
                (f"{prefix}-{i}",),
            ).fetchone()
            assert ev is not None
            db.execute(
                "INSERT INTO channel_mappings (plugin_instance_id, channel_id, channel_name, direction, unit,"
                " event_public_id) VALUES (%s, %s, 'c', 'input', 'u', %s)",
                (pi[0], f"ch{i}", ev[1]),
            )
            events.append((ev[0], ev[1]))
        return events


def count_rows(url: str) -> int:
    with psycopg.connect(url) as db:
        row = db.execute("SELECT count(*) FROM datapoints").fetchone()
        assert row is not None
        return int(row[0])


class ServerProcess:
    """`webmacs serve` in a subprocess (its own CPU and memory are what the benchmarks report), logged in as admin."""

    def __init__(self, url: str, home: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        full_env = {
            **os.environ,
            "DATABASE_URL": url,
            "SECRET_KEY": SECRET,
            "ENV": "test",
            "WEBMACS_BCRYPT_ROUNDS": "4",
            **(env or {}),
            "WEBMACS_HOME": str(home / "home"),
            "WEBMACS_UPDATE_DIR": str(home / "updates"),
            "WEBMACS_PLUGIN_DIR": str(home / "plugins"),
            "RATE_LIMIT_PER_MINUTE": "1000000",
        }
        for d in ("updates", "plugins"):
            (home / d).mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "webmacs.cli", "serve", "--port", str(self.port), "--log-level", "warning"],
            env=full_env,
            cwd=home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=self.base) as c:
            while True:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server did not start")
                time.sleep(0.1)
            r = c.post("/api/v1/auth/login", json={"email": "admin@webmacs.io", "password": "admin123"})
            self.token = r.json()["access_token"]

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak_rss(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
