"""The bundle updater (spec §10.6): applies uploaded update bundles with a backup, a health check and a way back."""
