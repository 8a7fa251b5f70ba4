//! The engine's settings.

use std::time::Duration;

use crate::batch::BatchPolicy;
use crate::fanout::Transport;
use crate::frame;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub dsn: String,
    pub policy: BatchPolicy,
    /// Rows waiting for the writer before `submit` answers QueueFull.
    pub queue_capacity: usize,
    pub max_frame_bytes: usize,
    /// Throttle of `sensor.reading` firings per event (spec §9: 5 s).
    pub reading_interval: Duration,
    /// Throttle of live-stream inclusion per event (spec §6 step 7: 0.2 s).
    pub broadcast_interval: Duration,
    /// Bound of the broadcast and firing buffers when Python does not drain them.
    pub buffer_capacity: usize,
    /// COPY connections: one fills the next batch while others write theirs.
    pub writers: usize,
    /// Fraction of `queue_capacity` one source (a connection, a token) may fill, so one flooding sender
    /// cannot take the queue from everyone else.
    pub source_share: f64,
    /// Deadline of one write transaction (and of a reconnect); past it the connection is dropped and the
    /// batch retried, so a database that stops answering cannot hold a writer forever.
    pub write_timeout: Duration,
    /// How live points and "latest" reach the other server processes sharing the database.
    pub fanout: Transport,
}

impl EngineConfig {
    pub fn new(dsn: &str) -> Self {
        EngineConfig {
            dsn: dsn.to_owned(),
            policy: BatchPolicy::default(),
            queue_capacity: 200_000,
            max_frame_bytes: frame::DEFAULT_MAX_FRAME_BYTES,
            reading_interval: Duration::from_secs(5),
            broadcast_interval: Duration::from_millis(200),
            buffer_capacity: 100_000,
            writers: 2,
            source_share: 0.25,
            write_timeout: Duration::from_secs(30),
            fanout: Transport::Postgres,
        }
    }
}
