-- Grafana-ready SQL: a view that charts datapoints without hand-written joins, and a read-only role for dashboards.
-- Panel query (README "Grafana"): WHERE $__timeFilter(time) AND event IN (…) — the planner resolves the event
-- names to ids and reads each event's range through the (event_id, time) index.
CREATE VIEW datapoints_named AS
SELECT d.time, e.name AS event, e.unit, d.value, x.name AS experiment, d.event_id
  FROM datapoints d
  JOIN events e ON e.id = d.event_id
  LEFT JOIN experiments x ON x.id = d.experiment_id;

-- Roles are per cluster: several databases of one cluster share it (created once, granted in each database).
-- NOLOGIN and owns nothing; `webmacs db grant-reader NAME` creates logins in it. The view runs with its owner's
-- rights, so the role needs no right on the hypertable itself.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'webmacs_reader') THEN
        CREATE ROLE webmacs_reader NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO webmacs_reader', current_schema());
END
$$;
GRANT SELECT ON datapoints_named, events, experiments, plugin_instances, channel_mappings TO webmacs_reader;
