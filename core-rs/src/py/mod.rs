//! PyO3 bindings: the only place in the crate that knows about Python.

mod downsample;
mod engine;
mod errors;
mod import;
mod lineproto;
mod pgcopy;

use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;

use crate::frame;

/// Run `f` detached from the interpreter: every call that does real work goes through here.
pub(crate) fn detached<T: Send, F: Send + FnOnce() -> T>(py: Python<'_>, f: F) -> T {
    py.detach(f)
}

type ValidatedFrame = (
    Vec<(String, f64, Option<i64>)>,
    Vec<(usize, &'static str)>,
    usize,
);

/// Parse and validate a frame without a catalog: (valid points, rejected (index, reason), total entries).
#[pyfunction]
fn validate_frame(py: Python<'_>, frame: PyBackedBytes) -> PyResult<ValidatedFrame> {
    let parsed = detached(py, || {
        frame::parse_frame(
            &frame,
            crate::engine::unix_now_us(),
            frame::DEFAULT_MAX_FRAME_BYTES,
        )
    })
    .map_err(crate::CoreError::from)?;
    let points = parsed
        .points
        .into_iter()
        .map(|(_, p)| (p.event_public_id.into_owned(), p.value, p.time_us))
        .collect();
    let rejects = parsed
        .rejects
        .into_iter()
        .map(|(i, r)| (i, r.code()))
        .collect();
    Ok((points, rejects, parsed.total))
}

/// A genuine JWT's user id, jti, exp and whether it is valid now.
type InspectedJwt = (i64, Option<String>, f64, bool);

/// Inspect a JWT: None unless it is genuine (signed with this key and algorithm, canonical base64url,
/// well-formed claims); else (user id, jti or None, exp, valid at `now_s`: not expired, not before nbf/iat).
#[pyfunction]
#[pyo3(signature = (token, *, secret_key, algorithm="HS256", now_s=None))]
fn inspect_jwt(
    token: &str,
    secret_key: &str,
    algorithm: &str,
    now_s: Option<f64>,
) -> PyResult<Option<InspectedJwt>> {
    let key = crate::auth::JwtKey::new(secret_key, algorithm)?;
    let now = now_s.unwrap_or_else(|| crate::engine::unix_now_us() as f64 / 1e6);
    Ok(key
        .inspect(token, now)
        .map(|(c, current)| (c.user_id, c.jti, c.exp, current)))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", crate::VERSION)?;
    m.add("CELL_US", crate::cells::CELL_US)?;
    m.add_function(wrap_pyfunction!(validate_frame, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_jwt, m)?)?;
    errors::register(m)?;
    engine::register(m)?;
    downsample::register(m)?;
    pgcopy::register(m)?;
    import::register(m)?;
    lineproto::register(m)?;
    Ok(())
}
