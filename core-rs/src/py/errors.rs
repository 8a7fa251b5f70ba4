//! CoreError → Python exception hierarchy (re-exported by `webmacs.exceptions`).

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use crate::error::CoreError;
use crate::frame::FrameError;

create_exception!(
    _core,
    CoreException,
    PyException,
    "Base class of every error raised by the engine."
);
create_exception!(
    _core,
    InvalidFrameError,
    CoreException,
    "The frame is not JSON or not a JSON object."
);
create_exception!(
    _core,
    FrameTooLargeError,
    CoreException,
    "The frame exceeds a limit (more than 500 datapoints, or too many bytes)."
);
create_exception!(
    _core,
    QueueFullError,
    CoreException,
    "The ingest queue is full; retry after the next commit."
);
create_exception!(
    _core,
    EngineClosedError,
    CoreException,
    "The engine was closed."
);
create_exception!(
    _core,
    DatabaseError,
    CoreException,
    "The engine could not reach or use the database."
);
create_exception!(
    _core,
    ConfigError,
    CoreException,
    "An engine setting is out of range."
);

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        let msg = e.to_string();
        match e {
            CoreError::Frame(FrameError::InvalidJson(_) | FrameError::NotObject) => {
                InvalidFrameError::new_err(msg)
            }
            CoreError::Frame(FrameError::TooMany(_) | FrameError::TooLarge(..)) => {
                FrameTooLargeError::new_err(msg)
            }
            CoreError::QueueFull { .. } => QueueFullError::new_err(msg),
            CoreError::Closed => EngineClosedError::new_err(msg),
            CoreError::Database(_) => DatabaseError::new_err(msg),
            CoreError::Config(_) => ConfigError::new_err(msg),
        }
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CoreException", py.get_type::<CoreException>())?;
    m.add("InvalidFrameError", py.get_type::<InvalidFrameError>())?;
    m.add("FrameTooLargeError", py.get_type::<FrameTooLargeError>())?;
    m.add("QueueFullError", py.get_type::<QueueFullError>())?;
    m.add("EngineClosedError", py.get_type::<EngineClosedError>())?;
    m.add("DatabaseError", py.get_type::<DatabaseError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    Ok(())
}
