-- Scoped device tokens (MQTT writers, line-protocol writers, field devices).
-- scope 'full'  : the token acts as its user (the WebMACS behaviour, the default).
-- scope 'write' : ingest only (REST/WS/MQTT/line protocol); every other endpoint answers 403.
-- plugin_instance_id, when set, limits ingest to events mapped to that plugin instance
-- (channel_mappings.event_public_id); points for other events are rejected per point.
ALTER TABLE api_tokens
    ADD COLUMN scope varchar(16) NOT NULL DEFAULT 'full' CHECK (scope IN ('full', 'write')),
    ADD COLUMN plugin_instance_id integer REFERENCES plugin_instances (id) ON DELETE CASCADE;
CREATE INDEX ix_api_tokens_plugin_instance ON api_tokens (plugin_instance_id)
    WHERE plugin_instance_id IS NOT NULL;
