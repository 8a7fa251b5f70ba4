//! CoreError → Python exception hierarchy (re-exported by `webmacs.exceptions`).

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use crate::error::CoreError;
use crate::frame::FrameError;
use crate::import::ImportError;
use crate::pgcopy::PgCopyError;

create_exception!(
    webmacs._core,
    CoreException,
    PyException,
    "Base class of every error raised by the engine."
);
create_exception!(
    webmacs._core,
    InvalidFrameError,
    CoreException,
    "The frame is not JSON or not a JSON object."
);
create_exception!(
    webmacs._core,
    FrameTooLargeError,
    CoreException,
    "The frame exceeds a limit (more than 500 datapoints, or too many bytes)."
);
create_exception!(
    webmacs._core,
    QueueFullError,
    CoreException,
    "The ingest queue is full; retry after the next commit."
);
create_exception!(
    webmacs._core,
    LineProtocolError,
    CoreException,
    "A line-protocol body was refused: a line does not parse (`line` is its 1-based number; 0 when the body \
     has too many points)."
);
create_exception!(
    webmacs._core,
    EngineClosedError,
    CoreException,
    "The engine was closed."
);
create_exception!(
    webmacs._core,
    DatabaseError,
    CoreException,
    "The engine could not reach or use the database."
);
create_exception!(
    webmacs._core,
    ConfigError,
    CoreException,
    "An engine setting is out of range."
);
create_exception!(
    webmacs._core,
    InvalidDataError,
    CoreException,
    "Bytes or columns handed to the core are malformed (a COPY stream, a packed series, import columns)."
);

/// Build the exception and set its data attributes, so Python never parses messages.
fn with_attrs(err: PyErr, attrs: &[(&str, Option<u64>)], code: Option<&str>) -> PyErr {
    Python::attach(|py| {
        let value = err.value(py);
        for (name, v) in attrs {
            // Setting an attribute on a fresh exception instance cannot fail short of memory exhaustion.
            let _ = value.setattr(*name, *v);
        }
        if let Some(code) = code {
            let _ = value.setattr("code", code);
        }
    });
    err
}

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        let msg = e.to_string();
        match e {
            CoreError::Frame(f @ (FrameError::InvalidJson(_) | FrameError::NotObject)) => {
                with_attrs(InvalidFrameError::new_err(msg), &[], Some(f.code()))
            }
            CoreError::Frame(FrameError::TooMany(n)) => with_attrs(
                FrameTooLargeError::new_err(msg),
                &[
                    ("count", Some(n as u64)),
                    ("limit", Some(crate::frame::MAX_FRAME_DATAPOINTS as u64)),
                ],
                Some("too_many"),
            ),
            CoreError::Frame(FrameError::TooLarge(n, max)) => with_attrs(
                FrameTooLargeError::new_err(msg),
                &[("count", Some(n as u64)), ("limit", Some(max as u64))],
                Some("too_large"),
            ),
            CoreError::QueueFull {
                depth,
                capacity,
                share,
            } => {
                let err = with_attrs(
                    QueueFullError::new_err(msg),
                    &[
                        ("depth", Some(depth as u64)),
                        ("capacity", Some(capacity as u64)),
                    ],
                    None,
                );
                Python::attach(|py| {
                    let _ = err.value(py).setattr("share", share);
                });
                err
            }
            CoreError::Lines(l) => {
                let line = match l {
                    crate::lineproto::LineError::Syntax { line, .. } => line as u64,
                    crate::lineproto::LineError::TooMany(_) => 0,
                };
                with_attrs(
                    LineProtocolError::new_err(msg),
                    &[("line", Some(line))],
                    None,
                )
            }
            CoreError::Closed => EngineClosedError::new_err(msg),
            CoreError::Database(_)
            | CoreError::Copy(PgCopyError::Database(_))
            | CoreError::Import(ImportError::Database(_) | ImportError::Checkpoint(_)) => {
                DatabaseError::new_err(msg)
            }
            CoreError::Config(_) => ConfigError::new_err(msg),
            // The Parquet writer failed on data that decoded fine: ours, not the caller's.
            CoreError::Copy(e @ PgCopyError::Encode(_)) => {
                with_attrs(CoreException::new_err(msg), &[], Some(e.code()))
            }
            CoreError::Copy(e) => with_attrs(InvalidDataError::new_err(msg), &[], Some(e.code())),
            CoreError::Downsample(e) => {
                with_attrs(InvalidDataError::new_err(msg), &[], Some(e.code()))
            }
            CoreError::Import(e @ (ImportError::Stream(_) | ImportError::Columns(_))) => {
                with_attrs(InvalidDataError::new_err(msg), &[], Some(e.code()))
            }
        }
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CoreException", py.get_type::<CoreException>())?;
    m.add("InvalidFrameError", py.get_type::<InvalidFrameError>())?;
    m.add("FrameTooLargeError", py.get_type::<FrameTooLargeError>())?;
    m.add("QueueFullError", py.get_type::<QueueFullError>())?;
    m.add("LineProtocolError", py.get_type::<LineProtocolError>())?;
    m.add("EngineClosedError", py.get_type::<EngineClosedError>())?;
    m.add("DatabaseError", py.get_type::<DatabaseError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("InvalidDataError", py.get_type::<InvalidDataError>())?;
    Ok(())
}
