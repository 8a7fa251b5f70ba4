//! Decoder of PostgreSQL binary `COPY … TO STDOUT` output of datapoints into column buffers.
//!
//! The export reads `COPY (SELECT time, event_id, value, experiment_id FROM datapoints …) TO STDOUT
//! (FORMAT binary)` and hands the bytes here a frame at a time. Each column comes back as one buffer in the
//! host's byte order, laid out as Arrow expects (`time` as i64 µs since the Unix epoch, `event_id` i32,
//! `value` f64, `experiment_id` i32 with an LSB-first validity bitmap), so the Python side wraps them
//! without a Python object per row. Binary COPY performs no casts: a column of another type is an `Err`.
//!
//! `CopyReader` runs such a COPY on a connection of its own and decodes it frame by frame: no per-row work
//! happens in Python (a psycopg read costs about a microsecond a row, as much as everything else together).

use futures_util::StreamExt;
use thiserror::Error;

pub use crate::pg::{COPY_SIGNATURE as SIGNATURE, PG_EPOCH_US};

/// The columns a datapoint tuple carries, in order.
pub const FIELDS: i16 = 4;

/// Why a COPY payload could not be decoded. Bad input is an `Err`, never a panic.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PgCopyError {
    #[error("not a binary COPY stream (bad signature)")]
    BadSignature,
    #[error("binary COPY header flags {0:#x} are not supported (OIDs or unknown critical flags)")]
    BadFlags(u32),
    #[error("binary COPY data ends inside {what} at byte {at}")]
    Truncated { what: &'static str, at: usize },
    #[error("a tuple has {got} fields at byte {at}, expected {FIELDS} (time, event_id, value, experiment_id)")]
    FieldCount { got: i16, at: usize },
    #[error("field {field} has length {got} at byte {at}, expected {expected}")]
    FieldLength {
        field: &'static str,
        got: i32,
        expected: i32,
        at: usize,
    },
    #[error("{0} bytes follow the COPY trailer")]
    AfterTrailer(usize),
    #[error("database error: {0}")]
    Database(String),
    /// The export's encoder (Parquet) failed: an internal error, not bad input.
    #[error("export encoding failed: {0}")]
    Encode(String),
}

impl PgCopyError {
    /// A stable name for the kind of error (the Python exception's `code`).
    pub fn code(&self) -> &'static str {
        match self {
            PgCopyError::BadSignature => "bad_signature",
            PgCopyError::BadFlags(_) => "bad_flags",
            PgCopyError::Truncated { .. } => "truncated",
            PgCopyError::FieldCount { .. } => "field_count",
            PgCopyError::FieldLength { .. } => "field_length",
            PgCopyError::AfterTrailer(_) => "after_trailer",
            PgCopyError::Database(_) => "database",
            PgCopyError::Encode(_) => "encode",
        }
    }
}

impl From<tokio_postgres::Error> for PgCopyError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgCopyError::Database(crate::error::describe(&e))
    }
}

impl From<crate::CoreError> for PgCopyError {
    fn from(e: crate::CoreError) -> Self {
        match e {
            crate::CoreError::Database(m) => PgCopyError::Database(m),
            other => PgCopyError::Database(other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, PgCopyError>;

/// Decoded datapoints: one buffer per column, `rows` values each (see the module docs for the layout).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DatapointColumns {
    pub rows: usize,
    pub time_us: Vec<u8>,
    pub event_id: Vec<u8>,
    pub value: Vec<u8>,
    pub experiment_id: Vec<u8>,
    /// Arrow validity bitmap of `experiment_id` (bit set = not NULL), `ceil(rows / 8)` bytes.
    pub experiment_validity: Vec<u8>,
    pub experiment_nulls: usize,
    /// The stream's trailer (field count −1) was read: the COPY is complete.
    pub finished: bool,
}

impl DatapointColumns {
    fn with_capacity(rows: usize) -> Self {
        DatapointColumns {
            time_us: Vec::with_capacity(rows * 8),
            event_id: Vec::with_capacity(rows * 4),
            value: Vec::with_capacity(rows * 8),
            experiment_id: Vec::with_capacity(rows * 4),
            experiment_validity: Vec::with_capacity(rows.div_ceil(8)),
            ..Default::default()
        }
    }

    /// Reorder the rows: row `i` becomes the old row `order[i]` (`order` is a permutation of `0..rows`).
    fn permute(&mut self, order: &[usize]) {
        fn gather<const W: usize>(buf: &[u8], order: &[usize]) -> Vec<u8> {
            let mut out = Vec::with_capacity(buf.len());
            for &i in order {
                out.extend_from_slice(&buf[i * W..(i + 1) * W]);
            }
            out
        }
        self.time_us = gather::<8>(&self.time_us, order);
        self.event_id = gather::<4>(&self.event_id, order);
        self.value = gather::<8>(&self.value, order);
        self.experiment_id = gather::<4>(&self.experiment_id, order);
        let mut validity = vec![0u8; self.experiment_validity.len()];
        for (to, &from) in order.iter().enumerate() {
            if self.experiment_validity[from / 8] & (1 << (from % 8)) != 0 {
                validity[to / 8] |= 1 << (to % 8);
            }
        }
        self.experiment_validity = validity;
    }

    /// The times as integers (for tests and callers outside Python).
    pub fn times(&self) -> Vec<i64> {
        self.time_us
            .chunks_exact(8)
            .map(|c| i64::from_ne_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")))
            .collect()
    }

    pub fn event_ids(&self) -> Vec<i32> {
        self.event_id
            .chunks_exact(4)
            .map(|c| i32::from_ne_bytes(c.try_into().expect("chunks_exact(4) yields 4 bytes")))
            .collect()
    }

    pub fn values(&self) -> Vec<f64> {
        self.value
            .chunks_exact(8)
            .map(|c| f64::from_ne_bytes(c.try_into().expect("chunks_exact(8) yields 8 bytes")))
            .collect()
    }

    pub fn experiment_ids(&self) -> Vec<Option<i32>> {
        self.experiment_id
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let valid = self.experiment_validity[i / 8] & (1 << (i % 8)) != 0;
                valid.then(|| {
                    i32::from_ne_bytes(c.try_into().expect("chunks_exact(4) yields 4 bytes"))
                })
            })
            .collect()
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(PgCopyError::Truncated { what, at: self.at });
        };
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        // take(N) returned exactly N bytes.
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn i16(&mut self, what: &'static str) -> Result<i16> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    /// One field's length word, checked against the column's fixed width; None for NULL if `nullable`.
    fn field(
        &mut self,
        field: &'static str,
        width: i32,
        nullable: bool,
    ) -> Result<Option<&'a [u8]>> {
        let at = self.at;
        let len = self.i32("a field length")?;
        if len == -1 && nullable {
            return Ok(None);
        }
        if len != width {
            return Err(PgCopyError::FieldLength {
                field,
                got: len,
                expected: width,
                at,
            });
        }
        Ok(Some(self.take(width as usize, field)?))
    }
}

/// Skip the header (signature, flags, extension area); `data` must start with it.
fn header(r: &mut Reader<'_>) -> Result<()> {
    let signature = r.take(SIGNATURE.len(), "the header").map_err(|_| {
        if SIGNATURE.starts_with(r.data) {
            PgCopyError::Truncated {
                what: "the header",
                at: r.data.len(),
            }
        } else {
            PgCopyError::BadSignature
        }
    })?;
    if signature != SIGNATURE {
        return Err(PgCopyError::BadSignature);
    }
    let flags = r.i32("the header")? as u32;
    // Bit 16 means OIDs are included; bits 17-31 are reserved critical flags (the format's spec says refuse).
    if flags & 0xffff_0000 != 0 {
        return Err(PgCopyError::BadFlags(flags));
    }
    let extension = r.i32("the header")?;
    let extension = usize::try_from(extension).map_err(|_| PgCopyError::Truncated {
        what: "the header extension",
        at: r.at,
    })?;
    r.take(extension, "the header extension")?;
    Ok(())
}

/// Decode whole tuples of datapoints from `data`; `with_header` when `data` is the start of the stream.
///
/// `data` must hold whole tuples (COPY sends one tuple per message, so joined messages qualify); the trailer
/// may end it. Timestamps are shifted from PostgreSQL's epoch to the Unix epoch.
pub fn decode_datapoints(data: &[u8], with_header: bool) -> Result<DatapointColumns> {
    let mut r = Reader { data, at: 0 };
    if with_header {
        header(&mut r)?;
    }
    // A tuple is 2 + 4 * 4 + 8 + 4 + 8 + 4 = 42 bytes (fewer with a NULL experiment).
    let mut out = DatapointColumns::with_capacity((data.len() - r.at) / 38);
    let mut validity_byte = 0u8;
    while r.at < data.len() {
        let at = r.at;
        let fields = r.i16("a tuple's field count")?;
        if fields == -1 {
            out.finished = true;
            if r.at != data.len() {
                return Err(PgCopyError::AfterTrailer(data.len() - r.at));
            }
            break;
        }
        if fields != FIELDS {
            return Err(PgCopyError::FieldCount { got: fields, at });
        }
        let time = r.field("time", 8, false)?;
        let event = r.field("event_id", 4, false)?;
        let value = r.field("value", 8, false)?;
        let experiment = r.field("experiment_id", 4, true)?;
        // Non-nullable fields are Some (field() returns None only when nullable).
        let time = i64::from_be_bytes(time.expect("not nullable").try_into().expect("8 bytes"));
        out.time_us
            .extend_from_slice(&time.saturating_add(PG_EPOCH_US).to_ne_bytes());
        let event = i32::from_be_bytes(event.expect("not nullable").try_into().expect("4 bytes"));
        out.event_id.extend_from_slice(&event.to_ne_bytes());
        let value = f64::from_be_bytes(value.expect("not nullable").try_into().expect("8 bytes"));
        out.value.extend_from_slice(&value.to_ne_bytes());
        let bit = out.rows % 8;
        match experiment {
            Some(x) => {
                let x = i32::from_be_bytes(x.try_into().expect("4 bytes"));
                out.experiment_id.extend_from_slice(&x.to_ne_bytes());
                validity_byte |= 1 << bit;
            }
            None => {
                out.experiment_id.extend_from_slice(&0i32.to_ne_bytes());
                out.experiment_nulls += 1;
            }
        }
        out.rows += 1;
        if bit == 7 {
            out.experiment_validity.push(validity_byte);
            validity_byte = 0;
        }
    }
    if !out.rows.is_multiple_of(8) {
        out.experiment_validity.push(validity_byte);
    }
    Ok(out)
}

/// The time (µs since the PostgreSQL epoch) of the tuple in one COPY message, None for the trailer. A message
/// holds one tuple; the first also the header.
pub fn message_time(message: &[u8]) -> Result<Option<i64>> {
    let mut r = Reader {
        data: message,
        at: 0,
    };
    if message.starts_with(SIGNATURE) {
        header(&mut r)?;
    }
    let at = r.at;
    match r.i16("a tuple's field count")? {
        -1 => Ok(None),
        FIELDS => {
            let time = r.field("time", 8, false)?.expect("not nullable");
            Ok(Some(i64::from_be_bytes(time.try_into().expect("8 bytes"))))
        }
        got => Err(PgCopyError::FieldCount { got, at }),
    }
}

/// Order rows of equal time by event id (rows arrive ordered by time only: PostgreSQL sorts on one int8 key
/// about twice as fast as on two). A run of equal times holds at most one row per event.
pub fn order_ties_by_event(cols: &mut DatapointColumns) {
    let times = cols.times();
    let events = cols.event_ids();
    let mut order: Option<Vec<usize>> = None;
    let mut start = 0;
    while start < times.len() {
        let mut end = start + 1;
        while end < times.len() && times[end] == times[start] {
            end += 1;
        }
        if !events[start..end].is_sorted() {
            let order = order.get_or_insert_with(|| (0..times.len()).collect());
            order[start..end].sort_unstable_by_key(|&i| events[i]);
        }
        start = end;
    }
    if let Some(order) = order {
        cols.permute(&order);
    }
}

/// A whole statement's rows, decoded, to be put in (time, event) order before they are handed out.
#[derive(Debug, Default)]
struct Collected {
    time_us: Vec<i64>,
    event_id: Vec<i32>,
    value: Vec<f64>,
    experiment_id: Vec<Option<i32>>,
}

impl Collected {
    fn extend(&mut self, cols: &DatapointColumns) {
        self.time_us.extend(cols.times());
        self.event_id.extend(cols.event_ids());
        self.value.extend(cols.values());
        self.experiment_id.extend(cols.experiment_ids());
    }

    /// Row indices in (time, event) order; None when the rows are in that order already.
    fn order(&self) -> Option<Vec<u32>> {
        let key = |i: usize| (self.time_us[i], self.event_id[i]);
        if (1..self.time_us.len()).all(|i| key(i - 1) <= key(i)) {
            return None;
        }
        // Rows come off the heap nearly in time order (ingest writes them so): the stable merge sort finds
        // the runs and costs little more than a pass.
        let mut order: Vec<u32> = (0..self.time_us.len() as u32).collect();
        order.sort_by_key(|&i| key(i as usize));
        Some(order)
    }

    /// Rows `range` of `order` (or of the rows as they are) as one frame.
    fn frame(&self, order: Option<&[u32]>, range: std::ops::Range<usize>) -> DatapointColumns {
        let mut out = DatapointColumns::with_capacity(range.len());
        let mut validity_byte = 0u8;
        for k in range {
            let i = order.map_or(k, |o| o[k] as usize);
            out.time_us
                .extend_from_slice(&self.time_us[i].to_ne_bytes());
            out.event_id
                .extend_from_slice(&self.event_id[i].to_ne_bytes());
            out.value.extend_from_slice(&self.value[i].to_ne_bytes());
            let bit = out.rows % 8;
            match self.experiment_id[i] {
                Some(x) => {
                    out.experiment_id.extend_from_slice(&x.to_ne_bytes());
                    validity_byte |= 1 << bit;
                }
                None => {
                    out.experiment_id.extend_from_slice(&0i32.to_ne_bytes());
                    out.experiment_nulls += 1;
                }
            }
            out.rows += 1;
            if bit == 7 {
                out.experiment_validity.push(validity_byte);
                validity_byte = 0;
            }
        }
        if !out.rows.is_multiple_of(8) {
            out.experiment_validity.push(validity_byte);
        }
        out
    }
}

/// Order of the rows a `CopyReader` hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// As the statement returns them.
    Statement,
    /// The statement orders by time; rows of equal time are put in event order here (a frame ends between
    /// two times and may exceed `max_rows` by up to one row per event).
    TiesByEvent,
    /// The statement has no ORDER BY: the reader collects all its rows (memory grows with the statement's
    /// size: the caller picks statements small enough), sorts them by (time, event) and hands them out in
    /// frames of `max_rows`. PostgreSQL streams without sorting, which costs it 3× less per row.
    Sort,
}

/// Decoded frames a `CopyReader` reads ahead of its caller: PostgreSQL keeps streaming and Rust keeps decoding
/// while the caller encodes the previous frame.
pub const READ_AHEAD: usize = 2;

type Frames = tokio::sync::mpsc::Receiver<Result<DatapointColumns>>;
type Client = std::sync::Arc<crate::pg::PgClient>;

/// Messages decoded at a time while a whole statement is collected (`Order::Sort`).
const COLLECT_BATCH: usize = 1 << 16;

/// `Order::Sort`: collect the whole COPY, decoded, then send it in (time, event) order, `max_rows` a frame.
async fn sorted<S>(
    mut stream: std::pin::Pin<&mut S>,
    max_rows: usize,
    tx: tokio::sync::mpsc::Sender<Result<DatapointColumns>>,
) where
    S: futures_util::Stream<Item = std::result::Result<bytes::Bytes, tokio_postgres::Error>>,
{
    let mut rows = Collected::default();
    let mut with_header = true;
    let mut data = Vec::new();
    let mut messages = 0;
    loop {
        let next = stream.next().await;
        let ended = next.is_none();
        match next {
            Some(Ok(message)) => {
                data.extend_from_slice(&message);
                messages += 1;
            }
            Some(Err(e)) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            None => {}
        }
        if (ended || messages >= COLLECT_BATCH) && !data.is_empty() {
            match decode_datapoints(&data, std::mem::take(&mut with_header)) {
                Ok(cols) => rows.extend(&cols),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
            data.clear();
            messages = 0;
        }
        if ended {
            break;
        }
    }
    drop(data);
    let order = rows.order();
    let n = rows.time_us.len();
    let mut start = 0;
    while start < n {
        let end = start.saturating_add(max_rows).min(n);
        // A closed channel means the caller moved on.
        if tx
            .send(Ok(rows.frame(order.as_deref(), start..end)))
            .await
            .is_err()
        {
            return;
        }
        start = end;
    }
}

/// One COPY in flight: the task reading it and the frames it decoded.
struct Running {
    key: (String, usize, Order),
    connection: usize,
    task: tokio::task::JoinHandle<()>,
    frames: Frames,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binary COPYs of datapoints (statements given whole, parameters already bound as literals by the caller's SQL
/// composer: COPY takes no bind parameters), decoded on a runtime thread of its own into frames of columns, at
/// most `READ_AHEAD` frames ahead of the caller. The next statement can be started early on a second
/// connection (`prefetch`), so PostgreSQL sorts the next chunk while this one streams.
pub struct CopyReader {
    runtime: tokio::runtime::Runtime,
    dsn: String,
    clients: Vec<Client>,
    current: Option<Running>,
    prefetched: Option<Running>,
}

impl CopyReader {
    pub fn connect(dsn: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("webmacs-export-copy")
            .enable_all()
            .build()
            .map_err(|e| PgCopyError::Database(e.to_string()))?;
        let mut reader = CopyReader {
            runtime,
            dsn: dsn.to_owned(),
            clients: Vec::new(),
            current: None,
            prefetched: None,
        };
        reader.client(0)?;
        Ok(reader)
    }

    fn client(&mut self, index: usize) -> Result<Client> {
        while self.clients.len() <= index {
            let client = self
                .runtime
                .block_on(crate::pg::connect(&self.dsn, "webmacs-export"))
                .map_err(PgCopyError::from)?;
            self.clients.push(std::sync::Arc::new(client));
        }
        Ok(self.clients[index].clone())
    }

    /// Start `statement` (a `COPY (SELECT time, event_id, value, experiment_id …) TO STDOUT (FORMAT binary)`),
    /// to be read in frames of at most `max_rows` rows in `order`; a COPY still running is abandoned.
    /// `prefetch` starts the statement expected next on the other connection (taken over by the next `start`
    /// of that statement).
    pub fn start(
        &mut self,
        statement: &str,
        max_rows: usize,
        order: Order,
        prefetch: Option<&str>,
    ) -> Result<()> {
        self.current = None;
        let key = (statement.to_owned(), max_rows.max(1), order);
        let current = match self.prefetched.take() {
            Some(running) if running.key == key => running,
            other => {
                drop(other);
                let connection = 0;
                self.spawn(key, connection)?
            }
        };
        let other = 1 - current.connection;
        self.current = Some(current);
        if let Some(next) = prefetch {
            let running = self.spawn((next.to_owned(), max_rows.max(1), order), other)?;
            self.prefetched = Some(running);
        }
        Ok(())
    }

    fn spawn(&mut self, key: (String, usize, Order), connection: usize) -> Result<Running> {
        let client = self.client(connection)?;
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        let (statement, max_rows, order) = key.clone();
        let task = self.runtime.spawn(async move {
            let stream = match client.copy_out(statement.as_str()).await {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let mut stream = std::pin::pin!(stream);
            if order == Order::Sort {
                sorted(stream, max_rows, tx).await;
                return;
            }
            let ties_by_event = order == Order::TiesByEvent;
            let mut with_header = true;
            let mut held: Option<bytes::Bytes> = None;
            let mut last_time: Option<i64> = None;
            loop {
                // One message per tuple (the first also carries the header, the last may be the trailer).
                // A tuple is 38 or 42 bytes.
                let mut data = Vec::with_capacity(max_rows.min(1 << 18) * 42);
                let mut messages = 0;
                let mut ended = false;
                if let Some(message) = held.take() {
                    data.extend_from_slice(&message);
                    messages += 1;
                }
                while messages < max_rows || ties_by_event {
                    match stream.next().await {
                        Some(Ok(message)) => {
                            if ties_by_event && messages + 1 >= max_rows {
                                // Frames end between two times, so a run of ties is never split.
                                let time = match message_time(&message) {
                                    Ok(time) => time,
                                    Err(e) => {
                                        let _ = tx.send(Err(e)).await;
                                        return;
                                    }
                                };
                                let boundary = messages >= max_rows && time != last_time;
                                last_time = time;
                                if boundary {
                                    held = Some(message);
                                    break;
                                }
                            }
                            data.extend_from_slice(&message);
                            messages += 1;
                        }
                        Some(Err(e)) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                        None => {
                            ended = true;
                            break;
                        }
                    }
                }
                if !data.is_empty() {
                    let mut frame = decode_datapoints(&data, std::mem::take(&mut with_header));
                    if let (true, Ok(frame)) = (ties_by_event, frame.as_mut()) {
                        order_ties_by_event(frame);
                    }
                    let failed = frame.is_err();
                    // A closed channel means the caller moved on: stop reading.
                    if tx.send(frame).await.is_err() || failed {
                        return;
                    }
                }
                if ended {
                    return;
                }
            }
        });
        Ok(Running {
            key,
            connection,
            task,
            frames: rx,
        })
    }

    /// The next frame; None once the COPY has ended (or none was started).
    pub fn next_frame(&mut self) -> Result<Option<DatapointColumns>> {
        let Some(current) = self.current.as_mut() else {
            return Ok(None);
        };
        match self.runtime.block_on(current.frames.recv()) {
            Some(Ok(frame)) => Ok(Some(frame)),
            Some(Err(e)) => {
                self.current = None;
                Err(e)
            }
            None => {
                self.current = None;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes() -> Vec<u8> {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b
    }

    fn tuple(time_pg_us: i64, event: i32, value: f64, experiment: Option<i32>) -> Vec<u8> {
        let mut b = FIELDS.to_be_bytes().to_vec();
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&time_pg_us.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&event.to_be_bytes());
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&value.to_be_bytes());
        match experiment {
            Some(x) => {
                b.extend_from_slice(&4i32.to_be_bytes());
                b.extend_from_slice(&x.to_be_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        b
    }

    const TRAILER: [u8; 2] = [0xff, 0xff];

    #[test]
    fn collected_rows_come_out_sorted_in_frames_of_any_size() {
        // Rows out of order, ties of time across events, NULL and non-NULL experiments, extreme values.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let rows: Vec<(i64, i32, f64, Option<i32>)> = (0..1000)
            .map(|i| {
                let r = next();
                let t = i64::from((r % 300) as i32) - 150;
                let x = (r % 3 != 0).then_some((r >> 20) as i32);
                let v = [f64::NAN, f64::MAX, -0.0, 1.5][(r >> 8) as usize % 4];
                (t * 1000, i, v, x)
            })
            .collect();
        let data: Vec<u8> = rows
            .iter()
            .flat_map(|&(t, e, v, x)| tuple(t, e, v, x))
            .collect();
        let mut collected = Collected::default();
        collected.extend(&decode_datapoints(&data, false).unwrap());
        let order = collected.order().expect("out of order");
        let mut expected = rows.clone();
        expected.sort_by_key(|r| (r.0, r.1));
        for size in [1, 7, 8, 999, 1000, 5000] {
            let (mut times, mut events, mut values, mut experiments) =
                (vec![], vec![], vec![], vec![]);
            let mut start = 0;
            while start < rows.len() {
                let end = (start + size).min(rows.len());
                let frame = collected.frame(Some(&order), start..end);
                assert_eq!(frame.rows, end - start);
                assert_eq!(
                    frame.experiment_nulls,
                    frame
                        .experiment_ids()
                        .iter()
                        .filter(|x| x.is_none())
                        .count()
                );
                times.extend(frame.times());
                events.extend(frame.event_ids());
                values.extend(frame.values().iter().map(|v| v.to_bits()));
                experiments.extend(frame.experiment_ids());
                start = end;
            }
            assert_eq!(
                times,
                expected
                    .iter()
                    .map(|r| r.0 + PG_EPOCH_US)
                    .collect::<Vec<_>>()
            );
            assert_eq!(events, expected.iter().map(|r| r.1).collect::<Vec<_>>());
            assert_eq!(
                values,
                expected.iter().map(|r| r.2.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(
                experiments,
                expected.iter().map(|r| r.3).collect::<Vec<_>>()
            );
        }
        // Rows in order already need no permutation.
        let mut sorted = Collected::default();
        let data: Vec<u8> = expected
            .iter()
            .flat_map(|&(t, e, v, x)| tuple(t, e, v, x))
            .collect();
        sorted.extend(&decode_datapoints(&data, false).unwrap());
        assert!(sorted.order().is_none());
        assert_eq!(sorted.frame(None, 0..0).rows, 0);
    }

    #[test]
    fn decodes_rows_with_null_experiments_and_the_trailer() {
        let mut data = header_bytes();
        let rows: Vec<(i64, i32, f64, Option<i32>)> = (0..19)
            .map(|i| {
                let x = (i % 3 != 0).then_some(i as i32 * 10);
                (i * 1_000_001 - 5, i as i32 + 1, i as f64 / 7.0, x)
            })
            .collect();
        for &(t, e, v, x) in &rows {
            data.extend(tuple(t, e, v, x));
        }
        data.extend_from_slice(&TRAILER);
        let cols = decode_datapoints(&data, true).unwrap();
        assert_eq!(cols.rows, 19);
        assert!(cols.finished);
        assert_eq!(
            cols.times(),
            rows.iter().map(|r| r.0 + PG_EPOCH_US).collect::<Vec<_>>()
        );
        assert_eq!(
            cols.event_ids(),
            rows.iter().map(|r| r.1).collect::<Vec<_>>()
        );
        assert_eq!(cols.values(), rows.iter().map(|r| r.2).collect::<Vec<_>>());
        assert_eq!(
            cols.experiment_ids(),
            rows.iter().map(|r| r.3).collect::<Vec<_>>()
        );
        assert_eq!(cols.experiment_nulls, 7);
        assert_eq!(cols.experiment_validity.len(), 3);
    }

    #[test]
    fn frames_without_header_and_an_empty_stream() {
        let data = tuple(0, 7, -1.5, None);
        let cols = decode_datapoints(&data, false).unwrap();
        assert_eq!(cols.times(), vec![PG_EPOCH_US]);
        assert_eq!(cols.experiment_ids(), vec![None]);
        assert!(!cols.finished);
        let mut empty = header_bytes();
        empty.extend_from_slice(&TRAILER);
        let cols = decode_datapoints(&empty, true).unwrap();
        assert_eq!((cols.rows, cols.finished), (0, true));
        assert!(cols.experiment_validity.is_empty());
        assert_eq!(decode_datapoints(&[], false).unwrap().rows, 0);
    }

    #[test]
    fn header_extension_is_skipped() {
        let mut data = SIGNATURE.to_vec();
        data.extend_from_slice(&0i32.to_be_bytes());
        data.extend_from_slice(&3i32.to_be_bytes());
        data.extend_from_slice(b"abc");
        data.extend(tuple(1, 2, 3.0, Some(4)));
        assert_eq!(decode_datapoints(&data, true).unwrap().rows, 1);
    }

    #[test]
    fn bad_headers_are_errors() {
        assert_eq!(
            decode_datapoints(b"PGCOPY\nXXXXXXXXXXXXXXXXX", true),
            Err(PgCopyError::BadSignature)
        );
        assert_eq!(
            decode_datapoints(b"not copy", true),
            Err(PgCopyError::BadSignature)
        );
        assert!(matches!(
            decode_datapoints(b"PGCOPY\n", true),
            Err(PgCopyError::Truncated { .. })
        ));
        let mut oids = SIGNATURE.to_vec();
        oids.extend_from_slice(&(1i32 << 16).to_be_bytes());
        oids.extend_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            decode_datapoints(&oids, true),
            Err(PgCopyError::BadFlags(1 << 16))
        );
        let mut negative = SIGNATURE.to_vec();
        negative.extend_from_slice(&0i32.to_be_bytes());
        negative.extend_from_slice(&(-4i32).to_be_bytes());
        assert!(matches!(
            decode_datapoints(&negative, true),
            Err(PgCopyError::Truncated { .. })
        ));
    }

    #[test]
    fn truncated_input_is_an_error_at_every_cut() {
        let mut data = header_bytes();
        data.extend(tuple(5, 6, 7.0, Some(8)));
        data.extend(tuple(9, 10, 11.0, None));
        data.extend_from_slice(&TRAILER);
        let header_len = header_bytes().len();
        let tuple_ends = [
            header_len,
            header_len + 42,
            header_len + 42 + 38,
            data.len(),
        ];
        for cut in 0..data.len() {
            let result = decode_datapoints(&data[..cut], true);
            if tuple_ends.contains(&cut) {
                assert!(result.is_ok(), "cut at {cut}");
            } else {
                assert!(
                    matches!(
                        result,
                        Err(PgCopyError::Truncated { .. } | PgCopyError::BadSignature)
                    ),
                    "cut at {cut}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let mut three = 3i16.to_be_bytes().to_vec();
        three.extend_from_slice(&[0; 30]);
        assert!(matches!(
            decode_datapoints(&three, false),
            Err(PgCopyError::FieldCount { got: 3, .. })
        ));
        // A timestamp column sent as int4, a NULL time, a text value.
        let mut bad = tuple(1, 2, 3.0, None);
        bad[2..6].copy_from_slice(&4i32.to_be_bytes());
        assert!(matches!(
            decode_datapoints(&bad, false),
            Err(PgCopyError::FieldLength {
                field: "time",
                got: 4,
                ..
            })
        ));
        let mut null_time = tuple(1, 2, 3.0, None);
        null_time[2..6].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(matches!(
            decode_datapoints(&null_time, false),
            Err(PgCopyError::FieldLength {
                field: "time",
                got: -1,
                ..
            })
        ));
        let mut after = tuple(1, 2, 3.0, None);
        after.extend_from_slice(&TRAILER);
        after.push(0);
        assert_eq!(
            decode_datapoints(&after, false),
            Err(PgCopyError::AfterTrailer(1))
        );
    }

    #[test]
    fn ties_are_ordered_by_event_with_their_columns() {
        let rows: Vec<(i64, i32, f64, Option<i32>)> = vec![
            (1, 5, 0.5, None),
            (2, 9, 0.9, Some(90)),
            (2, 3, 0.3, None),
            (2, 7, 0.7, Some(70)),
            (3, 2, 0.2, None),
            (4, 8, 0.8, Some(80)),
            (4, 1, 0.1, Some(10)),
            (5, 4, 0.4, None),
            (6, 6, 0.6, Some(60)),
        ];
        let data: Vec<u8> = rows
            .iter()
            .flat_map(|&(t, e, v, x)| tuple(t, e, v, x))
            .collect();
        let mut cols = decode_datapoints(&data, false).unwrap();
        order_ties_by_event(&mut cols);
        let mut expected = rows.clone();
        expected.sort_by_key(|r| (r.0, r.1));
        assert_eq!(
            cols.times(),
            expected
                .iter()
                .map(|r| r.0 + PG_EPOCH_US)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            cols.event_ids(),
            expected.iter().map(|r| r.1).collect::<Vec<_>>()
        );
        assert_eq!(
            cols.values(),
            expected.iter().map(|r| r.2).collect::<Vec<_>>()
        );
        assert_eq!(
            cols.experiment_ids(),
            expected.iter().map(|r| r.3).collect::<Vec<_>>()
        );
        assert_eq!(cols.experiment_nulls, 4);
    }

    #[test]
    fn message_times() {
        let mut first = header_bytes();
        first.extend(tuple(42, 1, 1.0, None));
        assert_eq!(message_time(&first), Ok(Some(42)));
        assert_eq!(message_time(&tuple(-7, 1, 1.0, Some(2))), Ok(Some(-7)));
        assert_eq!(message_time(&TRAILER), Ok(None));
        assert!(message_time(&[0, 4, 0]).is_err());
        assert!(matches!(
            message_time(&2i16.to_be_bytes()),
            Err(PgCopyError::FieldCount { got: 2, .. })
        ));
    }

    #[test]
    fn extreme_times_saturate_instead_of_overflowing() {
        let data = tuple(i64::MAX, 1, f64::NAN, None);
        let cols = decode_datapoints(&data, false).unwrap();
        assert_eq!(cols.times(), vec![i64::MAX]);
        assert!(cols.values()[0].is_nan());
    }
}
