//! Binary `COPY … TO STDOUT` of datapoints for exports: the decoder into column buffers and the reader.
//!
//! The export reads `COPY (SELECT time, event_id, value, experiment_id FROM datapoints …) TO STDOUT
//! (FORMAT binary)` and hands the bytes here a frame at a time. Each column comes back as one buffer in the
//! host's byte order, laid out as Arrow expects (`time` as i64 µs since the Unix epoch, `event_id` i32,
//! `value` f64, `experiment_id` i32 with an LSB-first validity bitmap), so the Python side wraps them
//! without a Python object per row. Binary COPY performs no casts: a column of another type is an `Err`.
//!
//! `CopyReader` runs such a COPY on a connection of its own and decodes it frame by frame: no per-row work
//! happens in Python (a psycopg read costs about a microsecond a row, as much as everything else together).
//!
//! `decode` turns bytes into columns (pure, no I/O); `sort` puts decoded rows in (time, event) order;
//! `reader` owns the connections, the prefetch and the channels of frames. The format's constants live in
//! `crate::pg`, shared with the writer and the import.

mod decode;
mod reader;
mod sort;

use thiserror::Error;

pub use crate::pg::{COPY_SIGNATURE as SIGNATURE, PG_EPOCH_US};
pub use decode::{decode_datapoints, message_time, DatapointColumns, FIELDS};
pub use reader::{CopyReader, Order, READ_AHEAD};
pub use sort::order_ties_by_event;

/// Why a COPY payload could not be decoded. Bad input is an `Err`, never a panic.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PgCopyError {
    #[error("not a binary COPY stream (bad signature)")]
    BadSignature,
    #[error("binary COPY header flags {0:#x} are not supported (OIDs or unknown critical flags)")]
    BadFlags(u32),
    #[error("binary COPY data ends inside {what} at byte {at}")]
    Truncated { what: &'static str, at: usize },
    #[error("a tuple has {got} fields at byte {at}, expected {FIELDS} (time, event_id, value, experiment_id)")]
    FieldCount { got: i16, at: usize },
    #[error("field {field} has length {got} at byte {at}, expected {expected}")]
    FieldLength {
        field: &'static str,
        got: i32,
        expected: i32,
        at: usize,
    },
    #[error("{0} bytes follow the COPY trailer")]
    AfterTrailer(usize),
    #[error("database error: {0}")]
    Database(String),
    /// The export's encoder (Parquet) failed: an internal error, not bad input.
    #[error("export encoding failed: {0}")]
    Encode(String),
}

impl PgCopyError {
    /// A stable name for the kind of error (the Python exception's `code`).
    pub fn code(&self) -> &'static str {
        match self {
            PgCopyError::BadSignature => "bad_signature",
            PgCopyError::BadFlags(_) => "bad_flags",
            PgCopyError::Truncated { .. } => "truncated",
            PgCopyError::FieldCount { .. } => "field_count",
            PgCopyError::FieldLength { .. } => "field_length",
            PgCopyError::AfterTrailer(_) => "after_trailer",
            PgCopyError::Database(_) => "database",
            PgCopyError::Encode(_) => "encode",
        }
    }
}

impl From<tokio_postgres::Error> for PgCopyError {
    fn from(e: tokio_postgres::Error) -> Self {
        PgCopyError::Database(crate::error::describe(&e))
    }
}

impl From<crate::CoreError> for PgCopyError {
    fn from(e: crate::CoreError) -> Self {
        match e {
            crate::CoreError::Database(m) => PgCopyError::Database(m),
            other => PgCopyError::Database(other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, PgCopyError>;
