//! Bindings for the history import (`crate::import`): the WebMACS datapoint transfer and the file writer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyDict;

use super::detached;
use crate::error::CoreError;
use crate::import::{self, Converter, EventTarget, ImportError, Progress, Transfer};

fn to_py(e: ImportError) -> PyErr {
    CoreError::from(e).into()
}

fn runtime(threads: usize, name: &str) -> PyResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

fn now_us(now_us: Option<i64>) -> i64 {
    now_us.unwrap_or_else(import::unix_now_us)
}

/// WebMACS's datapoints streamed into the hypertable, one checkpointed transaction per batch.
#[pyclass(frozen, module = "webmacs._core")]
struct WebmacsTransfer {
    runtime: tokio::runtime::Runtime,
    transfer: Transfer,
    converter: Mutex<Option<Converter>>,
    progress: Arc<Progress>,
}

#[pymethods]
impl WebmacsTransfer {
    /// `events`: source event public id → (target event id, min_value, max_value); `experiments`: source
    /// experiment public id → target experiment id; `carry`: the checkpoint's collision state
    /// (event id, last time µs) when resuming.
    #[new]
    #[pyo3(signature = (source_dsn, target_dsn, statement, *, run_id, events, experiments, carry,
                        batch_rows = 50_000, now_us = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        source_dsn: String,
        target_dsn: String,
        statement: String,
        run_id: i32,
        events: HashMap<String, (i32, f64, f64)>,
        experiments: HashMap<String, i32>,
        carry: Vec<(i32, i64)>,
        batch_rows: usize,
        now_us: Option<i64>,
    ) -> PyResult<Self> {
        if batch_rows == 0 {
            return Err(CoreError::Config("batch_rows must be at least 1".into()).into());
        }
        let events = events
            .into_iter()
            .map(|(k, (id, min_value, max_value))| {
                let target = EventTarget {
                    id,
                    min_value,
                    max_value,
                };
                (k.into_bytes(), target)
            })
            .collect();
        let experiments = experiments
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v))
            .collect();
        let converter = Converter::new(events, experiments, &carry, self::now_us(now_us));
        Ok(WebmacsTransfer {
            // One thread reads and converts while the other drives the target's COPY.
            runtime: runtime(2, "webmacs-import")?,
            transfer: Transfer {
                source_dsn,
                target_dsn,
                statement,
                run_id,
                batch_rows,
            },
            converter: Mutex::new(Some(converter)),
            progress: Arc::new(Progress::new()),
        })
    }

    /// Run the transfer to the end of the source (or until `cancel`); blocks without the GIL. Returns this
    /// run's counts (`read`, `inserted`, `duplicate`, `shifted`, …) and `completed` (False: cancelled).
    /// A transfer runs once.
    fn run<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let converter = self
            .converter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("this transfer has already run"))?;
        let transfer = self.transfer.clone();
        let progress = self.progress.clone();
        let outcome = detached(py, || {
            self.runtime
                .block_on(import::transfer(transfer, converter, progress))
        })
        .map_err(to_py)?;
        let d = PyDict::new(py);
        for (name, n) in outcome.counts.named() {
            d.set_item(name, n)?;
        }
        d.set_item("completed", outcome.completed)?;
        Ok(d)
    }

    /// (rows read, rows inserted, source time µs of the last committed row or None) so far.
    fn progress(&self) -> (u64, u64, Option<i64>) {
        use std::sync::atomic::Ordering::Relaxed;
        let position = self.progress.position_us.load(Relaxed);
        (
            self.progress.read.load(Relaxed),
            self.progress.inserted.load(Relaxed),
            (position != i64::MIN).then_some(position),
        )
    }

    /// Stop after the batch being written (it commits or rolls back whole); `run` then returns.
    fn cancel(&self) {
        self.progress.cancel();
    }
}

/// A target connection writing datapoints from files: the engine's checks, then one transaction per call,
/// first write wins on the unique key.
#[pyclass(frozen, module = "webmacs._core")]
struct DatapointWriter {
    runtime: tokio::runtime::Runtime,
    client: Mutex<Option<crate::pg::PgClient>>,
}

#[pymethods]
impl DatapointWriter {
    #[new]
    fn new(py: Python<'_>, dsn: String) -> PyResult<Self> {
        let runtime = runtime(1, "webmacs-import-writer")?;
        let client = detached(py, || {
            runtime.block_on(crate::pg::connect(&dsn, "webmacs-import"))
        })?;
        Ok(DatapointWriter {
            runtime,
            client: Mutex::new(Some(client)),
        })
    }

    /// Write rows given as column buffers (native byte order, Arrow layout: `time_us` int64 µs since the
    /// Unix epoch, `event_id` int32, `value` float64, `experiment_id` int32 with an optional LSB-first
    /// validity bitmap). Returns (inserted, duplicates, rejected per reason code).
    #[pyo3(signature = (time_us, event_id, value, experiment_id, experiment_validity = None, now_us = None))]
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        py: Python<'_>,
        time_us: PyBackedBytes,
        event_id: PyBackedBytes,
        value: PyBackedBytes,
        experiment_id: PyBackedBytes,
        experiment_validity: Option<PyBackedBytes>,
        now_us: Option<i64>,
    ) -> PyResult<(u64, u64, HashMap<&'static str, u64>)> {
        let now = self::now_us(now_us);
        let (inserted, duplicates, rejected) = detached(py, || {
            let (rows, rejected) = import::rows_from_columns(
                &time_us,
                &event_id,
                &value,
                &experiment_id,
                experiment_validity.as_deref(),
                now,
            )?;
            let mut guard = self.client.lock().unwrap_or_else(|e| e.into_inner());
            let client = guard
                .as_mut()
                .ok_or_else(|| ImportError::Database("the writer is closed".into()))?;
            let (inserted, duplicates) = self.runtime.block_on(import::write_batch(
                client,
                &crate::writer::Encoded::of(&rows),
                &import::Counts::default(),
                None,
            ))?;
            Ok::<_, ImportError>((inserted, duplicates, rejected))
        })
        .map_err(to_py)?;
        let rejected = rejected.into_iter().map(|(r, n)| (r.code(), n)).collect();
        Ok((inserted, duplicates, rejected))
    }

    /// Close the connection.
    fn close(&self, py: Python<'_>) {
        detached(py, || {
            self.client.lock().unwrap_or_else(|e| e.into_inner()).take();
        });
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<WebmacsTransfer>()?;
    m.add_class::<DatapointWriter>()?;
    Ok(())
}
