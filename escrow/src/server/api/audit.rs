//! The audit log as the caller may see it: records, export, verification, checkpoint.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, Caller, blocking};
use crate::server::AppState;
use crate::wire;
use escrow_policies::roles::Action;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditParams {
    /// RFC 3339; records at or after it.
    since: Option<String>,
}

/// The record of a read of the audit log, written before the records are read (so the answer
/// includes it): who looked at the log is itself audited.
fn audit_read(caller: &Caller, detail: serde_json::Value) -> crate::audit::Event {
    crate::audit::Event::new(
        "audit_read",
        caller.actor(),
        crate::audit::Outcome::Ok,
        detail,
    )
}

/// The caller's partner's events and every event that touched its datasets or rules.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(("since" = Option<String>, Query, description = "RFC 3339")), responses((status = 200, description = "audit records the caller may see", body = wire::AuditRecords), wire::Errors))]
pub(crate) async fn audit_list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<AuditParams>,
) -> Result<Json<wire::AuditRecords>, ApiError> {
    caller.may(&state, Action::AuditRead).await?;
    let since = params
        .since
        .as_deref()
        .map(crate::audit::parse_since)
        .transpose()?;
    let store = state.store.clone();
    let viewer = crate::audit::Viewer::Partner(caller.partner.clone());
    let read = audit_read(&caller, json!({ "view": "list", "since": params.since }));
    let records = blocking(move || {
        store.record(&read)?;
        crate::audit::list(store.audit_log(), store.catalog(), &viewer, since)
    })
    .await?;
    Ok(Json(wire::AuditRecords { records }))
}

/// The chain as `caller` may export it (`audit_export`), its reading audited as `view`.
async fn export_for(state: &AppState, caller: &Caller, view: &str) -> Result<Vec<u8>, ApiError> {
    caller.may(state, Action::AuditRead).await?;
    let store = state.store.clone();
    let viewer = crate::audit::Viewer::Partner(caller.partner.clone());
    let read = audit_read(caller, json!({ "view": view }));
    blocking(move || {
        store.record(&read)?;
        store.audit_checkpoint()?;
        let mut out = Vec::new();
        crate::audit::export(store.audit_log(), store.catalog(), &viewer, &mut out)?;
        Ok(out)
    })
    .await
}

/// The whole chain as JSON lines, ending in a fresh signed checkpoint; records the caller's
/// partner may not see are redacted to their hashes and signatures.
#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", responses((status = 200, description = "the chain as JSON lines, redacted for the caller", body = String, content_type = "application/jsonl"), wire::Errors))]
pub(crate) async fn audit_export(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let bytes = export_for(&state, &caller, "export").await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/jsonl")],
        bytes,
    )
        .into_response())
}

/// The caller's export of the chain (`audit_export`) verified on the server against the
/// escrow's signing key: for the console's status line. A partner that must not trust the
/// escrow verifies an export itself (`escrow audit verify`).
#[utoipa::path(get, path = "/v1/audit/verification", tag = "audit", responses((status = 200, description = "the caller's export verified on the server", body = wire::AuditVerification), wire::Errors))]
pub(crate) async fn audit_verification(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<wire::AuditVerification>, ApiError> {
    let out = export_for(&state, &caller, "verification").await?;
    let store = state.store.clone();
    let verdict = blocking(move || {
        let opts = crate::audit::VerifyOptions {
            public_key: Some(store.audit_log().public_key().to_string()),
            whole: true,
            ..Default::default()
        };
        Ok(match crate::audit::verify(&out[..], &opts) {
            Ok(v) => wire::AuditVerification::Verified {
                verified: true,
                records: v.records,
                redacted: v.redacted,
                checkpoints: v.checkpoints,
                head: v.head,
                public_key: v.public_key,
            },
            Err(f) => wire::AuditVerification::Broken {
                verified: false,
                line: f.line,
                seq: f.seq,
                reason: f.reason,
            },
        })
    })
    .await?;
    Ok(Json(verdict))
}

/// The latest signed checkpoint (written now if the log has moved on): what a partner keeps
/// to detect a later rewrite. Any authenticated user may fetch it: it reveals only a count
/// and a hash.
#[utoipa::path(get, path = "/v1/audit/checkpoint", tag = "audit", responses((status = 200, description = "the latest signed checkpoint", body = wire::AuditCheckpoint), wire::Errors))]
pub(crate) async fn audit_checkpoint(
    State(state): State<Arc<AppState>>,
    _caller: Caller,
) -> Result<Json<wire::AuditCheckpoint>, ApiError> {
    let store = state.store.clone();
    let c = blocking(move || store.audit_checkpoint()).await?;
    Ok(Json(wire::AuditCheckpoint {
        checkpoint: c,
        public_key: state.store.audit_log().public_key().to_string(),
    }))
}
