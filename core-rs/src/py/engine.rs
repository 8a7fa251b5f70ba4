//! Bindings for the ingestion engine (`crate::engine`): `Engine` and the `Receipt` of one frame.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use super::detached;
use crate::batch::BatchPolicy;
use crate::engine::{self, EngineConfig, Firing};
use crate::error::CoreError;
use crate::frame::Reject;
use crate::listener::Listener;

/// What happened to one submitted frame.
#[pyclass(frozen, module = "webmacs._core")]
pub struct Receipt {
    #[pyo3(get)]
    accepted: usize,
    #[pyo3(get)]
    total: usize,
    #[pyo3(get)]
    has_datapoints: bool,
    #[pyo3(get)]
    seq: Option<u64>,
    #[pyo3(get)]
    ticket: u64,
    rejects: Vec<(usize, Reject)>,
}

#[pymethods]
impl Receipt {
    /// Number of entries not accepted.
    #[getter]
    fn rejected(&self) -> usize {
        self.rejects.len()
    }

    /// Rejected entries per reason code.
    #[getter]
    fn reasons<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (_, r) in &self.rejects {
            let n: usize = d
                .get_item(r.code())?
                .map(|v| v.extract())
                .transpose()?
                .unwrap_or(0);
            d.set_item(r.code(), n + 1)?;
        }
        Ok(d)
    }

    /// Rejected entries as (index in the frame, reason code), in index order.
    #[getter]
    fn rejects(&self) -> Vec<(usize, &'static str)> {
        self.rejects.iter().map(|(i, r)| (*i, r.code())).collect()
    }

    fn __repr__(&self) -> String {
        format!(
            "Receipt(accepted={}, rejected={}, total={}, seq={:?}, ticket={})",
            self.accepted,
            self.rejects.len(),
            self.total,
            self.seq,
            self.ticket
        )
    }
}

impl From<engine::Receipt> for Receipt {
    fn from(r: engine::Receipt) -> Self {
        Receipt {
            accepted: r.accepted,
            total: r.total,
            has_datapoints: r.has_datapoints,
            seq: r.seq,
            ticket: r.ticket,
            rejects: r.rejects,
        }
    }
}

type LiveTuple = (String, f64, i64, Option<String>);

fn live_tuple(p: engine::LivePoint) -> LiveTuple {
    (
        p.event_public_id.to_string(),
        p.value,
        p.time_us,
        p.experiment_public_id.map(|x| x.to_string()),
    )
}

/// The ingestion engine: validates frames, evaluates rules, batches and COPYs into `datapoints`.
///
/// It never calls into Python: commits are signalled on `commit_fd()` (a socket that becomes readable),
/// after which `committed_ticket()` tells which receipts are durable.
#[pyclass(frozen, module = "webmacs._core")]
pub struct Engine {
    inner: Arc<engine::Engine>,
    /// The native telemetry listener, when started.
    listener: Mutex<Option<Listener>>,
}

impl Engine {
    fn stop_listener(&self) {
        if let Some(l) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            l.stop();
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (dsn, *, max_rows=20_000, max_bytes=4_194_304, max_age_ms=5, queue_capacity=200_000,
        max_frame_bytes=4_194_304, reading_interval_s=5.0, broadcast_interval_s=0.2, writers=2))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        dsn: String,
        max_rows: usize,
        max_bytes: usize,
        max_age_ms: u64,
        queue_capacity: usize,
        max_frame_bytes: usize,
        reading_interval_s: f64,
        broadcast_interval_s: f64,
        writers: usize,
    ) -> PyResult<Self> {
        let secs = |s: f64| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| CoreError::Config(format!("invalid interval {s}")))
        };
        let mut config = EngineConfig::new(&dsn);
        config.policy = BatchPolicy::new(max_rows, max_bytes, Duration::from_millis(max_age_ms))?;
        config.queue_capacity = queue_capacity;
        config.max_frame_bytes = max_frame_bytes;
        config.reading_interval = secs(reading_interval_s)?;
        config.broadcast_interval = secs(broadcast_interval_s)?;
        config.writers = writers;
        let inner = detached(py, || engine::Engine::start(config))?;
        Ok(Engine {
            inner: Arc::new(inner),
            listener: Mutex::new(None),
        })
    }

    /// Parse, validate and queue one frame (GIL released). `strict`: a malformed entry refuses the frame.
    #[pyo3(signature = (frame, strict=false))]
    fn submit(&self, py: Python<'_>, frame: PyBackedBytes, strict: bool) -> PyResult<Receipt> {
        Ok(detached(py, || self.inner.submit(&frame, strict))?.into())
    }

    /// Queue decoded points `(event_public_id, value, client_time_us | None)`.
    fn submit_points(
        &self,
        py: Python<'_>,
        points: Vec<(String, f64, Option<i64>)>,
    ) -> PyResult<Receipt> {
        Ok(detached(py, || self.inner.submit_points(points))?.into())
    }

    /// Serve `/ws/controller/telemetry` natively on `address` ("host:port"; port 0 picks one), verifying JWTs
    /// with `secret_key`/`algorithm`. Returns the bound "host:port". Replaces a running listener.
    #[pyo3(signature = (address, *, secret_key, algorithm="HS256"))]
    fn listen(
        &self,
        py: Python<'_>,
        address: &str,
        secret_key: &str,
        algorithm: &str,
    ) -> PyResult<String> {
        let key = crate::auth::JwtKey::new(secret_key, algorithm)?;
        self.stop_listener();
        let listener = detached(py, || Listener::start(self.inner.clone(), address, key))?;
        let bound = listener.local_addr().to_string();
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
        Ok(bound)
    }

    /// Stop the native listener (open connections are closed with 1001); no-op when not listening.
    fn stop_listening(&self) {
        self.stop_listener();
    }

    /// File descriptor that becomes readable after each commit; read and discard its bytes.
    fn commit_fd(&self) -> i32 {
        self.inner.commit_fd()
    }

    /// Every receipt whose ticket is <= this number is committed.
    fn committed_ticket(&self) -> u64 {
        self.inner.committed_ticket()
    }

    /// Re-read events, mappings, experiments and rules now (blocking, GIL released).
    fn refresh_catalog(&self, py: Python<'_>) -> PyResult<()> {
        Ok(detached(py, || self.inner.refresh_catalog())?)
    }

    /// Latest value per event: (event_public_id, value, time µs since the Unix epoch, experiment_public_id).
    fn latest(&self, py: Python<'_>) -> Vec<LiveTuple> {
        detached(py, || {
            self.inner.latest().into_iter().map(live_tuple).collect()
        })
    }

    /// Re-read the latest values of these events (all when None) after datapoints were deleted (blocking).
    #[pyo3(signature = (event_public_ids=None))]
    fn reload_latest(&self, py: Python<'_>, event_public_ids: Option<Vec<String>>) -> PyResult<()> {
        Ok(detached(py, || self.inner.reload_latest(event_public_ids))?)
    }

    /// Whether an event exists and accepts data: None (unknown), False (not mapped to an enabled plugin), True.
    fn event_state(&self, event_public_id: &str) -> Option<bool> {
        self.inner
            .catalog()
            .events
            .get(event_public_id)
            .map(|e| e.active)
    }

    /// Rule firings and throttled sensor readings queued since the last call, as dicts (`kind` = "rule" | "reading").
    fn drain_firings<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let firings = detached(py, || self.inner.drain_firings());
        firings
            .into_iter()
            .map(|f| {
                let d = PyDict::new(py);
                match f {
                    Firing::Rule {
                        rule,
                        event_public_id,
                        value,
                        time_us,
                    } => {
                        d.set_item("kind", "rule")?;
                        d.set_item("rule_id", rule.id)?;
                        d.set_item("rule", &rule.name)?;
                        d.set_item("operator", rule.op.as_str())?;
                        d.set_item("threshold", rule.threshold)?;
                        d.set_item("threshold_high", rule.threshold_high)?;
                        d.set_item("action_type", &rule.action_type)?;
                        d.set_item("webhook_event_type", rule.webhook_event_type.as_deref())?;
                        d.set_item("sensor", &*event_public_id)?;
                        d.set_item("value", value)?;
                        d.set_item("time_us", time_us)?;
                    }
                    Firing::Reading {
                        event_public_id,
                        value,
                        time_us,
                    } => {
                        d.set_item("kind", "reading")?;
                        d.set_item("sensor", &*event_public_id)?;
                        d.set_item("value", value)?;
                        d.set_item("time_us", time_us)?;
                    }
                }
                Ok(d)
            })
            .collect()
    }

    /// Datapoints for the live stream (throttled per event): (event_public_id, value, time µs, experiment_public_id).
    fn drain_broadcast(&self, py: Python<'_>) -> Vec<LiveTuple> {
        detached(py, || {
            self.inner
                .drain_live()
                .into_iter()
                .map(live_tuple)
                .collect()
        })
    }

    /// Counters: accepted, written, duplicates, batches, flush latency, queue depth… and `rejected` per reason.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.inner.stats();
        let d = PyDict::new(py);
        for (k, v) in snap.counters {
            d.set_item(k, v)?;
        }
        let rejected = PyDict::new(py);
        for (k, v) in snap.rejected {
            rejected.set_item(k, v)?;
        }
        d.set_item("rejected", rejected)?;
        Ok(d)
    }

    /// Stop taking data, write what is queued (waiting at most `timeout_s` for the database), stop.
    /// Returns the number of rows that could not be written.
    #[pyo3(signature = (timeout_s=30.0))]
    fn close(&self, py: Python<'_>, timeout_s: f64) -> usize {
        let timeout = Duration::try_from_secs_f64(timeout_s).unwrap_or(Duration::from_secs(30));
        self.stop_listener();
        detached(py, || self.inner.close(timeout))
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Receipt>()?;
    m.add("DATAPOINT_COLUMNS", crate::writer::COLUMNS.to_vec())?;
    m.add("MAX_FRAME_DATAPOINTS", crate::frame::MAX_FRAME_DATAPOINTS)?;
    Ok(())
}
