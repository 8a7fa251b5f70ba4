//! CoreError → Python exception hierarchy (re-exported by `webmacs.exceptions`).

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use crate::error::CoreError;

create_exception!(_core, CoreException, PyException, "Base class of every error raised by the engine.");
create_exception!(_core, InvalidFrameError, CoreException, "The frame is not a JSON object.");
create_exception!(_core, FrameTooLargeError, CoreException, "The frame exceeds a configured limit.");

impl From<CoreError> for PyErr {
    fn from(e: CoreError) -> PyErr {
        let msg = e.to_string();
        match e {
            CoreError::InvalidFrame(_) => InvalidFrameError::new_err(msg),
            CoreError::FrameTooLarge(_) => FrameTooLargeError::new_err(msg),
        }
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CoreException", py.get_type::<CoreException>())?;
    m.add("InvalidFrameError", py.get_type::<InvalidFrameError>())?;
    m.add("FrameTooLargeError", py.get_type::<FrameTooLargeError>())?;
    Ok(())
}
