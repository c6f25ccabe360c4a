//! escrow: a self-hostable data clean room.
//!
//! This crate is the service and its CLI: the query and overlap services, policies, roles,
//! the mutually authenticated HTTPS API, the web console and the client, on the storage
//! engine of `escrow-store` (re-exported under its old paths).
//! See docs/ARCHITECTURE.md for the crate map and request lifecycle.

pub mod access;
pub mod app;
pub mod assumed;
pub mod client;
pub mod explain;
pub mod flights;
pub mod grants;
pub mod overlaps;
pub mod policy;
pub mod populations;
pub mod queries;
pub mod s3;
pub mod server;
pub mod settings;
pub mod wire;

// The storage engine, under the paths the service has always used.
pub use escrow_store::{
    Error, Result, admin, audit, cache, catalog, crypto, datadir, error, faults, fsutil, ingest,
    matching, model, objects, pki, store,
};
