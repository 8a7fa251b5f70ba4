"""The project-managed local TimescaleDB cluster: initdb, start, stop, status, url."""

from __future__ import annotations

import hashlib
import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import quote

#: Package data: `bash` needs a file, and an installed wheel holds the script as one.
PROVISION_SCRIPT = Path(str(resources.files("webmacs.db") / "provision-timescaledb.sh"))
DB_NAME = "webmacs"
DB_USER = "webmacs"

# Settings chosen for a write-heavy time-series workload on a small machine; see README "Local cluster".
CLUSTER_CONF = """
# --- webmacs local cluster ---
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
max_connections = 200
shared_buffers = 512MB
work_mem = 32MB
maintenance_work_mem = 256MB
# Batches are large and few: fewer, bigger checkpoints and compressed full-page images.
max_wal_size = 4GB
min_wal_size = 512MB
checkpoint_timeout = 15min
checkpoint_completion_target = 0.9
wal_compression = on
wal_buffers = 64MB
# Durability stays on: an acknowledged datapoint must survive a server crash.
synchronous_commit = on
fsync = on
effective_io_concurrency = 64
random_page_cost = 1.1
timescaledb.max_background_workers = 4
max_worker_processes = 16
log_min_messages = warning
log_line_prefix = '%m [%p] '
"""


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs (an exited process its parent has not reaped yet counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())


def _prepare_data_dir(data: Path) -> None:
    """An empty data directory as initdb and pg_basebackup want it: owned by the server's user, mode 0700."""
    data.mkdir(parents=True, exist_ok=True)
    if _as_root():
        pw = pwd.getpwnam("postgres")
        os.chown(data, pw.pw_uid, pw.pw_gid)
    data.chmod(0o700)


class ClusterError(RuntimeError):
    """The local cluster could not be provisioned, started or stopped."""


def _pg_bindir() -> Path:
    pg_config = shutil.which("pg_config")
    candidates = []
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out:
            candidates.append(Path(out))
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        newest_first = sorted(root.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0, reverse=True)
        candidates.extend(v / "bin" for v in newest_first)
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise ClusterError("PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL 14+ server.")


def _as_root() -> bool:
    return os.geteuid() == 0


def _postgres_can_reach(path: Path) -> bool:
    """Whether the `postgres` user can traverse into `path` (PostgreSQL refuses to run as root)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    r = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(probe)], capture_output=True, check=False)
    return r.returncode == 0


@dataclass(frozen=True)
class Cluster:
    home: Path
    port: int
    #: Password authentication (SCRAM) instead of `trust`: for production, where other local users exist. The
    #: password is generated once and kept in `<home>/db-password` (mode 0600); it appears in `url()`.
    secure: bool = False

    @property
    def password_file(self) -> Path:
        return self.home / "db-password"

    def password(self) -> str | None:
        """The cluster's password (created on first use) when secure, else None."""
        if not self.secure:
            return None
        if not self.password_file.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secrets.token_urlsafe(32))
        return self.password_file.read_text(encoding="utf-8").strip()

    @property
    def data_dir(self) -> Path:
        home = self.home.resolve()
        if _as_root() and not _postgres_can_reach(home):
            # The checkout sits under a directory the postgres user cannot enter: keep the cluster in a
            # stable place derived from the home path instead.
            digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
            return Path("/var/tmp") / f"webmacs-pg-{digest}"  # noqa: S108 - stable across reboots, reachable by postgres
        return home / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def url(self, database: str = DB_NAME) -> str:
        pw = self.password()
        user = f"{DB_USER}:{quote(pw, safe='')}" if pw else DB_USER
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if _as_root():
            args = ["runuser", "-u", "postgres", "--", *args]
        r = subprocess.run(args, capture_output=True, text=True, check=False)
        if check and r.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def provision(self) -> None:
        """Make sure the timescaledb extension is installed (builds it on Debian/Ubuntu if needed)."""
        r = subprocess.run(["bash", str(PROVISION_SCRIPT)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise ClusterError(r.stderr.strip() or r.stdout.strip() or "timescaledb provisioning failed")

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def running(self) -> bool:
        if not self.initialised():
            return False
        r = self._run([str(_pg_bindir() / "pg_ctl"), "status", "-D", str(self.data_dir)], check=False)
        return r.returncode == 0

    def init(self) -> None:
        data = self.data_dir
        _prepare_data_dir(data)
        self._run(
            [
                str(_pg_bindir() / "initdb"),
                "-D",
                str(data),
                "-U",
                DB_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-instructions",
            ]
        )
        with open(data / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write(CLUSTER_CONF.format(port=self.port, socket_dir=data))

    def up(self) -> str:
        """Provision, initialise and start the cluster if needed; create the database. Returns its URL."""
        if not self.initialised():
            self.provision()
            self.init()
        if not self.running():
            self._run(
                [
                    str(_pg_bindir() / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-o",
                    f"-p {self.port}",
                ]
            )
        if self.secure:
            self._require_passwords()
        self._ensure_database()
        return self.url()

    def _require_passwords(self) -> None:
        """Switch a `trust` cluster to SCRAM passwords: set the role's password while trust still lets us in,
        then make every pg_hba line require it and reload."""
        import psycopg
        from psycopg import sql

        hba = self.data_dir / "pg_hba.conf"
        lines = hba.read_text(encoding="utf-8").splitlines()
        rules = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not any(ln.split()[-1] == "trust" for ln in rules):
            return
        with psycopg.connect(f"postgresql://{DB_USER}@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute("SET password_encryption = 'scram-sha-256'")
            c.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(DB_USER), sql.Literal(self.password()))
            )
        rewritten = [
            " ".join([*ln.split()[:-1], "scram-sha-256"]) if ln in rules and ln.split()[-1] == "trust" else ln
            for ln in lines
        ]
        self._write_as_owner(hba, "\n".join(rewritten) + "\n")
        self._run([str(_pg_bindir() / "pg_ctl"), "reload", "-D", str(self.data_dir)])

    def _write_as_owner(self, path: Path, text: str) -> None:
        st = path.stat()
        path.write_text(text, encoding="utf-8")
        os.chown(path, st.st_uid, st.st_gid)

    def _ensure_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url("postgres"), autocommit=True) as c:
                    if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone() is None:
                        c.execute(f'CREATE DATABASE "{DB_NAME}"')  # constant identifier, not user input
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def down(self) -> None:
        if self.running():
            pid = self._postmaster_pid()
            self._run([str(_pg_bindir() / "pg_ctl"), "stop", "-w", "-t", "60", "-m", "fast", "-D", str(self.data_dir)])
            # pg_ctl returns once postmaster.pid is gone, which the postmaster removes just before it exits:
            # wait (briefly) for the process itself, so that "stopped" means no server process is left.
            deadline = time.monotonic() + 10
            while pid is not None and _process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (used by fault-injection tests)."""
        self._run(
            [
                str(_pg_bindir() / "pg_ctl"),
                "restart",
                "-w",
                "-t",
                "60",
                "-m",
                mode,
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                f"-p {self.port}",
            ]
        )

    def status(self) -> str:
        if not self.initialised():
            return f"not initialised (data directory {self.data_dir})"
        state = "running" if self.running() else "stopped"
        return f"{state} on 127.0.0.1:{self.port} (data directory {self.data_dir})"

    def init_replica_of(self, primary: Cluster) -> None:
        """Make this cluster a streaming replica of `primary` (`pg_basebackup -R`: it follows the primary's WAL
        from then on). Start it with `up()`. The primary's default pg_hba lets local replication in."""
        data = self.data_dir
        if self.initialised():
            raise ClusterError(f"{data} already holds a cluster")
        _prepare_data_dir(data)
        self._run(
            [
                str(_pg_bindir() / "pg_basebackup"),
                "-D",
                str(data),
                "-d",
                primary.url("postgres"),
                "-X",
                "stream",
                "-R",
                "-c",
                "fast",
            ]
        )
        # The copied configuration names the primary's port and socket directory; later lines win.
        conf = data / "postgresql.conf"
        self._write_as_owner(
            conf,
            conf.read_text(encoding="utf-8") + f"port = {self.port}\nunix_socket_directories = '{data}'\n",
        )

    def destroy(self) -> None:
        self.down()
        shutil.rmtree(self.data_dir, ignore_errors=True)
