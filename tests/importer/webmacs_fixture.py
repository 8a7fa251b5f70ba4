"""A WebMACS 2.0 database (spec §1) filled with realistic data, for the importer's tests and benchmark.

`build(admin_url, name)` creates database `name` on the cluster of `admin_url`, applies `webmacs_schema.sql`
and fills it: users of every role (bcrypt hashes of known passwords, one SSO user), the Simulated Device's
nine channels and a few command events, a plugin instance with its channel mappings, experiments (stopped
and running, one empty), rules of every operator, webhooks with secrets and deliveries, dashboards and
widgets, log entries, OTA records, API tokens, a blacklisted JWT and about a million datapoints written the
way WebMACS writes them: one server timestamp shared by a batch of all channels every 2.5 s, tagged with
the experiment running at the time. A few batches carry two values of one event (WebMACS's `[10, 20]` batch):
they collide on our `(event_id, time)` key. All ids come from a seeded generator: two builds are identical
except for the times, which end ten minutes before the build.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bcrypt
import psycopg
from psycopg import sql

SCHEMA = Path(__file__).with_name("webmacs_schema.sql")
AFTER_LOAD = "-- @after-load"
#: Seconds between two batches of the simulated controller.
BATCH_SECONDS = 2.5
#: The series test asks for the last two days: no datapoint lies within this margin of that cutoff.
GAP = timedelta(minutes=30)
SIMULATED = [
    ("temp_reactor", "Temperature Reactor", "input", "°C", 20.0, 500.0),
    ("temp_inlet", "Temperature Inlet", "input", "°C", 15.0, 200.0),
    ("temp_outlet", "Temperature Outlet", "input", "°C", 15.0, 300.0),
    ("pressure_chamber", "Pressure Chamber", "input", "bar", 0.0, 6.0),
    ("pressure_diff", "Pressure Differential", "input", "mbar", 0.0, 100.0),
    ("volume_flow", "Volume Flow", "input", "m³/h", 0.0, 40.0),
    ("humidity", "Humidity", "input", "%", 0.0, 100.0),
    ("heater_power", "Heater Power", "output", "%", 0.0, 100.0),
    ("valve_position", "Valve Position", "output", "%", 0.0, 100.0),
]


@dataclass
class User:
    id: int
    public_id: str
    email: str
    username: str
    password: str
    role: str


@dataclass
class Fixture:
    """What the tests need to know about a built source database."""

    dsn: str
    name: str
    built_at: datetime
    users: list[User]
    #: Plaintext API tokens: a valid one (the admin's) and an expired one; a JWT of olga's that she revoked.
    api_token: str
    expired_api_token: str
    blacklisted_jwt: str
    #: Public ids of the events that receive datapoints, the experiments, and the one running experiment.
    event_ids: list[str]
    experiment_ids: list[str]
    running_experiment: str
    #: Rows of the source's datapoints table, and how many of them collide with an earlier row of the same
    #: event at the same timestamp.
    datapoints: int
    collisions: int
    counts: dict[str, int] = field(default_factory=dict)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


def create_database(admin_url: str, name: str) -> str:
    """(Re)create an empty database `name` on the cluster of `admin_url`; returns its URL."""
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        # Byte-order collation: the fixture's text indexes build several times faster than under a locale.
        c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 LOCALE 'C'").format(sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(admin_url, dbname=name)


def schema_parts() -> tuple[str, str]:
    """The schema before and after the datapoints are loaded."""
    before, after = SCHEMA.read_text(encoding="utf-8").split(AFTER_LOAD, 1)
    return before, after.split("\n", 1)[1]


def webmacs_jwt(user_id: int, role: str, secret: str, *, at: datetime) -> str:
    """A JWT as WebMACS issues it (spec §3.3: HS256, sub = users.id, exp, iat, role; no jti)."""
    import jwt

    iat = int(at.timestamp())
    return jwt.encode({"sub": str(user_id), "exp": iat + 86400, "iat": iat, "role": role}, secret, "HS256")


def build(
    admin_url: str,
    name: str,
    *,
    batches: int = 100_000,
    seed: int = 16,
    secret: str = "webmacs-fixture-secret-key-32-bytes-or-more",  # noqa: S107 - a throwaway database's key
) -> Fixture:
    """Create and fill database `name`; `batches` of ten datapoints each (plus the colliding extras). `secret`:
    WebMACS's SECRET_KEY, which signed the logged-out JWT in blacklist_tokens."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    dsn = create_database(admin_url, name)
    before, after = schema_parts()
    built_at = datetime.now(UTC).replace(microsecond=0)
    end = built_at - timedelta(minutes=10)
    start = end - timedelta(seconds=BATCH_SECONDS * batches) - 2 * GAP
    day = timedelta(days=1)
    span = end - start

    with psycopg.connect(dsn, autocommit=False, options="-c timezone=UTC") as db:
        db.execute(before)  # the fixture's own DDL file, not input
        users = [
            User(1, _uuid(rng), "admin@webmacs.io", "admin", "old-admin-password", "admin"),
            User(2, _uuid(rng), "olga.operator@lab.example", "olga", "operator-pass-1", "operator"),
            User(3, _uuid(rng), "victor.viewer@lab.example", "victor", "viewer-pass-22", "viewer"),
            User(4, _uuid(rng), "sso.user@lab.example", "sso_user", "never-used-sso-pw", "viewer"),
        ]
        for u in users:
            db.execute(
                "INSERT INTO users (id, public_id, email, username, password_hash, role, registered_on,"
                " sso_provider, sso_subject_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    u.id,
                    u.public_id,
                    u.email,
                    u.username,
                    _hash(u.password),
                    u.role,
                    start - timedelta(days=30 - u.id),
                    "SSO" if u.username == "sso_user" else None,
                    "sub-4711" if u.username == "sso_user" else None,
                ),
            )
        db.execute("SELECT setval('users_id_seq', 4)")
        admin, operator = users[0].public_id, users[1].public_id

        # Events: the Simulated Device's channels (named as WebMACS's auto-creation names them) and commands.
        events: list[tuple[str, str, float, float, str, str]] = []
        for _channel, label, direction, unit, lo, hi in SIMULATED:
            kind = "sensor" if direction == "input" else "actuator"
            events.append((_uuid(rng), f"Simulated Device – {label}", lo, hi, unit, kind))
        events.append((_uuid(rng), 'Valve, "main"', 0.0, 1.0, "state", "actuator"))
        for label, kind in [
            ("Start Button", "cmd_button"),
            ("Valve Opened", "cmd_opened"),
            ("Valve Closed", "cmd_closed"),
        ]:
            events.append((_uuid(rng), label, 0.0, 1.0, "", kind))
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO events (public_id, name, min_value, max_value, unit, type, user_public_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(*e, operator if i % 2 else admin) for i, e in enumerate(events)],
            )
        fed = events[:10]  # the nine channels and the valve receive datapoints

        instance = _uuid(rng)
        pi = db.execute(
            "INSERT INTO plugin_instances (public_id, plugin_id, instance_name, demo_mode, enabled, status,"
            " config_json, created_on, updated_on, user_public_id)"
            " VALUES (%s, 'simulated', 'Simulated Device', true, true, 'inactive', %s, %s, %s, %s) RETURNING id",
            (instance, '{"interval": 0.5}', start, start + day, admin),
        ).fetchone()
        assert pi is not None
        for (channel, label, direction, unit, _lo, _hi), mapped in zip(SIMULATED, events, strict=False):
            db.execute(
                "INSERT INTO channel_mappings (public_id, plugin_instance_id, channel_id, channel_name, direction,"
                " unit, event_public_id, created_on) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (_uuid(rng), pi[0], channel, label, direction, unit, mapped[0], start),
            )
        pi2 = db.execute(
            "INSERT INTO plugin_instances (public_id, plugin_id, instance_name, demo_mode, enabled, status,"
            " error_message, created_on, updated_on, user_public_id)"
            " VALUES (%s, 'system', 'System Monitor', false, false, 'inactive', 'psutil missing', %s, %s, %s)"
            " RETURNING id",
            (_uuid(rng), start, start, admin),
        ).fetchone()
        assert pi2 is not None
        db.execute(
            "INSERT INTO channel_mappings (public_id, plugin_instance_id, channel_id, channel_name, direction,"
            " unit, event_public_id, created_on) VALUES (%s, %s, 'cpu_percent', 'CPU', 'input', '%%', NULL, %s)",
            (_uuid(rng), pi2[0], start),
        )

        # Experiments: four stopped ones, an empty one and the running one (WebMACS tags new datapoints with it).
        spans: list[tuple[str, float, float | None]] = [
            ("Calibration run", 0.05, 0.06),
            ('Run 2, "hot"', 0.18, 0.19),
            ("Überdruck-Test", 0.45, 0.46),
            ("Long run", 0.60, 0.63),
            ("Empty experiment", -0.2, -0.1),  # before the first datapoint
            ("Live", 0.99, None),
        ]
        experiments = []
        for title, first, last in spans:
            pid = _uuid(rng)
            experiments.append(pid)
            db.execute(
                "INSERT INTO experiments (public_id, name, started_on, stopped_on, user_public_id)"
                " VALUES (%s, %s, %s, %s, %s)",
                (pid, title, start + span * first, None if last is None else start + span * last, operator),
            )

        # Datapoints: batch k sits k × 2.5 s before `end` (µs jitter, none on every 100th), skipping the
        # series test's gap; one value per fed event, tagged with the experiment running then.
        db.execute(
            "CREATE TEMP TABLE fed (i int, public_id text, lo float8, hi float8) ON COMMIT DROP;"
            " CREATE TEMP TABLE batch (k int, ts timestamptz, x text) ON COMMIT DROP"
        )
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO fed VALUES (%s, %s, %s, %s)", [(i, e[0], e[2], e[3]) for i, e in enumerate(fed)]
            )
        gap_center = built_at - timedelta(days=2)
        db.execute(
            "INSERT INTO batch (k, ts) SELECT k, t + CASE WHEN k %% 100 = 0 THEN interval '0'"
            " ELSE ((k * 7919) %% 1000000) * interval '1 microsecond' END"
            " FROM (SELECT k, %(end)s::timestamptz - k * %(step)s * interval '1 s' AS t"
            " FROM generate_series(0, %(n)s + %(slack)s) k) g"
            " WHERE t NOT BETWEEN %(gap_lo)s AND %(gap_hi)s ORDER BY k LIMIT %(n)s",
            {
                "end": end,
                "step": BATCH_SECONDS,
                "n": batches,
                "slack": int(2 * GAP.total_seconds() / BATCH_SECONDS) + 2,
                "gap_lo": gap_center - GAP,
                "gap_hi": gap_center + GAP,
            },
        )
        db.execute(
            "UPDATE batch b SET x = (SELECT x.public_id FROM experiments x WHERE b.ts >= x.started_on"
            " AND (x.stopped_on IS NULL OR b.ts <= x.stopped_on) ORDER BY x.id LIMIT 1)"
        )
        # Values: a smooth signal per channel rounded to 3 decimals, with Python-str edge cases (5.0, 42.5,
        # 1e-05, -0.0, 1e+16) and now and then a value above the event's max_value (WebMACS does not check).
        db.execute(
            "INSERT INTO datapoints (public_id, value, timestamp, event_public_id, experiment_public_id)"
            " SELECT gen_random_uuid()::text,"
            " CASE k % 1000 WHEN 1 THEN 5.0 WHEN 2 THEN 42.5 WHEN 3 THEN 1e-05 WHEN 4 THEN '-0'::float8"
            "  WHEN 5 THEN 1e16 ELSE CASE WHEN k % 5000 = 7 THEN f.hi + 10"
            "  ELSE round((f.lo + (f.hi - f.lo) * (0.5 + 0.4 * sin(k / 50.0 + f.i)))::numeric, 3)::float8 END END,"
            " b.ts, f.public_id, b.x FROM batch b CROSS JOIN fed f ORDER BY b.ts, f.i"
        )
        # WebMACS's `[10, 20]` batches: a second value for the reactor temperature at a batch's timestamp,
        # in untagged stretches only (one of them a third value), inserted after the batch as WebMACS would.
        collided = db.execute(
            "INSERT INTO datapoints (public_id, value, timestamp, event_public_id, experiment_public_id)"
            " SELECT gen_random_uuid()::text, d.value + r, d.timestamp, d.event_public_id, NULL"
            " FROM datapoints d JOIN batch b ON b.ts = d.timestamp CROSS JOIN generate_series(1, 2) r"
            " WHERE d.event_public_id = %(ev)s AND d.experiment_public_id IS NULL"
            " AND b.k %% 9973 = 17 AND b.k > 1000 AND (r = 1 OR b.k = 9973 * 3 + 17)",
            {"ev": fed[0][0]},
        ).rowcount
        db.execute(after)

        # Rules of every operator, both actions.
        rules = [
            ("Reactor too hot", 0, "gt", 450.0, None, "webhook", "sensor.threshold_exceeded", True, 60),
            ("Inlet cold", 1, "lt", 16.0, None, "log", None, True, 300),
            ("Pressure exact", 3, "eq", 3.0, None, "log", None, False, 0),
            ("Flow high", 5, "gte", 35.0, None, "webhook", None, True, 60),
            ("Humidity low", 6, "lte", 5.0, None, "log", None, True, 60),
            ("Outlet window", 2, "between", 100.0, 200.0, "webhook", "sensor.reading", True, 120),
            ("Diff outside", 4, "not_between", 10.0, 90.0, "log", None, True, 60),
        ]
        for rule, ev, op, t, th, action, wtype, enabled, cooldown in rules:
            db.execute(
                "INSERT INTO rules (public_id, name, event_public_id, operator, threshold, threshold_high,"
                " action_type, webhook_event_type, enabled, cooldown_seconds, last_triggered_at, created_on,"
                " user_public_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    _uuid(rng),
                    rule,
                    events[ev][0],
                    op,
                    t,
                    th,
                    action,
                    wtype,
                    enabled,
                    cooldown,
                    end - timedelta(hours=ev) if enabled else None,
                    start + timedelta(hours=ev),
                    operator,
                ),
            )

        hooks = []
        for url, hook_secret, subscribed, enabled in [
            (
                "https://hooks.lab.example/webmacs",
                "s3cr3t-hmac-key",
                '["sensor.threshold_exceeded", "experiment.started"]',
                True,
            ),
            ("https://alerts.example.org/in", None, '["experiment.stopped"]', False),
        ]:
            row = db.execute(
                "INSERT INTO webhooks (public_id, url, secret, events, enabled, created_on, user_public_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (_uuid(rng), url, hook_secret, subscribed, enabled, start, admin),
            ).fetchone()
            assert row is not None
            hooks.append(row[0])
        for i, (status, attempts, code, error) in enumerate(
            [
                ("delivered", 1, 200, None),
                ("dead_letter", 3, 500, "HTTP 500"),
                ("delivered", 2, 204, None),
                ("pending", 0, None, None),
            ]
        ):
            created = start + timedelta(hours=i)
            db.execute(
                "INSERT INTO webhook_deliveries (public_id, webhook_id, event_type, payload, status, attempts,"
                " last_error, response_code, created_on, delivered_on) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    _uuid(rng),
                    hooks[0],
                    "experiment.started",
                    f'{{"type": "experiment.started", "time": "{created.isoformat()}", "experiment": "Run {i}"}}',
                    status,
                    attempts,
                    error,
                    code,
                    created,
                    created + timedelta(seconds=1) if status == "delivered" else None,
                ),
            )

        for version, status, path in [
            ("2.1.0", "completed", "/updates/firmware-2.1.0.tar.gz"),
            ("2.2.0", "pending", None),
        ]:
            db.execute(
                "INSERT INTO firmware_updates (public_id, version, changelog, file_path, file_hash_sha256,"
                " file_size_bytes, status, created_on, started_on, completed_on, user_public_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    _uuid(rng),
                    version,
                    f'Changes in {version}:\n- faster\n- "quoted"',
                    path,
                    "ab" * 32 if path else None,
                    123456 if path else None,
                    status,
                    start,
                    start + day if path else None,
                    start + day if path else None,
                    admin,
                ),
            )

        for board, is_global, owner in [("Reactor overview", True, admin), ("Olga's board", False, operator)]:
            row = db.execute(
                "INSERT INTO dashboards (public_id, name, is_global, created_on, user_public_id)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (_uuid(rng), board, is_global, start + timedelta(minutes=len(board)), owner),
            ).fetchone()
            assert row is not None
            for j, (wtype, ev) in enumerate([("line_chart", 0), ("gauge", 3), ("actuator_toggle", 9)]):
                db.execute(
                    "INSERT INTO dashboard_widgets (public_id, dashboard_id, widget_type, title, event_public_id,"
                    " x, y, w, h, config_json) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        _uuid(rng),
                        row[0],
                        wtype,
                        f"{wtype} {j}",
                        events[ev][0],
                        4 * j,
                        0,
                        4,
                        3,
                        '{"minutes": 60, "color": "#ff0000"}' if j == 0 else None,
                    ),
                )
        db.execute(
            "INSERT INTO dashboard_widgets (public_id, dashboard_id, widget_type, title, event_public_id, x, y, w, h)"
            " SELECT %s, min(id), 'stat_card', 'Unlinked', NULL, 0, 3, 2, 2 FROM dashboards",
            (_uuid(rng),),
        )

        log_rows = []
        for i in range(300):
            who = users[i % 3]
            content = [
                f"User '{who.username}' logged in.",
                "Controller started – plugin sensor polling active",
                "Controller shutting down",
            ][i % 3]
            log_rows.append(
                (
                    _uuid(rng),
                    content,
                    ["info", "info", "warning"][i % 3],
                    "read" if i % 4 == 0 else "unread",
                    start + timedelta(minutes=10 * i),
                    who.public_id,
                )
            )
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO log_entries (public_id, content, logging_type, status_type, created_on, user_public_id)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                log_rows,
            )

        api_token = "wm_" + "A" * 20 + "valid-token-of-the-old-admin-000000000000"
        expired = "wm_" + "B" * 20 + "expired-token-of-the-operator-0000000000"
        for token, user, expires in [(api_token, users[0], None), (expired, users[1], start)]:
            db.execute(
                "INSERT INTO api_tokens (public_id, name, token_hash, user_id, last_used_at, expires_at, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    _uuid(rng),
                    f"controller of {user.username}",
                    hashlib.sha256(token.encode()).hexdigest(),
                    user.id,
                    end,
                    expires,
                    start,
                ),
            )
        # Olga logged out of a session an hour ago.
        revoked = webmacs_jwt(2, "operator", secret, at=built_at - timedelta(hours=1))
        db.execute("INSERT INTO blacklist_tokens (token, blacklisted_on) VALUES (%s, %s)", (revoked, end))
        db.execute(
            "INSERT INTO plugin_packages (public_id, package_name, version, source, file_path, file_hash_sha256,"
            " file_size_bytes, plugin_ids, installed_on, user_public_id)"
            " VALUES (%s, 'webmacs-plugin-acme', '1.0.3', 'uploaded',"
            " '/plugins/webmacs_plugin_acme-1.0.3-py3-none-any.whl', %s, 4096, '[\"acme\"]', %s, %s)",
            (_uuid(rng), "cd" * 32, start, admin),
        )
        db.commit()
        db.execute("ANALYZE")
        counts = {
            t: int(db.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0])  # type: ignore[index]
            for t in [
                "users",
                "events",
                "experiments",
                "datapoints",
                "blacklist_tokens",
                "api_tokens",
                "log_entries",
                "webhooks",
                "webhook_deliveries",
                "rules",
                "firmware_updates",
                "dashboards",
                "dashboard_widgets",
                "plugin_instances",
                "channel_mappings",
                "plugin_packages",
            ]
        }
    return Fixture(
        dsn=dsn,
        name=name,
        built_at=built_at,
        users=users,
        api_token=api_token,
        expired_api_token=expired,
        blacklisted_jwt=revoked,
        event_ids=[e[0] for e in fed],
        experiment_ids=experiments,
        running_experiment=experiments[-1],
        datapoints=counts["datapoints"],
        collisions=collided,
        counts=counts,
    )
