//! Policies: grants, protection settings, versions with diffs, rollback, import/export,
//! and the preview of what another partner can ask.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, Caller, blocking, created_if, json_body, owner_change};
use crate::Error;
use crate::audit::Actor;
use crate::server::AppState;
use crate::wire;
use escrow_policies::roles::Action;

#[utoipa::path(get, path = "/v1/policies", tag = "policies", responses((status = 200, description = "grants made and received", body = wire::GrantList), wire::Errors))]
pub(crate) async fn list_grants(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<wire::GrantList>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let store = state.store.clone();
    Ok(Json(
        blocking(move || crate::grants::list(&store, &caller.partner)).await?,
    ))
}

/// Grants are made by the data owner: the caller's partner owns the dataset named.
#[utoipa::path(post, path = "/v1/policies/grants", tag = "policies", request_body = wire::GrantRequest, responses((status = 201, description = "granted", body = wire::GrantChanged), (status = 200, description = "already granted", body = wire::GrantChanged), wire::Errors))]
pub(crate) async fn add_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<wire::GrantChanged>), ApiError> {
    let (_, (grant, new)) = owner_change(
        &state,
        &caller,
        Action::PolicyChange,
        &body,
        crate::grants::grant,
    )
    .await?;
    tracing::info!(partner = %caller.partner, dataset = %grant.dataset, column = %grant.column, to = %grant.to, usage = %grant.usage, new, "grant");
    Ok((
        created_if(new),
        Json(wire::GrantChanged {
            grant,
            changed: new,
        }),
    ))
}

#[utoipa::path(post, path = "/v1/policies/revocations", tag = "policies", request_body = wire::GrantRequest, responses((status = 200, description = "revoked", body = wire::GrantRevoked), wire::Errors))]
pub(crate) async fn revoke_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<wire::GrantRevoked>, ApiError> {
    let (_, grant) = owner_change(
        &state,
        &caller,
        Action::PolicyChange,
        &body,
        crate::grants::revoke,
    )
    .await?;
    tracing::info!(partner = %caller.partner, dataset = %grant.dataset, column = %grant.column, to = %grant.to, usage = %grant.usage, "grant revoked");
    Ok(Json(wire::GrantRevoked { revoked: grant }))
}

/// The protection settings in force for each of the caller's partner's own datasets
/// (defaults where none were set), by dataset name.
#[utoipa::path(get, path = "/v1/policies/settings", tag = "policies", responses((status = 200, description = "the settings of each of your datasets", body = wire::SettingsList), wire::Errors))]
pub(crate) async fn list_settings(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<wire::SettingsList>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let store = state.store.clone();
    let datasets = blocking(move || {
        (store.list(&caller.partner)?.into_iter())
            .map(|d| {
                let settings = crate::settings::of(&store, &caller.partner, &d.name)?;
                Ok(wire::SettingsNow {
                    dataset: d.name,
                    settings,
                })
            })
            .collect::<crate::Result<Vec<_>>>()
    })
    .await?;
    Ok(Json(wire::SettingsList { datasets }))
}

/// Owners change the protection settings of their own datasets.
#[utoipa::path(post, path = "/v1/policies/settings", tag = "policies", request_body = wire::SettingsChange, responses((status = 200, description = "the dataset's settings now", body = wire::SettingsNow), wire::Errors))]
pub(crate) async fn change_settings(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<wire::SettingsNow>, ApiError> {
    let (req, settings) = owner_change(
        &state,
        &caller,
        Action::PolicyChange,
        &body,
        crate::settings::change,
    )
    .await?;
    let dataset = req.dataset;
    tracing::info!(partner = %caller.partner, %dataset, ?settings, "protection settings changed");
    Ok(Json(wire::SettingsNow { dataset, settings }))
}

/// The caller's partner's policy versions, oldest first, each with its diff.
#[utoipa::path(get, path = "/v1/policies/versions", tag = "policies", responses((status = 200, description = "policy versions, oldest first", body = wire::PolicyHistory), wire::Errors))]
pub(crate) async fn policy_history(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<wire::PolicyHistory>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let store = state.store.clone();
    let versions = blocking(move || crate::policy::history(&store, &caller.partner)).await?;
    Ok(Json(wire::PolicyHistory { versions }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiffParams {
    from: i64,
    /// Default: the latest version.
    to: Option<i64>,
}

#[utoipa::path(get, path = "/v1/policies/diff", tag = "policies", params(("from" = i64, Query), ("to" = Option<i64>, Query)), responses((status = 200, description = "lines removed and added", body = wire::PolicyVersionsDiff), wire::Errors))]
pub(crate) async fn policy_diff(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<DiffParams>,
) -> Result<Json<wire::PolicyVersionsDiff>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let store = state.store.clone();
    let out = blocking(move || {
        let to = match params.to {
            Some(v) => v,
            None => store.catalog().policy_text(&caller.partner, None)?.0,
        };
        let d = crate::policy::diff_versions(&store, &caller.partner, params.from, to)?;
        Ok(wire::PolicyVersionsDiff {
            from: params.from,
            to,
            diff: d,
        })
    })
    .await?;
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VersionParams {
    version: Option<i64>,
}

/// The caller's partner's policy (or one of its versions) as casbin CSV.
#[utoipa::path(get, path = "/v1/policies/export", tag = "policies", params(("version" = Option<i64>, Query)), responses((status = 200, description = "the policy as casbin CSV", body = String, content_type = "text/csv"), wire::Errors))]
pub(crate) async fn policy_export(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<VersionParams>,
) -> Result<Response, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let store = state.store.clone();
    let text = blocking(move || {
        let (v, doc) = crate::policy::document(&store, &caller.partner, params.version)?;
        Ok(doc.export(v))
    })
    .await?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/csv")], text).into_response())
}

/// Replacing the whole policy changes grants, settings and populations: both rights needed.
async fn may_replace_policy(state: &AppState, caller: &Caller) -> Result<Actor, ApiError> {
    caller.may(state, Action::PolicyChange).await?;
    caller.may(state, Action::PopulationChange).await
}

/// Make an earlier version the policy in force again (as a new version).
#[utoipa::path(post, path = "/v1/policies/rollback", tag = "policies", request_body = wire::RollbackRequest, responses((status = 200, description = "rolled back, as a new version", body = wire::PolicyReplaced), wire::Errors))]
pub(crate) async fn policy_rollback(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<wire::PolicyReplaced>, ApiError> {
    let actor = may_replace_policy(&state, &caller).await?;
    let req: wire::RollbackRequest = json_body(&body)?;
    let store = state.store.clone();
    let owner = caller.partner.clone();
    // A version that cannot be read is a refused rollback: `replace` audits it.
    let doc = crate::queries::blocking(move || {
        crate::policy::document(&store, &owner, Some(req.version))
    })
    .await
    .map(|(_, doc)| doc);
    let detail = json!({ "rollback_to": req.version });
    let (version, diff) =
        crate::policy::replace(&state.store, &actor, doc, "policy_rollback", detail, false).await?;
    tracing::info!(partner = %caller.partner, to = req.version, ?version, "policy rolled back");
    Ok(Json(wire::PolicyReplaced {
        dry_run: false,
        version,
        diff,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImportParams {
    #[serde(default)]
    dry_run: bool,
}

/// Replace the caller's partner's policy with a casbin CSV document, validated whole; with
/// `dry_run`, only say what would change.
#[utoipa::path(post, path = "/v1/policies/import", tag = "policies", request_body(content = String, content_type = "text/csv", description = "the whole policy as casbin CSV"), params(("dry_run" = Option<bool>, Query)), responses((status = 200, description = "imported (or the diff of a dry run)", body = wire::PolicyReplaced), wire::Errors))]
pub(crate) async fn policy_import(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<ImportParams>,
    body: bytes::Bytes,
) -> Result<Json<wire::PolicyReplaced>, ApiError> {
    let actor = may_replace_policy(&state, &caller).await?;
    if body.len() > crate::policy::MAX_DOCUMENT_BYTES {
        return Err(Error::TooLarge {
            limit: crate::policy::MAX_DOCUMENT_BYTES as u64,
        }
        .into());
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| Error::bad("invalid_policy", "a policy document is UTF-8 text"))?;
    let detail = json!({ "bytes": body.len() });
    let doc = crate::policy::PolicyDocument::parse(&caller.partner, text);
    let (version, diff) = crate::policy::replace(
        &state.store,
        &actor,
        doc,
        "policy_import",
        detail,
        params.dry_run,
    )
    .await?;
    tracing::info!(partner = %caller.partner, ?version, dry_run = params.dry_run, "policy imported");
    Ok(Json(wire::PolicyReplaced {
        dry_run: params.dry_run,
        version,
        diff,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PreviewParams {
    partner: String,
    dataset: Option<String>,
}

/// What another partner can currently ask of the caller's partner's datasets.
#[utoipa::path(get, path = "/v1/policies/preview", tag = "policies", params(("partner" = String, Query), ("dataset" = Option<String>, Query)), responses((status = 200, description = "what the partner can ask of the caller's datasets", body = wire::Preview), wire::Errors))]
pub(crate) async fn policy_preview(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<PreviewParams>,
) -> Result<Json<crate::explain::Preview>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    Ok(Json(
        state
            .queries
            .preview(&caller.partner, &params.partner, params.dataset.as_deref())
            .await?,
    ))
}
