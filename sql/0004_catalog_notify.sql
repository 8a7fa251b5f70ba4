-- Every change to what the ingest engine's catalog is built from is announced on `webmacs_catalog`,
-- so every server process (not only the one that made the change) refreshes its snapshot.
CREATE FUNCTION webmacs_notify_catalog() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('webmacs_catalog', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER trg_events_catalog AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION webmacs_notify_catalog();
CREATE TRIGGER trg_experiments_catalog AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON experiments
    FOR EACH STATEMENT EXECUTE FUNCTION webmacs_notify_catalog();
CREATE TRIGGER trg_rules_catalog AFTER INSERT OR UPDATE OF name, event_public_id, operator, threshold, threshold_high,
        action_type, webhook_event_type, enabled, cooldown_seconds OR DELETE OR TRUNCATE ON rules
    FOR EACH STATEMENT EXECUTE FUNCTION webmacs_notify_catalog();
CREATE TRIGGER trg_plugin_instances_catalog AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON plugin_instances
    FOR EACH STATEMENT EXECUTE FUNCTION webmacs_notify_catalog();
CREATE TRIGGER trg_channel_mappings_catalog AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON channel_mappings
    FOR EACH STATEMENT EXECUTE FUNCTION webmacs_notify_catalog();
