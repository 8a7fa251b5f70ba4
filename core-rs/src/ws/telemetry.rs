//! `/ws/controller/telemetry` (spec §7.2): the one implementation of the telemetry protocol.
//!
//! Every frame goes through `Engine::submit`. Replies go out in frame order: error frames at once (behind
//! earlier acks), acks once their frame is durable. Rows the database refused when written are reported in
//! an error frame before the ack, and the ack counts them as rejected. A frame that is not a JSON object
//! closes the socket (1007). When the queue (or this connection's share of it) is full, the connection
//! stops reading until the next commit, so TCP pushes back to the controller; when the client does not read
//! its replies, the bounded outbox fills and reading stops as well: a stalled client stalls only itself.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{close_message, Inner, INVALID_PAYLOAD};
use crate::engine::Receipt;
use crate::error::CoreError;
use crate::frame::{FrameError, Reject};

const NO_VALID: &str = r#"{"type":"error","message":"No valid datapoints in batch"}"#;
/// Server pings keep idle connections honest; a peer silent for two intervals is gone.
const PING_INTERVAL: Duration = Duration::from_secs(20);

enum Out {
    /// Send at once (after what is already queued).
    Text(String),
    /// The ack of a frame with `seq`: sent once the frame is durable.
    Ack(u64, Receipt),
    Ping,
    Close(u16, &'static str),
}

/// The error frame for rows the database refused, and the ack counts corrected for them.
pub fn refusal_reply(receipt: &Receipt) -> Option<(String, usize)> {
    let refused = receipt.outcome.refused();
    if refused.is_empty() {
        return None;
    }
    let entries: Vec<_> = refused
        .iter()
        .map(|(i, r)| {
            serde_json::json!({"index": i, "reason": Reject::DatabaseRefused.code(),
                "sqlstate": r.sqlstate, "detail": r.message})
        })
        .collect();
    let msg = serde_json::json!({
        "type": "error",
        "message": format!("{} datapoint(s) refused by the database", refused.len()),
        "refused": entries,
    });
    Some((msg.to_string(), refused.len()))
}

fn ack_text(seq: u64, receipt: &Receipt, refused: usize) -> String {
    format!(
        r#"{{"type":"ack","seq":{seq},"accepted":{},"rejected":{}}}"#,
        receipt.accepted.saturating_sub(refused),
        receipt.rejects.len() + refused
    )
}

async fn send_timed<S>(sink: &mut S, msg: Message, limit: Duration) -> bool
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    matches!(
        tokio::time::timeout(limit, sink.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Queues a reply without flushing it: the replies that are ready together (the acks of the frames one commit
/// made durable, typically) leave in one write instead of one system call each.
async fn feed_timed<S>(sink: &mut S, msg: Message, limit: Duration) -> bool
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    matches!(
        tokio::time::timeout(limit, sink.feed(msg)).await,
        Ok(Ok(()))
    )
}

/// The next reply; what is queued is flushed first whenever none is ready yet (so nothing waits in the buffer
/// while the sender waits). None when the connection's replies have ended or the flush failed.
async fn next_reply<S>(sink: &mut S, rx: &mut mpsc::Receiver<Out>, limit: Duration) -> Option<Out>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    match rx.try_recv() {
        Ok(out) => Some(out),
        Err(mpsc::error::TryRecvError::Disconnected) => None,
        Err(mpsc::error::TryRecvError::Empty) => {
            if !matches!(tokio::time::timeout(limit, sink.flush()).await, Ok(Ok(()))) {
                return None;
            }
            rx.recv().await
        }
    }
}

/// Sends replies in order; acks wait for their commit (until the engine closes).
async fn sender<S>(inner: Arc<Inner>, mut sink: S, mut rx: mpsc::Receiver<Out>)
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let limit = inner.config.send_timeout;
    while let Some(out) = next_reply(&mut sink, &mut rx, limit).await {
        let sent = match out {
            Out::Text(t) => feed_timed(&mut sink, Message::text(t), limit).await,
            Out::Ping => feed_timed(&mut sink, Message::Ping(Default::default()), limit).await,
            Out::Ack(seq, receipt) => {
                if receipt.ticket > inner.engine.committed_ticket() {
                    // Flush what is queued before waiting; then wait for the frame's commit.
                    if tokio::time::timeout(limit, sink.flush()).await.is_err() {
                        return;
                    }
                    let never = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
                    if !inner.engine.wait_committed(receipt.ticket, never).await {
                        // The engine closed with the frame unwritten: no ack, the close follows.
                        return;
                    }
                }
                let mut ok = true;
                let refused = match refusal_reply(&receipt) {
                    Some((text, n)) => {
                        ok = feed_timed(&mut sink, Message::text(text), limit).await;
                        n
                    }
                    None => 0,
                };
                ok && feed_timed(
                    &mut sink,
                    Message::text(ack_text(seq, &receipt, refused)),
                    limit,
                )
                .await
            }
            Out::Close(code, reason) => {
                let _ = send_timed(&mut sink, close_message(code, reason), limit).await;
                return;
            }
        };
        if !sent {
            return;
        }
    }
    let _ = tokio::time::timeout(limit, sink.close()).await;
}

/// Serve an authenticated telemetry connection until it closes, the session ends or the server stops.
pub(super) async fn serve<S, R>(
    inner: Arc<Inner>,
    sink: S,
    mut source: R,
    session: Arc<super::auth::Session>,
    source_id: u64,
) where
    S: Sink<Message, Error = WsError> + Unpin + Send + 'static,
    R: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let (tx, rx) = mpsc::channel::<Out>(inner.config.outbox);
    let sender = tokio::spawn(sender(inner.clone(), sink, rx));
    let mut stop = inner.stop.subscribe();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let mut silent_ticks = 0u32;
    let close = |code, reason| Out::Close(code, reason);
    let last: Option<Out> = loop {
        let message = tokio::select! {
            m = source.next() => m,
            _ = stop.changed() => break Some(close(1001, "Server shutting down")),
            _ = session.ended.notified() => {
                break Some(close(super::POLICY_VIOLATION, session.reason().map_or("Session ended", |r| r.reason())));
            }
            _ = ping.tick() => {
                silent_ticks += 1;
                if silent_ticks > 2 {
                    break None; // the peer is gone: not even pongs for two intervals
                }
                if tx.send(Out::Ping).await.is_err() { break None; }
                continue;
            }
        };
        silent_ticks = 0;
        let data = match message {
            Some(Ok(Message::Text(t))) => bytes::Bytes::from(t),
            Some(Ok(Message::Binary(b))) => b,
            Some(Err(WsError::Capacity(_))) => {
                break Some(close(super::MESSAGE_TOO_BIG, "Message too big"))
            }
            Some(Err(WsError::Utf8(_))) => {
                break Some(close(INVALID_PAYLOAD, "Text frame is not UTF-8"))
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break None,
            Some(Ok(_)) => continue, // ping/pong: answered by tungstenite
        };
        let receipt = loop {
            match inner
                .engine
                .submit_as(&data, false, source_id, session.identity.instance)
            {
                Err(CoreError::QueueFull { .. }) => {
                    // Back-pressure: this socket is not read until a batch commits.
                    tokio::select! {
                        _ = inner.engine.next_commit(Duration::from_secs(1)) => {}
                        _ = stop.changed() => break Err(CoreError::Closed),
                    }
                }
                r => break r,
            }
        };
        let out = match receipt {
            Err(CoreError::Frame(FrameError::InvalidJson(_) | FrameError::NotObject)) => {
                break Some(close(INVALID_PAYLOAD, "Frame is not a JSON object"));
            }
            Err(CoreError::Frame(e)) => {
                let msg = serde_json::json!({"type": "error", "message": e.to_string()});
                vec![Out::Text(msg.to_string())]
            }
            Err(CoreError::Closed) => break Some(close(1001, "Server shutting down")),
            Err(_) => break Some(close(1011, "Internal error")),
            Ok(r) => {
                let mut out = Vec::new();
                // Entries of unknown or unlinked events are valid in shape, dropped silently (§7.2 step 5).
                let catalog_miss = r
                    .rejects
                    .iter()
                    .any(|(_, why)| matches!(why, Reject::UnknownEvent | Reject::InactiveEvent));
                if r.total > 0 && r.accepted == 0 && !catalog_miss {
                    out.push(Out::Text(NO_VALID.to_owned()));
                }
                if let Some(seq) = r.seq {
                    out.push(Out::Ack(seq, r));
                }
                out
            }
        };
        let mut failed = false;
        for o in out {
            // A full outbox (the client does not read its replies) stops reading here.
            if tx.send(o).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            break None; // the sender stopped: the socket failed while sending
        }
    };
    if let Some(o) = last {
        let _ = tx.send(o).await;
    }
    drop(tx);
    let _ = sender.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Outcome, Refusal};

    #[test]
    fn acks_count_refused_rows_as_rejected() {
        let outcome = Arc::new(Outcome::default());
        let receipt = Receipt {
            accepted: 3,
            rejects: vec![(1, Reject::NonFinite)],
            total: 4,
            has_datapoints: true,
            seq: Some(5),
            ticket: 1,
            outcome: outcome.clone(),
        };
        assert!(refusal_reply(&receipt).is_none());
        assert_eq!(
            ack_text(5, &receipt, 0),
            r#"{"type":"ack","seq":5,"accepted":3,"rejected":1}"#
        );
        outcome.refuse(
            2,
            Arc::new(Refusal {
                sqlstate: "23514".into(),
                message: "check \"x\"".into(),
            }),
        );
        let (text, n) = refusal_reply(&receipt).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["refused"][0]["index"], 2);
        assert_eq!(v["refused"][0]["sqlstate"], "23514");
        assert_eq!(
            ack_text(5, &receipt, n),
            r#"{"type":"ack","seq":5,"accepted":2,"rejected":2}"#
        );
    }
}
