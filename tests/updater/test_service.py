"""The updater as a command and a service: `webmacs updater --once`, the long-running loop, and the lock that
keeps two updaters off the same bundle."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.updater.conftest import Rig
from tests.updater.support import compose_up
from webmacs.updater.service import LOCK_FILE


def cli(rig: Rig, *args: str, database_url: str | None = None) -> subprocess.Popen[str]:
    """`webmacs …` in a subprocess configured through the environment, as a systemd unit would run it."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("WEBMACS_", "DATABASE_URL"))}
    env.update(
        DATABASE_URL=database_url or rig.db_url,
        WEBMACS_HOME=str(rig.root / "home"),
        WEBMACS_UPDATE_DIR=str(rig.updates),
        WEBMACS_UPDATER_COMPOSE_DIR=str(rig.compose),
        WEBMACS_UPDATER_HEALTH_TRIES="1",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "webmacs.cli", *args],
        cwd=rig.root,  # no .env of the checkout
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_once_from_the_command_line(rig: Rig) -> None:
    good = rig.bundle("2.1.0")
    bad = rig.bundle("2.2.0", images=None)
    p = cli(rig, "updater", "--once")
    out, err = p.communicate(timeout=120)
    assert out.splitlines() == [
        f"{good.name}: applied -> {rig.updates / 'applied' / ('2.1.0_' + good.name)}",
        f"{bad.name}: refused -> {rig.updates / 'failed' / bad.name} (images.tar is missing)",
    ], err
    assert p.returncode == 1  # not everything applied
    assert [c["args"] for c in rig.docker.calls()][1] == compose_up(rig.compose)


def test_two_updaters_never_apply_the_same_bundle(rig: Rig) -> None:
    bundle = rig.bundle()
    rig.docker.script(load=["block"])  # the first updater stops inside `docker load` until released
    first = cli(rig, "updater", "--once")
    try:
        rig.docker.wait_blocked()
        second = cli(rig, "updater", "--once")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0 and out == f"another updater is working on {rig.updates}; nothing done\n", err
        assert bundle.exists()  # untouched by the second
    finally:
        rig.docker.release()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert [c["args"][0] for c in rig.docker.calls()].count("load") == 1
    assert (rig.updates / "applied" / f"2.1.0_{bundle.name}").exists()


def test_lock_held_means_no_pass(rig: Rig) -> None:
    bundle = rig.bundle()
    updater = rig.updater()
    with open(rig.updates / LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert updater.run_once() is None
    assert bundle.exists() and rig.docker.calls() == []
    assert updater.run_once() is not None  # released: the next pass takes it
    assert not bundle.exists()


def test_service_loop_applies_what_arrives_and_stops_on_request(rig: Rig) -> None:
    updater = rig.updater(webmacs_updater_poll=0.05)
    stop = threading.Event()
    loop = threading.Thread(target=updater.run_forever, args=(stop,), daemon=True)
    loop.start()
    try:
        bundle = rig.bundle()
        applied = rig.updates / "applied" / f"2.1.0_{bundle.name}"
        deadline = time.monotonic() + 60
        while not applied.exists():
            assert time.monotonic() < deadline and loop.is_alive(), "the service did not pick the bundle up"
            time.sleep(0.02)
    finally:
        stop.set()
        loop.join(timeout=60)
    assert not loop.is_alive()


def test_symlinked_bundle_is_not_followed(rig: Rig) -> None:
    target = rig.root / "elsewhere.tar.gz"
    target.write_bytes(b"x")
    (rig.updates / "webmacs-update-9.9.9.tar.gz").symlink_to(target)
    assert rig.updater().run_once() == []
    assert Path(target).read_bytes() == b"x"
