//! escrow: a self-hostable data clean room.
//!
//! This crate is the service and its CLI: the data directory and its keys, the sealed
//! storage engine, the catalog, the mutually authenticated HTTPS API and the client.
//! See docs/ARCHITECTURE.md for the crate map and request lifecycle.

pub mod access;
pub mod admin;
pub mod app;
pub mod audit;
pub mod cache;
pub mod catalog;
pub mod client;
pub mod crypto;
pub mod datadir;
pub mod error;
pub mod explain;
pub mod faults;
pub mod fsutil;
pub mod grants;
pub mod ingest;
pub mod matching;
pub mod model;
pub mod overlaps;
pub mod pki;
pub mod policy;
pub mod populations;
pub mod queries;
pub mod server;
pub mod settings;
pub mod store;
pub mod wire;

pub use error::{Error, Result};
