//! What the engine's tasks share: the catalog snapshot, the ingest state behind one lock, the commit order,
//! and the connection catalog loads and "latest" reloads use.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use super::{EngineConfig, Firing, LivePoint};
use crate::batch::{CommitOrder, Queue};
use crate::catalog::Catalog;
use crate::error::CoreError;
use crate::pg::{self, PgClient};
use crate::rules::RuleState;
use crate::stats::Stats;
use crate::writer::WriterStatus;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Latest {
    pub(crate) value: f64,
    pub(crate) time_us: i64,
    pub(crate) experiment_id: Option<i32>,
}

pub(crate) struct IngestState {
    pub(crate) next_ticket: u64,
    pub(crate) queue: Queue,
    pub(crate) last_server_us: HashMap<i32, i64>,
    pub(crate) rule_states: HashMap<i32, RuleState>,
    pub(crate) reading_at: HashMap<i32, Instant>,
    pub(crate) broadcast_at: HashMap<i32, Instant>,
    pub(crate) latest: HashMap<i32, Latest>,
    /// Events whose latest value changed here since the last fan-out.
    pub(crate) dirty_latest: std::collections::HashSet<i32>,
    pub(crate) firings: VecDeque<Firing>,
    pub(crate) live: VecDeque<LivePoint>,
}

pub(crate) struct Shared {
    pub(crate) config: EngineConfig,
    pub(crate) catalog: ArcSwap<Catalog>,
    pub(crate) state: Mutex<IngestState>,
    pub(crate) stats: Stats,
    pub(crate) committed: AtomicU64,
    pub(crate) writer_wake: Notify,
    /// Woken when a writer finishes a transaction (the filling writer may then close its batch).
    pub(crate) writer_free: Notify,
    /// Writers inside a transaction right now.
    pub(crate) writing: AtomicUsize,
    pub(crate) writer_status: Arc<WriterStatus>,
    /// Held by the writer filling the next batch, so batches take the queue in order.
    pub(crate) fill: tokio::sync::Mutex<()>,
    pub(crate) commit_order: Mutex<CommitOrder>,
    pub(crate) closing: AtomicBool,
    pub(crate) abort: AtomicBool,
    pub(crate) shutdown: Notify,
    pub(crate) commit_signal: UnixStream,
    /// Woken after each commit, for waiters inside the runtime (the native listener's acks).
    pub(crate) commit_notify: Notify,
    /// One connection for catalog loads; the lock also serialises loads so a slow stale read never
    /// overwrites a newer snapshot.
    pub(crate) catalog_client: tokio::sync::Mutex<Option<PgClient>>,
    /// Live points for this process's stream subscribers (its own and other processes'), after commits.
    pub(crate) live_tx: tokio::sync::broadcast::Sender<Arc<Vec<LivePoint>>>,
    /// The transport to the other server processes (None: alone, or fan-out off).
    pub(crate) fanout: Mutex<Option<crate::fanout::Fanout>>,
    /// This engine's lane of server time (`ingest::LANES`), from a database sequence at start.
    pub(crate) lane: i64,
}

impl Shared {
    pub(crate) fn state(&self) -> MutexGuard<'_, IngestState> {
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

    pub(crate) async fn reload_catalog(&self) -> Result<(), CoreError> {
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
    pub(crate) async fn load_latest(&self, events: Option<Vec<i32>>) -> Result<(), CoreError> {
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

    pub(crate) fn signal_commit(&self) {
        // Non-blocking: a full pipe already holds a pending wake-up, which is all the reader needs.
        let _ = (&self.commit_signal).write(&[1]);
        self.commit_notify.notify_waiters();
    }
}
