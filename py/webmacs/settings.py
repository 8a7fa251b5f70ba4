"""All configuration, read once from the environment (spec §16 names; our own are prefixed WEBMACS_)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The spec's default initial admin password: fine for a laptop, refused in production (see app._seed).
DEFAULT_ADMIN_PASSWORD = "admin123"  # noqa: S105 - the documented development default, refused in production
DEV_SECRET_WARNING = "SECRET_KEY is empty or shorter than 32 characters; acceptable only in development."  # noqa: S105 - a message


def libpq_url(v: str) -> str:
    """WebMACS deployments carry SQLAlchemy URLs; psycopg and the engine want the plain libpq form."""
    v = v.strip()
    for prefix in ("postgresql+asyncpg://", "postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if v.startswith(prefix):
            return "postgresql://" + v[len(prefix) :]
    return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", case_sensitive=False, extra="ignore")

    # --- WebMACS names (spec §16) ---
    database_url: str | None = None
    secret_key: str = ""
    algorithm: str = "HS256"
    access_token_expire_minutes: int = Field(default=1440, ge=1)
    backend_host: str = "0.0.0.0"  # noqa: S104 - WebMACS's default (spec §16): a controller serves its network
    backend_port: int = 8000
    cors_origins: Annotated[list[str], NoDecode] = ["http://localhost:3000", "http://localhost:5173"]
    debug: bool = False
    #: Only `production` means anything (strict SECRET_KEY); other values (staging, test…) run as development,
    #: as in WebMACS, rather than refusing to start.
    env: str = "development"
    initial_admin_email: str = "admin@webmacs.io"
    initial_admin_username: str = "admin"
    initial_admin_password: str = DEFAULT_ADMIN_PASSWORD
    rate_limit_per_minute: int = Field(default=300, ge=1)
    github_repo: str = "stefanposs/webmacs"
    webmacs_update_dir: Path = Path("/updates")
    webmacs_plugin_dir: Path = Path("/plugins")
    # SSO / OIDC (spec §3.10)
    oidc_enabled: bool = False
    oidc_provider_name: str = "SSO"
    oidc_issuer_url: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: str = ""
    oidc_scopes: str = "openid email profile"
    #: Empty: derived from BACKEND_HOST/BACKEND_PORT (see services.sso.redirect_uri).
    oidc_redirect_uri: str = ""
    oidc_default_role: Literal["admin", "operator", "viewer"] = "viewer"
    oidc_auto_create_users: bool = True
    #: Empty: the first CORS origin.
    oidc_frontend_url: str = ""

    # --- our own (WEBMACS_*) ---
    #: Where the local cluster, uploads in development and caches live.
    webmacs_home: Path = Path(".webmacs")
    #: Port of the project-managed local cluster.
    webmacs_db_port: int = 55432
    #: Chunk interval of the datapoints hypertable (a PostgreSQL interval).
    webmacs_chunk_interval: str = "1 day"
    #: Connection pool size of the API (the engine has its own connections).
    webmacs_pool_size: int = Field(default=10, ge=1)
    #: Ingest engine tuning (see README "Ingest"): rows/bytes/age that close a batch, queued rows before REST
    #: answers 503 and WS reads pause, parallel COPY writer connections.
    webmacs_ingest_max_rows: int = Field(default=20_000, ge=1)
    webmacs_ingest_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    webmacs_ingest_max_age_ms: int = Field(default=5, ge=0)
    webmacs_ingest_queue_capacity: int = Field(default=200_000, ge=1)
    webmacs_ingest_writers: int = Field(default=2, ge=1, le=16)
    #: Fraction of the ingest queue one sender (a WebSocket connection, a REST token) may fill, so one flooding
    #: controller cannot take the queue from the others.
    webmacs_ingest_source_share: float = Field(default=0.25, gt=0, le=1)
    #: Deadline of one write transaction of the engine; past it the connection is dropped and the batch retried.
    webmacs_ingest_write_timeout_s: float = Field(default=30.0, gt=0)
    #: How long a REST ingest request waits for its datapoints to be written before answering 503 (they stay
    #: queued and may still be stored: the client was never told they were).
    webmacs_ingest_ack_timeout_s: float = Field(default=30.0, gt=0)
    #: How often open WebSocket sessions' credentials are checked again (logout, token deletion, role change).
    webmacs_ws_recheck_s: float = Field(default=2.0, gt=0)
    #: Shutdown budget: the engine writes what is queued for at most this long; what is left was never acked.
    webmacs_shutdown_timeout_s: float = Field(default=20.0, gt=0, le=300)
    #: `/health` reports ingest as degraded (and `/health/ready` answers 503) when an accepted datapoint has
    #: waited longer than this to be written, or while a writer is failing.
    webmacs_health_max_unacked_s: float = Field(default=5.0, gt=0)
    #: Largest ingest frame (a WebSocket message's JSON, a REST ingest body) the engine parses.
    webmacs_ingest_max_frame_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    #: Request-body limits, enforced while reading, before parsing and authentication (413 beyond): requests
    #: without credentials, and any other JSON request (ingest routes use the frame cap; uploads their own).
    webmacs_body_limit_anonymous: int = Field(default=1024 * 1024, ge=1024)
    webmacs_body_limit_default: int = Field(default=4 * 1024 * 1024, ge=1024)
    #: Peers (addresses or networks) whose `X-Forwarded-For` / `X-Real-IP` name the client (rate limit, login
    #: throttle). Anyone else is identified by the TCP peer address. Default: a reverse proxy on this host.
    webmacs_trusted_proxies: Annotated[list[str], NoDecode] = ["127.0.0.1/32", "::1/128"]
    #: Failed logins allowed per account, and per client address, in `webmacs_login_window_s`; more answer 429.
    webmacs_login_max_failures_account: int = Field(default=10, ge=1)
    webmacs_login_max_failures_peer: int = Field(default=50, ge=1)
    webmacs_login_window_s: int = Field(default=900, ge=1)
    #: Exports (CSV/Parquet, experiment CSV) running at once; more answer 503. Each holds its own connections.
    webmacs_export_concurrency: int = Field(default=4, ge=1)
    #: Text cells of CSV exports (names, units) that a spreadsheet would run as a formula (`= + - @` first) get a
    #: leading `'`. False: byte-exact WebMACS CSV (spec §13).
    webmacs_csv_formula_guard: bool = True
    #: How long a request waits for a pooled database connection before answering 503.
    webmacs_db_timeout_s: float = Field(default=10.0, gt=0)
    #: No request waits longer for its response to start (a stalled database): it is cancelled and answered 503.
    #: Longer than the REST ingest ack timeout.
    webmacs_request_timeout_s: float = Field(default=60.0, gt=0)
    #: PostgreSQL streaming replicas for analyst reads (series, exports, datapoint lists), comma-separated URLs.
    #: Writes and everything that must read its own writes stay on the primary (DATABASE_URL).
    webmacs_read_database_url: Annotated[list[str], NoDecode] = []
    #: A replica serves reads only while it is known to hold everything the primary had committed this many seconds
    #: ago (measured every second against the primary's WAL position); otherwise reads go to the primary.
    webmacs_read_max_staleness_s: float = Field(default=5.0, gt=0)
    #: How live datapoints and "latest" values reach the other server processes on the same database:
    #: PostgreSQL LISTEN/NOTIFY (no extra service), NATS (`webmacs_nats_url`), or off (one process).
    #: Bearer token Prometheus must send to scrape /metrics (empty: /metrics is open, like /health).
    webmacs_metrics_token: str = ""
    #: Line protocol: create events for series nobody mapped yet (else their points are rejected as unknown).
    webmacs_lp_auto_events: bool = True
    #: Line protocol: how many events one API token may create that way.
    webmacs_lp_max_auto_events: int = Field(default=1000, ge=0)
    #: Line protocol: the largest body after gzip decompression (larger: 413).
    webmacs_lp_max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    webmacs_fanout: Literal["postgres", "nats", "off"] = "postgres"
    #: A NATS server (`nats://host:4222`); when set, the fan-out uses it unless WEBMACS_FANOUT says otherwise.
    webmacs_nats_url: str = ""
    #: Server processes `webmacs serve` starts on one port (`--workers`); each runs its own engine.
    webmacs_workers: int = Field(default=1, ge=1, le=64)
    #: bcrypt cost factor (tests lower it; 12 is the production default).
    webmacs_bcrypt_rounds: int = Field(default=12, ge=4, le=16)
    #: Log lines as text, or as one JSON object per line (ts, level, logger, msg, request_id; access records
    #: add route, method, path, status, duration_ms, user_id, client).
    webmacs_log_format: Literal["text", "json"] = "text"
    #: Bind address/port of `webmacs serve`.
    webmacs_host: str = "127.0.0.1"
    webmacs_port: int = 8000
    #: "host:port" where the engine also accepts WebSocket connections itself (`/ws/controller/telemetry`,
    #: `/ws/datapoints/stream`), e.g. for a reverse proxy; empty = off. The API's own port serves them anyway.
    webmacs_telemetry_listen: str = ""
    #: Command that installs an uploaded plugin wheel (the wheel path is appended; split like a shell would).
    #: Empty: `<this python> -m pip install --no-deps --no-input <wheel>`.
    webmacs_plugin_install_cmd: str = ""

    # --- MQTT ingest (README "MQTT") ---
    #: A broker to take datapoints from (`mqtt://user:pass@host:1883`, `mqtts://…`); empty = MQTT ingest off.
    webmacs_mqtt_url: str = ""
    #: Topic filters subscribed to (comma-separated or a JSON list).
    webmacs_mqtt_topics: Annotated[list[str], NoDecode] = ["webmacs/telemetry/#"]
    #: The `wm_` API token (role operator or admin) the MQTT writer acts as; required with WEBMACS_MQTT_URL.
    webmacs_mqtt_token: str = Field(default="", repr=False)
    #: MQTT client id; empty = `webmacs-<host name>` (`-<n>` for further server processes), stable across
    #: restarts so the broker's persistent session is resumed.
    webmacs_mqtt_client_id: str = ""
    #: Subscribe as `$share/webmacs/<topic>` (MQTT 5 shared subscription): server processes share the messages.
    webmacs_mqtt_shared: bool = True
    #: A topic where a small JSON report of each rejected message is published (QoS 0); empty = none.
    webmacs_mqtt_error_topic: str = ""

    # --- webhooks (spec §9) and OTA (spec §10) ---
    #: Hosts (names or IP literals, or CIDR networks) exempt from the webhook/OTA SSRF guard,
    #: e.g. an internal receiver. Comma-separated or a JSON list.
    webmacs_webhook_allow_hosts: Annotated[list[str], NoDecode] = []
    #: Per-attempt timeout of a webhook delivery.
    webmacs_webhook_timeout_s: float = Field(default=10.0, gt=0)
    #: Delay before the 2nd, 3rd… attempt (the last value repeats); the reference sleeps 2 s then 4 s.
    webmacs_webhook_retry_delays_s: Annotated[list[float], NoDecode] = [2.0, 4.0]
    #: Attempts before a delivery becomes dead_letter.
    webmacs_webhook_max_attempts: int = Field(default=3, ge=1)
    #: Deliveries in flight at once in this process.
    webmacs_webhook_concurrency: int = Field(default=10, ge=1)
    #: Backstop poll of the outbox when no NOTIFY arrives (seconds).
    webmacs_webhook_poll_s: float = Field(default=5.0, gt=0)
    #: Bytes of a receiver's response body read (and discarded) at most.
    webmacs_webhook_max_response_bytes: int = Field(default=65536, ge=0)
    #: Largest OTA bundle accepted by upload or download (the reference: 500 MB).
    webmacs_ota_max_bundle_bytes: int = Field(default=500 * 1024 * 1024, ge=1)
    #: Timeout of an OTA bundle download (connect and between reads).
    webmacs_ota_download_timeout_s: float = Field(default=30.0, gt=0)
    #: Base URL of the GitHub REST API for `GET /ota/check`; empty disables the lookup.
    webmacs_ota_github_api: str = "https://api.github.com"
    #: Timeout of the GitHub release lookup.
    webmacs_ota_github_timeout_s: float = Field(default=8.0, gt=0)
    #: Seconds a GitHub lookup result is reused (unauthenticated GitHub allows 60 requests an hour); 0 = never.
    webmacs_ota_github_cache_s: float = Field(default=300.0, ge=0)

    # --- analyst path: exports and retention ---
    #: Rows per streamed export frame (one Parquet row group, one CSV piece); bounds an export's memory.
    webmacs_export_chunk_rows: int = Field(default=100_000, ge=1)
    #: Long-range m4/minmax/lttb series: pre-select each slice's extremes in SQL (only they cross the wire)
    #: instead of reading the range whole (20 bytes a datapoint) and thinning it in Rust. Off: on a local
    #: network reading whole is faster (one event's 100,000 interleaved datapoints: 89 ms vs 101–115 ms), the
    #: aggregation costing PostgreSQL more than the transfer saves; on for a database behind a slow link.
    webmacs_series_preselect: bool = False
    #: Long-range m4/minmax/lttb series from the datapoint cells (10-minute summaries the writers keep,
    #: sql/0041): only the cells and the raw rows of the cells a slice edge cuts are read. Before
    #: `webmacs_series_preselect` and reading whole; off only to compare.
    webmacs_series_cells: bool = True
    #: A hypertable chunk that can hold at most this many rows (judged by its size on disk) is exported with an
    #: unordered COPY and sorted in Rust (≈ 28 bytes a row held per chunk, two chunks at a time); larger chunks
    #: are sorted by PostgreSQL. 0: PostgreSQL always sorts.
    webmacs_export_sort_rows: int = Field(default=500_000, ge=0)
    #: Drop datapoints older than this many days (whole chunks); unset keeps everything.
    webmacs_retention_days: int | None = Field(default=None, ge=1)
    #: Compress chunks older than this many days (Timescale-License edition only); unset disables it.
    webmacs_compress_after_days: int | None = Field(default=None, ge=1)

    # --- the bundle updater (spec §10.6; README "Updater") ---
    #: Seconds between scans of WEBMACS_UPDATE_DIR for `webmacs-update-*.tar.gz` (spec §16).
    webmacs_updater_poll: float = Field(default=30.0, gt=0)
    #: How a verified bundle is applied: empty = the spec's Docker Compose flow; otherwise a command (split like
    #: a shell would) run in the extracted bundle with WEBMACS_BUNDLE_DIR, WEBMACS_VERSION and
    #: WEBMACS_PREVIOUS_VERSION in its environment, e.g. for bare-metal/systemd installs.
    webmacs_updater_apply: str = ""
    #: With WEBMACS_UPDATER_APPLY: the command that puts the previous version back (same environment);
    #: empty = no automatic rollback in command mode.
    webmacs_updater_rollback: str = ""
    #: Docker mode: the directory holding docker-compose.prod.yml and .env (the spec's /opt/webmacs).
    webmacs_updater_compose_dir: Path = Path("/opt/webmacs")
    #: "exec": GET the health URL from inside the `backend` container (the spec's check); "http": GET it from
    #: here. Empty: exec in Docker mode, http in command mode. Only `"status": "ok"` counts as healthy.
    webmacs_updater_health_check: Literal["", "exec", "http"] = ""
    webmacs_updater_health_url: str = "http://localhost:8000/health"
    #: The health check asks this many times, this far apart, before the update counts as failed (spec: 10 × 5 s).
    webmacs_updater_health_tries: int = Field(default=10, ge=1)
    webmacs_updater_health_interval_s: float = Field(default=5.0, ge=0)
    #: Deadline of each external command (docker load of large images takes a while).
    webmacs_updater_command_timeout_s: float = Field(default=900.0, gt=0)
    #: A failed database backup stops the update (the reference only warned and went on).
    webmacs_updater_require_backup: bool = True
    #: Public key (minisign, or base64 Ed25519) that bundles must be signed with; empty = signatures not required.
    webmacs_updater_public_key: str = ""
    #: Caps on what one bundle may unpack to (checked at upload and before extraction): zip bombs stop here.
    webmacs_updater_max_unpacked_bytes: int = Field(default=8 * 1024**3, ge=1)
    webmacs_updater_max_members: int = Field(default=10_000, ge=1)

    @field_validator(
        "cors_origins",
        "webmacs_webhook_allow_hosts",
        "webmacs_webhook_retry_delays_s",
        "webmacs_trusted_proxies",
        "webmacs_read_database_url",
        "webmacs_mqtt_topics",
        mode="before",
    )
    @classmethod
    def _parse_list(cls, v: Any) -> Any:
        """List settings from the environment: a JSON list (as WebMACS's CORS_ORIGINS) or comma separated."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("webmacs_trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for n in v:
            ipaddress.ip_network(n.strip(), strict=False)  # raises ValueError: a clear start-up error
        return v

    @field_validator("webmacs_webhook_retry_delays_s")
    @classmethod
    def _delays_non_negative(cls, v: list[float]) -> list[float]:
        if any(d < 0 for d in v):
            raise ValueError("retry delays must be >= 0")
        return v

    @field_validator("database_url", mode="before")
    @classmethod
    def _normalise_url(cls, v: Any) -> Any:
        if isinstance(v, str):
            return libpq_url(v) or None
        return v

    @field_validator("webmacs_read_database_url", mode="after")
    @classmethod
    def _normalise_read_urls(cls, v: list[str]) -> list[str]:
        return [u for u in (libpq_url(x) for x in v) if u]

    @field_validator("env", mode="after")
    @classmethod
    def _normalise_env(cls, v: str) -> str:
        # `ENV=Production` must not silently skip the production checks.
        return v.strip().lower()

    @field_validator("initial_admin_email", mode="after")
    @classmethod
    def _normalise_admin_email(cls, v: str) -> str:
        # Login normalises the domain part (spec §3.4); the seeded admin must be stored the same way or it
        # could never log in. An address the validator refuses is kept as given (login refuses it too).
        from pydantic.networks import validate_email

        try:
            return validate_email(v.strip())[1]
        except ValueError:
            return v.strip()

    @model_validator(mode="after")
    def _production_secret(self) -> Settings:
        if self.env == "production" and len(self.secret_key) < 32:
            raise ValueError("SECRET_KEY must be set to at least 32 characters when ENV=production")
        return self

    @property
    def weak_secret(self) -> bool:
        return len(self.secret_key) < 32

    @cached_property
    def secret_key_effective(self) -> str:
        """The JWT signing key. An empty development key is replaced by a random key generated once and kept
        in `<WEBMACS_HOME>/secret-key` (mode 0600): every worker process of this home signs with the same key
        (a token one process issued is valid at the others), and never with "". Where the home cannot be
        written, a random key for this process alone."""
        if self.secret_key:
            return self.secret_key
        import os
        import secrets

        path = self.webmacs_home / "secret-key"
        try:
            self.webmacs_home.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                key = path.read_text(encoding="utf-8").strip()
                if len(key) >= 32:
                    return key
                raise OSError("incomplete key file") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                key = secrets.token_urlsafe(48)
                f.write(key)
            return key
        except OSError:
            return secrets.token_urlsafe(48)
