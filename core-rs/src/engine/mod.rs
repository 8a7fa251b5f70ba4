//! The engine: frames in, rules and live view updated in-line, rows queued to the writers, commits signalled.
//!
//! `ingest` runs the pipeline of one frame, `writing` the writer tasks, `listen` the catalog's LISTEN task,
//! `state` holds what they share; this module is the engine's API.

mod config;
mod ingest;
mod listen;
mod live;
mod state;
mod writing;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub use config::EngineConfig;
pub use ingest::{next_server_time, next_server_time_in_lane, LANES};
pub use listen::CATALOG_CHANNEL;
use state::{IngestState, Shared};

use crate::batch::{CommitOrder, Outcome, Queue};
use crate::catalog::Catalog;
use crate::error::CoreError;
use crate::frame::{self, ParsedFrame, ParsedPoint, Reject};
use crate::lineproto::LineBatch;
use crate::rules::Rule;
use crate::stats::Protocol;
use crate::stats::{Stats, StatsSnapshot};

/// What happened to one frame.
#[derive(Debug, Clone, Default)]
pub struct Receipt {
    pub accepted: usize,
    /// Rejected entries: index in the frame and reason, in index order.
    pub rejects: Vec<(usize, Reject)>,
    pub total: usize,
    pub has_datapoints: bool,
    pub seq: Option<u64>,
    /// Wait until `committed_ticket() >= ticket` before acknowledging: then every accepted row is durable.
    pub ticket: u64,
    /// Rows the database refused when they were written; complete once the ticket is committed.
    pub outcome: Arc<Outcome>,
}

/// What `/health` and the readiness probe report of the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    /// Rows waiting for a writer.
    pub queue_depth: usize,
    /// Age of the oldest accepted row not yet acknowledged (queued, or in a batch not yet durable).
    pub oldest_unacked: Option<Duration>,
    /// How long a writer has been failing to write, and the last fault seen (kept after recovery).
    pub writer_failing: Option<Duration>,
    pub last_error: Option<String>,
    /// Batches being written or waiting for an earlier one to commit.
    pub batches_in_flight: usize,
    pub closing: bool,
}

/// Something Python must act on after a commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Firing {
    Rule {
        rule: Arc<Rule>,
        event_public_id: Arc<str>,
        value: f64,
        time_us: i64,
    },
    /// A throttled `sensor.reading` webhook (spec §9).
    Reading {
        event_public_id: Arc<str>,
        value: f64,
        time_us: i64,
    },
}

/// One datapoint for the live stream.
#[derive(Debug, Clone, PartialEq)]
pub struct LivePoint {
    pub event_public_id: Arc<str>,
    pub value: f64,
    pub time_us: i64,
    pub experiment_public_id: Option<Arc<str>>,
}

pub fn unix_now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The ingestion engine. Thread-safe; every method may be called from any thread.
pub struct Engine {
    shared: Arc<Shared>,
    handle: Handle,
    runtime: Mutex<Option<Runtime>>,
    writer_tasks: Mutex<Vec<JoinHandle<()>>>,
    commit_fd: UnixStream,
}

impl Engine {
    /// Connect, load the catalog and the latest values, and start the writer and the catalog listener.
    pub fn start(config: EngineConfig) -> Result<Engine, CoreError> {
        if config.queue_capacity == 0 || config.max_frame_bytes == 0 || config.writers == 0 {
            return Err(CoreError::Config(
                "queue_capacity, max_frame_bytes and writers must be positive".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("webmacs-engine")
            .enable_all()
            .build()
            .map_err(|e| CoreError::Config(format!("cannot start the engine runtime: {e}")))?;
        let io =
            |e: std::io::Error| CoreError::Config(format!("cannot create the commit pipe: {e}"));
        let (reader, signal) = UnixStream::pair().map_err(io)?;
        reader.set_nonblocking(true).map_err(io)?;
        signal.set_nonblocking(true).map_err(io)?;
        if config.write_timeout.is_zero() {
            return Err(CoreError::Config("write_timeout must be positive".into()));
        }
        let queue = Queue::new(config.queue_capacity, config.source_share)?;
        let config_dsn = config.dsn.clone();
        let shared = Arc::new(Shared {
            config,
            catalog: ArcSwap::from_pointee(Catalog::default()),
            state: Mutex::new(IngestState {
                next_ticket: 1,
                queue,
                last_server_us: HashMap::new(),
                rule_states: HashMap::new(),
                reading_at: HashMap::new(),
                broadcast_at: HashMap::new(),
                latest: HashMap::new(),
                dirty_latest: Default::default(),
                firings: VecDeque::new(),
                live: VecDeque::new(),
            }),
            stats: Stats::default(),
            committed: AtomicU64::new(0),
            writer_wake: Notify::new(),
            writer_free: Notify::new(),
            writing: std::sync::atomic::AtomicUsize::new(0),
            writer_status: Arc::default(),
            fill: tokio::sync::Mutex::new(()),
            commit_order: Mutex::new(CommitOrder::default()),
            closing: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            shutdown: Notify::new(),
            commit_signal: signal,
            commit_notify: Notify::new(),
            catalog_client: tokio::sync::Mutex::new(None),
            live_tx: tokio::sync::broadcast::channel(1024).0,
            fanout: Mutex::new(None),
            lane: runtime.block_on(lane_of(&config_dsn)),
        });
        runtime.block_on(async {
            shared.reload_catalog().await?;
            shared.load_latest(None).await
        })?;
        let writer_tasks = (0..shared.config.writers)
            .map(|_| runtime.spawn(writing::run_writer(shared.clone())))
            .collect();
        runtime.spawn(listen::run_listener(shared.clone()));
        {
            let _entered = runtime.enter();
            live::start(shared.clone());
        }
        Ok(Engine {
            handle: runtime.handle().clone(),
            shared,
            runtime: Mutex::new(Some(runtime)),
            writer_tasks: Mutex::new(writer_tasks),
            commit_fd: reader,
        })
    }

    /// The read end of the commit pipe: readable after each commit. Drain it, then read `committed_ticket`.
    pub fn commit_fd(&self) -> RawFd {
        self.commit_fd.as_raw_fd()
    }

    pub fn committed_ticket(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// The engine's runtime, for tasks that live as long as the engine (the native listener).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Return once `committed_ticket() >= ticket` (true), or false at `deadline` or when the engine closes
    /// with the ticket unwritten (from inside the runtime).
    pub async fn wait_committed(&self, ticket: u64, deadline: tokio::time::Instant) -> bool {
        loop {
            let notified = self.shared.commit_notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a commit between the check and the await is not missed.
            notified.as_mut().enable();
            if self.committed_ticket() >= ticket {
                return true;
            }
            if self.shared.abort.load(Ordering::Acquire) || tokio::time::Instant::now() >= deadline
            {
                return false;
            }
            // Bounded, as a backstop against a missed wake-up.
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_millis(200));
            let _ = tokio::time::timeout_at(wake, notified).await;
        }
    }

    /// Wait for the next commit (room in the queue), at most `timeout`.
    pub async fn next_commit(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.commit_notify.notified()).await;
    }

    /// Parse, validate and queue a frame from `source` (a connection or a token: the unit of fair queue
    /// shares). `strict` (REST): any malformed entry refuses the whole frame.
    pub fn submit(&self, bytes: &[u8], strict: bool, source: u64) -> Result<Receipt, CoreError> {
        self.submit_as(bytes, strict, source, None)
    }

    /// `submit` for a sender bound to one plugin instance (`instance`): points for events not mapped to it
    /// are rejected (`not_permitted`).
    pub fn submit_as(
        &self,
        bytes: &[u8],
        strict: bool,
        source: u64,
        instance: Option<i32>,
    ) -> Result<Receipt, CoreError> {
        self.check_open()?;
        let s = &self.shared;
        s.stats.frames.fetch_add(1, Ordering::Relaxed);
        let parsed = frame::parse_frame(bytes, unix_now_us(), s.config.max_frame_bytes)
            .inspect_err(|_| {
                s.stats.frames_refused.fetch_add(1, Ordering::Relaxed);
            })?;
        self.shared.ingest(
            parsed,
            strict,
            source,
            instance,
            Protocol::of_source(source),
        )
    }

    /// Queue points `range` of a parsed line-protocol body. `events[s]` is the event public id of series `s`
    /// (None: no such event, the points are rejected as `unknown_event`). `with_rejects`: count the body's
    /// parse-time rejects (string fields, timestamps) with this call — once per body. The receipt's indices
    /// are positions within `range`.
    pub fn submit_lines(
        &self,
        batch: &LineBatch,
        events: &[Option<String>],
        range: std::ops::Range<usize>,
        with_rejects: bool,
        source: u64,
        instance: Option<i32>,
    ) -> Result<Receipt, CoreError> {
        self.check_open()?;
        let s = &self.shared;
        s.stats.frames.fetch_add(1, Ordering::Relaxed);
        let slice = batch.points.get(range).unwrap_or(&[]);
        let mut parsed = ParsedFrame {
            total: slice.len(),
            has_datapoints: true,
            ..Default::default()
        };
        parsed.points.reserve(slice.len());
        for (i, p) in slice.iter().enumerate() {
            let event = usize::try_from(p.series)
                .ok()
                .and_then(|s| events.get(s))
                .and_then(|e| e.as_deref());
            match event {
                Some(e) => parsed.points.push((
                    i,
                    ParsedPoint {
                        event_public_id: Cow::Borrowed(e),
                        value: p.value,
                        time_us: p.time_us,
                    },
                )),
                None => parsed.rejects.push((i, Reject::UnknownEvent)),
            }
        }
        if with_rejects {
            batch.rejects.iter().for_each(|r| s.stats.reject(r.1));
        }
        self.shared
            .ingest(parsed, false, source, instance, Protocol::LineProtocol)
    }

    fn check_open(&self) -> Result<(), CoreError> {
        if self.shared.closing.load(Ordering::Acquire) {
            Err(CoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// Re-read the catalog now (after this process changed it; other processes' changes arrive by NOTIFY).
    pub fn refresh_catalog(&self) -> Result<(), CoreError> {
        // After close the runtime is gone; blocking on it would panic.
        self.check_open()?;
        self.handle.block_on(self.shared.reload_catalog())
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.shared.catalog.load_full()
    }

    /// Latest value per known event.
    pub fn latest(&self) -> Vec<LivePoint> {
        let catalog = self.shared.catalog.load();
        let st = self.shared.state();
        st.latest
            .iter()
            .filter_map(|(id, l)| {
                Some(LivePoint {
                    event_public_id: catalog.event_public_ids.get(id)?.clone(),
                    value: l.value,
                    time_us: l.time_us,
                    experiment_public_id: catalog.experiment_public_id(l.experiment_id),
                })
            })
            .collect()
    }

    /// Re-read latest values from the table after datapoints were deleted outside the engine (all events
    /// when `None`). Rows still queued for the writer are not in the table yet; their event's next value
    /// corrects the cache.
    pub fn reload_latest(&self, event_public_ids: Option<Vec<String>>) -> Result<(), CoreError> {
        self.check_open()?;
        let ids = event_public_ids.map(|ids| {
            let catalog = self.shared.catalog.load();
            ids.iter()
                .filter_map(|p| catalog.events.get(p.as_str()).map(|e| e.id))
                .collect::<Vec<i32>>()
        });
        if let Some(f) = self
            .shared
            .fanout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            // The other processes' caches hold the deleted values too.
            f.publish(crate::fanout::Message {
                origin: f.origin,
                reload: Some(ids.clone().unwrap_or_default()),
                ..Default::default()
            });
        }
        self.handle.block_on(self.shared.load_latest(ids))
    }

    pub fn drain_firings(&self) -> Vec<Firing> {
        self.shared.state().firings.drain(..).collect()
    }

    /// Live points after each commit: this process's (throttled per event) and, with fan-out, the other
    /// processes'. A receiver that falls behind misses batches (`Lagged`), never holds up the engine.
    pub fn live_receiver(&self) -> tokio::sync::broadcast::Receiver<Arc<Vec<LivePoint>>> {
        self.shared.live_tx.subscribe()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// The live counters, for protocol adapters that keep their own (MQTT).
    pub fn counters(&self) -> &Stats {
        &self.shared.stats
    }

    /// The engine's state for `/health`: backlog, the oldest un-acknowledged row, writer faults.
    pub fn health(&self) -> Health {
        let s = &self.shared;
        let (queue_depth, queued_oldest) = {
            let st = s.state();
            (st.queue.depth(), st.queue.oldest())
        };
        let (in_flight_oldest, batches_in_flight) = {
            let o = s.commit_order.lock().unwrap_or_else(|p| p.into_inner());
            (o.oldest(), o.in_flight())
        };
        let oldest = match (queued_oldest, in_flight_oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (writer_failing, last_error) = s.writer_status.snapshot();
        Health {
            queue_depth,
            oldest_unacked: oldest.map(|t| t.elapsed()),
            writer_failing,
            last_error,
            batches_in_flight,
            closing: s.closing.load(Ordering::Acquire),
        }
    }

    /// Stop taking data, write everything queued (waiting at most `timeout` for the database), stop.
    /// Returns the number of rows that could not be written (never acknowledged to anyone).
    pub fn close(&self, timeout: Duration) -> usize {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.writer_wake.notify_one();
        let tasks =
            std::mem::take(&mut *self.writer_tasks.lock().unwrap_or_else(|p| p.into_inner()));
        if !tasks.is_empty() {
            let shared = self.shared.clone();
            self.handle.block_on(async move {
                let deadline = tokio::time::Instant::now() + timeout;
                for mut task in tasks {
                    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                        shared.abort.store(true, Ordering::Release);
                        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
                    }
                }
            });
        }
        self.shared.shutdown.notify_waiters();
        let left = self.shared.state().queue.depth();
        if let Some(rt) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        left
    }
}

/// This engine's lane of server time: the next value of a database sequence (sql/0025), so concurrently
/// running engines get different lanes; 0 when the sequence is not there (a database without migrations).
async fn lane_of(dsn: &str) -> i64 {
    let Ok(client) = crate::pg::connect(dsn, "webmacs-ingest-lane").await else {
        return 0;
    };
    let row = crate::pg::deadline(
        crate::pg::QUERY_TIMEOUT,
        "lane",
        client.query_opt(
            "SELECT nextval('webmacs_engine_lane') WHERE to_regclass('webmacs_engine_lane') IS NOT NULL",
            &[],
        ),
    )
    .await;
    match row {
        Ok(Some(r)) => r
            .try_get::<_, i64>(0)
            .map_or(0, |n| n.rem_euclid(ingest::LANES)),
        _ => 0,
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(rt) = self
            .runtime
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }
}
