-- The datapoints hypertable: narrow on purpose (DESIGN.md "Data model").
-- No foreign keys: the engine validates event ids against its catalog, and deletions of events and
-- experiments remove their datapoints explicitly in the same transaction (a FK check per row costs ingest).
CREATE TABLE datapoints (
    time            timestamptz      NOT NULL,
    event_id        integer          NOT NULL,
    experiment_id   integer,
    value           double precision NOT NULL
);

-- Chunk interval comes from WEBMACS_CHUNK_INTERVAL via a session setting the migration runner sets.
SELECT create_hypertable(
    'datapoints',
    by_range('time', coalesce(nullif(current_setting('webmacs.chunk_interval', true), ''), '1 day')::interval),
    create_default_indexes => false
);

-- The one index: dedup key (first write wins) and per-channel range scans.
CREATE UNIQUE INDEX ux_datapoints_event_time ON datapoints (event_id, time);
