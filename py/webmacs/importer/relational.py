"""WebMACS's relational tables onto ours (spec §1): every public id kept, integer keys mapped, rows that
collide with rows already here refused or merged into them.

Each table is read in id order (so lists ordered by id come out as in WebMACS) and written with COPY. A
source row *collides* when the target already has a row with its public id or one of its unique keys (a
user's email, username or SSO identity, an event's or experiment's name …). With `merge="refuse"` any
collision stops the import; with `merge="skip"` the target's row stays, the source row is left out, and
whatever referred to it (events of a user, datapoints of an event, widgets …) is pointed at the target's
row. Users keep their integer id when it is free here: WebMACS's JWTs name the user by that id.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from webmacs.importer.report import Report
from webmacs.importer.source import Source

Merge = Literal["refuse", "skip"]
#: Rows written (and checked against the target) per round trip.
CHUNK_ROWS = 5000
EXAMPLES = 5


class _Now:
    """Default marker: the import's own time (for NOT NULL timestamps that WebMACS left NULL)."""

    def __repr__(self) -> str:
        return "NOW"


NOW = _Now()


@dataclass(frozen=True)
class Ref:
    """A column referring to another table, by public id or (`by_id`) by integer id."""

    column: str
    table: str
    by_id: bool = False
    #: NOT NULL here: a row whose reference cannot be resolved is left out (else the column becomes NULL).
    required: bool = False


@dataclass(frozen=True)
class Spec:
    table: str
    #: Target columns filled from the source's column of the same name.
    columns: tuple[str, ...]
    #: NOT NULL here but NULL (or absent) there → this value.
    defaults: dict[str, Any] = field(default_factory=dict)
    #: Allowed values (the CHECK constraints of sql/0002); source values are compared lower-cased.
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Unique keys besides public_id.
    keys: tuple[tuple[str, ...], ...] = ()
    refs: tuple[Ref, ...] = ()
    #: Target columns set to a constant.
    constants: dict[str, Any] = field(default_factory=dict)
    has_public_id: bool = True

    @property
    def source_columns(self) -> tuple[str, ...]:
        extra = ("id", "public_id") if self.has_public_id else ("id",)
        return extra + self.columns + tuple(r.column for r in self.refs)

    @property
    def target_columns(self) -> tuple[str, ...]:
        own = ("public_id",) if self.has_public_id else ()
        return own + self.columns + tuple(r.column for r in self.refs) + tuple(self.constants)


ROLES = ("admin", "operator", "viewer")
SPECS: tuple[Spec, ...] = (
    Spec(
        "users",
        ("email", "username", "password_hash", "role", "registered_on", "sso_provider", "sso_subject_id"),
        defaults={"registered_on": NOW, "role": "viewer"},
        enums={"role": ROLES},
        keys=(("email",), ("username",), ("sso_provider", "sso_subject_id")),
    ),
    Spec(
        "events",
        ("name", "min_value", "max_value", "unit", "type"),
        enums={"type": ("sensor", "actuator", "range", "cmd_button", "cmd_opened", "cmd_closed")},
        keys=(("name",),),
        refs=(Ref("user_public_id", "users"),),
    ),
    Spec(
        "experiments",
        ("name", "started_on", "stopped_on"),
        defaults={"started_on": NOW},
        keys=(("name",),),
        refs=(Ref("user_public_id", "users"),),
    ),
    Spec(
        "api_tokens",
        ("name", "token_hash", "last_used_at", "expires_at", "created_at"),
        defaults={"created_at": NOW},
        keys=(("token_hash",),),
        refs=(Ref("user_id", "users", by_id=True, required=True),),
    ),
    Spec(
        "blacklist_tokens",
        ("token", "blacklisted_on"),
        defaults={"blacklisted_on": NOW},
        keys=(("token",),),
        has_public_id=False,
    ),
    Spec(
        "log_entries",
        ("content", "logging_type", "status_type", "created_on"),
        defaults={"status_type": "unread", "created_on": NOW},
        enums={"logging_type": ("error", "warning", "info"), "status_type": ("read", "unread")},
        refs=(Ref("user_public_id", "users"),),
    ),
    Spec(
        "webhooks",
        ("url", "secret", "events", "enabled", "created_on"),
        defaults={"events": "[]", "enabled": True, "created_on": NOW},
        refs=(Ref("user_public_id", "users"),),
    ),
    Spec(
        "webhook_deliveries",
        ("event_type", "payload", "status", "attempts", "last_error", "response_code", "created_on", "delivered_on"),
        defaults={"status": "pending", "attempts": 0, "created_on": NOW},
        enums={"status": ("pending", "delivered", "failed", "dead_letter")},
        refs=(Ref("webhook_id", "webhooks", by_id=True, required=True),),
        # History only: a delivery WebMACS had not made is not made now (our dispatcher sends rows that are due).
        constants={"next_attempt_at": None},
    ),
    Spec(
        "rules",
        (
            "name",
            "operator",
            "threshold",
            "threshold_high",
            "action_type",
            "webhook_event_type",
            "enabled",
            "cooldown_seconds",
            "last_triggered_at",
            "created_on",
        ),
        defaults={"enabled": True, "cooldown_seconds": 60, "created_on": NOW},
        enums={
            "operator": ("gt", "lt", "eq", "gte", "lte", "between", "not_between"),
            "action_type": ("webhook", "log"),
        },
        keys=(("name",),),
        refs=(Ref("event_public_id", "events", required=True), Ref("user_public_id", "users")),
    ),
    Spec(
        "firmware_updates",
        (
            "version",
            "changelog",
            "file_path",
            "file_hash_sha256",
            "file_size_bytes",
            "status",
            "error_message",
            "created_on",
            "started_on",
            "completed_on",
        ),
        defaults={"status": "pending", "created_on": NOW},
        enums={"status": ("pending", "downloading", "verifying", "applying", "completed", "failed", "rolled_back")},
        keys=(("version",),),
        refs=(Ref("user_public_id", "users"),),
    ),
    Spec(
        "dashboards",
        ("name", "is_global", "created_on"),
        defaults={"is_global": False, "created_on": NOW},
        refs=(Ref("user_public_id", "users"),),
    ),
    Spec(
        "dashboard_widgets",
        ("widget_type", "title", "x", "y", "w", "h", "config_json"),
        defaults={"x": 0, "y": 0, "w": 4, "h": 3},
        enums={"widget_type": ("line_chart", "gauge", "stat_card", "actuator_toggle")},
        refs=(Ref("dashboard_id", "dashboards", by_id=True, required=True), Ref("event_public_id", "events")),
    ),
    Spec(
        "plugin_instances",
        (
            "plugin_id",
            "instance_name",
            "demo_mode",
            "enabled",
            "status",
            "config_json",
            "error_message",
            "created_on",
            "updated_on",
        ),
        defaults={"demo_mode": False, "enabled": True, "status": "inactive", "created_on": NOW, "updated_on": NOW},
        enums={"status": ("inactive", "connected", "error", "demo")},
        keys=(("instance_name",),),
        refs=(Ref("user_public_id", "users"),),
    ),
    Spec(
        "channel_mappings",
        ("channel_id", "channel_name", "direction", "unit", "created_on"),
        defaults={"created_on": NOW},
        enums={"direction": ("input", "output", "bidirectional")},
        keys=(("plugin_instance_id", "channel_id"),),
        refs=(
            Ref("plugin_instance_id", "plugin_instances", by_id=True, required=True),
            Ref("event_public_id", "events"),
        ),
    ),
    Spec(
        "plugin_packages",
        (
            "package_name",
            "version",
            "source",
            "file_path",
            "file_hash_sha256",
            "file_size_bytes",
            "plugin_ids",
            "installed_on",
        ),
        defaults={"source": "uploaded", "plugin_ids": "[]", "installed_on": NOW},
        enums={"source": ("bundled", "uploaded")},
        keys=(("package_name",),),
        refs=(Ref("user_public_id", "users"),),
    ),
)
TABLES = tuple(s.table for s in SPECS)


@dataclass
class _Tally:
    """How many rows share one outcome, and the first few of them."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, label: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(label)


Tallies = dict[str, _Tally]


@dataclass
class _Existing:
    """A target row a source row collides with."""

    public_id: str | None
    id: int
    why: str


class Mapper:
    """Maps (and with `write`, writes) every relational table of `source` into `target`'s open transaction.

    After `run`, `public_ids[table][source public id]` is the public id the row has here (itself, or the
    row it was merged into) and `ids[table][public id here]` its integer id (with `write`)."""

    def __init__(
        self,
        source: Source,
        target: psycopg.Connection | None,
        *,
        merge: Merge,
        report: Report,
        now: datetime,
        write: bool,
    ) -> None:
        """`target` None: plan against an empty database (a dry run whose target has no tables yet)."""
        assert target is not None or not write
        self.source = source
        self.target = target
        self.merge = merge
        self.report = report
        self.now = now
        self.write = write
        self.public_ids: dict[str, dict[str, str]] = {t: {} for t in TABLES}
        self.source_ids: dict[str, dict[int, str]] = {t: {} for t in TABLES}
        self.ids: dict[str, dict[str, int]] = {t: {} for t in TABLES}
        self.kept_user_ids = True
        self._placeholder = 0

    def run(self) -> None:
        for spec in SPECS:
            self._table(spec)
        if self.write and self.target is not None:
            # Users were given their WebMACS ids: move the identity past them.
            self.target.execute(
                "SELECT setval(pg_get_serial_sequence('users', 'id'), greatest(max(id), 1), max(id) IS NOT NULL)"
                " FROM users"
            )
        if not self.kept_user_ids:
            self.report.notes.append(
                "note: some users do not have their WebMACS id here (taken, or merged into another user): use a"
                " SECRET_KEY different from WebMACS's, or a JWT WebMACS issued for one of them would name another"
                " user."
            )

    # --- one table ---------------------------------------------------------------------------------------

    def _table(self, spec: Spec) -> None:
        count = self.report.table(spec.table)
        count.source = self.source.count(spec.table)
        seen: dict[tuple[str, ...], dict[tuple[Any, ...], str]] = {k: {} for k in spec.keys}
        seen_public: set[str] = set()
        collisions = _Tally()
        dangling: Tallies = {}
        invalid: Tallies = {}
        filled = _Tally()
        chunk: list[dict[str, Any]] = []
        wanted = spec.source_columns
        if spec.table == "users" and not self.source.has("users", "role") and self.source.has("users", "admin"):
            wanted += ("admin",)  # WebMACS before roles (alembic 004) had an `admin` flag
        for raw in self.source.rows(spec.table, wanted):
            row = self._convert(spec, raw, dangling, invalid, filled)
            if row is None:
                continue
            chunk.append(row)
            if len(chunk) >= CHUNK_ROWS:
                self._chunk(spec, chunk, seen, seen_public, collisions, invalid)
                chunk = []
        if chunk:
            self._chunk(spec, chunk, seen, seen_public, collisions, invalid)
        count.invalid = sum(t.count for t in invalid.values()) + sum(
            t.count for why, t in dangling.items() if why.endswith("(required)")
        )
        count.merged = collisions.count
        count.imported = count.source - count.invalid - count.merged
        if collisions.count:
            refused = self.merge == "refuse" and spec.table != "blacklist_tokens"
            self.report.problem(
                "conflict",
                spec.table,
                collisions.count,
                "rows collide with rows already here"
                + (
                    " (use --merge skip to keep those and point references at them)"
                    if refused
                    else ": merged into them"
                ),
                collisions.examples,
                blocking=refused,
            )
        self.report.problem(
            "filled", spec.table, filled.count, "rows without public_id: given a new one", filled.examples
        )
        for why, examples in invalid.items():
            self.report.problem("invalid", spec.table, examples.count, f"rows left out: {why}", examples.examples)
        for why, examples in dangling.items():
            self.report.problem("dangling", spec.table, examples.count, why, examples.examples)

    def _convert(
        self,
        spec: Spec,
        raw: dict[str, Any],
        dangling: Tallies,
        invalid: Tallies,
        filled: _Tally,
    ) -> dict[str, Any] | None:
        """The row as our table stores it, with references resolved; None when it is left out."""
        label = str(raw.get("public_id") or raw["id"])
        row: dict[str, Any] = {"_source_id": raw["id"]}
        if spec.has_public_id:
            row["public_id"] = raw["public_id"]
            if not raw["public_id"]:
                row["public_id"] = str(uuid.uuid4())
                filled.add(label)
        if "admin" in raw and raw.get("role") is None:
            raw["role"] = "admin" if raw["admin"] else "viewer"
        for column in spec.columns:
            value = raw[column]
            if value is None and column in spec.defaults:
                default = spec.defaults[column]
                value = self.now if default is NOW else default
            if column in spec.enums and value is not None:
                value = str(value).lower()
                if value not in spec.enums[column]:
                    invalid.setdefault(
                        f"{column} {value!r} is not one of {', '.join(spec.enums[column])}", _Tally()
                    ).add(label)
                    return None
            row[column] = value
        if spec.table == "rules" and row["cooldown_seconds"] is not None and row["cooldown_seconds"] < 0:
            invalid.setdefault("negative cooldown_seconds", _Tally()).add(label)
            return None
        for ref in spec.refs:
            value = raw[ref.column]
            if value is None:
                if ref.required:
                    invalid.setdefault(f"{ref.column} is NULL", _Tally()).add(label)
                    return None
                row[ref.column] = None
                continue
            resolved = self._resolve(ref, value)
            if resolved is None:
                why = f"{ref.column} names a missing {ref.table[:-1]}"
                if ref.required:
                    dangling.setdefault(why + ": left out (required)", _Tally()).add(f"{label} → {value}")
                    return None
                dangling.setdefault(why + ": set to NULL", _Tally()).add(f"{label} → {value}")
            row[ref.column] = resolved
        row.update(spec.constants)
        return row

    def _resolve(self, ref: Ref, value: Any) -> Any:
        """The referenced row's public id (or integer id, `by_id`) here, or None when it is not imported."""
        if ref.by_id:
            source_public_id = self.source_ids[ref.table].get(value)
            if source_public_id is None:
                return None
            public_id = self.public_ids[ref.table].get(source_public_id)
            return None if public_id is None else self.ids[ref.table].get(public_id)
        return self.public_ids[ref.table].get(value)

    def _chunk(
        self,
        spec: Spec,
        rows: list[dict[str, Any]],
        seen: dict[tuple[str, ...], dict[tuple[Any, ...], str]],
        seen_public: set[str],
        collisions: _Tally,
        invalid: Tallies,
    ) -> None:
        existing = self._existing(spec, rows)
        new: list[dict[str, Any]] = []
        for row in rows:
            label = row.get("public_id") or str(row["_source_id"])
            if spec.has_public_id and row["public_id"] in seen_public:
                invalid.setdefault("public_id repeats an earlier row", _Tally()).add(label)
                continue
            repeated = None
            for key in spec.keys:
                values = tuple(row[c] for c in key)
                if None not in values and values in seen[key]:
                    repeated = f"{'/'.join(key)} repeats an earlier row"
            if repeated:
                invalid.setdefault(repeated, _Tally()).add(label)
                continue
            hit = existing.get(id(row))
            if hit is not None:
                collisions.add(f"{label}: {hit.why}")
                if spec.table == "users" and hit.id != row["_source_id"]:
                    self.kept_user_ids = False
                if spec.has_public_id and hit.public_id is not None:
                    self._map(spec, row, hit.public_id, hit.id)
                continue
            if spec.has_public_id:
                seen_public.add(row["public_id"])
                self._map(spec, row, row["public_id"], None)
            for key in spec.keys:
                values = tuple(row[c] for c in key)
                if None not in values:
                    seen[key][values] = label
            new.append(row)
        if self.write and new:
            self._insert(spec, new)

    def _map(self, spec: Spec, row: dict[str, Any], public_id: str, target_id: int | None) -> None:
        self.public_ids[spec.table][row["public_id"]] = public_id
        self.source_ids[spec.table][row["_source_id"]] = row["public_id"]
        if target_id is not None:
            self.ids[spec.table][public_id] = target_id
        elif not self.write:
            # Planning: a stand-in id, never equal to a real one, so keys built on it behave.
            self._placeholder -= 1
            self.ids[spec.table][public_id] = self._placeholder

    def _existing(self, spec: Spec, rows: list[dict[str, Any]]) -> dict[int, _Existing]:
        """Target rows the given source rows collide with, keyed by `id()` of the source row."""
        table = sql.Identifier(spec.table)
        found: dict[int, _Existing] = {}
        if self.target is None:
            return found
        if spec.has_public_id:
            ids = [r["public_id"] for r in rows]
            query = sql.SQL("SELECT public_id, id FROM {} WHERE public_id = ANY(%s)").format(table)
            hits: dict[str, int] = dict(self.target.execute(query, (ids,)).fetchall())
            for r in rows:
                if r["public_id"] in hits:
                    found[id(r)] = _Existing(r["public_id"], hits[r["public_id"]], "same public_id")
        for key in spec.keys:
            candidates = [r for r in rows if id(r) not in found and None not in (r[c] for c in key)]
            if not candidates:
                continue
            # Compared as text: one array type whatever the key's columns are (the tables are small).
            as_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in key)
            arrays = [[str(r[c]) for r in candidates] for c in key]
            unnest = sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in key)
            public = sql.SQL("public_id") if spec.has_public_id else sql.SQL("NULL::text")
            query = sql.SQL(
                "SELECT {public}, id, {cols} FROM {t} WHERE ({cols}) IN (SELECT * FROM unnest({arrays}))"
            ).format(public=public, cols=as_text, t=table, arrays=unnest)
            hits2 = {tuple(h[2:]): (h[0], h[1]) for h in self.target.execute(query, arrays)}
            for r in candidates:
                values = tuple(str(r[c]) for c in key)
                if values in hits2:
                    public_id, target_id = hits2[values]
                    shown = "/".join(values)
                    found[id(r)] = _Existing(public_id, target_id, f"{'/'.join(key)} {shown!r} exists here")
        return found

    def _insert(self, spec: Spec, rows: list[dict[str, Any]]) -> None:
        assert self.target is not None
        columns = list(spec.target_columns)
        keep_ids: list[dict[str, Any]] = []
        if spec.table == "users":
            taken = {
                i
                for (i,) in self.target.execute(
                    "SELECT id FROM users WHERE id = ANY(%s)", ([r["_source_id"] for r in rows],)
                )
            }
            keep_ids = [r for r in rows if r["_source_id"] not in taken]
            if len(keep_ids) < len(rows):
                self.kept_user_ids = False
            for r in keep_ids:
                r["id"] = r["_source_id"]
            self._copy(spec.table, ["id", *columns], keep_ids)
            rows = [r for r in rows if r["_source_id"] in taken]
            if rows:
                self.target.execute(
                    "SELECT setval(pg_get_serial_sequence('users', 'id'), greatest(max(id), 1), max(id) IS NOT NULL)"
                    " FROM users"
                )
        self._copy(spec.table, columns, rows)
        if spec.has_public_id:
            public_ids = [r["public_id"] for r in rows + keep_ids]
            for p, i in self.target.execute(
                sql.SQL("SELECT public_id, id FROM {} WHERE public_id = ANY(%s)").format(sql.Identifier(spec.table)),
                (public_ids,),
            ):
                self.ids[spec.table][p] = i

    def _copy(self, table: str, columns: list[str], rows: list[dict[str, Any]]) -> None:
        assert self.target is not None
        if not rows:
            return
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with self.target.cursor() as cur, cur.copy(statement) as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])


def events_and_experiments(
    source: Source, target: psycopg.Connection, redirects: dict[str, dict[str, str]]
) -> tuple[dict[str, tuple[int, float, float]], dict[str, int]]:
    """Where the source's datapoints go: source event public id → (event id here, min, max), source
    experiment public id → experiment id here. A source row imported keeps its public id; `redirects` names
    those merged into a row of another public id."""
    events: dict[str, tuple[int, float, float]] = {}
    experiments: dict[str, int] = {}
    here_events = {
        p: (i, lo, hi) for p, i, lo, hi in target.execute("SELECT public_id, id, min_value, max_value FROM events")
    }
    here_experiments: dict[str, int] = dict(target.execute("SELECT public_id, id FROM experiments").fetchall())
    moved_events, moved_experiments = redirects.get("events", {}), redirects.get("experiments", {})
    with source.snapshot():
        for (public_id,) in source.conn.execute("SELECT public_id FROM events WHERE public_id IS NOT NULL"):
            found = here_events.get(moved_events.get(public_id) or public_id)
            if found is not None:
                events[public_id] = found
        for (public_id,) in source.conn.execute("SELECT public_id FROM experiments WHERE public_id IS NOT NULL"):
            found_x = here_experiments.get(moved_experiments.get(public_id) or public_id)
            if found_x is not None:
                experiments[public_id] = found_x
    return events, experiments


def redirects(mapper: Mapper) -> dict[str, dict[str, str]]:
    """The events and experiments merged into a row of another public id (all the datapoints need)."""
    return {t: {s: d for s, d in mapper.public_ids[t].items() if s != d} for t in ("events", "experiments")}
