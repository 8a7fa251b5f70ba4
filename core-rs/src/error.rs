//! The one error enum of the core; `py::errors` maps it onto the Python exception hierarchy.

use thiserror::Error;

use crate::frame::FrameError;
use crate::lineproto::LineError;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// The frame as a whole was refused (not JSON, not an object, too many entries, too many bytes).
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A line-protocol body was refused as a whole (a line that does not parse, too many points).
    #[error("{0}")]
    Lines(#[from] LineError),
    /// The ingest queue is full (or the sender's share of it); nothing of the frame was taken. Retry once a
    /// batch has committed.
    #[error("ingest queue is full ({depth} of {capacity} rows queued{})", if *share { "; this sender's share is used up" } else { "" })]
    QueueFull {
        depth: usize,
        capacity: usize,
        share: bool,
    },
    /// The engine was closed; it takes no more data.
    #[error("the ingest engine is closed")]
    Closed,
    /// The database could not be reached or refused a statement the engine cannot do without.
    #[error("database error: {0}")]
    Database(String),
    /// An engine setting is out of range.
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

impl From<tokio_postgres::Error> for CoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        CoreError::Database(e.to_string())
    }
}
