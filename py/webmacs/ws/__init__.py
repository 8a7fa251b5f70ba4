"""WebSocket endpoints (spec §7) and the authentication they share."""
