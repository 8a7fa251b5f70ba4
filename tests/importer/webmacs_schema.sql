-- WebMACS 2.0's own PostgreSQL schema (spec §1, §2), as its SQLAlchemy models create it: integer ids,
-- `public_id` varchar(100) UNIQUE, native enum types named after the enum classes (except users.role, a
-- non-native enum, i.e. varchar), nullable server-default columns, and the foreign keys of §1.
-- Test fixture only: the importer reads databases of this shape.

CREATE TYPE eventtype AS ENUM ('sensor', 'actuator', 'range', 'cmd_button', 'cmd_opened', 'cmd_closed');
CREATE TYPE statustype AS ENUM ('read', 'unread');
CREATE TYPE loggingtype AS ENUM ('error', 'warning', 'info');
CREATE TYPE webhookdeliverystatus AS ENUM ('pending', 'delivered', 'failed', 'dead_letter');
CREATE TYPE ruleoperator AS ENUM ('gt', 'lt', 'eq', 'gte', 'lte', 'between', 'not_between');
CREATE TYPE ruleactiontype AS ENUM ('webhook', 'log');
CREATE TYPE updatestatus AS ENUM ('pending', 'downloading', 'verifying', 'applying', 'completed', 'failed',
                                  'rolled_back');
CREATE TYPE widgettype AS ENUM ('line_chart', 'gauge', 'stat_card', 'actuator_toggle');
CREATE TYPE pluginstatus AS ENUM ('inactive', 'connected', 'error', 'demo');
CREATE TYPE channeldirection AS ENUM ('input', 'output', 'bidirectional');
CREATE TYPE pluginsource AS ENUM ('bundled', 'uploaded');

CREATE TABLE users (
    id              serial PRIMARY KEY,
    public_id       varchar(100) UNIQUE,
    email           varchar(255) NOT NULL UNIQUE,
    username        varchar(50)  NOT NULL UNIQUE,
    password_hash   varchar(255) NOT NULL,
    role            varchar(8)   NOT NULL DEFAULT 'viewer',
    registered_on   timestamptz  DEFAULT now(),
    sso_provider    varchar(100),
    sso_subject_id  varchar(255),
    CONSTRAINT uq_users_sso_identity UNIQUE (sso_provider, sso_subject_id)
);
CREATE INDEX ix_users_email ON users (email);
CREATE INDEX ix_users_sso_lookup ON users (sso_provider, sso_subject_id);

CREATE TABLE events (
    id              serial PRIMARY KEY,
    public_id       varchar(100) UNIQUE,
    name            varchar(255) NOT NULL UNIQUE,
    min_value       double precision NOT NULL,
    max_value       double precision NOT NULL,
    unit            varchar(255) NOT NULL,
    type            eventtype    NOT NULL,
    user_public_id  varchar REFERENCES users (public_id) ON DELETE CASCADE
);
CREATE INDEX ix_events_user_public_id ON events (user_public_id);

CREATE TABLE experiments (
    id              serial PRIMARY KEY,
    public_id       varchar(100) NOT NULL UNIQUE,
    name            varchar(255) NOT NULL UNIQUE,
    started_on      timestamptz  DEFAULT now(),
    stopped_on      timestamptz,
    user_public_id  varchar REFERENCES users (public_id) ON DELETE CASCADE
);
CREATE INDEX ix_experiments_user_public_id ON experiments (user_public_id);

CREATE TABLE datapoints (
    id                    serial,
    public_id             varchar(100),
    value                 double precision NOT NULL,
    "timestamp"           timestamptz DEFAULT now(),
    event_public_id       varchar,
    experiment_public_id  varchar
);

CREATE TABLE blacklist_tokens (
    id              serial PRIMARY KEY,
    token           varchar(500) NOT NULL UNIQUE,
    blacklisted_on  timestamptz DEFAULT now()
);
CREATE INDEX ix_blacklist_tokens_blacklisted_on ON blacklist_tokens (blacklisted_on);

CREATE TABLE api_tokens (
    id              serial PRIMARY KEY,
    public_id       varchar(100) NOT NULL UNIQUE,
    name            varchar(255) NOT NULL,
    token_hash      varchar(64)  NOT NULL UNIQUE,
    user_id         integer      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    last_used_at    timestamptz,
    expires_at      timestamptz,
    created_at      timestamptz  DEFAULT now()
);
CREATE INDEX ix_api_tokens_user_id ON api_tokens (user_id);

CREATE TABLE log_entries (
    id              serial PRIMARY KEY,
    public_id       varchar(100) UNIQUE,
    content         varchar(500) NOT NULL,
    logging_type    loggingtype,
    status_type     statustype,
    created_on      timestamptz DEFAULT now(),
    user_public_id  varchar REFERENCES users (public_id) ON DELETE CASCADE
);
CREATE INDEX ix_log_entries_created_on ON log_entries (created_on);
CREATE INDEX ix_log_entries_user_public_id ON log_entries (user_public_id);

CREATE TABLE webhooks (
    id              serial PRIMARY KEY,
    public_id       varchar(100) UNIQUE,
    url             varchar(2048) NOT NULL,
    secret          varchar(255),
    events          text NOT NULL,
    enabled         boolean,
    created_on      timestamptz DEFAULT now(),
    user_public_id  varchar REFERENCES users (public_id) ON DELETE CASCADE
);
CREATE INDEX ix_webhooks_user_public_id ON webhooks (user_public_id);

CREATE TABLE webhook_deliveries (
    id              serial PRIMARY KEY,
    public_id       varchar(100) UNIQUE,
    webhook_id      integer NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_type      varchar(100) NOT NULL,
    payload         text NOT NULL,
    status          webhookdeliverystatus,
    attempts        integer,
    last_error      text,
    response_code   integer,
    created_on      timestamptz DEFAULT now(),
    delivered_on    timestamptz
);
CREATE INDEX ix_webhook_deliveries_webhook_id ON webhook_deliveries (webhook_id);
CREATE INDEX ix_webhook_deliveries_event_type ON webhook_deliveries (event_type);
CREATE INDEX ix_webhook_deliveries_created_on ON webhook_deliveries (created_on);

CREATE TABLE rules (
    id                  serial PRIMARY KEY,
    public_id           varchar(100) UNIQUE,
    name                varchar(255) NOT NULL UNIQUE,
    event_public_id     varchar NOT NULL REFERENCES events (public_id) ON DELETE CASCADE,
    operator            ruleoperator NOT NULL,
    threshold           double precision NOT NULL,
    threshold_high      double precision,
    action_type         ruleactiontype NOT NULL,
    webhook_event_type  varchar(100),
    enabled             boolean,
    cooldown_seconds    integer,
    last_triggered_at   timestamptz,
    created_on          timestamptz DEFAULT now(),
    user_public_id      varchar REFERENCES users (public_id) ON DELETE CASCADE
);
CREATE INDEX ix_rules_event_public_id ON rules (event_public_id);
CREATE INDEX ix_rules_enabled ON rules (enabled);

CREATE TABLE firmware_updates (
    id                  serial PRIMARY KEY,
    public_id           varchar(100) UNIQUE,
    version             varchar(50) NOT NULL UNIQUE,
    changelog           text,
    file_path           varchar(500),
    file_hash_sha256    varchar(64),
    file_size_bytes     integer,
    status              updatestatus,
    error_message       text,
    created_on          timestamptz DEFAULT now(),
    started_on          timestamptz,
    completed_on        timestamptz,
    user_public_id      varchar REFERENCES users (public_id) ON DELETE SET NULL
);
CREATE INDEX ix_firmware_updates_status ON firmware_updates (status);

CREATE TABLE dashboards (
    id              serial PRIMARY KEY,
    public_id       varchar(100) UNIQUE,
    name            varchar(255) NOT NULL,
    is_global       boolean,
    created_on      timestamptz DEFAULT now(),
    user_public_id  varchar REFERENCES users (public_id) ON DELETE CASCADE
);

CREATE TABLE dashboard_widgets (
    id              serial PRIMARY KEY,
    public_id       varchar(100) UNIQUE,
    dashboard_id    integer NOT NULL REFERENCES dashboards (id) ON DELETE CASCADE,
    widget_type     widgettype NOT NULL,
    title           varchar(255) NOT NULL,
    event_public_id varchar REFERENCES events (public_id) ON DELETE SET NULL,
    x               integer NOT NULL,
    y               integer NOT NULL,
    w               integer NOT NULL,
    h               integer NOT NULL,
    config_json     text
);
CREATE INDEX ix_dashboard_widgets_dashboard_id ON dashboard_widgets (dashboard_id);

CREATE TABLE plugin_instances (
    id              serial PRIMARY KEY,
    public_id       varchar(100) NOT NULL UNIQUE,
    plugin_id       varchar(100) NOT NULL,
    instance_name   varchar(255) NOT NULL UNIQUE,
    demo_mode       boolean NOT NULL DEFAULT false,
    enabled         boolean NOT NULL DEFAULT true,
    status          pluginstatus NOT NULL DEFAULT 'inactive',
    config_json     text,
    error_message   text,
    created_on      timestamptz NOT NULL DEFAULT now(),
    updated_on      timestamptz NOT NULL DEFAULT now(),
    user_public_id  varchar NOT NULL REFERENCES users (public_id) ON DELETE CASCADE
);
CREATE INDEX ix_plugin_instances_plugin_id ON plugin_instances (plugin_id);
CREATE INDEX ix_plugin_instances_user_public_id ON plugin_instances (user_public_id);

CREATE TABLE channel_mappings (
    id                  serial PRIMARY KEY,
    public_id           varchar(100) NOT NULL UNIQUE,
    plugin_instance_id  integer NOT NULL REFERENCES plugin_instances (id) ON DELETE CASCADE,
    channel_id          varchar(100) NOT NULL,
    channel_name        varchar(255) NOT NULL,
    direction           channeldirection NOT NULL,
    unit                varchar(50) NOT NULL,
    event_public_id     varchar REFERENCES events (public_id) ON DELETE SET NULL,
    created_on          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ix_channel_mappings_plugin_instance_id ON channel_mappings (plugin_instance_id);
CREATE INDEX ix_channel_mappings_event_public_id ON channel_mappings (event_public_id);
CREATE UNIQUE INDEX ix_channel_mappings_plugin_channel ON channel_mappings (plugin_instance_id, channel_id);

CREATE TABLE plugin_packages (
    id                  serial PRIMARY KEY,
    public_id           varchar(100) NOT NULL UNIQUE,
    package_name        varchar(255) NOT NULL UNIQUE,
    version             varchar(50) NOT NULL,
    source              pluginsource NOT NULL,
    file_path           varchar(500),
    file_hash_sha256    varchar(64),
    file_size_bytes     integer,
    plugin_ids          text NOT NULL DEFAULT '[]',
    installed_on        timestamptz DEFAULT now(),
    user_public_id      varchar REFERENCES users (public_id) ON DELETE SET NULL
);
CREATE INDEX ix_plugin_packages_user_public_id ON plugin_packages (user_public_id);

-- @after-load: the datapoints' keys, foreign keys and indexes, created after the fixture filled the table (one
-- join and six index builds instead of two trigger calls and six index insertions per row).
ALTER TABLE datapoints ADD PRIMARY KEY (id);
ALTER TABLE datapoints ADD UNIQUE (public_id);
ALTER TABLE datapoints ADD FOREIGN KEY (event_public_id) REFERENCES events (public_id) ON DELETE CASCADE;
ALTER TABLE datapoints ADD FOREIGN KEY (experiment_public_id) REFERENCES experiments (public_id) ON DELETE SET NULL;
CREATE INDEX ix_datapoints_timestamp ON datapoints ("timestamp");
CREATE INDEX ix_datapoints_event_public_id ON datapoints (event_public_id);
CREATE INDEX ix_datapoints_experiment_public_id ON datapoints (experiment_public_id);
CREATE INDEX ix_datapoints_event_ts ON datapoints (event_public_id, "timestamp");
