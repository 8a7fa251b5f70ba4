-- Cell summaries of the datapoints, for long-range series (issue 13; DESIGN.md "Data model").
--
-- A cell is one event's 10 minutes (aligned to the Unix epoch). Every transaction that writes datapoints also
-- appends, per cell it wrote into, one row here summarising exactly the rows it inserted: how many, the
-- first and the last, the minimum and the maximum (the earliest of equal values; NaN ignored, NULL when every
-- value was NaN), and the rows themselves packed (16 bytes each: a second, compact copy of the data). The
-- engine's writer and the importer compute them in Rust from the rows they COPY, or from
-- what their duplicate-tolerant insert RETURNs, so a row is summarised once, by the transaction that stored
-- it. A cell may hold several such partial rows; `compact_datapoint_cells` merges them.
--
-- GET /api/v1/series for a long range (m4, minmax, lttb) reads these instead of the hypertable: the cells
-- wholly inside one of the downsampler's slices give their four points as candidates, the cells a slice
-- edge cuts (and the range's two end cells) their packed rows, and the downsampler runs on the candidates:
-- for m4 and minmax that is exactly the answer from every row. Writers that bypass the engine (plain SQL)
-- call `refresh_datapoint_cells` for what they wrote; deleting datapoints deletes or refreshes their cells.
CREATE TABLE datapoint_cells (
    event_id    integer          NOT NULL,
    -- Start of the 10 minutes: date_bin('10 minutes', time, 'epoch').
    cell        timestamptz      NOT NULL,
    n           bigint           NOT NULL CHECK (n > 0),
    first_time  timestamptz      NOT NULL,
    first_value double precision NOT NULL,
    min_time    timestamptz,
    min_value   double precision,
    max_time    timestamptz,
    max_value   double precision,
    last_time   timestamptz      NOT NULL,
    last_value  double precision NOT NULL,
    -- timestamptz_send(time) || float8send(value) per row, in no particular order.
    packed      bytea            NOT NULL
);
-- Packed rows are incompressible enough; out of line above ~2 kB without pglz's CPU on every write.
ALTER TABLE datapoint_cells ALTER COLUMN packed SET STORAGE EXTERNAL;
CREATE INDEX ix_datapoint_cells_event_cell ON datapoint_cells (event_id, cell);

-- Recompute the cells of `events` touching [lo, hi] from the datapoints
-- themselves, replacing their partial rows; returns how many cells now hold datapoints. Refreshes and
-- compactions take one transaction-scoped advisory lock, so two of them never both replace the same partials
-- (an ingest transaction only appends, so it needs none: what it commits after this statement's snapshot is
-- neither deleted nor counted here).
CREATE FUNCTION refresh_datapoint_cells(events integer[], lo timestamptz, hi timestamptz)
RETURNS bigint LANGUAGE sql VOLATILE AS $$
SELECT pg_advisory_xact_lock(7265730412);
WITH span AS (
    SELECT date_bin('10 minutes', lo, 'epoch') AS lo, date_bin('10 minutes', hi, 'epoch') AS hi
), src AS (
    SELECT d.event_id, date_bin('10 minutes', d.time, 'epoch') AS cell, d.time, d.value
    FROM datapoints d, span
    WHERE d.event_id = ANY(events) AND d.time >= span.lo AND d.time < span.hi + interval '10 minutes'
), gone AS (
    DELETE FROM datapoint_cells c USING span
    WHERE c.event_id = ANY(events) AND c.cell >= span.lo AND c.cell <= span.hi
), counted AS (
    SELECT event_id, cell, count(*) AS n, string_agg(timestamptz_send(time) || float8send(value), ''::bytea) AS packed
    FROM src GROUP BY 1, 2
), f AS (
    SELECT DISTINCT ON (event_id, cell) event_id, cell, time, value FROM src ORDER BY event_id, cell, time
), l AS (
    SELECT DISTINCT ON (event_id, cell) event_id, cell, time, value FROM src ORDER BY event_id, cell, time DESC
), mn AS (
    SELECT DISTINCT ON (event_id, cell) event_id, cell, time, value FROM src WHERE value <> 'NaN'
    ORDER BY event_id, cell, value, time
), mx AS (
    SELECT DISTINCT ON (event_id, cell) event_id, cell, time, value FROM src WHERE value <> 'NaN'
    ORDER BY event_id, cell, value DESC, time
), ins AS (
    INSERT INTO datapoint_cells (event_id, cell, n, first_time, first_value, min_time, min_value, max_time,
                                 max_value, last_time, last_value, packed)
    SELECT c.event_id, c.cell, c.n, f.time, f.value, mn.time, mn.value, mx.time, mx.value, l.time, l.value, c.packed
    FROM counted c
    JOIN f USING (event_id, cell)
    JOIN l USING (event_id, cell)
    LEFT JOIN mn USING (event_id, cell)
    LEFT JOIN mx USING (event_id, cell)
    RETURNING 1
)
SELECT count(*) FROM ins;
$$;

-- Merge the partial rows of up to `max_cells` cells starting at or after `since` ('-infinity': any) into one row
-- each; returns how many cells were merged. Only cells that have ended: a cell still being written would have
-- its packed rows rewritten at every run. It merges exactly the rows its DELETE removed (a concurrent
-- compaction's rows are skipped once it commits), so nothing is counted twice.
CREATE FUNCTION compact_datapoint_cells(since timestamptz, max_cells integer)
RETURNS bigint LANGUAGE sql VOLATILE AS $$
SELECT pg_advisory_xact_lock(7265730412);
WITH many AS (
    SELECT event_id, cell FROM datapoint_cells WHERE cell >= since AND cell + interval '10 minutes' <= now()
    GROUP BY 1, 2 HAVING count(*) > 1 LIMIT max_cells
), gone AS (
    DELETE FROM datapoint_cells c USING many m WHERE c.event_id = m.event_id AND c.cell = m.cell
    RETURNING c.*
), ins AS (
    INSERT INTO datapoint_cells (event_id, cell, n, first_time, first_value, min_time, min_value, max_time,
                                 max_value, last_time, last_value, packed)
    SELECT event_id, cell, sum(n),
        min(first_time), (array_agg(first_value ORDER BY first_time))[1],
        (array_agg(min_time ORDER BY min_value, min_time) FILTER (WHERE min_time IS NOT NULL))[1],
        (array_agg(min_value ORDER BY min_value, min_time) FILTER (WHERE min_time IS NOT NULL))[1],
        (array_agg(max_time ORDER BY max_value DESC, max_time) FILTER (WHERE max_time IS NOT NULL))[1],
        (array_agg(max_value ORDER BY max_value DESC, max_time) FILTER (WHERE max_time IS NOT NULL))[1],
        max(last_time), (array_agg(last_value ORDER BY last_time DESC))[1], string_agg(packed, ''::bytea)
    FROM gone GROUP BY event_id, cell
    RETURNING 1
)
SELECT count(*) FROM ins;
$$;

-- Datapoints stored before this migration.
SELECT refresh_datapoint_cells(array(SELECT id FROM events), min(time), max(time)) FROM datapoints;
