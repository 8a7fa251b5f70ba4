//! Bindings for the line-protocol parser (`crate::lineproto`): a parsed body stays in Rust until queued.

use std::collections::BTreeMap;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use super::detached;
use crate::error::CoreError;
use crate::lineproto::{self, Precision};

/// A parsed line-protocol body: its distinct series, and its points (kept in Rust for `Engine.submit_lines`).
#[pyclass(frozen, module = "webmacs._core")]
pub struct LineBatch {
    pub(super) inner: Arc<lineproto::LineBatch>,
}

#[pymethods]
impl LineBatch {
    /// Canonical series names (`measurement,tag=value… field`), index = series number.
    #[getter]
    fn series(&self) -> Vec<String> {
        self.inner.series.clone()
    }

    /// Number of numeric fields (points) in the body.
    #[getter]
    fn points(&self) -> usize {
        self.inner.points.len()
    }

    /// Lines holding a point.
    #[getter]
    fn lines(&self) -> usize {
        self.inner.lines
    }

    /// Points per series number.
    fn series_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.inner.series.len()];
        for p in &self.inner.points {
            if let Some(c) = usize::try_from(p.series)
                .ok()
                .and_then(|s| counts.get_mut(s))
            {
                *c = c.saturating_add(1);
            }
        }
        counts
    }

    /// Fields rejected while parsing (string fields, bad timestamps, non-finite numbers) per reason code.
    #[getter]
    fn rejects(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for (_, r) in &self.inner.rejects {
            *m.entry(r.code()).or_insert(0) += 1;
        }
        m
    }
}

/// Parse a line-protocol body (`precision`: ns, us, ms or s); LineProtocolError for a line that does not parse
/// (its `line` attribute) or more than `max_points` fields.
#[pyfunction]
#[pyo3(signature = (body, precision="ns", max_points=1_000_000))]
fn parse_lines(
    py: Python<'_>,
    body: PyBackedBytes,
    precision: &str,
    max_points: usize,
) -> PyResult<LineBatch> {
    let precision = Precision::parse(precision)
        .ok_or_else(|| CoreError::Config(format!("invalid precision {precision:?}")))?;
    let batch = detached(py, || {
        lineproto::parse(&body, precision, crate::engine::unix_now_us(), max_points)
    })
    .map_err(CoreError::from)?;
    Ok(LineBatch {
        inner: Arc::new(batch),
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LineBatch>()?;
    m.add_function(wrap_pyfunction!(parse_lines, m)?)?;
    Ok(())
}
