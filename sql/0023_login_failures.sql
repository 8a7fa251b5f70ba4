-- Failed logins, counted per account and per client address to throttle password guessing. In the database
-- so that every server process counts the same failures. UNLOGGED: a crash only forgets recent failures.
CREATE UNLOGGED TABLE login_failures (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account     varchar(320) NOT NULL,
    peer        varchar(64)  NOT NULL,
    failed_at   timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX ix_login_failures_account ON login_failures (account, failed_at);
CREATE INDEX ix_login_failures_peer ON login_failures (peer, failed_at);
