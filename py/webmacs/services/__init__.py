"""Services behind the routers: ingest engine bridge, webhooks, OTA, plugins, series, exports."""
