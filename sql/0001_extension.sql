-- TimescaleDB is required (hypertables, time_bucket, drop_chunks).
CREATE EXTENSION IF NOT EXISTS timescaledb;
