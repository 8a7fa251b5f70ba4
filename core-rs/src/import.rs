//! History import into the hypertable: WebMACS's datapoints streamed from the old database with a checkpoint
//! committed in the same transaction as every batch, and rows read from files with the engine's checks and
//! its first-write-wins rule.
//!
//! WebMACS keeps one row per datapoint, its event and experiment as public id strings. `transfer` runs
//! `COPY (SELECT timestamp, event_public_id, experiment_public_id, value, id … ORDER BY timestamp) TO STDOUT
//! (FORMAT binary)` on the old database, converts each tuple here (rows of one timestamp in id order, ids
//! looked up, the engine's value and time checks, the collision rule) and writes batches in the engine's
//! binary COPY encoding (`writer::encode`): no Python object per row. Reading and converting overlap with writing (a bounded
//! channel of `PIPELINE` batches), so memory stays bounded by the batch size whatever the table's.
//!
//! Exactly once: a batch's rows and the run's checkpoint (the last source row read, the collision rule's
//! state, the counters) commit in one transaction, so a run killed at any point resumes after its last
//! commit, and the counters are exact too. The unique key `(event_id, time)` stays a second line: a batch it
//! refuses (rows already present in a database being merged into) is written again through a staging table
//! with `ON CONFLICT DO NOTHING` in the same transaction, and the rows it kept out count as duplicates.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use thiserror::Error;

use crate::cells;
use crate::frame::{check_time, Reject};
use crate::pg::{self, Failure, PgClient, COPY_SIGNATURE, PG_EPOCH_US};
use crate::writer::{Encoded, Row};

/// Source rows per batch (one target transaction) unless the caller says otherwise.
pub const DEFAULT_BATCH_ROWS: usize = 50_000;
/// Batches converted ahead of the one being written.
pub const PIPELINE: usize = 2;
/// Deadline of one batch's transaction on the target.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest silence of the source's COPY stream (the first row may wait for a sort).
pub const SOURCE_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The hypertable's columns in the order `writer::encode` writes them.
pub const TARGET_COLUMNS: [&str; 4] = ["time", "event_id", "experiment_id", "value"];
const COPY_SQL: &str =
    "COPY datapoints (time, event_id, experiment_id, value) FROM STDIN (FORMAT binary)";
const STAGING_SQL: &str =
    "CREATE TEMP TABLE IF NOT EXISTS import_staging (LIKE datapoints) ON COMMIT DELETE ROWS";
const STAGING_COPY_SQL: &str =
    "COPY import_staging (time, event_id, experiment_id, value) FROM STDIN (FORMAT binary)";
const STAGING_INSERT_SQL: &str = "INSERT INTO datapoints (time, event_id, experiment_id, value)
    SELECT time, event_id, experiment_id, value FROM import_staging ON CONFLICT DO NOTHING
    RETURNING time, event_id, value";
/// The checkpoint (sql/0040_import_runs.sql), advanced in the batch's own transaction. Only a run still
/// streaming datapoints moves: a finished or vanished run makes the batch roll back.
const CHECKPOINT_SQL: &str = "UPDATE import_runs SET position_us = $2, position_id = $3,
    carry_events = $4, carry_times = $5, rows_read = rows_read + $6, rows_inserted = rows_inserted + $7,
    rows_duplicate = rows_duplicate + $8, rows_shifted = rows_shifted + $9,
    rows_out_of_range = rows_out_of_range + $10, rows_unknown_experiment = rows_unknown_experiment + $11,
    rows_unknown_event = rows_unknown_event + $12, rows_invalid_value = rows_invalid_value + $13,
    rows_bad_time = rows_bad_time + $14, updated_on = now()
    WHERE id = $1 AND state = 'datapoints'";

/// The fields of one source tuple: `timestamp`, `event_public_id`, `experiment_public_id`, `value`, `id`.
pub const SOURCE_FIELDS: usize = 5;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ImportError {
    /// The source's COPY stream is not shaped as the statement promises (bad input, not a database fault).
    #[error("source COPY stream: {0}")]
    Stream(String),
    /// Column buffers handed in do not line up.
    #[error("datapoint columns: {0}")]
    Columns(String),
    #[error("database error: {0}")]
    Database(String),
    /// The checkpoint row is gone or no longer streaming (another run finished it): nothing was written.
    #[error(
        "import run {0} is not streaming datapoints any more (finished or removed by another run)"
    )]
    Checkpoint(i32),
}

impl ImportError {
    /// A stable name for the kind of error (the Python exception's `code`).
    pub fn code(&self) -> &'static str {
        match self {
            ImportError::Stream(_) => "stream",
            ImportError::Columns(_) => "columns",
            ImportError::Database(_) => "database",
            ImportError::Checkpoint(_) => "checkpoint",
        }
    }
}

impl From<tokio_postgres::Error> for ImportError {
    fn from(e: tokio_postgres::Error) -> Self {
        ImportError::Database(e.to_string())
    }
}

impl From<crate::CoreError> for ImportError {
    fn from(e: crate::CoreError) -> Self {
        ImportError::Database(e.to_string())
    }
}

type Result<T> = std::result::Result<T, ImportError>;

/// What became of the rows; every source row read lands in exactly one of `inserted`, `duplicates` or a
/// skip reason (`unknown_event`, `invalid_value`, `bad_time`). `shifted`, `out_of_range` and
/// `unknown_experiment` describe rows that were written.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub read: u64,
    pub inserted: u64,
    /// Kept out by the unique key: already present in the target.
    pub duplicates: u64,
    /// Moved forward by the collision rule (a later row of an event at a time already taken).
    pub shifted: u64,
    /// Outside the event's [min_value, max_value]; written (WebMACS never enforced the range).
    pub out_of_range: u64,
    /// Tagged with an experiment the target does not have; written untagged.
    pub unknown_experiment: u64,
    /// No event, or one the target does not have: skipped.
    pub unknown_event: u64,
    /// NULL or not finite (NaN, ±Infinity): skipped, as the engine refuses them.
    pub invalid_value: u64,
    /// Before 1970 or more than 5 minutes ahead of the import: skipped, as the engine refuses them.
    pub bad_time: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.read += o.read;
        self.inserted += o.inserted;
        self.duplicates += o.duplicates;
        self.shifted += o.shifted;
        self.out_of_range += o.out_of_range;
        self.unknown_experiment += o.unknown_experiment;
        self.unknown_event += o.unknown_event;
        self.invalid_value += o.invalid_value;
        self.bad_time += o.bad_time;
    }

    /// (name, count) pairs, the names as the checkpoint's `rows_*` columns spell them.
    pub fn named(&self) -> [(&'static str, u64); 9] {
        [
            ("read", self.read),
            ("inserted", self.inserted),
            ("duplicate", self.duplicates),
            ("shifted", self.shifted),
            ("out_of_range", self.out_of_range),
            ("unknown_experiment", self.unknown_experiment),
            ("unknown_event", self.unknown_event),
            ("invalid_value", self.invalid_value),
            ("bad_time", self.bad_time),
        ]
    }
}

// ---------------------------------------------------------------------------------------------------------
// Decoding the source's binary COPY stream.

struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(ImportError::Stream(format!(
                "data ends inside {what} at byte {}",
                self.at
            )));
        };
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn i16(&mut self, what: &str) -> Result<i16> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

fn skip_header(c: &mut Cursor<'_>) -> Result<()> {
    if c.take(COPY_SIGNATURE.len(), "the header")? != COPY_SIGNATURE {
        return Err(ImportError::Stream("not a binary COPY stream".into()));
    }
    let flags = c.i32("the header")? as u32;
    // Bit 16: OIDs included; bits 17-31: critical flags a reader must not ignore.
    if flags & 0xffff_0000 != 0 {
        return Err(ImportError::Stream(format!(
            "unsupported header flags {flags:#x}"
        )));
    }
    let extension = c.i32("the header")?;
    let extension = usize::try_from(extension)
        .map_err(|_| ImportError::Stream("negative header extension length".into()))?;
    c.take(extension, "the header extension")?;
    Ok(())
}

/// The next tuple's fields (None = NULL), or None at the trailer.
fn tuple<'a, const N: usize>(c: &mut Cursor<'a>) -> Result<Option<[Option<&'a [u8]>; N]>> {
    let count = c.i16("a tuple's field count")?;
    if count == -1 {
        return Ok(None);
    }
    if count as usize != N {
        return Err(ImportError::Stream(format!(
            "a tuple has {count} fields, expected {N}"
        )));
    }
    let mut fields = [None; N];
    for field in fields.iter_mut() {
        let len = c.i32("a field length")?;
        if len >= 0 {
            *field = Some(c.take(len as usize, "a field")?);
        } else if len != -1 {
            return Err(ImportError::Stream(format!("field length {len}")));
        }
    }
    Ok(Some(fields))
}

fn fixed<const W: usize>(field: Option<&[u8]>, name: &str) -> Result<Option<[u8; W]>> {
    match field {
        None => Ok(None),
        Some(b) => b.try_into().map(Some).map_err(|_| {
            ImportError::Stream(format!("{name} has {} bytes, expected {W}", b.len()))
        }),
    }
}

/// One row of WebMACS's datapoints table as the source statement selects it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceRow<'a> {
    /// µs since the Unix epoch.
    pub time_us: i64,
    pub event: Option<&'a [u8]>,
    pub experiment: Option<&'a [u8]>,
    pub value: Option<f64>,
    pub id: i64,
}

fn source_row(fields: [Option<&[u8]>; SOURCE_FIELDS]) -> Result<SourceRow<'_>> {
    let [time, event, experiment, value, id] = fields;
    let time = fixed::<8>(time, "timestamp")?.ok_or_else(|| {
        ImportError::Stream("a NULL timestamp (the statement filters them)".into())
    })?;
    let id = fixed::<8>(id, "id")?
        .ok_or_else(|| ImportError::Stream("a NULL id (the statement selects id::int8)".into()))?;
    Ok(SourceRow {
        time_us: i64::from_be_bytes(time).saturating_add(PG_EPOCH_US),
        event,
        experiment,
        value: fixed::<8>(value, "value")?.map(f64::from_be_bytes),
        id: i64::from_be_bytes(id),
    })
}

// ---------------------------------------------------------------------------------------------------------
// Converting source rows to hypertable rows.

/// Where a source event's datapoints go, and its range (only reported, never enforced).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventTarget {
    pub id: i32,
    pub min_value: f64,
    pub max_value: f64,
}

/// Source rows to hypertable rows: public ids to ids, the engine's checks, the collision rule.
///
/// Collision rule: WebMACS gives every row of a batch the same server timestamp, so a batch with two values
/// of one event has two rows at one time, which our unique key `(event_id, time)` cannot hold. As the
/// engine does for server timestamps, times are made strictly increasing per event in the order rows are
/// converted (`timestamp`, then `id`, i.e. insertion order): a row at or before its event's last written
/// time is moved to 1 µs after it. Nothing is lost, the order of the values is kept, and the later row stays the latest
/// (WebMACS's `/datapoints/latest` breaks ties by the greater id).
pub struct Converter {
    events: HashMap<Vec<u8>, EventTarget>,
    experiments: HashMap<Vec<u8>, i32>,
    /// Last time written per target event.
    last: HashMap<i32, i64>,
    now_us: i64,
}

impl Converter {
    /// `carry`: the collision state saved with the checkpoint being resumed (`Converter::carry`).
    pub fn new(
        events: HashMap<Vec<u8>, EventTarget>,
        experiments: HashMap<Vec<u8>, i32>,
        carry: &[(i32, i64)],
        now_us: i64,
    ) -> Self {
        Converter {
            events,
            experiments,
            last: carry.iter().copied().collect(),
            now_us,
        }
    }

    /// The row to write, or None when the row is skipped; `counts` says which.
    pub fn convert(&mut self, row: &SourceRow<'_>, counts: &mut Counts) -> Option<Row> {
        counts.read += 1;
        let Some(event) = row.event.and_then(|e| self.events.get(e)).copied() else {
            counts.unknown_event += 1;
            return None;
        };
        let value = match row.value {
            Some(v) if v.is_finite() => v,
            _ => {
                counts.invalid_value += 1;
                return None;
            }
        };
        if check_time(row.time_us, self.now_us).is_err() {
            counts.bad_time += 1;
            return None;
        }
        let experiment_id = match row.experiment {
            None => None,
            Some(x) => {
                let id = self.experiments.get(x).copied();
                if id.is_none() {
                    counts.unknown_experiment += 1;
                }
                id
            }
        };
        if !(event.min_value..=event.max_value).contains(&value) {
            counts.out_of_range += 1;
        }
        let mut time_us = row.time_us;
        let last = self.last.entry(event.id).or_insert(i64::MIN);
        if time_us <= *last {
            time_us = *last + 1;
            counts.shifted += 1;
        }
        *last = time_us;
        Some(Row {
            time_us,
            event_id: event.id,
            experiment_id,
            value,
            server_time: false,
        })
    }

    /// The collision state a resumed run needs: the events whose last written time is at or after
    /// `position_us` (the last source timestamp converted), in event order. Every later source row is after
    /// that time, so the other events cannot collide with what was written before.
    pub fn carry(&self, position_us: i64) -> Vec<(i32, i64)> {
        let mut carry: Vec<(i32, i64)> = self
            .last
            .iter()
            .filter(|&(_, &t)| t >= position_us)
            .map(|(&e, &t)| (e, t))
            .collect();
        carry.sort_unstable();
        carry
    }
}

// ---------------------------------------------------------------------------------------------------------
// Writing batches.

/// The checkpoint a batch moves: the run, the last source timestamp of the batch (every row of it written;
/// `position_id` is the greatest id among them, for information) and the collision state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub run_id: i32,
    pub position_us: i64,
    pub position_id: i64,
    pub carry: Vec<(i32, i64)>,
}

enum WriteError {
    Pg(tokio_postgres::Error),
    Checkpoint(i32),
}

impl From<tokio_postgres::Error> for WriteError {
    fn from(e: tokio_postgres::Error) -> Self {
        WriteError::Pg(e)
    }
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn try_write(
    client: &mut PgClient,
    batch: &Encoded,
    counts: &Counts,
    checkpoint: Option<&Checkpoint>,
    dedup: bool,
) -> std::result::Result<u64, WriteError> {
    let rows = batch.rows;
    let tx = client.transaction().await?;
    let inserted = if rows == 0 {
        0
    } else if dedup {
        tx.batch_execute(STAGING_SQL).await?;
        let sink = tx.copy_in(STAGING_COPY_SQL).await?;
        let mut sink = pin!(sink);
        sink.send(batch.data.clone()).await?;
        sink.finish().await?;
        // The cells of what was new: those of the batch would count the duplicates again.
        cells::insert_returning(&tx, STAGING_INSERT_SQL, &[]).await?
    } else {
        let sink = tx.copy_in(COPY_SQL).await?;
        let mut sink = pin!(sink);
        sink.send(batch.data.clone()).await?;
        let n = sink.finish().await?.min(rows);
        cells::copy(&tx, batch.cells.clone()).await?;
        n
    };
    if let Some(cp) = checkpoint {
        let (events, times): (Vec<i32>, Vec<i64>) = cp.carry.iter().copied().unzip();
        let updated = tx
            .execute(
                CHECKPOINT_SQL,
                &[
                    &cp.run_id,
                    &cp.position_us,
                    &cp.position_id,
                    &events,
                    &times,
                    &count(counts.read),
                    &count(inserted),
                    &count(rows - inserted),
                    &count(counts.shifted),
                    &count(counts.out_of_range),
                    &count(counts.unknown_experiment),
                    &count(counts.unknown_event),
                    &count(counts.invalid_value),
                    &count(counts.bad_time),
                ],
            )
            .await?;
        if updated != 1 {
            return Err(WriteError::Checkpoint(cp.run_id));
        }
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Write one encoded batch (and move `checkpoint`, with `counts`, when given) in one transaction, with the
/// cell summaries of what it inserts: a plain COPY, or, when the unique key refuses it, the staged
/// duplicate-tolerant insert. Returns (inserted, duplicates).
pub async fn write_batch(
    client: &mut PgClient,
    batch: &Encoded,
    counts: &Counts,
    checkpoint: Option<&Checkpoint>,
) -> Result<(u64, u64)> {
    let rows = batch.rows;
    let plain = try_write(client, batch, counts, checkpoint, false);
    let first = tokio::time::timeout(WRITE_TIMEOUT, plain).await;
    let outcome = match first {
        Err(_) => return Err(timeout()),
        Ok(Err(WriteError::Pg(e))) if pg::classify(&e) == Failure::Duplicate => {
            // try_write's transaction was rolled back when it was dropped with the error.
            let attempt = try_write(client, batch, counts, checkpoint, true);
            tokio::time::timeout(WRITE_TIMEOUT, attempt)
                .await
                .map_err(|_| timeout())?
        }
        Ok(other) => other,
    };
    match outcome {
        Ok(inserted) => Ok((inserted, rows - inserted)),
        Err(WriteError::Pg(e)) => Err(e.into()),
        Err(WriteError::Checkpoint(run)) => Err(ImportError::Checkpoint(run)),
    }
}

fn timeout() -> ImportError {
    ImportError::Database(format!(
        "no answer from the target database within {} s",
        WRITE_TIMEOUT.as_secs()
    ))
}

// ---------------------------------------------------------------------------------------------------------
// The WebMACS datapoint transfer.

/// What a transfer reads and where it writes.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub source_dsn: String,
    pub target_dsn: String,
    /// `COPY (SELECT "timestamp", event_public_id::text, experiment_public_id::text, value::float8, id::int8
    /// FROM datapoints WHERE "timestamp" > <checkpoint> ORDER BY "timestamp") TO STDOUT (FORMAT binary)`,
    /// parameters bound.
    pub statement: String,
    pub run_id: i32,
    pub batch_rows: usize,
}

/// Live counters for a progress display, and the way to stop a transfer between two batches.
#[derive(Debug, Default)]
pub struct Progress {
    pub read: AtomicU64,
    pub inserted: AtomicU64,
    /// Source time (µs since the Unix epoch) of the last row committed; i64::MIN before the first.
    pub position_us: AtomicI64,
    cancel: AtomicBool,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            position_us: AtomicI64::new(i64::MIN),
            ..Default::default()
        }
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Counts of this run only (the checkpoint row holds the totals of every run).
    pub counts: Counts,
    /// The source's stream was read to its end and everything committed (false: cancelled).
    pub completed: bool,
}

struct Batch {
    data: Encoded,
    counts: Counts,
    checkpoint: Checkpoint,
}

/// The source's COPY messages to batches. The source is read in "timestamp" order only (an index scan: no
/// sort in PostgreSQL); the rows of one timestamp are held until the timestamp changes and then converted
/// in id (insertion) order, so the collision rule sees WebMACS's order. A batch closes only between two
/// timestamps: the checkpoint is a timestamp all of whose rows are written, and a resumed run reads the
/// rows after it. Memory: a batch, or the rows of one timestamp if there are more.
struct SourceBatcher {
    converter: Converter,
    run_id: i32,
    batch_rows: usize,
    with_header: bool,
    ended: bool,
    /// Time of the rows held, and the rows (id, their message, the tuple's offset in it).
    group_time: Option<i64>,
    group: Vec<(i64, Bytes, usize)>,
    rows: Vec<Row>,
    counts: Counts,
    /// (time, last id) of the last timestamp converted.
    position: Option<(i64, i64)>,
}

impl SourceBatcher {
    fn new(converter: Converter, run_id: i32, batch_rows: usize) -> Self {
        SourceBatcher {
            converter,
            run_id,
            batch_rows,
            with_header: true,
            ended: false,
            group_time: None,
            group: Vec::new(),
            rows: Vec::with_capacity(batch_rows),
            counts: Counts::default(),
            position: None,
        }
    }

    /// Take one COPY message (normally one tuple; the first also carries the header, the last may be the
    /// trailer); returns the batch it completed, if any.
    fn message(&mut self, message: &Bytes) -> Result<Option<Batch>> {
        let mut c = Cursor {
            data: message,
            at: 0,
        };
        if std::mem::take(&mut self.with_header) {
            skip_header(&mut c)?;
        }
        let mut batch = None;
        while !c.done() && !self.ended {
            let at = c.at;
            let Some(fields) = tuple::<SOURCE_FIELDS>(&mut c)? else {
                self.ended = true;
                break;
            };
            let row = source_row(fields)?;
            if self.group_time != Some(row.time_us) {
                self.convert_group()?;
                if batch.is_none() && self.counts.read as usize >= self.batch_rows {
                    batch = self.batch();
                }
                self.group_time = Some(row.time_us);
            }
            self.group.push((row.id, message.clone(), at));
        }
        Ok(batch)
    }

    /// The last batch, once the stream has ended.
    fn finish(&mut self) -> Result<Option<Batch>> {
        self.convert_group()?;
        Ok(self.batch())
    }

    fn convert_group(&mut self) -> Result<()> {
        let Some(time) = self.group_time.take() else {
            return Ok(());
        };
        self.group.sort_unstable_by_key(|r| r.0);
        let mut last_id = i64::MIN;
        for (id, message, at) in self.group.drain(..) {
            let mut c = Cursor { data: &message, at };
            // It was read as a tuple when it arrived.
            let fields = tuple::<SOURCE_FIELDS>(&mut c)?
                .ok_or_else(|| ImportError::Stream("a held row is the trailer".into()))?;
            if let Some(r) = self
                .converter
                .convert(&source_row(fields)?, &mut self.counts)
            {
                self.rows.push(r);
            }
            last_id = id;
        }
        self.position = Some((time, last_id));
        Ok(())
    }

    fn batch(&mut self) -> Option<Batch> {
        if self.counts.read == 0 {
            return None;
        }
        // A batch holds at least one converted timestamp, so there is a position.
        let (position_us, position_id) =
            self.position.expect("rows read, so a timestamp converted");
        let batch = Batch {
            data: Encoded::of(&self.rows),
            counts: std::mem::take(&mut self.counts),
            checkpoint: Checkpoint {
                run_id: self.run_id,
                position_us,
                position_id,
                carry: self.converter.carry(position_us),
            },
        };
        self.rows.clear();
        Some(batch)
    }
}

/// What the reader hands the writer: a batch, the end of the source (`Ok(None)`), or why it stopped. A
/// channel that closes without the end (the reader died) is an error, never a finished import.
type Batches = tokio::sync::mpsc::Sender<Result<Option<Batch>>>;

/// Read the source statement and convert it into batches, sent to the writer; ends at the stream's end or
/// when the writer stops listening.
async fn read_source(transfer: Transfer, converter: Converter, batches: Batches) {
    let result = async {
        let source = pg::connect(&transfer.source_dsn, "webmacs-import-source").await?;
        // The old database is only ever read.
        source
            .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            .await?;
        let stream = source.copy_out(transfer.statement.as_str()).await?;
        let mut stream = pin!(stream);
        let mut batcher = SourceBatcher::new(converter, transfer.run_id, transfer.batch_rows);
        loop {
            let message = match tokio::time::timeout(SOURCE_IDLE_TIMEOUT, stream.next()).await {
                Err(_) => {
                    return Err(ImportError::Database(format!(
                        "the source sent nothing for {} s",
                        SOURCE_IDLE_TIMEOUT.as_secs()
                    )))
                }
                Ok(None) => break,
                Ok(Some(message)) => message?,
            };
            if let Some(batch) = batcher.message(&message)? {
                if batches.send(Ok(Some(batch))).await.is_err() {
                    return Ok(());
                }
            }
        }
        if let Some(batch) = batcher.finish()? {
            if batches.send(Ok(Some(batch))).await.is_err() {
                return Ok(());
            }
        }
        let _ = batches.send(Ok(None)).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = batches.send(Err(e)).await;
    }
}

/// Stream the source's datapoints into the target, one checkpointed transaction per batch, until the
/// source ends or `progress` is cancelled (then the batch in flight still commits or rolls back whole).
pub async fn transfer(
    transfer: Transfer,
    converter: Converter,
    progress: Arc<Progress>,
) -> Result<Outcome> {
    let mut target = pg::connect(&transfer.target_dsn, "webmacs-import").await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(PIPELINE);
    let reader = tokio::spawn(read_source(transfer, converter, tx));
    // Dropping the receiver (cancel, error) makes the reader stop at its next send.
    let abort = AbortOnDrop(reader);
    let mut total = Counts::default();
    let completed = loop {
        if progress.cancelled() {
            break false;
        }
        let batch = match rx.recv().await {
            Some(Ok(Some(batch))) => batch,
            Some(Ok(None)) => break true,
            Some(Err(e)) => return Err(e),
            None => {
                return Err(ImportError::Stream(
                    "the source reader stopped before the end of the stream".into(),
                ))
            }
        };
        let (inserted, duplicates) = write_batch(
            &mut target,
            &batch.data,
            &batch.counts,
            Some(&batch.checkpoint),
        )
        .await?;
        let mut counts = batch.counts;
        counts.inserted = inserted;
        counts.duplicates = duplicates;
        total.add(&counts);
        progress.read.fetch_add(counts.read, Ordering::Relaxed);
        progress.inserted.fetch_add(inserted, Ordering::Relaxed);
        progress
            .position_us
            .store(batch.checkpoint.position_us, Ordering::Relaxed);
    };
    drop(rx);
    drop(abort);
    Ok(Outcome {
        counts: total,
        completed,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Rows from files.

/// Now, in µs since the Unix epoch (the reference of the "not more than 5 minutes ahead" check).
pub fn unix_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Rows that passed the checks, and the rejected ones per reason.
pub type CheckedRows = (Vec<Row>, Vec<(Reject, u64)>);

/// Rows from column buffers laid out as Arrow keeps them (native byte order: `time_us` i64 µs since the Unix
/// epoch, `event_id` i32, `value` f64, `experiment_id` i32 with an LSB-first validity bitmap, absent = all
/// valid), checked as the engine checks client datapoints: finite values, times from 1970 to 5 minutes
/// after `now_us`. Returns the rows and the rejected ones per reason.
pub fn rows_from_columns(
    time_us: &[u8],
    event_id: &[u8],
    value: &[u8],
    experiment_id: &[u8],
    experiment_validity: Option<&[u8]>,
    now_us: i64,
) -> Result<CheckedRows> {
    let n = time_us.len() / 8;
    let lengths_agree = time_us.len() == n * 8
        && event_id.len() == n * 4
        && value.len() == n * 8
        && experiment_id.len() == n * 4
        && experiment_validity.is_none_or(|v| v.len() >= n.div_ceil(8));
    if !lengths_agree {
        return Err(ImportError::Columns(format!(
            "buffer lengths disagree: {} time, {} event, {} value, {} experiment bytes for {n} rows",
            time_us.len(),
            event_id.len(),
            value.len(),
            experiment_id.len()
        )));
    }
    let mut rows = Vec::with_capacity(n);
    let mut rejected: HashMap<Reject, u64> = HashMap::new();
    // The chunks are exactly as wide as the arrays below (lengths checked above).
    let times = time_us
        .chunks_exact(8)
        .map(|c| i64::from_ne_bytes(c.try_into().expect("8 bytes")));
    let events = event_id
        .chunks_exact(4)
        .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")));
    let values = value
        .chunks_exact(8)
        .map(|c| f64::from_ne_bytes(c.try_into().expect("8 bytes")));
    let experiments = experiment_id
        .chunks_exact(4)
        .map(|c| i32::from_ne_bytes(c.try_into().expect("4 bytes")));
    for (i, (((time_us, event_id), value), experiment)) in
        times.zip(events).zip(values).zip(experiments).enumerate()
    {
        let reject = if !value.is_finite() {
            Some(Reject::NonFinite)
        } else {
            check_time(time_us, now_us).err()
        };
        if let Some(reason) = reject {
            *rejected.entry(reason).or_default() += 1;
            continue;
        }
        let valid = experiment_validity.is_none_or(|v| v[i / 8] & (1 << (i % 8)) != 0);
        rows.push(Row {
            time_us,
            event_id,
            experiment_id: valid.then_some(experiment),
            value,
            server_time: false,
        });
    }
    let mut rejected: Vec<(Reject, u64)> = rejected.into_iter().collect();
    rejected.sort_unstable();
    Ok((rows, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut b = COPY_SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b
    }

    fn field(b: &mut Vec<u8>, data: Option<&[u8]>) {
        match data {
            Some(d) => {
                b.extend_from_slice(&(d.len() as i32).to_be_bytes());
                b.extend_from_slice(d);
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    fn source_tuple(
        time_unix_us: i64,
        event: Option<&str>,
        experiment: Option<&str>,
        value: Option<f64>,
        id: i64,
    ) -> Vec<u8> {
        let mut b = (SOURCE_FIELDS as i16).to_be_bytes().to_vec();
        field(&mut b, Some(&(time_unix_us - PG_EPOCH_US).to_be_bytes()));
        field(&mut b, event.map(str::as_bytes));
        field(&mut b, experiment.map(str::as_bytes));
        field(&mut b, value.map(f64::to_be_bytes).as_ref().map(|v| &v[..]));
        field(&mut b, Some(&id.to_be_bytes()));
        b
    }

    const NOW: i64 = 1_800_000_000_000_000;

    /// (time µs, event, experiment, value, id) of a decoded source row.
    type Decoded = (i64, Option<String>, Option<String>, Option<f64>, i64);

    fn converter(carry: &[(i32, i64)]) -> Converter {
        let events = HashMap::from([
            (
                b"ev-a".to_vec(),
                EventTarget {
                    id: 1,
                    min_value: 0.0,
                    max_value: 10.0,
                },
            ),
            (
                b"ev-b".to_vec(),
                EventTarget {
                    id: 2,
                    min_value: 0.0,
                    max_value: 10.0,
                },
            ),
        ]);
        let experiments = HashMap::from([(b"x-1".to_vec(), 7)]);
        Converter::new(events, experiments, carry, NOW)
    }

    fn decode_all(data: &[u8]) -> Result<Vec<Decoded>> {
        let mut c = Cursor { data, at: 0 };
        skip_header(&mut c)?;
        let mut out = vec![];
        while let Some(f) = tuple::<SOURCE_FIELDS>(&mut c)? {
            let r = source_row(f)?;
            let s = |b: Option<&[u8]>| b.map(|b| String::from_utf8(b.to_vec()).unwrap());
            out.push((r.time_us, s(r.event), s(r.experiment), r.value, r.id));
        }
        assert!(c.done(), "bytes after the trailer");
        Ok(out)
    }

    #[test]
    fn decodes_source_tuples_with_nulls() {
        let mut data = header();
        data.extend(source_tuple(NOW, Some("ev-a"), None, Some(1.5), 3));
        data.extend(source_tuple(NOW + 1, None, Some("x-1"), None, 4));
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let rows = decode_all(&data).unwrap();
        assert_eq!(
            rows,
            vec![
                (NOW, Some("ev-a".into()), None, Some(1.5), 3),
                (NOW + 1, None, Some("x-1".into()), None, 4)
            ]
        );
    }

    #[test]
    fn malformed_streams_are_errors_not_panics() {
        let mut data = header();
        data.extend(source_tuple(NOW, Some("ev-a"), None, Some(1.5), 3));
        for cut in 0..data.len() {
            let r = decode_all(&data[..cut]);
            assert!(r.is_err(), "cut at {cut} decoded");
        }
        let mut four = header();
        four.extend_from_slice(&4i16.to_be_bytes());
        assert!(matches!(decode_all(&four), Err(ImportError::Stream(_))));
        let mut wide_time = header();
        let mut t = (SOURCE_FIELDS as i16).to_be_bytes().to_vec();
        field(&mut t, Some(&[0; 4]));
        wide_time.extend(t);
        assert!(decode_all(&wide_time).is_err());
        let mut null_time = header();
        let mut t = (SOURCE_FIELDS as i16).to_be_bytes().to_vec();
        for _ in 0..SOURCE_FIELDS {
            field(&mut t, None);
        }
        null_time.extend(t);
        assert!(decode_all(&null_time).is_err());
        assert!(decode_all(b"not a copy stream at all").is_err());
    }

    fn row<'a>(t: i64, ev: Option<&'a str>, x: Option<&'a str>, v: f64, id: i64) -> SourceRow<'a> {
        SourceRow {
            time_us: t,
            event: ev.map(str::as_bytes),
            experiment: x.map(str::as_bytes),
            value: Some(v),
            id,
        }
    }

    #[test]
    fn converts_and_counts_every_skip_reason() {
        let mut c = converter(&[]);
        let mut n = Counts::default();
        let out: Vec<Option<Row>> = [
            row(NOW, Some("ev-a"), Some("x-1"), 1.0, 1),
            row(NOW, Some("nope"), None, 1.0, 2),
            row(NOW, None, None, 1.0, 3),
            row(NOW, Some("ev-b"), Some("x-gone"), 11.0, 4),
            row(NOW, Some("ev-b"), None, f64::NAN, 5),
            row(-1, Some("ev-b"), None, 1.0, 6),
            row(NOW + 301_000_000, Some("ev-b"), None, 1.0, 7),
        ]
        .iter()
        .map(|r| c.convert(r, &mut n))
        .collect();
        assert_eq!(
            out[0],
            Some(Row {
                time_us: NOW,
                event_id: 1,
                experiment_id: Some(7),
                value: 1.0,
                server_time: false,
            })
        );
        assert_eq!(
            out[3],
            Some(Row {
                time_us: NOW,
                event_id: 2,
                experiment_id: None,
                value: 11.0,
                server_time: false,
            })
        );
        assert_eq!(out.iter().filter(|r| r.is_some()).count(), 2);
        let mut missing = SourceRow {
            value: None,
            ..row(NOW, Some("ev-a"), None, 0.0, 8)
        };
        assert_eq!(c.convert(&missing, &mut n), None);
        missing.value = Some(f64::INFINITY);
        assert_eq!(c.convert(&missing, &mut n), None);
        assert_eq!(
            n,
            Counts {
                read: 9,
                unknown_event: 2,
                unknown_experiment: 1,
                out_of_range: 1,
                invalid_value: 3,
                bad_time: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn collisions_become_strictly_increasing_per_event() {
        let mut c = converter(&[]);
        let mut n = Counts::default();
        let times: Vec<(i32, i64)> = [
            row(100, Some("ev-a"), None, 1.0, 1),
            row(100, Some("ev-b"), None, 1.0, 2),
            row(100, Some("ev-a"), None, 2.0, 3),
            row(100, Some("ev-a"), None, 3.0, 4),
            row(101, Some("ev-a"), None, 4.0, 5),
            row(105, Some("ev-a"), None, 5.0, 6),
        ]
        .iter()
        .map(|r| c.convert(r, &mut n).unwrap())
        .map(|r| (r.event_id, r.time_us))
        .collect();
        assert_eq!(
            times,
            vec![(1, 100), (2, 100), (1, 101), (1, 102), (1, 103), (1, 105)]
        );
        assert_eq!(n.shifted, 3);
    }

    /// One COPY message per tuple, the header in the first and the trailer last, as PostgreSQL sends them.
    fn messages(rows: &[(i64, &str, f64, i64)]) -> Vec<Bytes> {
        let mut out: Vec<Vec<u8>> = rows
            .iter()
            .map(|&(t, ev, v, id)| source_tuple(t, Some(ev), None, Some(v), id))
            .collect();
        out.push((-1i16).to_be_bytes().to_vec());
        out[0].splice(0..0, header());
        out.into_iter().map(Bytes::from).collect()
    }

    /// Rows of a batch (the writer's COPY: time, event_id, experiment_id, value) as (event, time, value).
    fn batch_rows(batch: &Batch) -> Vec<(i32, i64, f64)> {
        let mut c = Cursor {
            data: &batch.data.data,
            at: 0,
        };
        skip_header(&mut c).unwrap();
        let mut out = vec![];
        while let Some([t, e, _, v]) = tuple::<4>(&mut c).unwrap() {
            let t = i64::from_be_bytes(t.unwrap().try_into().unwrap()) + PG_EPOCH_US;
            let e = i32::from_be_bytes(e.unwrap().try_into().unwrap());
            out.push((e, t, f64::from_be_bytes(v.unwrap().try_into().unwrap())));
        }
        out
    }

    fn run_batcher(messages: &[Bytes], carry: &[(i32, i64)], batch_rows: usize) -> Vec<Batch> {
        let mut b = SourceBatcher::new(converter(carry), 1, batch_rows);
        let mut out: Vec<Batch> = messages
            .iter()
            .filter_map(|m| b.message(m).unwrap())
            .collect();
        out.extend(b.finish().unwrap());
        out
    }

    #[test]
    fn batches_close_between_timestamps_and_ties_convert_in_id_order() {
        // Index order puts the ties of one timestamp in any order; ids 1, 2, 3 were inserted in that order.
        let source = [
            (100, "ev-a", 3.0, 3),
            (100, "ev-b", 2.0, 2),
            (100, "ev-a", 1.0, 1),
            (101, "ev-a", 4.0, 4),
            (102, "ev-b", 5.0, 5),
        ];
        let batches = run_batcher(&messages(&source), &[], 2);
        assert_eq!(batches.len(), 2);
        // The first batch holds the whole first timestamp, though it is over the batch size.
        assert_eq!(
            batch_rows(&batches[0]),
            vec![(1, 100, 1.0), (2, 100, 2.0), (1, 101, 3.0)]
        );
        assert_eq!(
            (
                batches[0].checkpoint.position_us,
                batches[0].checkpoint.position_id
            ),
            (100, 3)
        );
        assert_eq!(batches[0].checkpoint.carry, vec![(1, 101), (2, 100)]);
        assert_eq!((batches[0].counts.read, batches[0].counts.shifted), (3, 1));
        // The collision moved ev-a's value 3 to 101: its own row at 101 goes to 102.
        assert_eq!(batch_rows(&batches[1]), vec![(1, 102, 4.0), (2, 102, 5.0)]);
        assert_eq!(batches[1].checkpoint.position_us, 102);
    }

    #[test]
    fn resuming_after_any_checkpoint_converts_exactly_as_one_run() {
        // A stream full of collisions; a run resumed after any batch's checkpoint (reading the rows after
        // its timestamp, with its carry) writes what the uninterrupted run wrote after that batch.
        let source: Vec<(i64, &str, f64, i64)> = (0..60)
            .map(|i| {
                let ev = if i % 3 == 0 { "ev-b" } else { "ev-a" };
                (100 + i / 4, ev, i as f64, 60 - i)
            })
            .collect();
        for batch_size in [1, 3, 7] {
            let whole = run_batcher(&messages(&source), &[], batch_size);
            let all: Vec<_> = whole.iter().flat_map(batch_rows).collect();
            assert_eq!(all.len(), source.len());
            for (k, cut) in whole.iter().enumerate() {
                let after: Vec<_> = source
                    .iter()
                    .copied()
                    .filter(|r| r.0 > cut.checkpoint.position_us)
                    .collect();
                let resumed = run_batcher(&messages(&after), &cut.checkpoint.carry, batch_size);
                let got: Vec<_> = resumed.iter().flat_map(batch_rows).collect();
                let expected: Vec<_> = whole[k + 1..].iter().flat_map(batch_rows).collect();
                assert_eq!(
                    got, expected,
                    "batch size {batch_size}, resumed after batch {k}"
                );
            }
        }
    }

    #[test]
    fn target_columns_are_the_writers() {
        let names: Vec<&str> = crate::writer::COLUMNS.iter().map(|c| c.0).collect();
        assert_eq!(names, TARGET_COLUMNS);
        assert!(COPY_SQL.contains(&TARGET_COLUMNS.join(", ")));
        assert!(STAGING_COPY_SQL.contains(&TARGET_COLUMNS.join(", ")));
    }

    #[test]
    fn columns_are_checked_like_client_datapoints() {
        let times: Vec<u8> = [NOW, -5, NOW, NOW + 400_000_000]
            .iter()
            .flat_map(|t| t.to_ne_bytes())
            .collect();
        let events: Vec<u8> = [1i32, 2, 3, 4]
            .iter()
            .flat_map(|e| e.to_ne_bytes())
            .collect();
        let values: Vec<u8> = [1.0f64, 2.0, f64::NAN, 4.0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let experiments: Vec<u8> = [9i32, 0, 0, 0]
            .iter()
            .flat_map(|x| x.to_ne_bytes())
            .collect();
        let (rows, rejected) =
            rows_from_columns(&times, &events, &values, &experiments, Some(&[0b0001]), NOW)
                .unwrap();
        assert_eq!(
            rows,
            vec![Row {
                time_us: NOW,
                event_id: 1,
                experiment_id: Some(9),
                value: 1.0,
                server_time: false,
            }]
        );
        assert_eq!(
            rejected,
            vec![
                (Reject::NonFinite, 1),
                (Reject::FarFutureTimestamp, 1),
                (Reject::TimestampTooOld, 1)
            ]
        );
        let (rows, _) = rows_from_columns(
            &times[..8],
            &events[..4],
            &values[..8],
            &experiments[..4],
            None,
            NOW,
        )
        .unwrap();
        assert_eq!(rows[0].experiment_id, Some(9));
        assert!(matches!(
            rows_from_columns(&times, &events[..4], &values, &experiments, None, NOW),
            Err(ImportError::Columns(_))
        ));
        assert!(matches!(
            rows_from_columns(&times, &events, &values, &experiments, Some(&[]), NOW),
            Err(ImportError::Columns(_))
        ));
    }
}
