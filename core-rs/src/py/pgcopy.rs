//! Bindings for the binary COPY decoder (`crate::pgcopy`): bytes in, one `bytes` buffer per column out.

use std::sync::Mutex;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use super::detached;
use crate::error::CoreError;
use crate::parquet_export::{self, EventAttrs};
use crate::pgcopy::{self, PgCopyError};

fn value_error(e: PgCopyError) -> PyErr {
    CoreError::from(e).into()
}

fn columns(py: Python<'_>, cols: pgcopy::DatapointColumns) -> Columns<'_> {
    (
        cols.rows,
        PyBytes::new(py, &cols.time_us),
        PyBytes::new(py, &cols.event_id),
        PyBytes::new(py, &cols.value),
        PyBytes::new(py, &cols.experiment_id),
        PyBytes::new(py, &cols.experiment_validity),
        cols.experiment_nulls,
        cols.finished,
    )
}

/// (rows, time_us, event_id, value, experiment_id, experiment_validity, experiment_nulls, finished).
type Columns<'py> = (
    usize,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    usize,
    bool,
);

/// Decode binary COPY tuples of (time, event_id, value, experiment_id) into native-endian column buffers.
#[pyfunction]
#[pyo3(signature = (data, with_header))]
fn decode_datapoints<'py>(
    py: Python<'py>,
    data: PyBackedBytes,
    with_header: bool,
) -> PyResult<Columns<'py>> {
    let cols =
        detached(py, || pgcopy::decode_datapoints(&data, with_header)).map_err(value_error)?;
    Ok(columns(py, cols))
}

/// A connection of its own running binary COPYs of datapoints, decoded a frame at a time without the GIL.
#[pyclass(frozen, module = "webmacs._core")]
struct CopyReader {
    inner: Mutex<Option<pgcopy::CopyReader>>,
}

/// Run `f` on the object in `slot` without the GIL; a closed (taken) one is a database error naming `what`.
fn with_open<R: Send, T: Send>(
    py: Python<'_>,
    slot: &Mutex<Option<R>>,
    what: &str,
    f: impl Send + FnOnce(&mut R) -> Result<T, PgCopyError>,
) -> PyResult<T> {
    detached(py, || {
        // A panic while holding the lock would be a bug elsewhere; the object is then unusable anyway.
        let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some(open) => f(open),
            None => Err(PgCopyError::Database(format!("the {what} is closed"))),
        }
    })
    .map_err(value_error)
}

impl CopyReader {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl Send + FnOnce(&mut pgcopy::CopyReader) -> Result<T, PgCopyError>,
    ) -> PyResult<T> {
        with_open(py, &self.inner, "reader", f)
    }
}

#[pymethods]
impl CopyReader {
    #[new]
    fn new(py: Python<'_>, dsn: String) -> PyResult<Self> {
        let reader = detached(py, || pgcopy::CopyReader::connect(&dsn)).map_err(value_error)?;
        Ok(CopyReader {
            inner: Mutex::new(Some(reader)),
        })
    }

    /// Start a `COPY (SELECT time, event_id, value, experiment_id …) TO STDOUT (FORMAT binary)` statement,
    /// read ahead in frames of at most `max_rows` rows (errors surface from `next_frame`). With
    /// `ties_by_event`, rows come ordered by time and equal times are put in event order here. With `sort`,
    /// the statement has no ORDER BY: all its rows are collected and handed out by (time, event) (memory grows
    /// with the statement's rows). `prefetch` starts the statement expected next on a second connection.
    #[pyo3(signature = (statement, max_rows, ties_by_event = false, prefetch = None, sort = false))]
    fn start(
        &self,
        py: Python<'_>,
        statement: String,
        max_rows: usize,
        ties_by_event: bool,
        prefetch: Option<String>,
        sort: bool,
    ) -> PyResult<()> {
        let order = order(ties_by_event, sort);
        self.with(py, move |r| {
            r.start(&statement, max_rows, order, prefetch.as_deref())
        })
    }

    /// The next frame as column buffers; None once the COPY has ended.
    fn next_frame<'py>(&self, py: Python<'py>) -> PyResult<Option<Columns<'py>>> {
        let cols = self.with(py, |r| r.next_frame())?;
        Ok(cols.map(|c| columns(py, c)))
    }

    /// Close the connection (a running COPY is abandoned).
    fn close(&self, py: Python<'_>) {
        detached(py, || {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            guard.take();
        });
    }
}

fn order(ties_by_event: bool, sort: bool) -> pgcopy::Order {
    match (sort, ties_by_event) {
        (true, _) => pgcopy::Order::Sort,
        (false, true) => pgcopy::Order::TiesByEvent,
        (false, false) => pgcopy::Order::Statement,
    }
}

/// A Parquet export encoded in Rust: binary COPYs of datapoints on connections of its own, decoded and
/// written as Parquet row groups of `row_group_rows` rows into memory, drained by `next_chunk` (no pyarrow).
#[pyclass(frozen, module = "webmacs._core")]
struct ParquetExport {
    inner: Mutex<Option<parquet_export::ParquetExport>>,
}

impl ParquetExport {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl Send + FnOnce(&mut parquet_export::ParquetExport) -> Result<T, PgCopyError>,
    ) -> PyResult<T> {
        with_open(py, &self.inner, "export", f)
    }
}

#[pymethods]
impl ParquetExport {
    /// `events`: (internal id, public id, name, unit) of every event rows may refer to (rows of others are
    /// left out); `experiments`: (internal id, public id) (others are written as null).
    #[new]
    fn new(
        py: Python<'_>,
        dsn: String,
        events: Vec<(i32, String, String, Option<String>)>,
        experiments: Vec<(i32, String)>,
        row_group_rows: usize,
    ) -> PyResult<Self> {
        let events = events
            .into_iter()
            .map(|(id, public_id, name, unit)| EventAttrs {
                id,
                public_id,
                name,
                unit,
            })
            .collect();
        let export = detached(py, || {
            parquet_export::ParquetExport::connect(&dsn, events, experiments, row_group_rows)
        })
        .map_err(value_error)?;
        Ok(ParquetExport {
            inner: Mutex::new(Some(export)),
        })
    }

    /// Start a COPY statement, as `CopyReader.start` (`max_rows`: rows decoded at a time).
    #[pyo3(signature = (statement, max_rows, ties_by_event = false, prefetch = None, sort = false))]
    fn start(
        &self,
        py: Python<'_>,
        statement: String,
        max_rows: usize,
        ties_by_event: bool,
        prefetch: Option<String>,
        sort: bool,
    ) -> PyResult<()> {
        let order = order(ties_by_event, sort);
        self.with(py, move |e| {
            e.start(&statement, max_rows, order, prefetch.as_deref())
        })
    }

    /// The next encoded bytes (at least one row group's) of the running COPY; None once it has ended (a
    /// partial row group waits for the next statement or `finish`).
    fn next_chunk<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let chunk = self.with(py, |e| e.next_chunk())?;
        Ok(chunk.map(|c| PyBytes::new(py, &c)))
    }

    /// The last row group and the footer: the end of the file.
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let rest = self.with(py, |e| e.finish())?;
        Ok(PyBytes::new(py, &rest))
    }

    /// Rows encoded so far.
    #[getter]
    fn rows(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |e| Ok(e.rows()))
    }

    /// Close the connections (a running COPY is abandoned).
    fn close(&self, py: Python<'_>) {
        detached(py, || {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            guard.take();
        });
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_datapoints, m)?)?;
    m.add_class::<CopyReader>()?;
    m.add_class::<ParquetExport>()?;
    Ok(())
}
