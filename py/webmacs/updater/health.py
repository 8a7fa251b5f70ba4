"""Is the server healthy after an update? A probe answers once; `wait_healthy` asks it a bounded number of times."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from webmacs.updater.commands import Commands, failure

#: One look at the server: None when healthy, else what was wrong.
Probe = Callable[[], str | None]


def http_probe(url: str, timeout_s: float = 5.0) -> Probe:
    """GET the health URL. `/health` answers 200 even when degraded (spec §17), so only a body saying
    `"status": "ok"` counts."""

    def probe() -> str | None:
        try:
            r = httpx.get(url, timeout=timeout_s, trust_env=False)
        except httpx.HTTPError as e:
            return f"{url}: {str(e) or type(e).__name__}"
        if r.status_code != 200:
            return f"{url} answered {r.status_code}"
        try:
            status = r.json().get("status")
        except (ValueError, AttributeError):
            return f"{url} did not answer a JSON object"
        return None if status == "ok" else f"{url} says status {status!r}"

    return probe


def exec_probe(commands: Commands, compose_file: Path, url: str) -> Probe:
    """The spec's check: from inside the backend container (the server may publish no port on the host).
    Stricter than the reference, which accepted any 200: the status must be ok."""
    check = (
        "import json, urllib.request; "
        f"r = urllib.request.urlopen({url!r}, timeout=5); "
        "raise SystemExit(0 if json.load(r).get('status') == 'ok' else 1)"
    )
    args = ["docker", "compose", "-f", str(compose_file), "exec", "-T", "backend", "python", "-c", check]

    def probe() -> str | None:
        r = commands.run(args)
        return None if r.returncode == 0 else "health check " + failure(r)

    return probe


def wait_healthy(probe: Probe, tries: int, interval_s: float, sleep: Callable[[float], None]) -> str | None:
    """Ask `probe` up to `tries` times, `interval_s` apart (a restarted server needs a moment, and may run
    migrations first). None when it became healthy, else the last thing that was wrong."""
    reason: str | None = "not checked"
    for attempt in range(tries):
        if attempt:
            sleep(interval_s)
        reason = probe()
        if reason is None:
            return None
    return reason
