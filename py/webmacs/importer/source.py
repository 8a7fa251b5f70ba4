"""Reading a WebMACS database: its tables (spec §1, older versions too), what is wrong with its datapoints,
and the binary COPY that streams them. The connection is read-only: nothing here can write to it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import ClientCursor, sql
from psycopg.rows import dict_row

from webmacs.epoch import EPOCH, from_micros
from webmacs.importer.report import Report

#: Tables and columns without which a database is not a WebMACS database.
REQUIRED = {
    "users": {"id", "public_id", "email", "username", "password_hash"},
    "events": {"id", "public_id", "name", "min_value", "max_value", "unit", "type"},
    "experiments": {"id", "public_id", "name"},
    "datapoints": {"id", "value", "timestamp", "event_public_id"},
}
#: Rows fetched per round trip when reading a table.
FETCH_ROWS = 5000
#: Examples listed per problem.
EXAMPLES = 5


class NotWebmacs(Exception):
    """The source database does not hold WebMACS's tables."""


def plain_url(url: str) -> str:
    """A libpq URL from a WebMACS-style SQLAlchemy one (`postgresql+asyncpg://…`), as Settings does for
    DATABASE_URL."""
    url = url.strip()
    for prefix in ("postgresql+asyncpg://", "postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable URL>"
    host = params.get("host") or "localhost"
    return f"{params.get('user') or ''}@{host}:{params.get('port') or 5432}/{params.get('dbname') or ''}"


@dataclass
class Source:
    """An open, read-only WebMACS database and the columns each of its tables has."""

    url: str
    conn: psycopg.Connection
    columns: dict[str, dict[str, str]]

    @classmethod
    def open(cls, url: str) -> Source:
        url = plain_url(url)
        conn = psycopg.connect(url, autocommit=True, options="-c default_transaction_read_only=on -c timezone=UTC")
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        rows = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        ).fetchall()
        columns: dict[str, dict[str, str]] = {}
        for table, column, data_type in rows:
            columns.setdefault(table, {})[column] = data_type
        source = cls(url, conn, columns)
        missing = [
            f"{t}.{c}" if t in columns else t
            for t, cs in REQUIRED.items()
            for c in sorted(cs)
            if t not in columns or c not in columns[t]
        ]
        if missing:
            conn.close()
            raise NotWebmacs(
                f"{redacted(url)} does not hold WebMACS's tables (missing: {', '.join(dict.fromkeys(missing))})"
            )
        return source

    def close(self) -> None:
        self.conn.close()

    def has(self, table: str, column: str | None = None) -> bool:
        return table in self.columns and (column is None or column in self.columns[table])

    def fingerprint(self) -> str:
        """Which database this is, stable across URLs that reach it: the cluster's system identifier (or its
        address when that is not readable), the database and the schema."""
        try:
            with self.conn.transaction():
                row = self.conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
            cluster = str(row[0]) if row else ""
        except psycopg.errors.InsufficientPrivilege:
            row = self.conn.execute(
                "SELECT coalesce(inet_server_addr()::text, 'local') || ':' || current_setting('port')"
            ).fetchone()
            cluster = str(row[0]) if row else ""
        row = self.conn.execute("SELECT current_database(), current_schema()").fetchone()
        assert row is not None
        return f"webmacs:{cluster}/{row[0]}/{row[1]}"

    def select(self, table: str, wanted: Sequence[str]) -> sql.Composed:
        """`SELECT <wanted> FROM <table> ORDER BY id`: enum columns as text, columns the table lacks (an older
        WebMACS) as NULL."""
        have = self.columns.get(table, {})
        parts: list[sql.Composable] = []
        for column in wanted:
            if column not in have:
                parts.append(sql.SQL("NULL AS {}").format(sql.Identifier(column)))
            elif have[column] == "USER-DEFINED":
                parts.append(sql.SQL("{c}::text AS {c}").format(c=sql.Identifier(column)))
            else:
                parts.append(sql.Identifier(column))
        return sql.SQL("SELECT {} FROM {} ORDER BY id").format(sql.SQL(", ").join(parts), sql.Identifier(table))

    def rows(self, table: str, wanted: Sequence[str]) -> Iterator[dict[str, Any]]:
        """The table's rows in id order, streamed; none when the table does not exist (an older WebMACS).
        Call inside `snapshot()`."""
        if not self.has(table):
            return
        with self.conn.cursor(name=f"import_{table}", row_factory=dict_row) as cur:
            cur.itersize = FETCH_ROWS
            cur.execute(self.select(table, wanted))
            yield from cur

    def snapshot(self) -> AbstractContextManager[psycopg.Transaction]:
        """A repeatable-read transaction: everything read inside sees one state of the database."""
        return self.conn.transaction()

    def count(self, table: str) -> int:
        if not self.has(table):
            return 0
        row = self.conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
        return int(row[0]) if row else 0

    # --- datapoints ---------------------------------------------------------------------------------------

    def datapoint_copy(self, after: int | None) -> str:
        """The COPY the transfer streams: every datapoint with a timestamp after `after` (µs since the Unix
        epoch: the checkpoint, a timestamp all of whose rows were written) in "timestamp" order, as
        (timestamp, event_public_id, experiment_public_id, value, id), parameters bound (COPY takes none).
        Only "timestamp" orders the rows (an index scan, no sort): the transfer puts ties in id order."""
        x = (
            sql.SQL("d.experiment_public_id::text")
            if self.has("datapoints", "experiment_public_id")
            else sql.SQL("NULL::text")
        )
        query = sql.SQL(
            'SELECT d."timestamp", d.event_public_id::text, {x}, d.value::float8, d.id::int8 FROM datapoints d'
            ' WHERE d."timestamp" IS NOT NULL'
        ).format(x=x)
        params: dict[str, Any] = {}
        if after is not None:
            query += sql.SQL(' AND d."timestamp" > %(time)s')
            params = {"time": from_micros(after)}
        query += sql.SQL(' ORDER BY d."timestamp"')
        copy = sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)
        return ClientCursor(self.conn).mogrify(copy, params)

    def datapoint_span(self) -> tuple[datetime | None, datetime | None]:
        """Oldest and newest datapoint time (two index lookups), for the progress display."""
        row = self.conn.execute('SELECT min("timestamp"), max("timestamp") FROM datapoints').fetchone()
        return (row[0], row[1]) if row else (None, None)

    def datapoint_problems(self, report: Report, *, now: datetime) -> int:
        """Count the datapoints and add to `report` what the import would skip, shift or flag. One pass for
        the per-row checks, one per join. Returns the number of datapoints."""
        x = self.has("datapoints", "experiment_public_id")
        row = self.conn.execute(
            'SELECT count(*), count(*) FILTER (WHERE "timestamp" IS NULL),'
            " count(*) FILTER (WHERE event_public_id IS NULL),"
            " count(*) FILTER (WHERE value IS NULL OR value IN ('NaN', 'Infinity', '-Infinity')),"
            ' count(*) FILTER (WHERE "timestamp" < %(epoch)s OR "timestamp" > %(future)s)'
            " FROM datapoints",
            {"epoch": EPOCH, "future": now + timedelta(minutes=5)},
        ).fetchone()
        assert row is not None
        total, no_time, no_event, invalid, bad_time = (int(v) for v in row)
        report.problem("no_timestamp", "datapoints", no_time, "datapoints without a timestamp: skipped")
        report.problem("no_event", "datapoints", no_event, "datapoints without an event: skipped")
        report.problem("invalid_value", "datapoints", invalid, "values NULL, NaN or infinite: skipped")
        report.problem(
            "bad_time", "datapoints", bad_time, "timestamps before 1970 or more than 5 minutes ahead: skipped"
        )

        orphans = self.conn.execute(
            "SELECT d.event_public_id, count(*) FROM datapoints d WHERE d.event_public_id IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.public_id = d.event_public_id)"
            " GROUP BY 1 ORDER BY 2 DESC, 1"
        ).fetchall()
        report.problem(
            "orphan_datapoints",
            "datapoints",
            sum(n for _, n in orphans),
            "orphan datapoints (their event does not exist): skipped",
            [f"{e!r} × {n:,}" for e, n in orphans[:EXAMPLES]],
        )
        if x:
            lost = self.conn.execute(
                "SELECT d.experiment_public_id, count(*) FROM datapoints d WHERE d.experiment_public_id IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM experiments x WHERE x.public_id = d.experiment_public_id)"
                " GROUP BY 1 ORDER BY 2 DESC, 1"
            ).fetchall()
            report.problem(
                "orphan_experiment",
                "datapoints",
                sum(n for _, n in lost),
                "datapoints tagged with an experiment that does not exist: imported untagged",
                [f"{e!r} × {n:,}" for e, n in lost[:EXAMPLES]],
            )
        out = self.conn.execute(
            "SELECT e.name, count(*), min(d.value), max(d.value), min(e.min_value), max(e.max_value)"
            " FROM datapoints d JOIN events e ON e.public_id = d.event_public_id"
            " WHERE d.value < e.min_value OR d.value > e.max_value GROUP BY e.name ORDER BY 2 DESC, 1"
        ).fetchall()
        report.problem(
            "out_of_range",
            "datapoints",
            sum(r[1] for r in out),
            "values outside their event's min_value..max_value: imported as they are",
            [f"{r[0]!r}: {r[1]:,} in {r[2]}..{r[3]} (range {r[4]}..{r[5]})" for r in out[:EXAMPLES]],
        )
        collisions = self.conn.execute(
            'SELECT count(*), coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM datapoints WHERE "timestamp"'
            ' IS NOT NULL AND event_public_id IS NOT NULL GROUP BY event_public_id, "timestamp"'
            " HAVING count(*) > 1) c"
        ).fetchone()
        assert collisions is not None
        if collisions[0]:
            examples = self.conn.execute(
                'SELECT event_public_id, "timestamp", count(*) FROM datapoints WHERE "timestamp" IS NOT NULL'
                " AND event_public_id IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 2 LIMIT %(n)s",
                {"n": EXAMPLES},
            ).fetchall()
            report.problem(
                "duplicate_timestamps",
                "datapoints",
                int(collisions[1]),
                f"datapoints share their event and timestamp with an earlier one ({int(collisions[0]):,} times):"
                " each is written 1 µs after the previous one of its event",
                [f"{e} at {t.isoformat()} × {n}" for e, t, n in examples],
            )
        return total
