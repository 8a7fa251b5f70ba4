//! The fuzz targets, one module per boundary of the core.

pub mod frame;
pub mod http;
pub mod jwt;
pub mod lineproto;
pub mod pgcopy;
pub mod time;
