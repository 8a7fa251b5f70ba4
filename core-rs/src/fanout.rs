//! Cross-process fan-out: what one server process ingests reaches the live-stream subscribers and the
//! "latest" cache of every other process sharing the database.
//!
//! One interface, two transports: PostgreSQL `NOTIFY`/`LISTEN` (the default: no extra service) and NATS core
//! subjects (`WEBMACS_NATS_URL`, for high fan-out). Messages are compact JSON: the live points that passed the
//! broadcast throttle, the latest value of every event that changed, and requests to re-read "latest" after
//! deletions. A process ignores its own messages (each carries its origin). NOTIFY payloads are limited to
//! 8,000 bytes, so a message is cut into pieces of at most `MAX_PAYLOAD`; they are few: the live stream is
//! throttled per event, and a process publishes at most every `PUBLISH_INTERVAL`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

use crate::pg;

/// The NOTIFY channel (and NATS subject suffix) of the fan-out.
pub const CHANNEL: &str = "webmacs_live";
/// Largest payload of one NOTIFY (PostgreSQL's limit is 8,000 bytes).
pub const MAX_PAYLOAD: usize = 7_900;
/// How often a process publishes what accumulated (the live stream's own throttle is 200 ms per event).
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// Which transport carries the fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Off,
    Postgres,
    /// A NATS server URL (`nats://host:port`), and the subject prefix.
    Nats {
        url: String,
        prefix: String,
    },
}

/// One live point as it travels: event public id, value, time (µs), experiment public id.
pub type WireLive = (Arc<str>, f64, i64, Option<Arc<str>>);
/// One latest value as it travels: event id, value, time (µs), experiment id.
pub type WireLatest = (i32, f64, i64, Option<i32>);

/// What one process tells the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// The sending process (a random id per engine).
    #[serde(rename = "o")]
    pub origin: u64,
    #[serde(rename = "l", default, skip_serializing_if = "Vec::is_empty")]
    pub live: Vec<WireLive>,
    #[serde(rename = "t", default, skip_serializing_if = "Vec::is_empty")]
    pub latest: Vec<WireLatest>,
    /// Events whose "latest" must be re-read from the table (datapoints were deleted); `Some(vec![])` = all.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Vec<i32>>,
}

impl Message {
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.latest.is_empty() && self.reload.is_none()
    }

    /// The message as payloads of at most `max` bytes each (live points and latest values spread over as
    /// many pieces as needed; every piece is a valid message of its own).
    pub fn encode(&self, max: usize) -> Vec<String> {
        let whole = serde_json::to_string(self).unwrap_or_default();
        if whole.len() <= max || (self.live.len() + self.latest.len()) <= 1 {
            return vec![whole];
        }
        let mut pieces = Vec::new();
        let mut piece = Message {
            origin: self.origin,
            reload: self.reload.clone(),
            ..Default::default()
        };
        let mut size = serde_json::to_string(&piece).map_or(0, |s| s.len());
        let flush = |piece: &mut Message, pieces: &mut Vec<String>| {
            if !piece.is_empty() {
                pieces.push(serde_json::to_string(piece).unwrap_or_default());
            }
            *piece = Message {
                origin: piece.origin,
                ..Default::default()
            };
        };
        for p in &self.live {
            let n = serde_json::to_string(p).map_or(0, |s| s.len()) + 1;
            if size + n > max && !(piece.live.is_empty() && piece.latest.is_empty()) {
                flush(&mut piece, &mut pieces);
                size = 32;
            }
            piece.live.push(p.clone());
            size += n;
        }
        for t in &self.latest {
            let n = serde_json::to_string(t).map_or(0, |s| s.len()) + 1;
            if size + n > max && !(piece.live.is_empty() && piece.latest.is_empty()) {
                flush(&mut piece, &mut pieces);
                size = 32;
            }
            piece.latest.push(*t);
            size += n;
        }
        flush(&mut piece, &mut pieces);
        pieces
    }

    pub fn decode(payload: &[u8]) -> Option<Message> {
        serde_json::from_slice(payload).ok()
    }
}

/// A running fan-out: `publish` sends, received messages of other processes arrive on the receiver given to
/// `start`. Reconnects by itself; while disconnected, messages are dropped (a live view, not a log), and
/// after a reconnect the receiver gets a `reload: all` so "latest" catches up from the table.
pub struct Fanout {
    tx: mpsc::Sender<Message>,
    pub origin: u64,
}

impl Fanout {
    /// Start the transport's tasks on the current runtime; messages from other processes go to `inbox`.
    pub fn start(
        transport: &Transport,
        dsn: &str,
        origin: u64,
        inbox: mpsc::Sender<Message>,
        stop: Arc<tokio::sync::Notify>,
    ) -> Option<Fanout> {
        let (tx, rx) = mpsc::channel::<Message>(256);
        match transport {
            Transport::Off => return None,
            Transport::Postgres => {
                tokio::spawn(pg_publisher(dsn.to_owned(), rx, stop.clone()));
                tokio::spawn(pg_listener(dsn.to_owned(), origin, inbox, stop));
            }
            Transport::Nats { url, prefix } => {
                let subject = format!("{prefix}.{CHANNEL}");
                tokio::spawn(nats_loop(url.clone(), subject, origin, rx, inbox, stop));
            }
        }
        Some(Fanout { tx, origin })
    }

    /// Queue a message for the other processes (dropped when the transport is far behind: a live view).
    pub fn publish(&self, message: Message) {
        let _ = self.tx.try_send(message);
    }
}

async fn pg_publisher(
    dsn: String,
    mut rx: mpsc::Receiver<Message>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut client: Option<pg::PgClient> = None;
    loop {
        let message = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = stop.notified() => return,
        };
        for payload in message.encode(MAX_PAYLOAD) {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = pg::connect(&dsn, "webmacs-ingest-fanout").await.ok();
            }
            let Some(c) = client.as_ref() else {
                break; // the database is away: this message is lost to the others, as a live view may be
            };
            let sent = pg::deadline(
                pg::QUERY_TIMEOUT,
                "fan-out notify",
                c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]),
            )
            .await;
            if sent.is_err() {
                client = None;
                break;
            }
        }
    }
}

async fn pg_listener(
    dsn: String,
    origin: u64,
    inbox: mpsc::Sender<Message>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let connected = pg::open(&dsn, "webmacs-ingest-fanout-listen").await;
        let Ok((client, mut conn)) = connected else {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.notified() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        };
        let (ntx, mut nrx) = mpsc::channel::<String>(1024);
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(msg)) = messages.next().await {
                if let AsyncMessage::Notification(n) = msg {
                    // A full channel drops a live message rather than stalling the connection.
                    let _ = ntx.try_send(n.payload().to_owned());
                }
            }
        });
        let listening = pg::deadline(
            pg::QUERY_TIMEOUT,
            "LISTEN",
            client.batch_execute(&format!("LISTEN {CHANNEL}")),
        )
        .await;
        if listening.is_ok() {
            backoff = Duration::from_millis(100);
            if !first {
                // Messages sent while this process was not listening are gone: re-read "latest".
                let _ = inbox.try_send(Message {
                    origin: 0,
                    reload: Some(Vec::new()),
                    ..Default::default()
                });
            }
            first = false;
            let mut probe = tokio::time::interval(Duration::from_secs(15));
            probe.tick().await;
            loop {
                tokio::select! {
                    payload = nrx.recv() => match payload {
                        Some(p) => {
                            if let Some(m) = Message::decode(p.as_bytes()) {
                                if m.origin != origin {
                                    let _ = inbox.try_send(m);
                                }
                            }
                        }
                        None => break,
                    },
                    _ = probe.tick() => {
                        if pg::deadline(pg::QUERY_TIMEOUT, "probe", client.simple_query("")).await.is_err() {
                            break;
                        }
                    }
                    _ = stop.notified() => { driver.abort(); return; }
                }
            }
        }
        driver.abort();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.notified() => return,
        }
    }
}

async fn nats_loop(
    url: String,
    subject: String,
    origin: u64,
    mut rx: mpsc::Receiver<Message>,
    inbox: mpsc::Sender<Message>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let options = async_nats::ConnectOptions::new()
            .name("webmacs")
            .connection_timeout(pg::CONNECT_TIMEOUT);
        let connected =
            tokio::time::timeout(pg::CONNECT_TIMEOUT, options.connect(url.as_str())).await;
        let client = match connected {
            Ok(Ok(c)) => c,
            _ => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.notified() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let Ok(mut subscriber) = client.subscribe(subject.clone()).await else {
            tokio::time::sleep(backoff).await;
            continue;
        };
        backoff = Duration::from_millis(100);
        if !first {
            let _ = inbox.try_send(Message {
                origin: 0,
                reload: Some(Vec::new()),
                ..Default::default()
            });
        }
        first = false;
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        // NATS carries up to 1 MiB per message by default; pieces keep each one small all the same.
                        for payload in m.encode(64 * 1024) {
                            if client.publish(subject.clone(), payload.into()).await.is_err() {
                                break;
                            }
                        }
                    }
                    None => return,
                },
                received = subscriber.next() => match received {
                    Some(msg) => {
                        if let Some(m) = Message::decode(&msg.payload) {
                            if m.origin != origin {
                                let _ = inbox.try_send(m);
                            }
                        }
                    }
                    None => break, // the connection is gone: connect again
                },
                _ = stop.notified() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(i: usize) -> WireLive {
        (
            Arc::from(format!("0d4c1e2a-8f0b-4c47-9a3e-{i:012}")),
            i as f64 + 0.5,
            1_764_000_000_000_000 + i as i64,
            Some(Arc::from("99d7e0aa-0000-4000-8000-000000000000")),
        )
    }

    #[test]
    fn messages_round_trip_and_split_under_the_limit() {
        let m = Message {
            origin: 7,
            live: (0..500).map(live).collect(),
            latest: (0..500).map(|i| (i, 1.0, 2, None)).collect(),
            reload: None,
        };
        let pieces = m.encode(MAX_PAYLOAD);
        assert!(pieces.len() > 1);
        let mut back = Message {
            origin: 7,
            ..Default::default()
        };
        for p in &pieces {
            assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
            let d = Message::decode(p.as_bytes()).unwrap();
            assert_eq!(d.origin, 7);
            back.live.extend(d.live);
            back.latest.extend(d.latest);
        }
        // Every point arrives once, in order.
        assert_eq!(back, m);
    }

    #[test]
    fn small_messages_stay_whole_and_garbage_is_ignored() {
        let m = Message {
            origin: 1,
            reload: Some(vec![3, 4]),
            ..Default::default()
        };
        let pieces = m.encode(MAX_PAYLOAD);
        assert_eq!(pieces.len(), 1);
        assert_eq!(Message::decode(pieces[0].as_bytes()), Some(m));
        assert_eq!(Message::decode(b"not json"), None);
        assert_eq!(Message::decode(b"{\"x\":1}"), None);
    }
}
