//! The engine: frames in, rules and live view updated in-line, rows queued to the writer, commits signalled.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::batch::{self, Batch, BatchPolicy, CommitOrder, FrameMeta, Outcome, Queue, RateMeter};
use crate::catalog::{Catalog, EventEntry};
use crate::error::CoreError;
use crate::frame::{self, ParsedFrame, ParsedPoint, Reject};
use crate::pg::{self, PgClient};
use crate::rules::{self, Rule, RuleState};
use crate::stats::{Stats, StatsSnapshot};
use crate::writer::{self, Row, Writer, WriterStatus};

/// The NOTIFY channel the catalog tables' triggers announce changes on (sql/0004).
pub const CATALOG_CHANNEL: &str = "webmacs_catalog";

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
        }
    }
}

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

#[derive(Debug, Clone, Copy)]
struct Latest {
    value: f64,
    time_us: i64,
    experiment_id: Option<i32>,
}

struct IngestState {
    next_ticket: u64,
    queue: Queue,
    last_server_us: HashMap<i32, i64>,
    rule_states: HashMap<i32, RuleState>,
    reading_at: HashMap<i32, Instant>,
    broadcast_at: HashMap<i32, Instant>,
    latest: HashMap<i32, Latest>,
    firings: VecDeque<Firing>,
    live: VecDeque<LivePoint>,
}

struct Shared {
    config: EngineConfig,
    catalog: ArcSwap<Catalog>,
    state: Mutex<IngestState>,
    stats: Stats,
    committed: AtomicU64,
    writer_wake: Notify,
    /// Woken when a writer finishes a transaction (the filling writer may then close its batch).
    writer_free: Notify,
    /// Writers inside a transaction right now.
    writing: std::sync::atomic::AtomicUsize,
    writer_status: Arc<WriterStatus>,
    /// Held by the writer filling the next batch, so batches take the queue in order.
    fill: tokio::sync::Mutex<()>,
    commit_order: Mutex<CommitOrder>,
    closing: AtomicBool,
    abort: AtomicBool,
    shutdown: Notify,
    commit_signal: UnixStream,
    /// Woken after each commit, for waiters inside the runtime (the native listener's acks).
    commit_notify: Notify,
    /// One connection for catalog loads; the lock also serialises loads so a slow stale read never
    /// overwrites a newer snapshot.
    catalog_client: tokio::sync::Mutex<Option<PgClient>>,
}

pub fn unix_now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, IngestState> {
        // A panic while holding the lock would be a bug; the state stays usable (counters and caches).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn with_catalog_client<T>(
        &self,
        f: impl AsyncFnOnce(&mut PgClient) -> Result<T, CoreError>,
    ) -> Result<T, CoreError> {
        // Waiting for the lock counts against the deadline too: a stalled load must not queue callers forever.
        let started = tokio::time::Instant::now();
        let limit = pg::CONNECT_TIMEOUT + pg::QUERY_TIMEOUT;
        let mut guard = tokio::time::timeout(limit, self.catalog_client.lock())
            .await
            .map_err(|_| {
                CoreError::Database("catalog connection busy (database not answering)".into())
            })?;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(pg::connect(&self.config.dsn, "webmacs-ingest-catalog").await?);
        }
        // Set just above when missing.
        let client = guard.as_mut().expect("connected above");
        let res = match tokio::time::timeout_at(started + limit, f(client)).await {
            Ok(r) => r,
            Err(_) => Err(CoreError::Database(
                "catalog query: no answer from the database in time".into(),
            )),
        };
        if res.is_err() {
            // The connection may be dead without knowing it yet (server restart); start afresh next time.
            *guard = None;
        }
        res
    }

    async fn reload_catalog(&self) -> Result<(), CoreError> {
        let load = async |c: &mut PgClient| {
            let cat = Catalog::load(c).await?;
            self.catalog.store(Arc::new(cat));
            Ok(())
        };
        match self.with_catalog_client(load).await {
            // One retry on a fresh connection: a restart since the last load is the usual cause.
            Err(_) => self.with_catalog_client(load).await,
            ok => ok,
        }
    }

    /// (Re)load the latest value of the given events (all when `None`) from the table.
    async fn load_latest(&self, events: Option<Vec<i32>>) -> Result<(), CoreError> {
        let rows = self
            .with_catalog_client(async |c| {
                Ok(c.query(
                    "SELECT e.id, d.value, (EXTRACT(EPOCH FROM d.time) * 1000000)::int8, d.experiment_id
                     FROM events e CROSS JOIN LATERAL (
                        SELECT time, value, experiment_id FROM datapoints WHERE event_id = e.id
                        ORDER BY time DESC LIMIT 1) d
                     WHERE $1::int4[] IS NULL OR e.id = ANY($1)",
                    &[&events],
                )
                .await?)
            })
            .await?;
        let mut st = self.state();
        match &events {
            None => st.latest.clear(),
            Some(ids) => ids.iter().for_each(|id| {
                st.latest.remove(id);
            }),
        }
        for r in rows {
            st.latest.insert(
                r.try_get(0)?,
                Latest {
                    value: r.try_get(1)?,
                    time_us: r.try_get(2)?,
                    experiment_id: r.try_get(3)?,
                },
            );
        }
        Ok(())
    }

    fn signal_commit(&self) {
        // Non-blocking: a full pipe already holds a pending wake-up, which is all the reader needs.
        let _ = (&self.commit_signal).write(&[1]);
        self.commit_notify.notify_waiters();
    }
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
        });
        runtime.block_on(async {
            shared.reload_catalog().await?;
            shared.load_latest(None).await
        })?;
        let writer_tasks = (0..shared.config.writers)
            .map(|_| runtime.spawn(run_writer(shared.clone())))
            .collect();
        runtime.spawn(run_listener(shared.clone()));
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
        self.check_open()?;
        let s = &self.shared;
        s.stats.frames.fetch_add(1, Ordering::Relaxed);
        let parsed = frame::parse_frame(bytes, unix_now_us(), s.config.max_frame_bytes)
            .inspect_err(|_| {
                s.stats.frames_refused.fetch_add(1, Ordering::Relaxed);
            })?;
        self.ingest(parsed, strict, source)
    }

    fn check_open(&self) -> Result<(), CoreError> {
        if self.shared.closing.load(Ordering::Acquire) {
            Err(CoreError::Closed)
        } else {
            Ok(())
        }
    }

    fn ingest(&self, parsed: ParsedFrame, strict: bool, source: u64) -> Result<Receipt, CoreError> {
        let s = &self.shared;
        let ParsedFrame {
            points,
            mut rejects,
            total,
            has_datapoints,
            seq,
        } = parsed;
        let mut receipt = Receipt {
            total,
            has_datapoints,
            seq,
            ..Default::default()
        };
        if strict && rejects.iter().any(|r| r.1.is_shape_error()) {
            rejects.iter().for_each(|r| s.stats.reject(r.1));
            receipt.rejects = rejects;
            return Ok(receipt);
        }
        let catalog = s.catalog.load();
        let mut resolved: Vec<(usize, &EventEntry, ParsedPoint)> = Vec::with_capacity(points.len());
        for (i, p) in points {
            match catalog.events.get(p.event_public_id.as_ref()) {
                None => rejects.push((i, Reject::UnknownEvent)),
                Some(e) if !e.active => rejects.push((i, Reject::InactiveEvent)),
                Some(e) => resolved.push((i, e, p)),
            }
        }
        rejects.sort_unstable_by_key(|r| r.0);

        let now = Instant::now();
        let now_us = unix_now_us();
        let cfg = &s.config;
        let mut st = s.state();
        if !resolved.is_empty() {
            if let Err(full) = st.queue.admits(source, resolved.len()) {
                s.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                if full.share {
                    s.stats.queue_full_share.fetch_add(1, Ordering::Relaxed);
                }
                return Err(CoreError::QueueFull {
                    depth: full.depth,
                    capacity: full.capacity,
                    share: full.share,
                });
            }
        }
        rejects.iter().for_each(|r| s.stats.reject(r.1));
        receipt.accepted = resolved.len();
        receipt.rejects = rejects;
        if resolved.is_empty() {
            // Nothing of ours to wait for, but acks stay in order behind earlier frames.
            receipt.ticket = st.next_ticket - 1;
            return Ok(receipt);
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        receipt.ticket = ticket;
        let experiment_id = catalog.running_experiment;
        let experiment_public_id = catalog.experiment_public_id(experiment_id);
        let mut live_pass: HashMap<i32, bool> = HashMap::new();
        // Row i of the frame's queued rows came from entry indices[i] (None: rows are entries 0, 1, 2, …).
        let identity = resolved.iter().enumerate().all(|(n, r)| r.0 == n);
        let indices = (!identity).then(|| resolved.iter().map(|r| r.0 as u32).collect());
        let mut rows = Vec::with_capacity(resolved.len());
        let st = &mut *st;
        for (_, e, p) in resolved {
            let time_us = p.time_us.unwrap_or_else(|| {
                next_server_time(st.last_server_us.entry(e.id).or_insert(i64::MIN), now_us)
            });
            for rule in &e.rules {
                let state = st.rule_states.entry(rule.id).or_default();
                if rules::evaluate(rule, state, p.value, now) {
                    push_bounded(
                        &mut st.firings,
                        cfg.buffer_capacity,
                        &s.stats,
                        Firing::Rule {
                            rule: rule.clone(),
                            event_public_id: e.public_id.clone(),
                            value: p.value,
                            time_us,
                        },
                    );
                }
            }
            if st
                .reading_at
                .get(&e.id)
                .is_none_or(|t| now.duration_since(*t) >= cfg.reading_interval)
            {
                st.reading_at.insert(e.id, now);
                push_bounded(
                    &mut st.firings,
                    cfg.buffer_capacity,
                    &s.stats,
                    Firing::Reading {
                        event_public_id: e.public_id.clone(),
                        value: p.value,
                        time_us,
                    },
                );
            }
            let pass = *live_pass.entry(e.id).or_insert_with(|| {
                let due = st
                    .broadcast_at
                    .get(&e.id)
                    .is_none_or(|t| now.duration_since(*t) >= cfg.broadcast_interval);
                if due {
                    st.broadcast_at.insert(e.id, now);
                }
                due
            });
            if pass {
                push_bounded(
                    &mut st.live,
                    cfg.buffer_capacity,
                    &s.stats,
                    LivePoint {
                        event_public_id: e.public_id.clone(),
                        value: p.value,
                        time_us,
                        experiment_public_id: experiment_public_id.clone(),
                    },
                );
            }
            let latest = Latest {
                value: p.value,
                time_us,
                experiment_id,
            };
            st.latest
                .entry(e.id)
                .and_modify(|l| {
                    if time_us >= l.time_us {
                        *l = latest
                    }
                })
                .or_insert(latest);
            rows.push(Row {
                time_us,
                event_id: e.id,
                experiment_id,
                value: p.value,
            });
        }
        let meta = Arc::new(FrameMeta {
            ticket,
            source,
            indices,
            outcome: receipt.outcome.clone(),
        });
        st.queue.push(meta, rows, now);
        s.stats
            .accepted
            .fetch_add(receipt.accepted as u64, Ordering::Relaxed);
        s.stats
            .queue_depth
            .store(st.queue.depth() as u64, Ordering::Relaxed);
        s.writer_wake.notify_one();
        Ok(receipt)
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
        self.handle.block_on(self.shared.load_latest(ids))
    }

    pub fn drain_firings(&self) -> Vec<Firing> {
        self.shared.state().firings.drain(..).collect()
    }

    pub fn drain_live(&self) -> Vec<LivePoint> {
        self.shared.state().live.drain(..).collect()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
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

/// Server time for one event: the clock, but strictly after the event's previous server time, so two values
/// of one event in one batch (or a clock step back) never collide on the unique key.
pub fn next_server_time(prev: &mut i64, now_us: i64) -> i64 {
    *prev = now_us.max(prev.saturating_add(1));
    *prev
}

fn push_bounded<T>(buf: &mut VecDeque<T>, cap: usize, stats: &Stats, item: T) {
    if buf.len() >= cap {
        buf.pop_front();
        stats.broadcast_dropped.fetch_add(1, Ordering::Relaxed);
    }
    buf.push_back(item);
}

/// One writer: take the right to fill, fill the next batch from the queue in order, hand the right on, write
/// the batch in one transaction, then release the tickets it completed (in batch order, see `CommitOrder`).
///
/// Batches close adaptively (`batch::should_close`): at once when the engine is idle, larger as the load grows,
/// and a second writer joins only when one cannot keep up.
async fn run_writer(shared: Arc<Shared>) {
    let policy = shared.config.policy;
    let mut writer = Writer::new(
        &shared.config.dsn,
        shared.config.write_timeout,
        shared.writer_status.clone(),
    );
    let (mut retries, mut reconnects) = (0, 0);
    // Shared by whichever writer fills next would be better; per writer it converges within its window.
    let mut meter = RateMeter::new(Duration::from_millis(200));
    loop {
        let mut batch = Batch::default();
        let fill = shared.fill.lock().await;
        loop {
            // Registered before looking, so a writer finishing in between still wakes us.
            let freed = shared.writer_free.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let (full, pushed) = {
                let mut st = shared.state();
                let full = st.queue.fill(&mut batch, &policy);
                shared
                    .stats
                    .queue_depth
                    .store(st.queue.depth() as u64, Ordering::Relaxed);
                (full, st.queue.pushed())
            };
            let now = Instant::now();
            let rate = meter.observe(now, pushed);
            let closing = shared.closing.load(Ordering::Acquire);
            if batch.rows.is_empty() {
                if closing {
                    // Wake the next writer waiting to fill: it sees the same and stops too.
                    shared.writer_wake.notify_one();
                    return;
                }
                shared.writer_wake.notified().await;
                continue;
            }
            let busy = shared.writing.load(Ordering::Acquire) > 0;
            if full || closing || batch::should_close(&batch.size, &policy, now, busy, rate) {
                break;
            }
            let due = batch::close_due(&batch.size, &policy, busy).unwrap_or(now);
            tokio::select! {
                _ = shared.writer_wake.notified() => {}
                _ = &mut freed => {}
                _ = tokio::time::sleep_until(due.into()) => {}
            }
        }
        let seq = shared
            .commit_order
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open(batch.size.opened_at);
        shared.writing.fetch_add(1, Ordering::AcqRel);
        drop(fill);
        // Rows may be left for the next writer, which may be waiting for a wake-up that was consumed here.
        shared.writer_wake.notify_one();
        let started = Instant::now();
        let res = writer
            .write(&batch.rows, || shared.abort.load(Ordering::Acquire))
            .await;
        shared.writing.fetch_sub(1, Ordering::AcqRel);
        shared.writer_free.notify_waiters();
        let stats = &shared.stats;
        stats
            .retries
            .fetch_add(writer.retries - retries, Ordering::Relaxed);
        stats
            .reconnects
            .fetch_add(writer.reconnects - reconnects, Ordering::Relaxed);
        (retries, reconnects) = (writer.retries, writer.reconnects);
        let written = match res {
            Ok(w) => w,
            // Only when closing with a dead database: nothing of this batch was acknowledged.
            Err(_) => return,
        };
        stats.written.fetch_add(written.inserted, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(written.duplicates, Ordering::Relaxed);
        stats
            .bisections
            .fetch_add(written.bisections, Ordering::Relaxed);
        stats.flushed(writer::elapsed_us(started));
        if !written.refused.is_empty() {
            refuse_rows(&shared, &batch, &written.refused);
        }
        let released = shared
            .commit_order
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .commit(seq, batch.done_ticket);
        if let Some(t) = released {
            shared.committed.fetch_max(t, Ordering::AcqRel);
        }
        shared.signal_commit();
    }
}

/// Report rows the database refused to their frames (before the frames' tickets are released), count them,
/// and re-read "latest" for their events: the cache took their values when they were accepted.
fn refuse_rows(
    shared: &Arc<Shared>,
    batch: &Batch,
    refused: &[(usize, Arc<crate::batch::Refusal>)],
) {
    let mut events = Vec::with_capacity(refused.len());
    for (row, why) in refused {
        if let Some((meta, index)) = batch.locate(*row) {
            meta.outcome.refuse(index, why.clone());
        }
        shared.stats.reject(Reject::DatabaseRefused);
        events.push(batch.rows[*row].event_id);
    }
    events.sort_unstable();
    events.dedup();
    let s = shared.clone();
    tokio::spawn(async move {
        let _ = s.load_latest(Some(events)).await;
    });
}

/// How often the LISTEN connection proves it is alive: notifications sent to a connection that silently
/// stopped (a partition behind a proxy) would be lost, so a probe that fails in time reconnects it.
const LISTEN_PROBE: Duration = Duration::from_secs(15);

/// LISTEN for catalog changes made by any process; reload on each (coalesced) notification, and after
/// every reconnect, since notifications sent while disconnected are lost.
async fn run_listener(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if shared.closing.load(Ordering::Acquire) {
            return;
        }
        let connected = async {
            let config = pg::config(&shared.config.dsn, "webmacs-ingest-listen")?;
            tokio::time::timeout(pg::CONNECT_TIMEOUT, config.connect(NoTls))
                .await
                .map_err(|_| CoreError::Database("connect timed out".into()))?
                .map_err(CoreError::from)
        }
        .await;
        let (client, mut conn) = match connected {
            Ok(c) => c,
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.shutdown.notified() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(Ok(msg)) = messages.next().await {
                if let AsyncMessage::Notification(_) = msg {
                    let _ = tx.send(());
                }
            }
        });
        let listening = pg::deadline(
            pg::QUERY_TIMEOUT,
            "LISTEN",
            client.batch_execute(&format!("LISTEN {CATALOG_CHANNEL}")),
        )
        .await;
        if listening.is_ok() {
            backoff = Duration::from_millis(100);
            let _ = shared.reload_catalog().await;
            let mut probe = tokio::time::interval(LISTEN_PROBE);
            probe.tick().await;
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(()) => {
                            while rx.try_recv().is_ok() {}
                            if shared.reload_catalog().await.is_err() {
                                // Retry once the catalog connection is back; a later NOTIFY may never come.
                                tokio::time::sleep(backoff).await;
                                let _ = shared.reload_catalog().await;
                            }
                        }
                        None => break,
                    },
                    _ = probe.tick() => {
                        if pg::deadline(pg::QUERY_TIMEOUT, "probe", client.simple_query("")).await.is_err() {
                            break;
                        }
                    }
                    _ = shared.shutdown.notified() => { driver.abort(); return; }
                }
            }
        }
        driver.abort();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shared.shutdown.notified() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_time_is_strictly_increasing_per_event() {
        let mut prev = i64::MIN;
        let t = 1_000_000;
        assert_eq!(next_server_time(&mut prev, t), t);
        assert_eq!(next_server_time(&mut prev, t), t + 1);
        assert_eq!(next_server_time(&mut prev, t), t + 2);
        // The clock stepping back does not reuse a timestamp; a later clock wins again.
        assert_eq!(next_server_time(&mut prev, t - 50), t + 3);
        assert_eq!(next_server_time(&mut prev, t + 100), t + 100);
    }
}
