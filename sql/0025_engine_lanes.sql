-- Each ingest engine takes the next value at start; its lane (value mod 16) is the residue of the microseconds
-- it may choose as server time, so up to 16 server processes never pick the same time for the same event.
CREATE SEQUENCE webmacs_engine_lane;
