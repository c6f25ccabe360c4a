#![allow(clippy::expect_used, clippy::unwrap_used)]
//! escrow's black-box test suite: the real `escrow` binary, real mutual TLS, real files,
//! real SQLite and PostgreSQL. One test binary; modules by surface.

mod harness;
mod s3server;

mod app;
mod architecture;
mod audit;
mod bad_input;
mod console;
mod crash;
mod enrollment;
mod faults;
mod identity;
mod keys;
mod limits;
mod nodes;
mod objects;
mod overlaps;
mod policy;
mod populations;
mod queries;
mod roles;
mod side_doors;
mod tamper;
mod upload;
