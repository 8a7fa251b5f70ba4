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
use crate::fanout::Transport;
use crate::frame::Reject;
use crate::mqtt::{MqttConfig, MqttIngest};
use crate::ws::{Listener, WsConfig, WsServer};

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
    outcome: Arc<crate::batch::Outcome>,
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

    /// Entries the database refused when they were written, as (index in the frame, SQLSTATE, message):
    /// complete once `committed_ticket() >= ticket`. They count in `accepted`, not in `rejected`.
    fn refused(&self) -> Vec<(u32, String, String)> {
        self.outcome
            .refused()
            .into_iter()
            .map(|(i, r)| (i, r.sqlstate.clone(), r.message.clone()))
            .collect()
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
            outcome: r.outcome,
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
    /// The WebSocket server, once `serve_websockets` ran, and the port it listens on itself, if any.
    websockets: Mutex<Option<(WsServer, Option<Listener>)>>,
    /// The MQTT writer, when the engine was started with `mqtt_url`.
    mqtt: Mutex<Option<MqttIngest>>,
}

impl Engine {
    fn stop_websockets(&self) {
        if let Some((server, listener)) = self
            .websockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            drop(listener);
            server.stop();
        }
    }

    fn stop_mqtt(&self, timeout: Duration) {
        let mqtt = self.mqtt.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(m) = mqtt {
            m.stop(timeout);
        }
    }
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (dsn, *, max_rows=20_000, max_bytes=4_194_304, max_age_ms=5, queue_capacity=200_000,
        max_frame_bytes=4_194_304, reading_interval_s=5.0, broadcast_interval_s=0.2, writers=2, source_share=0.25,
        write_timeout_s=30.0, fanout="postgres", nats_url=None, nats_prefix="webmacs", mqtt_url=None,
        mqtt_topics=None, mqtt_token=None, mqtt_client_id=None, mqtt_shared=true, mqtt_error_topic=None,
        mqtt_session_expiry_s=604_800, mqtt_receive_maximum=1000))]
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
        source_share: f64,
        write_timeout_s: f64,
        fanout: &str,
        nats_url: Option<String>,
        nats_prefix: &str,
        mqtt_url: Option<String>,
        mqtt_topics: Option<Vec<String>>,
        mqtt_token: Option<String>,
        mqtt_client_id: Option<String>,
        mqtt_shared: bool,
        mqtt_error_topic: Option<String>,
        mqtt_session_expiry_s: u64,
        mqtt_receive_maximum: u16,
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
        config.source_share = source_share;
        config.write_timeout = secs(write_timeout_s)?;
        config.fanout = match (fanout, nats_url) {
            ("off", _) => Transport::Off,
            ("postgres", _) => Transport::Postgres,
            ("nats", Some(url)) => Transport::Nats {
                url,
                prefix: nats_prefix.to_owned(),
            },
            (other, _) => {
                return Err(CoreError::Config(format!(
                    "fanout {other:?}: expected \"postgres\", \"nats\" (with nats_url) or \"off\""
                ))
                .into())
            }
        };
        let mqtt = mqtt_url.filter(|u| !u.is_empty()).map(|url| {
            let mut m = MqttConfig::new(&url, mqtt_token.as_deref().unwrap_or(""));
            if let Some(topics) = mqtt_topics {
                m.topics = topics;
            }
            m.client_id = mqtt_client_id.filter(|c| !c.is_empty());
            m.shared = mqtt_shared;
            m.error_topic = mqtt_error_topic.filter(|t| !t.is_empty());
            m.session_expiry = Duration::from_secs(mqtt_session_expiry_s);
            m.receive_maximum = mqtt_receive_maximum;
            m
        });
        let (inner, mqtt) = detached(py, || -> Result<_, CoreError> {
            let inner = Arc::new(engine::Engine::start(config)?);
            let mqtt = match mqtt
                .map(|m| MqttIngest::start(inner.clone(), m))
                .transpose()
            {
                Ok(m) => m,
                Err(e) => {
                    inner.close(Duration::from_secs(5));
                    return Err(e);
                }
            };
            Ok((inner, mqtt))
        })?;
        Ok(Engine {
            inner,
            websockets: Mutex::new(None),
            mqtt: Mutex::new(mqtt),
        })
    }

    /// Parse, validate and queue one frame (GIL released). `strict`: a malformed entry refuses the frame.
    /// `source` identifies the sender (a token, a connection) for the fair shares of the queue.
    /// `instance`: the sender's token is bound to this plugin instance (other events: `not_permitted`).
    #[pyo3(signature = (frame, strict=false, source=0, instance=None))]
    fn submit(
        &self,
        py: Python<'_>,
        frame: PyBackedBytes,
        strict: bool,
        source: u64,
        instance: Option<i32>,
    ) -> PyResult<Receipt> {
        Ok(detached(py, || {
            self.inner.submit_as(&frame, strict, source, instance)
        })?
        .into())
    }

    /// The MQTT client id in use, or None when MQTT ingest is off.
    #[getter]
    fn mqtt_client_id(&self) -> Option<String> {
        self.mqtt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|m| m.client_id.clone())
    }

    /// MQTT log lines since the last call (rejections, connection trouble; at most one per second).
    fn drain_mqtt_log(&self) -> Vec<String> {
        self.mqtt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|m| m.drain_log())
            .unwrap_or_default()
    }

    /// Queue points `start..end` of a parsed line-protocol body; `events[s]` is series `s`'s event public id
    /// (None: rejected as unknown). `with_rejects` counts the body's parse-time rejects (once per body).
    #[pyo3(signature = (batch, events, start, end, *, with_rejects, source=0, instance=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit_lines(
        &self,
        py: Python<'_>,
        batch: PyRef<'_, super::lineproto::LineBatch>,
        events: Vec<Option<String>>,
        start: usize,
        end: usize,
        with_rejects: bool,
        source: u64,
        instance: Option<i32>,
    ) -> PyResult<Receipt> {
        let inner = batch.inner.clone();
        Ok(detached(py, || {
            self.inner
                .submit_lines(&inner, &events, start..end, with_rejects, source, instance)
        })?
        .into())
    }

    /// Serve `/ws/controller/telemetry` and `/ws/datapoints/stream` from the engine, verifying JWTs with
    /// `secret_key`/`algorithm`: sockets handed over with `adopt_websocket`, and, when `listen` is given
    /// ("host:port"; port 0 picks one), connections on that port. Returns the bound "host:port" or None.
    /// Replaces a running server.
    #[pyo3(signature = (*, secret_key, algorithm="HS256", listen=None, recheck_s=2.0, outbox=1024,
        subscriber_queue=256, send_timeout_s=30.0, max_connections=10_000))]
    #[allow(clippy::too_many_arguments)]
    fn serve_websockets(
        &self,
        py: Python<'_>,
        secret_key: &str,
        algorithm: &str,
        listen: Option<&str>,
        recheck_s: f64,
        outbox: usize,
        subscriber_queue: usize,
        send_timeout_s: f64,
        max_connections: usize,
    ) -> PyResult<Option<String>> {
        let secs = |s: f64| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| CoreError::Config(format!("invalid interval {s}")))
        };
        let mut config = WsConfig::new(crate::auth::JwtKey::new(secret_key, algorithm)?);
        config.recheck_interval = secs(recheck_s)?;
        config.outbox = outbox;
        config.subscriber_queue = subscriber_queue;
        config.send_timeout = secs(send_timeout_s)?;
        config.max_connections = max_connections;
        self.stop_websockets();
        let inner = self.inner.clone();
        let (server, listener) = detached(py, || -> Result<_, CoreError> {
            let server = WsServer::start(inner, config)?;
            let listener = listen.map(|a| server.listen(a)).transpose()?;
            Ok((server, listener))
        })?;
        let bound = listener.as_ref().map(|l| l.local_addr().to_string());
        *self.websockets.lock().unwrap_or_else(|p| p.into_inner()) = Some((server, listener));
        Ok(bound)
    }

    /// Take over a connected socket whose request head (`head`, the bytes up to the blank line) another
    /// server read: the engine answers the upgrade and serves the WebSocket. `fd` is owned by the engine
    /// from here on, also when this raises.
    fn adopt_websocket(&self, fd: i32, head: Vec<u8>) -> PyResult<()> {
        use std::os::fd::{FromRawFd, OwnedFd};
        if fd < 0 {
            return Err(CoreError::Config("invalid file descriptor".into()).into());
        }
        // SAFETY: the caller passes a descriptor it owns and never uses again (a dup of the socket).
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let guard = self.websockets.lock().unwrap_or_else(|p| p.into_inner());
        let Some((server, _)) = guard.as_ref() else {
            return Err(CoreError::Closed.into());
        };
        Ok(server.adopt(socket, head)?)
    }

    /// WebSocket counters: connections, telemetry_sessions, subscribers, subscribers_dropped, sessions_ended,
    /// refused_busy (all 0 when the server is not running).
    fn websocket_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let guard = self.websockets.lock().unwrap_or_else(|p| p.into_inner());
        let s = guard.as_ref().map(|(server, _)| server.stats());
        let s = s.unwrap_or(crate::ws::WsStats {
            connections: 0,
            telemetry_sessions: 0,
            subscribers: 0,
            subscribers_dropped: 0,
            sessions_ended: 0,
            refused_busy: 0,
        });
        d.set_item("connections", s.connections)?;
        d.set_item("telemetry_sessions", s.telemetry_sessions)?;
        d.set_item("subscribers", s.subscribers)?;
        d.set_item("subscribers_dropped", s.subscribers_dropped)?;
        d.set_item("sessions_ended", s.sessions_ended)?;
        d.set_item("refused_busy", s.refused_busy)?;
        Ok(d)
    }

    /// Close every WebSocket with 1001 and stop serving them; no-op when not serving.
    fn stop_websockets_now(&self) {
        self.stop_websockets();
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

    /// Counters: accepted, written, duplicates, batches, flush latency, queue depth… and `rejected` per reason;
    /// `mqtt`: the MQTT writer's counters (received, points, accepted, rejected per reason, malformed, acked,
    /// connected, reconnects, …).
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
        for (name, p) in snap.protocols {
            let pd = PyDict::new(py);
            for (k, v) in p.counters {
                pd.set_item(k, v)?;
            }
            let rejected = PyDict::new(py);
            for (k, v) in p.rejected {
                rejected.set_item(k, v)?;
            }
            pd.set_item("rejected", rejected)?;
            d.set_item(name, pd)?;
        }
        let by_protocol = PyDict::new(py);
        for (name, counters) in snap.by_protocol {
            let pd = PyDict::new(py);
            for (k, v) in counters {
                pd.set_item(k, v)?;
            }
            by_protocol.set_item(name, pd)?;
        }
        d.set_item("by_protocol", by_protocol)?;
        Ok(d)
    }

    /// The engine's state: queue_depth, oldest_unacked_s, writer_failing_s (None when writing works),
    /// last_error, batches_in_flight, closing.
    fn health<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let h = self.inner.health();
        let d = PyDict::new(py);
        d.set_item("queue_depth", h.queue_depth)?;
        d.set_item(
            "oldest_unacked_s",
            h.oldest_unacked.map(|t| t.as_secs_f64()),
        )?;
        d.set_item(
            "writer_failing_s",
            h.writer_failing.map(|t| t.as_secs_f64()),
        )?;
        d.set_item("last_error", h.last_error)?;
        d.set_item("batches_in_flight", h.batches_in_flight)?;
        d.set_item("closing", h.closing)?;
        Ok(d)
    }

    /// Stop taking data, write what is queued (waiting at most `timeout_s` for the database), stop.
    /// Returns the number of rows that could not be written.
    #[pyo3(signature = (timeout_s=30.0))]
    fn close(&self, py: Python<'_>, timeout_s: f64) -> usize {
        let timeout = Duration::try_from_secs_f64(timeout_s).unwrap_or(Duration::from_secs(30));
        self.stop_websockets();
        detached(py, || {
            // MQTT first: its last messages commit and are acknowledged while the writers still run.
            self.stop_mqtt(timeout.min(Duration::from_secs(10)));
            self.inner.close(timeout)
        })
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Receipt>()?;
    m.add("DATAPOINT_COLUMNS", crate::writer::COLUMNS.to_vec())?;
    m.add("MAX_FRAME_DATAPOINTS", crate::frame::MAX_FRAME_DATAPOINTS)?;
    Ok(())
}
