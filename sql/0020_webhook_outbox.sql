-- Wake the webhook dispatchers (every server process LISTENs on `webhook_outbox`) when deliveries are queued;
-- NOTIFY is sent at commit, so a woken dispatcher always sees the rows. Its periodic poll is only a backstop.
CREATE FUNCTION webmacs_notify_webhook_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM queued) THEN
        PERFORM pg_notify('webhook_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER trg_webhook_deliveries_outbox AFTER INSERT ON webhook_deliveries
    REFERENCING NEW TABLE AS queued
    FOR EACH STATEMENT EXECUTE FUNCTION webmacs_notify_webhook_outbox();

-- The rules' hysteresis columns (0005) are part of the ingest catalog too: announce changes to them.
CREATE OR REPLACE TRIGGER trg_rules_catalog AFTER INSERT OR UPDATE OF name, event_public_id, operator, threshold,
        threshold_high, action_type, webhook_event_type, enabled, cooldown_seconds, clear_threshold, rearm_on_clear
        OR DELETE OR TRUNCATE ON rules
    FOR EACH STATEMENT EXECUTE FUNCTION webmacs_notify_catalog();
