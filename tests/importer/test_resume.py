"""An import killed (SIGKILL) at random points and started again ends with every source row exactly once: the
same rows and the same counters as an import that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from tests.importer.conftest import NewDatabase
from tests.importer.webmacs_fixture import Fixture
from webmacs.importer.report import Report

BATCH_ROWS = 20_000
#: Per event and experiment: how many datapoints, their values and their times, summed exactly.
CONTENT = (
    "SELECT e.public_id, x.public_id, count(*), sum(d.value::numeric),"
    " sum((extract(epoch FROM d.time) * 1000000)::numeric) FROM datapoints d JOIN events e ON e.id = d.event_id"
    " LEFT JOIN experiments x ON x.id = d.experiment_id GROUP BY 1, 2 ORDER BY 1, 2"
)
# (The reference database is also served by other tests, which adds log entries: count WebMACS's only.)
RELATIONAL = (
    "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM rules),"
    " (SELECT count(*) FROM log_entries WHERE created_on < %(built)s)"
)


def start(source: str, target: str, tmp: Path, *, capture: bool = False) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": target, "WEBMACS_HOME": str(tmp / "home")}
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "webmacs.cli", "import", "webmacs", "--from", source, "--batch-rows", str(BATCH_ROWS)],
        env=env,
        stdout=out,
        stderr=out,
    )


def rows_read(target: str) -> int:
    """Source rows committed so far (0 before the run's row exists)."""
    try:
        with psycopg.connect(target, autocommit=True) as c:
            if not c.execute("SELECT to_regclass('import_runs') IS NOT NULL").fetchone()[0]:  # type: ignore[index]
                return 0
            row = c.execute("SELECT rows_read FROM import_runs").fetchone()
            return int(row[0]) if row else 0
    except psycopg.OperationalError:
        return 0


def kill_when(proc: subprocess.Popen[bytes], ready: object) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False if it ended first."""
    while proc.poll() is None:
        if ready():  # type: ignore[operator]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    return False


def test_sigkill_at_random_points_then_rerun(
    webmacs_source: Fixture, imported: tuple[str, Report], new_database: NewDatabase, tmp_path: Path
) -> None:
    seed = random.randrange(1 << 30)  # noqa: S311 - kill points, reported on failure; not secrets
    rng = random.Random(seed)  # noqa: S311
    target = new_database()
    total = webmacs_source.datapoints
    kills = []
    # First kill: any moment after the start (migrations, the relational transaction, the first batches).
    proc = start(webmacs_source.dsn, target, tmp_path)
    deadline = time.monotonic() + rng.uniform(0.0, 2.0)
    if kill_when(proc, lambda: time.monotonic() > deadline):
        kills.append(("at", rows_read(target)))
    # Then kills in the middle of the datapoints, each past a random number of committed rows.
    for _ in range(3):
        done = rows_read(target)
        if done + 1 >= total:
            break
        threshold = rng.randrange(done + 1, total)
        proc = start(webmacs_source.dsn, target, tmp_path)
        if kill_when(proc, lambda t=threshold: rows_read(target) >= t):
            kills.append(("after", rows_read(target)))
    final = start(webmacs_source.dsn, target, tmp_path, capture=True)
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, (seed, kills, err.decode()[-2000:])
    assert kills, "nothing was interrupted"

    reference = imported[0]
    with psycopg.connect(target) as t, psycopg.connect(reference) as r:
        assert t.execute(CONTENT).fetchall() == r.execute(CONTENT).fetchall(), (seed, kills)
        built = {"built": webmacs_source.built_at}
        assert t.execute(RELATIONAL, built).fetchall() == r.execute(RELATIONAL, built).fetchall(), (seed, kills)
        counters = "SELECT state, rows_read, rows_inserted, rows_duplicate, rows_shifted FROM import_runs"
        # The counters commit with the rows: exact across the kills too.
        assert t.execute(counters).fetchall() == r.execute(counters).fetchall(), (seed, kills)
        assert t.execute(counters).fetchone() == ("complete", total, total, 0, webmacs_source.collisions)
    # (The last kill may have come after a run had finished: the final run then has nothing left to do.)
    assert b"datapoints streamed in" in out or b"imported already" in out
