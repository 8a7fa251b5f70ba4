//! PyO3 bindings: the only place in the crate that knows about Python.

mod downsample;
mod errors;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use crate::frame;

/// Run `f` detached from the interpreter: every call that does real work goes through here.
pub(crate) fn detached<T: Send, F: Send + FnOnce() -> T>(py: Python<'_>, f: F) -> T {
    py.detach(f)
}

/// Parse and validate a telemetry frame; returns (valid points, invalid entries, total entries).
#[pyfunction]
fn validate_frame(py: Python<'_>, frame: PyBackedBytes) -> PyResult<(Vec<(String, f64)>, usize, usize)> {
    let parsed = detached(py, || frame::parse_frame(&frame))?;
    let points = parsed.points.into_iter().map(|p| (p.event_public_id, p.value)).collect();
    Ok((points, parsed.invalid, parsed.total))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", crate::VERSION)?;
    m.add_function(wrap_pyfunction!(validate_frame, m)?)?;
    errors::register(m)?;
    downsample::register(m)?;
    Ok(())
}
