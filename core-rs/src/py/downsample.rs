//! Bindings for the series downsamplers (`crate::downsample`).
//!
//! Series arrive as packed big-endian arrays (`bytes`), exactly as PostgreSQL's `int8send`/`float8send`
//! aggregate them, so a query result reaches Rust without one Python object per datapoint.

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use super::detached;
use crate::downsample::{self, DownsampleError};
use crate::error::CoreError;

fn value_error(e: DownsampleError) -> PyErr {
    CoreError::from(e).into()
}

type Selector = fn(&[i64], &[f64], usize) -> Result<Vec<usize>, DownsampleError>;

fn select(
    py: Python<'_>,
    select: Selector,
    times: &PyBackedBytes,
    values: &PyBackedBytes,
    max_points: usize,
) -> PyResult<Vec<usize>> {
    detached(py, || {
        let times = downsample::unpack_i64_be(times)?;
        let values = downsample::unpack_f64_be(values)?;
        select(&times, &values, max_points)
    })
    .map_err(value_error)
}

/// Indices kept by the WebMACS reference striding (spec §4.2) for a series of `n` points.
#[pyfunction]
fn downsample_stride(n: usize, max_points: usize) -> PyResult<Vec<usize>> {
    downsample::stride(n, max_points).map_err(value_error)
}

/// Indices kept by Largest-Triangle-Three-Buckets.
#[pyfunction]
fn downsample_lttb(
    py: Python<'_>,
    times: PyBackedBytes,
    values: PyBackedBytes,
    max_points: usize,
) -> PyResult<Vec<usize>> {
    select(py, downsample::lttb, &times, &values, max_points)
}

/// Indices kept by per-bucket min/max.
#[pyfunction]
fn downsample_minmax(
    py: Python<'_>,
    times: PyBackedBytes,
    values: PyBackedBytes,
    max_points: usize,
) -> PyResult<Vec<usize>> {
    select(py, downsample::minmax, &times, &values, max_points)
}

/// Indices kept by M4 (first, min, max, last per bucket).
#[pyfunction]
fn downsample_m4(
    py: Python<'_>,
    times: PyBackedBytes,
    values: PyBackedBytes,
    max_points: usize,
) -> PyResult<Vec<usize>> {
    select(py, downsample::m4, &times, &values, max_points)
}

/// Bucket means as (times in µs, values).
#[pyfunction]
fn downsample_avg(
    py: Python<'_>,
    times: PyBackedBytes,
    values: PyBackedBytes,
    max_points: usize,
) -> PyResult<(Vec<i64>, Vec<f64>)> {
    detached(py, || {
        let times = downsample::unpack_i64_be(&times)?;
        let values = downsample::unpack_f64_be(&values)?;
        downsample::avg(&times, &values, max_points)
    })
    .map_err(value_error)
}

/// A series as PostgreSQL packs it (`timestamptz_send` times since 2000, values, experiment ids) → times
/// since 1970, in time order (see `downsample::series_from_pg`).
#[pyfunction]
#[pyo3(signature = (times, values, experiments=None))]
fn series_from_pg<'py>(
    py: Python<'py>,
    times: PyBackedBytes,
    values: PyBackedBytes,
    experiments: Option<PyBackedBytes>,
) -> PyResult<PackedBytes<'py>> {
    let packed = detached(py, || {
        downsample::series_from_pg(&times, &values, experiments.as_deref())
    })
    .map_err(value_error)?;
    Ok((
        PyBytes::new(py, &packed.times),
        PyBytes::new(py, &packed.values),
        packed.experiments.map(|x| PyBytes::new(py, &x)),
    ))
}

/// m4, minmax or lttb of a long range from its candidates (`downsample::from_candidates`), which arrive
/// packed as PostgreSQL sends them (times since 2000); returns the kept points packed as the downsamplers
/// take them (µs since 1970, values).
#[pyfunction]
fn series_from_candidates<'py>(
    py: Python<'py>,
    mode: &str,
    times: PyBackedBytes,
    values: PyBackedBytes,
    total: u64,
    max_points: usize,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let kept = detached(py, || {
        let candidates = downsample::points_from_pg(&times, &values)?;
        downsample::from_candidates(mode, candidates, total, max_points)
    })
    .map_err(value_error)?;
    let mut out_times = Vec::with_capacity(kept.len() * 8);
    let mut out_values = Vec::with_capacity(kept.len() * 8);
    for (t, v) in kept {
        out_times.extend_from_slice(&t.to_be_bytes());
        out_values.extend_from_slice(&v.to_be_bytes());
    }
    Ok((PyBytes::new(py, &out_times), PyBytes::new(py, &out_values)))
}

/// The rows of cells' packed copies with times (µs since 2000) in [lo, hi]: (how many, packed times, packed
/// values), laid out as PostgreSQL's send functions lay them out.
#[pyfunction]
fn cell_rows_in<'py>(
    py: Python<'py>,
    packed: PyBackedBytes,
    lo: i64,
    hi: i64,
) -> PyResult<(u64, Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let (n, times, values) =
        detached(py, || downsample::packed_rows_in(&packed, lo, hi)).map_err(value_error)?;
    Ok((n, PyBytes::new(py, &times), PyBytes::new(py, &values)))
}

/// (times, values, experiment ids or None) as Python bytes.
type PackedBytes<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Option<Bound<'py, PyBytes>>,
);

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(downsample_stride, m)?)?;
    m.add_function(wrap_pyfunction!(downsample_lttb, m)?)?;
    m.add_function(wrap_pyfunction!(downsample_minmax, m)?)?;
    m.add_function(wrap_pyfunction!(downsample_m4, m)?)?;
    m.add_function(wrap_pyfunction!(downsample_avg, m)?)?;
    m.add_function(wrap_pyfunction!(series_from_pg, m)?)?;
    m.add_function(wrap_pyfunction!(series_from_candidates, m)?)?;
    m.add_function(wrap_pyfunction!(cell_rows_in, m)?)?;
    Ok(())
}
