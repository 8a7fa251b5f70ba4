//! The one error enum of the core; `py::errors` maps it onto the Python exception hierarchy.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// The frame is not a JSON object (the spec drops such connections).
    #[error("frame is not a JSON object: {0}")]
    InvalidFrame(String),
    /// The frame is well-formed but exceeds a configured limit.
    #[error("{0}")]
    FrameTooLarge(String),
}
