//! `/ws/datapoints/stream` (spec §7.1): live datapoint broadcasts to dashboards; ping → pong.
//!
//! Each subscriber has its own bounded queue: a subscriber that stops reading fills only its own queue and
//! is dropped (counted) when it is full, so it never holds up the broadcast for the others.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{close_message, Inner, INVALID_PAYLOAD};
use crate::engine::LivePoint;

pub const CONNECTED: &str =
    r#"{"type":"connected","message":"Subscribed to live datapoint stream."}"#;
const PONG: &str = r#"{"type":"pong"}"#;

/// The subscribers and their queues.
#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<HashMap<u64, mpsc::Sender<Arc<str>>>>,
    pub dropped: AtomicU64,
    pub broadcasts: AtomicU64,
}

impl Hub {
    fn join(&self, id: u64, capacity: usize) -> mpsc::Receiver<Arc<str>> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.lock().insert(id, tx);
        rx
    }

    fn leave(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<Arc<str>>>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queue `message` for every subscriber; one whose queue is full is dropped (its receiver then ends).
    pub fn broadcast(&self, message: Arc<str>) {
        self.broadcasts.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .retain(|_, tx| match tx.try_send(message.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }
}

/// Python's `datetime.isoformat()` of an aware UTC time, as the reference sends it: microseconds only when
/// not zero, `+00:00` for UTC.
pub fn isoformat_utc(time_us: i64) -> String {
    let secs = time_us.div_euclid(1_000_000);
    let micros = time_us.rem_euclid(1_000_000);
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => {
            let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
            if micros != 0 {
                let _ = write!(s, ".{micros:06}");
            }
            s.push_str("+00:00");
            s
        }
        // Unreachable for validated times (1970 .. now + 5 min); never a panic all the same.
        None => String::from("1970-01-01T00:00:00+00:00"),
    }
}

/// The broadcast message for a set of live points (spec §7.1).
pub fn batch_message(points: &[LivePoint]) -> String {
    let datapoints: Vec<_> = points
        .iter()
        .map(|p| {
            serde_json::json!({
                "value": p.value,
                "event_public_id": &*p.event_public_id,
                "timestamp": isoformat_utc(p.time_us),
                "experiment_public_id": p.experiment_public_id.as_deref(),
            })
        })
        .collect();
    serde_json::json!({"type": "datapoints_batch", "datapoints": datapoints}).to_string()
}

/// Send every batch of live points (this process's after its commits, and the other processes' through the
/// fan-out) to every subscriber.
pub(super) async fn broadcaster(inner: Arc<Inner>) {
    let mut stop = inner.stop.subscribe();
    let mut live = inner.engine.live_receiver();
    loop {
        let points = tokio::select! {
            p = live.recv() => match p {
                Ok(points) => points,
                // This task fell behind the engine (a burst of commits): those batches are skipped, counted.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    inner.hub.dropped.fetch_add(n, Ordering::Relaxed);
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = stop.changed() => return,
        };
        if points.is_empty() || inner.hub.is_empty() {
            continue;
        }
        inner.hub.broadcast(Arc::from(batch_message(&points)));
    }
}

/// Serve an authenticated subscriber until it closes, is dropped, its session ends or the server stops.
pub(super) async fn serve<S, R>(
    inner: Arc<Inner>,
    mut sink: S,
    mut source: R,
    session: Arc<super::auth::Session>,
    id: u64,
) where
    S: Sink<Message, Error = WsError> + Unpin,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let limit = inner.config.send_timeout;
    let send = async |sink: &mut S, m: Message| {
        matches!(tokio::time::timeout(limit, sink.send(m)).await, Ok(Ok(())))
    };
    if !send(&mut sink, Message::text(CONNECTED)).await {
        return;
    }
    let mut rx = inner.hub.join(id, inner.config.subscriber_queue);
    let mut stop = inner.stop.subscribe();
    let close: Option<(u16, &'static str)> = loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(text) => if !send(&mut sink, Message::text(&*text)).await { break None },
                // Dropped by the hub: this subscriber fell too far behind.
                None => break Some((1013, "Too slow: live stream messages were dropped")),
            },
            m = source.next() => match m {
                Some(Ok(Message::Text(t))) => match reply(t.as_bytes()) {
                    Ok(Some(r)) => if !send(&mut sink, Message::text(r)).await { break None },
                    Ok(None) => {}
                    Err(()) => break Some((INVALID_PAYLOAD, "Message is not a JSON object")),
                },
                Some(Ok(Message::Binary(b))) => match reply(&b) {
                    Ok(Some(r)) => if !send(&mut sink, Message::text(r)).await { break None },
                    Ok(None) => {}
                    Err(()) => break Some((INVALID_PAYLOAD, "Message is not a JSON object")),
                },
                Some(Err(WsError::Capacity(_))) => break Some((super::MESSAGE_TOO_BIG, "Message too big")),
                Some(Err(WsError::Utf8(_))) => break Some((INVALID_PAYLOAD, "Text frame is not UTF-8")),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
                Some(Ok(_)) => {}
            },
            _ = stop.changed() => break Some((1001, "Server shutting down")),
            _ = session.ended.notified() => {
                break Some((super::POLICY_VIOLATION, session.reason().map_or("Session ended", |r| r.reason())));
            }
        }
    };
    inner.hub.leave(id);
    if let Some((code, reason)) = close {
        let _ = send(&mut sink, close_message(code, reason)).await;
    }
    let _ = tokio::time::timeout(limit, sink.close()).await;
}

/// The answer to a client message: `{"type":"ping"}` → pong, other objects → nothing, anything else → Err.
/// Public for the fuzz harness (`core-rs/tests/fuzz`), which feeds it arbitrary client bytes.
// The one failure ("not a JSON object") needs no payload: the caller closes with 1007.
#[allow(clippy::result_unit_err)]
pub fn reply(raw: &[u8]) -> Result<Option<&'static str>, ()> {
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(serde_json::Value::Object(o)) => {
            Ok((o.get("type").and_then(|t| t.as_str()) == Some("ping")).then_some(PONG))
        }
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isoformat_matches_python() {
        assert_eq!(isoformat_utc(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(
            isoformat_utc(1_764_139_639_517_435),
            "2025-11-26T06:47:19.517435+00:00"
        );
        assert_eq!(
            isoformat_utc(1_764_139_639_000_001),
            "2025-11-26T06:47:19.000001+00:00"
        );
        assert_eq!(
            isoformat_utc(1_764_139_639_000_000),
            "2025-11-26T06:47:19+00:00"
        );
        // Out of chrono's range: an answer, not a panic.
        let _ = isoformat_utc(i64::MIN);
        let _ = isoformat_utc(i64::MAX);
    }

    #[test]
    fn replies() {
        assert_eq!(reply(br#"{"type":"ping"}"#), Ok(Some(PONG)));
        assert_eq!(reply(br#"{"type":"other"}"#), Ok(None));
        assert_eq!(reply(b"{}"), Ok(None));
        assert_eq!(reply(b"[1]"), Err(()));
        assert_eq!(reply(b"\xff\xfe"), Err(()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_subscriber_is_dropped_others_keep_receiving() {
        let hub = Hub::default();
        let mut slow = hub.join(1, 2);
        let mut fast = hub.join(2, 2);
        for i in 0..3 {
            hub.broadcast(Arc::from(format!("m{i}")));
            assert_eq!(&*fast.recv().await.unwrap(), format!("m{i}"));
        }
        // The slow one got two messages queued, the third overflowed: dropped and counted.
        assert_eq!(hub.len(), 1);
        assert_eq!(hub.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(&*slow.recv().await.unwrap(), "m0");
        assert_eq!(&*slow.recv().await.unwrap(), "m1");
        assert!(slow.recv().await.is_none());
    }

    #[test]
    fn batch_message_shape() {
        let p = LivePoint {
            event_public_id: Arc::from("e1"),
            value: 21.5,
            time_us: 1_764_139_639_517_435,
            experiment_public_id: None,
        };
        let v: serde_json::Value = serde_json::from_str(&batch_message(&[p])).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "datapoints_batch", "datapoints": [{"value": 21.5,
                "event_public_id": "e1", "timestamp": "2025-11-26T06:47:19.517435+00:00",
                "experiment_public_id": null}]})
        );
    }
}
