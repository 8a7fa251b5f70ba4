//! Engine counters (lock-free): what was accepted, rejected and why, written, retried, and how fast.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::frame::Reject;

/// The path a frame came in by, for the per-protocol counters (`Stats::by_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `POST /api/v1/datapoints` and `/batch`.
    Rest,
    /// `/ws/controller/telemetry`, on the API's port or the engine's own (one implementation).
    WebSocket,
    Mqtt,
    LineProtocol,
}

/// The `source` the MQTT adapter submits as (one sender for the queue's fair shares).
pub const MQTT_SOURCE: u64 = u64::MAX - 1;

impl Protocol {
    pub const ALL: [Protocol; 4] = [
        Protocol::Rest,
        Protocol::WebSocket,
        Protocol::Mqtt,
        Protocol::LineProtocol,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Rest => "rest",
            Protocol::WebSocket => "websocket",
            Protocol::Mqtt => "mqtt",
            Protocol::LineProtocol => "line_protocol",
        }
    }

    /// The protocol of a frame submitted as `source`: WebSocket connections carry the high bit, the MQTT
    /// adapter its own source, everything else is a REST sender (a token or a user).
    pub fn of_source(source: u64) -> Protocol {
        if source == MQTT_SOURCE {
            Protocol::Mqtt
        } else if source >> 63 == 1 {
            Protocol::WebSocket
        } else {
            Protocol::Rest
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Frames and datapoints of one protocol, as the engine's pipeline saw them.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub frames: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub frames: AtomicU64,
    pub frames_refused: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: [AtomicU64; Reject::ALL.len()],
    pub queue_full: AtomicU64,
    /// Frames refused because their sender's share of the queue was used up (the queue had room).
    pub queue_full_share: AtomicU64,
    pub written: AtomicU64,
    pub duplicates: AtomicU64,
    pub batches: AtomicU64,
    /// Extra transactions spent isolating rows the database refused.
    pub bisections: AtomicU64,
    pub retries: AtomicU64,
    pub reconnects: AtomicU64,
    pub flush_us_last: AtomicU64,
    pub flush_us_total: AtomicU64,
    pub flush_us_max: AtomicU64,
    pub queue_depth: AtomicU64,
    pub broadcast_dropped: AtomicU64,
    pub mqtt: ProtocolStats,
    pub by_protocol: [IngestCounters; Protocol::ALL.len()],
}

/// Counters of one protocol adapter (MQTT): messages, points and why points were rejected.
#[derive(Debug, Default)]
pub struct ProtocolStats {
    /// Messages (publishes) received.
    pub received: AtomicU64,
    /// Datapoints in them (entries of frames, one per one-value message).
    pub points: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: [AtomicU64; Reject::ALL.len()],
    /// Messages refused as a whole (not JSON, not UTF-8, too large, too many entries): acknowledged, counted.
    pub malformed: AtomicU64,
    /// Messages acknowledged to the broker (after their points committed).
    pub acked: AtomicU64,
    /// 1 while connected to the broker.
    pub connected: AtomicU64,
    /// Subscriptions the broker granted on the current connection.
    pub subscribed: AtomicU64,
    pub reconnects: AtomicU64,
    pub connection_errors: AtomicU64,
    /// Rejection reports published on the error topic.
    pub errors_published: AtomicU64,
    /// Log lines left out by the rate limit.
    pub log_suppressed: AtomicU64,
}

impl ProtocolStats {
    pub fn reject(&self, r: Reject) {
        self.rejected[r.index()].fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> ProtocolSnapshot {
        let counters = vec![
            ("received", self.received.load(Relaxed)),
            ("points", self.points.load(Relaxed)),
            ("accepted", self.accepted.load(Relaxed)),
            ("malformed", self.malformed.load(Relaxed)),
            ("acked", self.acked.load(Relaxed)),
            ("connected", self.connected.load(Relaxed)),
            ("subscribed", self.subscribed.load(Relaxed)),
            ("reconnects", self.reconnects.load(Relaxed)),
            ("connection_errors", self.connection_errors.load(Relaxed)),
            ("errors_published", self.errors_published.load(Relaxed)),
            ("log_suppressed", self.log_suppressed.load(Relaxed)),
        ];
        let rejected = Reject::ALL
            .iter()
            .map(|r| (r.code(), self.rejected[r.index()].load(Relaxed)))
            .collect();
        ProtocolSnapshot { counters, rejected }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolSnapshot {
    pub counters: Vec<(&'static str, u64)>,
    pub rejected: Vec<(&'static str, u64)>,
}

/// A consistent-enough copy of the counters for reporting.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsSnapshot {
    pub counters: Vec<(&'static str, u64)>,
    pub rejected: Vec<(&'static str, u64)>,
    /// Per protocol adapter: ("mqtt", its counters).
    pub protocols: Vec<(&'static str, ProtocolSnapshot)>,
    /// Per ingest path ("rest", "websocket", "mqtt", "line_protocol"): frames, accepted, rejected.
    pub by_protocol: Vec<(&'static str, Vec<(&'static str, u64)>)>,
}

impl Stats {
    pub fn reject(&self, r: Reject) {
        self.rejected[r.index()].fetch_add(1, Relaxed);
    }

    /// A frame of `protocol` went through the pipeline with `accepted` and `rejected` datapoints.
    pub fn ingested(&self, protocol: Protocol, accepted: usize, rejected: usize) {
        let c = &self.by_protocol[protocol.index()];
        c.frames.fetch_add(1, Relaxed);
        c.accepted.fetch_add(accepted as u64, Relaxed);
        c.rejected.fetch_add(rejected as u64, Relaxed);
    }

    pub fn flushed(&self, flush_us: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.flush_us_last.store(flush_us, Relaxed);
        self.flush_us_total.fetch_add(flush_us, Relaxed);
        self.flush_us_max.fetch_max(flush_us, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let batches = self.batches.load(Relaxed);
        let avg = self
            .flush_us_total
            .load(Relaxed)
            .checked_div(batches)
            .unwrap_or(0);
        let counters = vec![
            ("frames", self.frames.load(Relaxed)),
            ("frames_refused", self.frames_refused.load(Relaxed)),
            ("accepted", self.accepted.load(Relaxed)),
            ("queue_full", self.queue_full.load(Relaxed)),
            ("queue_full_share", self.queue_full_share.load(Relaxed)),
            ("written", self.written.load(Relaxed)),
            ("duplicates", self.duplicates.load(Relaxed)),
            ("batches", batches),
            ("bisections", self.bisections.load(Relaxed)),
            ("retries", self.retries.load(Relaxed)),
            ("reconnects", self.reconnects.load(Relaxed)),
            ("flush_us_last", self.flush_us_last.load(Relaxed)),
            ("flush_us_avg", avg),
            ("flush_us_total", self.flush_us_total.load(Relaxed)),
            ("flush_us_max", self.flush_us_max.load(Relaxed)),
            ("queue_depth", self.queue_depth.load(Relaxed)),
            ("broadcast_dropped", self.broadcast_dropped.load(Relaxed)),
        ];
        let rejected = Reject::ALL
            .iter()
            .map(|r| (r.code(), self.rejected[r.index()].load(Relaxed)))
            .collect();
        StatsSnapshot {
            counters,
            rejected,
            protocols: vec![("mqtt", self.mqtt.snapshot())],
            by_protocol: Protocol::ALL
                .iter()
                .map(|p| {
                    let c = &self.by_protocol[p.index()];
                    (
                        p.name(),
                        vec![
                            ("frames", c.frames.load(Relaxed)),
                            ("accepted", c.accepted.load(Relaxed)),
                            ("rejected", c.rejected.load(Relaxed)),
                        ],
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_averages() {
        let s = Stats::default();
        s.reject(Reject::NonFinite);
        s.reject(Reject::NonFinite);
        s.flushed(10);
        s.flushed(30);
        let snap = s.snapshot();
        let get = |k: &str| snap.counters.iter().find(|c| c.0 == k).unwrap().1;
        assert_eq!(
            (
                get("batches"),
                get("flush_us_avg"),
                get("flush_us_max"),
                get("flush_us_last")
            ),
            (2, 20, 30, 30)
        );
        assert!(snap.rejected.contains(&("non_finite", 2)));
        assert_eq!(snap.rejected.len(), Reject::ALL.len());
    }
}
