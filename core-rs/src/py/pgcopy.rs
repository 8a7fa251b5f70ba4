//! Bindings for the binary COPY decoder (`crate::pgcopy`): bytes in, one `bytes` buffer per column out.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use super::detached;
use crate::pgcopy::{self, PgCopyError};

fn value_error(e: PgCopyError) -> PyErr {
    PyValueError::new_err(e.to_string())
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
    Ok((
        cols.rows,
        PyBytes::new(py, &cols.time_us),
        PyBytes::new(py, &cols.event_id),
        PyBytes::new(py, &cols.value),
        PyBytes::new(py, &cols.experiment_id),
        PyBytes::new(py, &cols.experiment_validity),
        cols.experiment_nulls,
        cols.finished,
    ))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_datapoints, m)?)?;
    Ok(())
}
