-- Influx line protocol: which event each series (`measurement,tag=value… field`) feeds, and which API token
-- created it (WEBMACS_LP_MAX_AUTO_EVENTS caps how many events one token may create).
CREATE TABLE line_protocol_series (
    series      text        PRIMARY KEY,
    event_id    integer     NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    token_id    integer     REFERENCES api_tokens (id) ON DELETE SET NULL,
    created_on  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ix_line_protocol_series_token ON line_protocol_series (token_id) WHERE token_id IS NOT NULL;
CREATE INDEX ix_line_protocol_series_event ON line_protocol_series (event_id);
