//! escrow's storage engine: the data directory and its keys, sealed datasets (ingest, seal,
//! verified reads), the catalog, the audit log, and the value types they hold (`model`).
//!
//! No HTTP: this crate depends on neither axum, hyper, reqwest nor clap, so Cargo keeps the
//! engine free of them; the `escrow` crate builds the service and its CLI on top, and the
//! fuzz targets link only this. See docs/ARCHITECTURE.md.

pub mod admin;
pub mod audit;
pub mod background;
pub mod blocking;
pub mod cache;
pub mod catalog;
pub mod crypto;
pub mod datadir;
pub mod error;
pub mod faults;
pub mod fsutil;
pub mod ingest;
pub mod matching;
pub mod model;
pub mod objects;
pub mod pki;
pub mod projected;
pub mod store;

pub use error::{Error, Result};
