//! The one error enum of the core; `py::errors` maps it onto the Python exception hierarchy.

use thiserror::Error;

use crate::downsample::DownsampleError;
use crate::frame::FrameError;
use crate::import::ImportError;
use crate::pgcopy::PgCopyError;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// The frame as a whole was refused (not JSON, not an object, too many entries, too many bytes).
    #[error("{0}")]
    Frame(#[from] FrameError),
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
    /// A binary COPY stream of datapoints (exports) could not be read or decoded.
    #[error("{0}")]
    Copy(#[from] PgCopyError),
    /// A series handed to a downsampler is malformed.
    #[error("{0}")]
    Downsample(#[from] DownsampleError),
    /// A history import failed (its source stream, its columns, the database, its checkpoint).
    #[error("{0}")]
    Import(#[from] ImportError),
}

impl From<tokio_postgres::Error> for CoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        CoreError::Database(e.to_string())
    }
}
