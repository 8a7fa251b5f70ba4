"""The `webmacs` command: `serve`, `db up|down|status|url|migrate|backup|restore|grant-reader`, `export`, `import`
and `updater`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from webmacs.settings import Settings

if TYPE_CHECKING:
    from webmacs.db.cluster import Cluster


def _cluster(settings: Settings) -> Cluster:
    from webmacs.db.cluster import Cluster

    return Cluster(settings.webmacs_home, settings.webmacs_db_port, secure=settings.env == "production")


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from webmacs.db import migrate

    cluster = _cluster(settings)
    if args.action == "up":
        print(cluster.up())
    elif args.action == "down":
        cluster.down()
        print("stopped")
    elif args.action == "status":
        print(cluster.status())
    elif args.action == "url":
        print(settings.database_url or cluster.url())
    elif args.action == "migrate":
        url = settings.database_url or cluster.up()
        applied = migrate.apply(url, settings.webmacs_chunk_interval)
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    elif args.action == "grant-reader":
        return cmd_grant_reader(args.file, settings)
    elif args.action == "backup":
        return cmd_backup(Path(args.file or "."), settings)
    elif args.action == "restore":
        if not args.file:
            print("webmacs: db restore needs the backup FILE", file=sys.stderr)
            return 2
        return cmd_restore(Path(args.file), settings, replace=args.replace)
    return 0


def cmd_grant_reader(name: str | None, settings: Settings) -> int:
    """A read-only login for Grafana: the password is asked for on a terminal (empty: generated) or generated, and
    printed only when generated — never logged, and sent to the server only as a SCRAM verifier."""
    import getpass

    from webmacs.db import migrate, reader

    if not name:
        print("webmacs: db grant-reader needs the login NAME", file=sys.stderr)
        return 2
    password = getpass.getpass(f"password for {name} (empty: generate one): ") if sys.stdin.isatty() else ""
    generated = not password
    password = password or reader.generate_password()
    url = settings.database_url or _cluster(settings).up()
    migrate.apply(url, settings.webmacs_chunk_interval)
    try:
        created = reader.grant_reader(url, name, password)
    except reader.ReaderError as e:
        print(f"webmacs: {e}", file=sys.stderr)
        return 1
    print(f"{'created' if created else 'updated'} read-only login {name} (role {reader.READER_ROLE})")
    if generated:
        print(f"password: {password}")
    return 0


# --- backup, restore and the updater (README "Backup and restore", "Updater") ---


def cmd_backup(dest: Path, settings: Settings) -> int:
    from webmacs.db import backup

    made = backup.backup(settings.database_url or _cluster(settings).up(), dest)
    st = made.state
    print(f"{made.path} (PostgreSQL {st.postgres_version}, TimescaleDB {st.timescaledb_version},", end=" ")
    print(f"schema {st.schema_version})")
    return 0


def cmd_restore(dump: Path, settings: Settings, *, replace: bool) -> int:
    from webmacs.db import backup

    restored = backup.restore(dump, settings.database_url or _cluster(settings).up(), replace=replace)
    print(f"restored {dump} into database '{restored.database}'")
    if restored.kept_as:
        print(
            f"the data it held before is kept in database '{restored.kept_as}' (drop it when no longer needed;"
            " to use it, run SELECT timescaledb_post_restore() in it first)"
        )
    return 0


def cmd_updater(args: argparse.Namespace, settings: Settings) -> int:
    if args.updater_action == "restore":
        given = Path(args.backup)
        # A bare name from the updater's record means the backup it made in <update dir>/backups/.
        dump = given if given.exists() else settings.webmacs_update_dir / "backups" / given
        return cmd_restore(dump, settings, replace=True)
    import signal
    import threading

    from webmacs.updater.service import Updater

    try:
        updater = Updater(settings)
    except ValueError as e:  # a configuration error (the signing key): say it, no traceback
        print(f"webmacs: {e}", file=sys.stderr)
        return 2
    if args.once:
        results = updater.run_once()
        if results is None:
            print(f"another updater is working on {settings.webmacs_update_dir}; nothing done")
            return 0
        for r in results:
            print(f"{r.bundle}: {r.outcome} -> {r.moved_to}" + (f" ({r.reason})" if r.reason else ""))
        return 1 if any(r.outcome != "applied" for r in results) else 0
    stop = threading.Event()
    # systemd stops with SIGTERM: finish the bundle in hand (never leave an update half applied), then exit.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    updater.run_forever(stop)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from webmacs.app import create_app, database_url
    from webmacs.server import serve, serve_workers

    if not settings.database_url:
        # Bring the cluster up before uvicorn so its start-up (and the URL) is visible first.
        settings = settings.model_copy(update={"database_url": database_url(settings)})
    host = args.host or settings.webmacs_host
    port = args.port or settings.webmacs_port
    workers = args.workers or settings.webmacs_workers
    print(
        f"WebMACS-TS listening on http://{host}:{port} (docs: http://{host}:{port}/docs)"
        + (f" with {workers} worker processes" if workers > 1 else ""),
        flush=True,
    )
    if workers > 1:
        # Every worker builds its settings from the environment: hand them the database this process resolved
        # (the local cluster), and the development key every worker must share is kept in WEBMACS_HOME.
        os.environ["DATABASE_URL"] = settings.database_url or ""
        if not settings.secret_key:
            settings.secret_key_effective  # noqa: B018 - creates the shared key file before the workers start
        serve_workers(
            workers=workers, host=host, port=port, log_level=args.log_level, log_format=settings.webmacs_log_format
        )
    else:
        serve(
            create_app(settings),
            host=host,
            port=port,
            log_level=args.log_level,
            log_format=settings.webmacs_log_format,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    import webmacs

    parser = argparse.ArgumentParser(prog="webmacs", description=__doc__)
    parser.add_argument(
        "--version",
        action="version",
        version=f"webmacs-ts {webmacs.package_version()} (engine {webmacs.core_version})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (default WEBMACS_WORKERS, 1)")
    db = sub.add_parser("db", help="manage the local TimescaleDB cluster")
    db.add_argument("action", choices=["up", "down", "status", "url", "migrate", "backup", "restore", "grant-reader"])
    db.add_argument(
        "file",
        nargs="?",
        help="backup: file or directory to write (default: here); restore: the dump; grant-reader: the login name",
    )
    db.add_argument("--replace", action="store_true", help="restore: replace a database that holds data")
    updater = sub.add_parser("updater", help="apply uploaded update bundles (spec §10.6)")
    updater.add_argument("--once", action="store_true", help="one pass over the update directory, then exit")
    updater_sub = updater.add_subparsers(dest="updater_action")
    updater_restore = updater_sub.add_parser("restore", help="restore a database backup the updater made")
    updater_restore.add_argument("backup", help="a backup file, or its name in <WEBMACS_UPDATE_DIR>/backups")
    from webmacs import cli_export

    cli_export.add_parser(sub)
    from webmacs import cli_import

    cli_import.add_parser(sub)
    args = parser.parse_args(argv)
    settings = Settings()
    from webmacs import logs

    logs.configure(settings.webmacs_log_format, logging.INFO)
    try:
        if args.command == "db":
            return cmd_db(args, settings)
        if args.command == "export":
            return int(args.handler(args, settings))
        if args.command == "updater":
            return cmd_updater(args, settings)
        if args.command == "import":
            return int(args.handler(args, settings))
        return cmd_serve(args, settings)
    except Exception as e:  # a clear one-line message instead of a traceback for operational failures
        from webmacs.db.backup import BackupError
        from webmacs.db.cluster import ClusterError

        if isinstance(e, ClusterError | BackupError):
            print(f"webmacs: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
