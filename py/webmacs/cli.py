"""The `webmacs` command: `serve`, `db up|down|status|url|migrate`, `export` and `import`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from webmacs.settings import Settings

if TYPE_CHECKING:
    from webmacs.db.cluster import Cluster


def _cluster(settings: Settings) -> Cluster:
    from webmacs.db.cluster import Cluster

    return Cluster(settings.webmacs_home, settings.webmacs_db_port)


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
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from webmacs.app import create_app, database_url
    from webmacs.server import serve

    if not settings.database_url:
        # Bring the cluster up before uvicorn so its start-up (and the URL) is visible first.
        settings = settings.model_copy(update={"database_url": database_url(settings)})
    host = args.host or settings.webmacs_host
    port = args.port or settings.webmacs_port
    print(f"WebMACS-TS listening on http://{host}:{port} (docs: http://{host}:{port}/docs)", flush=True)
    serve(create_app(settings), host=host, port=port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webmacs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info")
    db = sub.add_parser("db", help="manage the local TimescaleDB cluster")
    db.add_argument("action", choices=["up", "down", "status", "url", "migrate"])
    from webmacs import cli_export

    cli_export.add_parser(sub)
    from webmacs import cli_import

    cli_import.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    try:
        if args.command == "db":
            return cmd_db(args, settings)
        if args.command == "export":
            return int(args.handler(args, settings))
        if args.command == "import":
            return int(args.handler(args, settings))
        return cmd_serve(args, settings)
    except Exception as e:  # a clear one-line message instead of a traceback for operational failures
        from webmacs.db.cluster import ClusterError

        if isinstance(e, ClusterError):
            print(f"webmacs: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
