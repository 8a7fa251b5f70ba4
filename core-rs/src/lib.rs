//! WebMACS-TS core: the ingestion engine behind the Python package `webmacs`.
//!
//! The core knows nothing of Python; bindings live in `py/` behind the `python` feature.

pub mod auth;
pub mod batch;
pub mod catalog;
pub mod cells;
pub mod downsample;
pub mod engine;
pub mod error;
pub mod fanout;
pub mod frame;
pub mod import;
pub mod lineproto;
pub mod mqtt;
pub mod parquet_export;
pub mod pg;
pub mod pgcopy;
pub mod rules;
pub mod stats;
pub mod tls;
pub mod writer;
pub mod ws;

#[cfg(feature = "python")]
pub mod py;

pub use error::CoreError;

/// Version of the core crate, exported to Python as `webmacs._core.__version__`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
