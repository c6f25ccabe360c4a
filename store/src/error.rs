//! The one error type of the `escrow` crate.
//!
//! Every variant says who is at fault. Client faults carry a stable machine-readable
//! `code` (part of the API contract) and a message that never contains dataset content.
//! Server faults (`Internal`, `Integrity`) are logged in full and shown to clients only as
//! a generic message: see `server::api::ApiError` for the single HTTP mapping.

use std::fmt;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, classified by who must act.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request or the uploaded data is invalid. `code` is stable (see docs/API.md).
    #[error("{message}")]
    BadInput { code: &'static str, message: String },
    /// One field of the request is invalid: `field` names it (a JSON key of the request,
    /// `bounds.COLUMN` for a column's bounds) so that a form can show the reason beside it.
    #[error("{message}")]
    InvalidField {
        code: &'static str,
        field: String,
        message: String,
    },
    /// The named thing does not exist for this caller.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with concurrent work (e.g. a delete racing an upload).
    #[error("{0}")]
    Conflict(String),
    /// The upload is larger than the configured limit.
    #[error("the request body exceeds the size limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// The client stopped sending before the upload was complete.
    #[error("the upload was interrupted before it was complete")]
    Interrupted,
    /// The caller is authenticated but may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// A query the gate or the owners' policies refuse. `rule` is stable (docs/API.md);
    /// the message names constructs or grants, never data.
    #[error("{message}")]
    Refused { rule: &'static str, message: String },
    /// The caller could not be identified (no, unknown or revoked certificate).
    #[error("{0}")]
    Unauthenticated(String),
    /// Sealed data failed authentication: tampering, truncation or a swapped file.
    #[error("sealed data failed authentication: {0}")]
    Integrity(String),
    /// The audit log cannot be written, so the action was not done (fail closed). Logged;
    /// clients see only that the service is unavailable.
    #[error("audit log unavailable: {0}")]
    AuditUnavailable(String),
    /// Too much of the caller's work is already running (per-partner concurrency limit);
    /// nothing was done. `retry_after` is in seconds (HTTP `Retry-After`).
    #[error("too busy: {limit} {what} already running for {scope}; retry in {retry_after} s")]
    Busy {
        what: &'static str,
        limit: usize,
        scope: &'static str,
        retry_after: u64,
    },
    /// The server's storage is full (ENOSPC, quota, SQLite "database or disk is full"): the
    /// action was not done and left nothing behind; retrying later may succeed. Logged.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// A catalog write guarded on what the catalog held found it changed (the audit
    /// writer's insert, `audit::record` following on from a node's last line: another node
    /// wrote first) and was rolled back whole; a NOT NULL violation, which is what the guard
    /// raises. Anywhere else it is a server fault, answered as [`Error::Internal`].
    #[error("internal error: the catalog changed under a guarded write: {0}")]
    Changed(String),
    /// What a request took from its node's copies of earlier reads no longer holds in the
    /// catalog (`catalog::Assumed`): nothing of it was recorded or released, and it is asked
    /// again on fresh reads. Never answered as such (a server fault if it were).
    #[error("internal error: a request's assumed reads no longer hold")]
    Stale,
    /// Anything else on the server side. Logged, never shown to clients.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A client fault with a stable code.
    pub fn bad(code: &'static str, message: impl fmt::Display) -> Self {
        Error::BadInput {
            code,
            message: message.to_string(),
        }
    }

    /// Field `field` of the request is invalid ([`Error::InvalidField`]).
    pub fn invalid_field(
        code: &'static str,
        field: impl Into<String>,
        message: impl fmt::Display,
    ) -> Self {
        Error::InvalidField {
            code,
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// A query or overlap refused by rule `rule` (stable, see docs/API.md).
    pub fn refused(rule: &'static str, message: impl fmt::Display) -> Self {
        Error::Refused {
            rule,
            message: message.to_string(),
        }
    }

    /// A server fault; `context` says what was being done.
    pub fn internal(context: impl fmt::Display) -> Self {
        Error::Internal(context.to_string())
    }

    /// The stable code of this error, as returned to API clients.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadInput { code, .. } | Error::InvalidField { code, .. } => code,
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::TooLarge { .. } => "too_large",
            Error::Interrupted => "upload_interrupted",
            Error::Forbidden(_) => "forbidden",
            Error::Refused { .. } => "QUERY_REFUSED",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::AuditUnavailable(_) => "audit_unavailable",
            Error::StorageFull(_) => "storage_full",
            Error::Busy { .. } => "too_many_requests",
            Error::Integrity(_) | Error::Changed(_) | Error::Stale | Error::Internal(_) => {
                "internal"
            }
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Error::StorageFull(format!("catalog: {e}")),
            _ if matches!(&e, rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL) =>
            {
                Error::Changed(format!("catalog: {e}"))
            }
            _ => Error::Internal(format!("catalog: {e}")),
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // Its Display is only "db error": the server's own words are in the source.
        let words = match e.as_db_error() {
            Some(db) => format!("catalog: {} ({})", db.message(), db.code().code()),
            None => format!("catalog: {e}"),
        };
        match e.code() {
            Some(&tokio_postgres::error::SqlState::DISK_FULL) => {
                Error::StorageFull(format!("catalog: {e}"))
            }
            Some(&tokio_postgres::error::SqlState::NOT_NULL_VIOLATION) => Error::Changed(words),
            _ => Error::Internal(words),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
        match e.kind() {
            StorageFull | QuotaExceeded | FileTooLarge => Error::StorageFull(format!("i/o: {e}")),
            _ => Error::Internal(format!("i/o: {e}")),
        }
    }
}

/// A query engine error as the service reports it: refusals keep their rule; a memory
/// refusal decided before admission is shown whole.
impl From<escrow_query::QueryError> for Error {
    fn from(e: escrow_query::QueryError) -> Self {
        match e {
            escrow_query::QueryError::Refused { rule, message } => Error::Refused { rule, message },
            // An admission refusal depends on the caller's own rows, the question and the
            // other partners' size classes only, and carries no estimate: shown whole.
            escrow_query::QueryError::ResourcesExhausted(m)
                if m.starts_with(escrow_query::exec::ADMISSION_REFUSAL) =>
            {
                Error::bad("query_memory_limit", m)
            }
            escrow_query::QueryError::ResourcesExhausted(_) => Error::bad(
                "query_memory_limit",
                "the query needs more memory than the per-query limit",
            ),
            // DataFusion wraps some of its errors in others (external, context).
            escrow_query::QueryError::Internal(m) if m.contains("Resources exhausted") => {
                Error::bad(
                    "query_memory_limit",
                    "the query needs more memory than the per-query limit",
                )
            }
            escrow_query::QueryError::Internal(m) => Error::Internal(format!("query: {m}")),
        }
    }
}
