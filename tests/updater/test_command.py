"""Command mode (bare-metal/systemd installs): the admin's apply command gets the bundle and versions in its
environment; the HTTP health check wants `"status": "ok"` (the endpoint answers 200 when degraded too)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.services.receiver import Reply
from tests.updater.conftest import Rig
from tests.updater.support import BROKEN, DEGRADED

WHEEL = "webmacs_ts-2.1.0-py3-none-any.whl"

RECORDER = """
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({
        "action": os.environ.get("WEBMACS_UPDATER_ACTION"),
        "bundle_dir": os.environ.get("WEBMACS_BUNDLE_DIR"),
        "version": os.environ.get("WEBMACS_VERSION"),
        "previous": os.environ.get("WEBMACS_PREVIOUS_VERSION"),
        "cwd": os.getcwd(),
        "files": sorted(os.listdir(".")),
    }) + "\\n")
sys.exit(int(sys.argv[2]))
"""


def command(rig: Rig, status: int = 0) -> tuple[str, Path]:
    """A command that records what it was given and exits with `status`."""
    script = rig.root / "recorder.py"
    script.write_text(RECORDER)
    log = rig.root / "commands.jsonl"
    return f"{sys.executable} {script} {log} {status}", log


def recorded(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_command_applies_and_http_health_says_ok(rig: Rig) -> None:
    bundle = rig.bundle(files={WHEEL: b"wheel"})
    apply, log = command(rig)
    work = rig.updates / ".work" / bundle.name.removesuffix(".tar.gz")

    result = rig.run(webmacs_updater_apply=apply, webmacs_updater_health_url=rig.health_url)

    assert result.outcome == "applied"
    assert recorded(log) == [
        {
            "action": "apply",
            "bundle_dir": str(work),
            "version": "2.1.0",
            "previous": "2.0.0",  # the installed webmacs-ts distribution
            "cwd": str(work),
            "files": ["images.tar", "manifest.json", WHEEL],
        }
    ]
    assert [(r.method, r.path) for r in rig.health.requests] == [("GET", "/health")]
    assert rig.docker.calls() == []  # no docker in command mode


def test_degraded_server_is_rolled_back_by_the_rollback_command(rig: Rig) -> None:
    bundle = rig.bundle()
    apply, log = command(rig)
    rig.health.script(DEGRADED, DEGRADED, DEGRADED)  # then healthy again (the default) after the rollback

    result = rig.run(
        webmacs_updater_apply=apply, webmacs_updater_rollback=apply, webmacs_updater_health_url=rig.health_url
    )

    assert result.outcome == "rolled_back"
    assert [(c["action"], c["version"], c["previous"]) for c in recorded(log)] == [
        ("apply", "2.1.0", "2.0.0"),
        ("rollback", "2.1.0", "2.0.0"),
    ]
    assert len(rig.health.requests) == 4
    assert result.reason is not None and "says status 'degraded'; rolled back to 2.0.0." in result.reason
    assert (rig.updates / "failed" / bundle.name).exists()


def test_failing_apply_command_is_rolled_back(rig: Rig) -> None:
    rig.bundle()
    apply, log = command(rig, status=3)
    rollback, _ = command(rig)

    result = rig.run(
        webmacs_updater_apply=apply, webmacs_updater_rollback=rollback, webmacs_updater_health_url=rig.health_url
    )

    assert result.outcome == "rolled_back"
    assert result.reason is not None and result.reason.startswith(
        f"apply failed: '{Path(sys.executable).name}' exited with 3"
    )
    assert [c["action"] for c in recorded(log)] == ["apply", "rollback"]


def test_server_down_and_no_rollback_command(rig: Rig) -> None:
    bundle = rig.bundle()
    apply, log = command(rig)
    down = f"http://127.0.0.1:{free_port()}/health"  # nothing listens there

    result = rig.run(webmacs_updater_apply=apply, webmacs_updater_health_url=down)

    assert result.outcome == "failed"
    assert result.reason is not None
    assert "the rollback failed too (no WEBMACS_UPDATER_ROLLBACK command is configured)" in result.reason
    assert [c["action"] for c in recorded(log)] == ["apply"]
    [(content, level)] = rig.log_entries(bundle)
    assert level == "error" and "needs an administrator" in content


def test_server_error_is_unhealthy(rig: Rig) -> None:
    rig.bundle()
    apply, _ = command(rig)
    rig.health.default = BROKEN
    result = rig.run(
        webmacs_updater_apply=apply, webmacs_updater_rollback=apply, webmacs_updater_health_url=rig.health_url
    )
    assert result.outcome == "failed" and "answered 500" in (result.reason or "")


def test_http_check_can_serve_docker_mode_too(rig: Rig) -> None:
    rig.bundle()
    rig.health.script(Reply(200, b"not json"))
    result = rig.run(webmacs_updater_health_check="http", webmacs_updater_health_url=rig.health_url)
    assert result.outcome == "applied"  # the second try found it healthy
    assert [c["args"][0] for c in rig.docker.calls()] == ["load", "compose"]  # no `compose exec`
    assert len(rig.health.requests) == 2
