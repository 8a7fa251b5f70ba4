//! `CopyReader`: binary COPYs of datapoints on connections of its own, decoded into frames on a runtime thread
//! a few frames ahead of the caller, the next statement prefetched on a second connection.

use futures_util::StreamExt;

use super::decode::{decode_datapoints, message_time, DatapointColumns};
use super::sort::{order_ties_by_event, Collected};
use super::{PgCopyError, Result};

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
    let n = rows.rows();
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
