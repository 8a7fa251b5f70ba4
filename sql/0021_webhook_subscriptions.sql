-- Whether a webhook's `events` (JSON array text, spec §1) contains an event type. A row whose text is not
-- valid JSON is simply not subscribed (spec §9: unparseable → skipped) instead of failing the caller's
-- transaction, e.g. an experiment start.
CREATE FUNCTION webmacs_webhook_subscribes(events text, event_type text) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN jsonb_typeof(events::jsonb) = 'array' AND events::jsonb ? event_type;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN false;
END;
$$;
