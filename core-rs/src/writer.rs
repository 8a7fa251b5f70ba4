//! The writer: binary COPY of one batch per transaction, reconnect and retry, duplicate-tolerant fallback.

use std::pin::pin;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::error::CoreError;

/// One datapoint row as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    /// Microseconds since the Unix epoch.
    pub time_us: i64,
    pub event_id: i32,
    pub experiment_id: Option<i32>,
    pub value: f64,
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
    SELECT time, event_id, experiment_id, value FROM datapoints_staging ON CONFLICT DO NOTHING";

/// PostgreSQL's epoch (2000-01-01) in Unix microseconds.
const PG_EPOCH_US: i64 = 946_684_800_000_000;
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Size of one row in binary COPY.
pub fn row_bytes(row: &Row) -> usize {
    // field count + 4 length words + time(8) + event(4) + experiment(4 or NULL) + value(8)
    2 + 16 + 8 + 4 + if row.experiment_id.is_some() { 4 } else { 0 } + 8
}

/// Encode rows as a complete binary COPY stream (header, tuples, trailer), written once.
pub fn encode(rows: &[Row]) -> Bytes {
    let mut buf = BytesMut::with_capacity(19 + rows.len() * 42 + 2);
    buf.put_slice(HEADER);
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension length
    for r in rows {
        buf.put_i16(4);
        buf.put_i32(8);
        buf.put_i64(r.time_us - PG_EPOCH_US);
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

/// Connect with the engine's session settings; the connection is driven on the current runtime.
pub async fn connect(dsn: &str, name: &str) -> Result<Client, CoreError> {
    let mut config: tokio_postgres::Config = dsn.parse()?;
    config.application_name(name);
    config.options("-c timezone=UTC");
    config.connect_timeout(Duration::from_secs(10));
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        // Errors surface on the client's next call; the connection task just ends.
        let _ = conn.await;
    });
    Ok(client)
}

/// Outcome of writing one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Written {
    pub inserted: u64,
    pub duplicates: u64,
}

async fn copy(
    client: &mut Client,
    data: &Bytes,
    rows: u64,
) -> Result<Written, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let sink = tx.copy_in(COPY_SQL).await?;
    let mut sink = pin!(sink);
    sink.send(data.clone()).await?;
    let n = sink.finish().await?;
    tx.commit().await?;
    Ok(Written {
        inserted: n,
        duplicates: rows - n.min(rows),
    })
}

/// The unique key rejected the batch (a retry after a lost commit, or a client resending timestamps):
/// stage it and insert what is new; the rest counts as duplicates.
async fn copy_dedup(
    client: &mut Client,
    data: &Bytes,
    rows: u64,
) -> Result<Written, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(STAGING_SQL).await?;
    let sink = tx.copy_in(STAGING_COPY_SQL).await?;
    let mut sink = pin!(sink);
    sink.send(data.clone()).await?;
    sink.finish().await?;
    let n = tx.execute(STAGING_INSERT_SQL, &[]).await?;
    tx.commit().await?;
    Ok(Written {
        inserted: n,
        duplicates: rows - n.min(rows),
    })
}

/// A COPY connection that survives restarts: every batch is retried until it commits (or `give_up` says so).
pub struct Writer {
    dsn: String,
    client: Option<Client>,
    connected_once: bool,
    pub retries: u64,
    pub reconnects: u64,
}

impl Writer {
    pub fn new(dsn: &str) -> Self {
        Writer {
            dsn: dsn.to_owned(),
            client: None,
            connected_once: false,
            retries: 0,
            reconnects: 0,
        }
    }

    /// Write one batch in one transaction. Transient failures are retried with exponential backoff
    /// (50 ms doubling to 5 s); `give_up` is polled between attempts (engine shutdown with a dead database).
    pub async fn write(
        &mut self,
        rows: &[Row],
        give_up: impl Fn() -> bool,
    ) -> Result<Written, CoreError> {
        let data = encode(rows);
        let n = rows.len() as u64;
        let mut backoff = Duration::from_millis(50);
        let mut dedup = false;
        loop {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                match connect(&self.dsn, "webmacs-ingest-writer").await {
                    Ok(c) => {
                        if self.connected_once {
                            self.reconnects += 1;
                        }
                        self.connected_once = true;
                        self.client = Some(c);
                    }
                    Err(e) => {
                        self.client = None;
                        if give_up() {
                            return Err(e);
                        }
                        self.retries += 1;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            // Only reached with a connected client (set just above).
            let client = self.client.as_mut().expect("connected above");
            let res = if dedup {
                copy_dedup(client, &data, n).await
            } else {
                copy(client, &data, n).await
            };
            match res {
                Ok(w) => return Ok(w),
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    dedup = true;
                    continue;
                }
                Err(e) => {
                    if e.as_db_error().is_none() || client.is_closed() {
                        self.client = None;
                    }
                    if give_up() {
                        return Err(e.into());
                    }
                    self.retries += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
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
            },
            Row {
                time_us: PG_EPOCH_US,
                event_id: 8,
                experiment_id: Some(3),
                value: -2.0,
            },
        ];
        let b = encode(&rows);
        assert_eq!(&b[..11], HEADER);
        assert_eq!(b.len(), 19 + row_bytes(&rows[0]) + row_bytes(&rows[1]) + 2);
        // First tuple: 4 fields, time = 1 µs after the PostgreSQL epoch.
        assert_eq!(&b[19..21], &[0, 4]);
        assert_eq!(&b[25..33], &1i64.to_be_bytes());
        // NULL experiment is a -1 length.
        assert_eq!(&b[41..45], &(-1i32).to_be_bytes());
        assert_eq!(&b[b.len() - 2..], &[0xff, 0xff]);
    }
}
