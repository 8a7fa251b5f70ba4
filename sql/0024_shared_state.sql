-- State every server process must share (several processes behind one port or a load balancer):
-- SSO one-time codes (issued by the process that served the callback, redeemed by any), and the accepted
-- requests of the rate limiter's sliding window. UNLOGGED: both are short-lived; a crash forgets them.
CREATE UNLOGGED TABLE sso_codes (
    code_hash   varchar(64) PRIMARY KEY,
    user_id     integer     NOT NULL,
    role        varchar(20) NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX ix_sso_codes_expires ON sso_codes (expires_at);

CREATE UNLOGGED TABLE rate_limit_hits (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client      varchar(64) NOT NULL,
    hit_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ix_rate_limit_hits_client ON rate_limit_hits (client, hit_at);
