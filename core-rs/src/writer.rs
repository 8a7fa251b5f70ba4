//! The writer: binary COPY of one batch per transaction. Transient faults are retried (reconnecting, with a
//! deadline on every attempt); rows the database refuses are isolated by bisection and returned, so one bad
//! row never holds up the rows behind it; the unique key's refusals fall back to a duplicate-tolerant insert.

use std::ops::Range;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;

use crate::batch::Refusal;
use crate::cells;
use crate::error::CoreError;
use crate::pg::{self, Failure, PgClient, COPY_SIGNATURE, PG_EPOCH_US};

/// One datapoint row as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    /// Microseconds since the Unix epoch.
    pub time_us: i64,
    pub event_id: i32,
    pub experiment_id: Option<i32>,
    pub value: f64,
    /// The engine chose the time (no client timestamp). Such a row meeting another row of its event at the same
    /// time is not a duplicate but a collision with another server process: it moves to a free microsecond.
    pub server_time: bool,
}

/// The hypertable's columns and their types, in COPY order. Binary COPY performs no casts, so these must
/// match `information_schema` exactly (a Python test checks this after the migrations ran).
pub const COLUMNS: [(&str, &str); 4] = [
    ("time", "timestamp with time zone"),
    ("event_id", "integer"),
    ("experiment_id", "integer"),
    ("value", "double precision"),
];

const COPY_SQL: &str =
    "COPY datapoints (time, event_id, experiment_id, value) FROM STDIN (FORMAT binary)";
const STAGING_SQL: &str =
    "CREATE TEMP TABLE IF NOT EXISTS datapoints_staging (LIKE datapoints) ON COMMIT DELETE ROWS";
const STAGING_COPY_SQL: &str =
    "COPY datapoints_staging (time, event_id, experiment_id, value) FROM STDIN (FORMAT binary)";
const STAGING_INSERT_SQL: &str = "INSERT INTO datapoints (time, event_id, experiment_id, value)
    SELECT time, event_id, experiment_id, value FROM datapoints_staging ON CONFLICT DO NOTHING
    RETURNING time, event_id, value";
/// Staged rows the unique key kept out although they are not what is stored: same event and time, another
/// value. Only server-timed rows qualify (a client's timestamp is its identity: first write wins).
const COLLISIONS_SQL: &str =
    "SELECT s.time, s.event_id, s.experiment_id, s.value FROM datapoints_staging s
    WHERE s.time = ANY($1::timestamptz[]) AND EXISTS (SELECT 1 FROM datapoints d
        WHERE d.event_id = s.event_id AND d.time = s.time AND d.value IS DISTINCT FROM s.value)";
/// Insert one moved row at the first free microsecond at or after `$1` (tried in steps inside the statement).
const MOVE_SQL: &str = "INSERT INTO datapoints (time, event_id, experiment_id, value)
    SELECT t, $2, $3, $4 FROM generate_series($1::timestamptz, $1::timestamptz + interval '1 second',
        interval '1 microsecond') AS t
    WHERE NOT EXISTS (SELECT 1 FROM datapoints d WHERE d.event_id = $2 AND d.time = t)
    LIMIT 1 ON CONFLICT DO NOTHING RETURNING time, event_id, value";

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Size of one row in binary COPY.
pub fn row_bytes(row: &Row) -> usize {
    // field count + 4 length words + time(8) + event(4) + experiment(4 or NULL) + value(8)
    2 + 16 + 8 + 4 + if row.experiment_id.is_some() { 4 } else { 0 } + 8
}

/// Encode rows as a complete binary COPY stream (header, tuples, trailer), written once. Times are
/// validated at the door (`frame::check_time`), so the shift to PostgreSQL's epoch cannot overflow; it
/// saturates rather than wraps all the same, and the database then refuses the row (range error).
pub fn encode(rows: &[Row]) -> Bytes {
    let mut buf = BytesMut::with_capacity(19 + rows.len() * 42 + 2);
    buf.put_slice(COPY_SIGNATURE);
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension length
    for r in rows {
        buf.put_i16(4);
        buf.put_i32(8);
        buf.put_i64(r.time_us.saturating_sub(PG_EPOCH_US));
        buf.put_i32(4);
        buf.put_i32(r.event_id);
        match r.experiment_id {
            Some(e) => {
                buf.put_i32(4);
                buf.put_i32(e);
            }
            None => buf.put_i32(-1),
        }
        buf.put_i32(8);
        buf.put_f64(r.value);
    }
    buf.put_i16(-1);
    buf.freeze()
}

/// Rows as one transaction writes them: their binary COPY stream and that of their cell summaries, made
/// once per batch (not per attempt of a retried transaction).
#[derive(Debug, Clone)]
pub struct Encoded {
    pub data: Bytes,
    pub rows: u64,
    pub cells: Bytes,
}

impl Encoded {
    pub fn of(rows: &[Row]) -> Self {
        Encoded {
            data: encode(rows),
            rows: rows.len() as u64,
            cells: cells::encode(&cells::of_rows(rows)),
        }
    }
}

/// Outcome of writing one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub inserted: u64,
    pub duplicates: u64,
    /// Rows the database refused: their index in the batch and why.
    pub refused: Vec<(usize, Arc<Refusal>)>,
    /// Extra transactions spent isolating refused rows.
    pub bisections: u64,
}

/// The rows and the cell summaries of what they insert, in one transaction.
async fn copy(client: &mut PgClient, batch: &Encoded) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let sink = tx.copy_in(COPY_SQL).await?;
    let mut sink = pin!(sink);
    sink.send(batch.data.clone()).await?;
    let n = sink.finish().await?;
    cells::copy(&tx, batch.cells.clone()).await?;
    tx.commit().await?;
    Ok(n.min(batch.rows))
}

/// The unique key refused the batch (a retry after a lost commit, a client resending timestamps, or another
/// server process that chose the same microsecond for the same event): stage it, insert what is new, and move
/// server-timed rows that collided with a different value to a free microsecond. What is left is duplicates.
/// The cells summarise what the inserts RETURN: exactly the rows stored.
async fn copy_dedup(
    client: &mut PgClient,
    data: Bytes,
    server_times: &[std::time::SystemTime],
) -> Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(STAGING_SQL).await?;
    let sink = tx.copy_in(STAGING_COPY_SQL).await?;
    let mut sink = pin!(sink);
    sink.send(data).await?;
    sink.finish().await?;
    let mut n = cells::insert_returning(&tx, STAGING_INSERT_SQL, &[]).await?;
    if !server_times.is_empty() {
        for r in tx.query(COLLISIONS_SQL, &[&server_times]).await? {
            let time: std::time::SystemTime = r.try_get(0)?;
            let (event, experiment, value): (i32, Option<i32>, f64) =
                (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            // Another process may take the free microsecond first: look again (rarely more than once).
            for _ in 0..5 {
                let moved =
                    cells::insert_returning(&tx, MOVE_SQL, &[&time, &event, &experiment, &value])
                        .await?;
                if moved > 0 {
                    n += moved;
                    break;
                }
            }
        }
    }
    tx.commit().await?;
    Ok(n)
}

/// A row's time as the driver binds a timestamptz.
fn system_time(time_us: i64) -> std::time::SystemTime {
    let offset = Duration::from_micros(time_us.unsigned_abs());
    if time_us >= 0 {
        std::time::UNIX_EPOCH + offset
    } else {
        std::time::UNIX_EPOCH - offset
    }
}

/// What the writers report for `/health` and the stats: since when writing fails, and the last fault.
#[derive(Debug, Default)]
pub struct WriterStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone)]
struct StatusInner {
    failing_since: Option<Instant>,
    failing_writers: usize,
    last_error: Option<String>,
}

impl WriterStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failing(&self, was_failing: bool, error: String) {
        let mut s = self.lock();
        s.failing_since.get_or_insert_with(Instant::now);
        if !was_failing {
            s.failing_writers += 1;
        }
        s.last_error = Some(error);
    }

    fn recovered(&self) {
        let mut s = self.lock();
        s.failing_writers = s.failing_writers.saturating_sub(1);
        if s.failing_writers == 0 {
            s.failing_since = None;
        }
    }

    /// How long some writer has been failing to write (None: all fine), and the last fault seen.
    pub fn snapshot(&self) -> (Option<Duration>, Option<String>) {
        let s = self.lock();
        (s.failing_since.map(|t| t.elapsed()), s.last_error.clone())
    }
}

enum Attempt {
    Done(u64),
    Data(Refusal),
}

/// A COPY connection that survives restarts: every transaction is retried until it commits, a data error
/// says so, or `give_up` (engine shutdown) says stop.
pub struct Writer {
    dsn: String,
    client: Option<PgClient>,
    connected_once: bool,
    /// Deadline of one attempt (a transaction, or a connect).
    attempt_timeout: Duration,
    status: Arc<WriterStatus>,
    pub retries: u64,
    pub reconnects: u64,
}

impl Writer {
    pub fn new(dsn: &str, attempt_timeout: Duration, status: Arc<WriterStatus>) -> Self {
        Writer {
            dsn: dsn.to_owned(),
            client: None,
            connected_once: false,
            attempt_timeout,
            status,
            retries: 0,
            reconnects: 0,
        }
    }

    /// Write one batch. Rows the database refuses for what they hold are isolated (the batch is split in
    /// halves, each in its own transaction, down to single rows) and reported; everything else commits.
    /// Err only when `give_up` turned true while the database was failing (shutdown): the batch is then not
    /// acknowledged, though halves of it may have committed while it was being bisected.
    pub async fn write(
        &mut self,
        rows: &[Row],
        give_up: impl Fn() -> bool,
    ) -> Result<Written, CoreError> {
        let mut out = Written::default();
        let mut work: Vec<Range<usize>> = Vec::with_capacity(32);
        work.push(0..rows.len());
        let mut first = true;
        while let Some(range) = work.pop() {
            if range.is_empty() {
                continue;
            }
            if !first {
                out.bisections += 1;
            }
            first = false;
            let slice = &rows[range.clone()];
            let batch = Encoded::of(slice);
            let n = range.len() as u64;
            match self.attempt(&batch, slice, &give_up).await? {
                Attempt::Done(inserted) => {
                    out.inserted += inserted;
                    out.duplicates += n - inserted;
                }
                Attempt::Data(why) if range.len() == 1 => {
                    out.refused.push((range.start, Arc::new(why)))
                }
                Attempt::Data(_) => {
                    let mid = range.start + range.len() / 2;
                    // Popped last-in first-out: the left half is written first, keeping time order.
                    work.push(mid..range.end);
                    work.push(range.start..mid);
                }
            }
        }
        out.refused.sort_by_key(|r| r.0);
        Ok(out)
    }

    /// One transaction for `data`, retried across transient faults.
    async fn attempt(
        &mut self,
        batch: &Encoded,
        slice: &[Row],
        give_up: &impl Fn() -> bool,
    ) -> Result<Attempt, CoreError> {
        let mut backoff = Duration::from_millis(50);
        let mut dedup = false;
        let mut failing = false;
        let result = loop {
            let fault = match self.try_once(batch, slice, dedup).await {
                Ok(n) => break Ok(Attempt::Done(n)),
                Err(Failure::Duplicate) if !dedup => {
                    dedup = true;
                    continue;
                }
                Err(Failure::Data { sqlstate, message }) => {
                    break Ok(Attempt::Data(Refusal { sqlstate, message }))
                }
                // A unique violation even in the duplicate-tolerant insert: a concurrent writer of the same
                // key (two processes, two writers) committed between our staging and our insert. Retry.
                Err(Failure::Duplicate) => "unique violation during deduplication".to_owned(),
                Err(Failure::Transient(e)) => e,
            };
            self.status.failing(failing, fault.clone());
            failing = true;
            if give_up() {
                break Err(CoreError::Database(fault));
            }
            self.retries += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        if failing {
            self.status.recovered();
        }
        result
    }

    async fn try_once(
        &mut self,
        batch: &Encoded,
        slice: &[Row],
        dedup: bool,
    ) -> Result<u64, Failure> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            let c = pg::connect(&self.dsn, "webmacs-ingest-writer")
                .await
                .map_err(|e| Failure::Transient(e.to_string()))?;
            if self.connected_once {
                self.reconnects += 1;
            }
            self.connected_once = true;
            self.client = Some(c);
        }
        // Set just above when missing.
        let client = self.client.as_mut().expect("connected above");
        let run = async {
            if dedup {
                let server_times: Vec<std::time::SystemTime> = slice
                    .iter()
                    .filter(|r| r.server_time)
                    .map(|r| system_time(r.time_us))
                    .collect();
                copy_dedup(client, batch.data.clone(), &server_times).await
            } else {
                copy(client, batch).await
            }
        };
        match tokio::time::timeout(self.attempt_timeout, run).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => {
                let failure = pg::classify(&e);
                if matches!(failure, Failure::Transient(_)) {
                    // The connection may be unusable (or its state unknown): start afresh.
                    self.client = None;
                }
                Err(failure)
            }
            Err(_) => {
                // No answer in time: the commit may or may not have happened. Drop the connection; the
                // retry meets the unique key if it did, and the duplicate-tolerant insert keeps it once.
                self.client = None;
                Err(Failure::Transient(format!(
                    "no answer from the database within {} s",
                    self.attempt_timeout.as_secs_f64()
                )))
            }
        }
    }
}

/// Microseconds elapsed since `t`, for the flush-latency counters.
pub fn elapsed_us(t: Instant) -> u64 {
    t.elapsed().as_micros().min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_binary_copy() {
        let rows = [
            Row {
                time_us: PG_EPOCH_US + 1,
                event_id: 7,
                experiment_id: None,
                value: 1.5,
                server_time: false,
            },
            Row {
                time_us: PG_EPOCH_US,
                event_id: 8,
                experiment_id: Some(3),
                value: -2.0,
                server_time: false,
            },
        ];
        let b = encode(&rows);
        assert_eq!(&b[..11], COPY_SIGNATURE);
        assert_eq!(b.len(), 19 + row_bytes(&rows[0]) + row_bytes(&rows[1]) + 2);
        // First tuple: 4 fields, time = 1 µs after the PostgreSQL epoch.
        assert_eq!(&b[19..21], &[0, 4]);
        assert_eq!(&b[25..33], &1i64.to_be_bytes());
        // NULL experiment is a -1 length.
        assert_eq!(&b[41..45], &(-1i32).to_be_bytes());
        assert_eq!(&b[b.len() - 2..], &[0xff, 0xff]);
    }

    #[test]
    fn extreme_times_saturate_instead_of_wrapping() {
        let b = encode(&[Row {
            time_us: i64::MIN,
            event_id: 1,
            experiment_id: None,
            value: 0.0,
            server_time: false,
        }]);
        assert_eq!(&b[25..33], &i64::MIN.to_be_bytes());
    }

    #[test]
    fn status_tracks_failing_writers() {
        let s = WriterStatus::default();
        assert_eq!(s.snapshot().0, None);
        s.failing(false, "down".into());
        s.failing(true, "still down".into());
        s.failing(false, "second writer".into());
        assert!(s.snapshot().0.is_some());
        s.recovered();
        assert!(s.snapshot().0.is_some(), "one writer still failing");
        s.recovered();
        let (since, last) = s.snapshot();
        assert_eq!((since, last.as_deref()), (None, Some("second writer")));
    }
}
