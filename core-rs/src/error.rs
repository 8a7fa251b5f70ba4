//! The one error enum of the core; `py::errors` maps it onto the Python exception hierarchy.

use thiserror::Error;

use crate::downsample::DownsampleError;
use crate::frame::FrameError;
use crate::import::ImportError;
use crate::lineproto::LineError;
use crate::pgcopy::PgCopyError;

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
        CoreError::Database(describe(&e))
    }
}

/// An error with its causes: tokio-postgres' own text is only the kind ("db error", "error performing TLS
/// handshake"); the reason (the server's message, the certificate problem) is in the source chain.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !more.is_empty() && !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_follows_the_source_chain() {
        let inner = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let outer = std::io::Error::new(std::io::ErrorKind::ConnectionAborted, inner);
        assert_eq!(describe(&outer), "invalid peer certificate: UnknownIssuer");
        let plain = std::io::Error::other("x");
        assert_eq!(describe(&plain), "x");
    }
}
