//! The HTTP API (axum). Thin handlers: authenticate, call the store on the blocking pool,
//! map the result. `ApiError` is the one place errors become HTTP responses.
//!
//! There is deliberately no route that returns dataset rows.

use std::io;
use std::sync::Arc;

use axum::body::Body;

use super::limits::Work;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::{AppState, ConnInfo};
use crate::Error;
use crate::audit::Actor;
use crate::catalog::DatasetInfo;
use crate::ingest::Format;
use crate::store::{UploadOutcome, UploadRequest};
use escrow_policies::roles::Action;

/// Build the router with its state.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/datasets", get(list_datasets))
        .route(
            "/v1/datasets/{name}",
            axum::routing::put(upload).delete(delete_dataset),
        )
        .route("/v1/policies", get(list_grants))
        .route("/v1/policies/grants", axum::routing::post(add_grant))
        .route(
            "/v1/policies/revocations",
            axum::routing::post(revoke_grant),
        )
        .route(
            "/v1/policies/settings",
            axum::routing::post(change_settings),
        )
        .route("/v1/policies/versions", get(policy_history))
        .route("/v1/policies/diff", get(policy_diff))
        .route("/v1/policies/export", get(policy_export))
        .route(
            "/v1/policies/rollback",
            axum::routing::post(policy_rollback),
        )
        .route("/v1/policies/import", axum::routing::post(policy_import))
        .route(
            "/v1/populations",
            get(list_populations).post(add_population),
        )
        .route(
            "/v1/populations/removals",
            axum::routing::post(remove_population),
        )
        .route("/v1/users", get(list_users).post(add_user))
        .route("/v1/users/revocations", axum::routing::post(revoke_user))
        .route("/v1/audit", get(audit_list))
        .route("/v1/audit/export", get(audit_export))
        .route("/v1/audit/checkpoint", get(audit_checkpoint))
        .route("/v1/audit/verification", get(audit_verification))
        .route("/v1/openapi.json", get(super::openapi::document))
        .route("/v1/policies/preview", get(policy_preview))
        .route("/v1/queries", axum::routing::post(query))
        .route("/v1/queries/explain", axum::routing::post(explain_query))
        .route("/v1/overlaps", axum::routing::post(overlap))
        .route("/v1/overlaps/explain", axum::routing::post(explain_overlap))
        .route("/v1/reports/co-selling", axum::routing::post(co_selling))
        .merge(super::console::routes())
        .fallback(|| async { ApiError(Error::NotFound("no such endpoint".into())) })
        .method_not_allowed_fallback(|| async {
            ApiError(Error::bad(
                "method_not_allowed",
                "method not allowed on this endpoint",
            ))
        })
        // Extractor rejections (a JSON body over axum's 2 MiB default) come as plain text:
        // give them the same JSON error shape and code as everything else.
        .layer(axum::middleware::map_response(json_rejections))
        // (uploads stream their `Body`, which this does not limit: they have their own)
        .layer(axum::extract::DefaultBodyLimit::max(
            MAX_REQUEST_BODY as usize,
        ))
        .with_state(state)
}

/// Largest request body other than an upload (JSON requests, policy documents).
const MAX_REQUEST_BODY: u64 = 2 << 20;

async fn json_rejections(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        return ApiError(Error::TooLarge {
            limit: MAX_REQUEST_BODY,
        })
        .into_response();
    }
    // Other extractor rejections (a query string that does not fit) are plain text too.
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if response.status().is_client_error() && plain {
        let status = response.status();
        let text = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let mut r = ApiError(Error::bad("invalid_request", text)).into_response();
        *r.status_mut() = status;
        return r;
    }
    response
}

/// The one error-to-HTTP mapping.
///
/// | variant         | status | code                       |
/// |-----------------|--------|----------------------------|
/// | BadInput        | 400    | per error (see docs/API.md)|
/// | NotFound        | 404    | not_found                  |
/// | Conflict        | 409    | conflict                   |
/// | TooLarge        | 413    | too_large                  |
/// | Interrupted     | 400    | upload_interrupted         |
/// | Forbidden       | 403    | forbidden                  |
/// | Refused         | 400 (query not understood) / 403 (not allowed) | QUERY_REFUSED + `rule` |
/// | Unauthenticated | 401    | unauthenticated            |
/// | AuditUnavailable| 503    | audit_unavailable (details logged) |
/// | StorageFull     | 507    | storage_full (details logged) |
/// | Busy            | 429 + Retry-After | too_many_requests |
/// | Integrity       | 500    | internal (details logged)  |
/// | Internal        | 500    | internal (details logged)  |
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = match &e {
            Error::BadInput { code, .. } if *code == "method_not_allowed" => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            Error::BadInput { .. } | Error::Interrupted => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Refused { rule, .. } if escrow_query::is_planning_rule(rule) => {
                StatusCode::BAD_REQUEST
            }
            Error::Refused { .. } => StatusCode::FORBIDDEN,
            Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Error::AuditUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            Error::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Integrity(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // Server faults are logged in full under an incident id; the client learns only what
        // it can act on (their details can hold paths, data or key ids).
        let public = match &e {
            Error::AuditUnavailable(_) => {
                Some("the audit log cannot be written, so nothing was done (fail closed)")
            }
            Error::StorageFull(_) => {
                Some("the server's storage is full, so nothing was stored; retry later")
            }
            Error::Integrity(_) | Error::Internal(_) => Some("internal error"),
            _ => None,
        };
        let message = match public {
            Some(public) => {
                let incident = uuid::Uuid::new_v4().simple().to_string();
                tracing::error!(%incident, code = e.code(), error = %e, "server fault");
                format!("{public}; the operator can find incident {incident} in the server log")
            }
            None => e.to_string(),
        };
        let rule = match &e {
            Error::Refused { rule, .. } => Some(rule.to_string()),
            _ => None,
        };
        let body = crate::wire::ErrorBody {
            error: crate::wire::ErrorDetail {
                code: e.code().to_string(),
                message,
                rule,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Error::Busy { retry_after, .. } = &e {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, (*retry_after).into());
        }
        response
    }
}

/// The authenticated caller: a registered, unrevoked identity, known by the certificate
/// verified in the TLS handshake or by a console session minted with one (`console.rs`).
/// Handlers that take a `Caller` cannot run for anyone else.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Caller {
    pub partner: String,
    pub user: String,
    pub role: String,
    /// How the caller authenticated.
    pub via: Via,
}

/// How a caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Its client certificate (programs, the CLI).
    Certificate,
    /// A browser session of the web console.
    Console,
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let subject = parts
            .extensions
            .get::<ConnInfo>()
            .and_then(|c| c.subject.clone());
        let (serial, partner, user, via) = match subject {
            Some(s) => (s.serial, s.partner, s.user, Via::Certificate),
            None => {
                let session =
                    super::console::session(&parts.method, &parts.headers, &state.sessions)?;
                let id = session.identity;
                (id.serial, id.partner, id.user, Via::Console)
            }
        };
        let store = state.store.clone();
        let row = blocking(move || store.catalog().active_identity(&serial)).await?;
        match row {
            // Checked per request, so a revocation also ends keep-alive connections' access
            // and the console sessions of the identity.
            Some(id) if id.partner == partner && id.user == user => Ok(Caller {
                partner: id.partner,
                user: id.user,
                role: id.role,
                via,
            }),
            _ => Err(Error::Unauthenticated(
                "the identity is not registered or was revoked".into(),
            )
            .into()),
        }
    }
}

impl Caller {
    /// The caller as the audit log names it.
    pub fn actor(&self) -> Actor {
        let mut actor = Actor::user(&self.partner, &self.user, &self.role);
        if self.via == Via::Console {
            actor.via = Some("console".into());
        }
        actor
    }

    /// The caller, if its role may take `action` (casbin role policy); refusals are audited.
    async fn may(&self, state: &AppState, action: Action) -> Result<Actor, ApiError> {
        let actor = self.actor();
        state.access.require(&actor, action).await?;
        Ok(actor)
    }
}

/// Run blocking store work on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
        .map_err(ApiError)
}

#[utoipa::path(get, path = "/v1/whoami", tag = "whoami", responses((status = 200, description = "the caller", body = Caller), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn whoami(caller: Caller) -> Json<Caller> {
    Json(caller)
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct DatasetList {
    datasets: Vec<DatasetInfo>,
}

#[utoipa::path(get, path = "/v1/datasets", tag = "datasets", responses((status = 200, description = "the caller's datasets", body = DatasetList), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn list_datasets(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<DatasetList>, ApiError> {
    caller.may(&state, Action::DatasetList).await?;
    let store = state.store.clone();
    let datasets = blocking(move || store.list(&caller.partner)).await?;
    Ok(Json(DatasetList { datasets }))
}

#[derive(Debug, Deserialize)]
pub(super) struct UploadParams {
    format: Option<String>,
    key_column: Option<String>,
    name_column: Option<String>,
    /// Comma-separated name-context columns.
    name_context: Option<String>,
    key_type: Option<String>,
}

/// Bytes of a refused upload read and discarded so the client can read the error response.
const DRAIN_AFTER_ERROR: u64 = 64 << 20;

#[utoipa::path(put, path = "/v1/datasets/{name}", tag = "datasets", request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's bytes: CSV, Parquet, Arrow IPC file or stream"), params(("name" = String, Path, description = "dataset name, [a-z][a-z0-9_]{0,62}"), ("format" = Option<String>, Query, description = "csv, arrow, arrow-stream, parquet; sniffed when absent"), ("key_column" = Option<String>, Query), ("name_column" = Option<String>, Query), ("name_context" = Option<String>, Query, description = "comma-separated columns"), ("key_type" = Option<String>, Query, description = "website or id")), responses((status = 201, description = "the version committed", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn upload(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(params): Query<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<UploadOutcome>), ApiError> {
    caller.may(&state, Action::DatasetUpload).await?;
    let _permit = state.admission.admit(&caller.partner, Work::Upload).await?;
    crate::datadir::validate_name("dataset", &name)?;
    let limit = state.store.config().max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::TooLarge { limit }.into());
    }
    let format = params.format.as_deref().map(Format::parse).transpose()?;
    let req = UploadRequest {
        owner: caller.partner.clone(),
        actor: caller.actor(),
        dataset: name,
        format,
        key: crate::ingest::KeySpec {
            column: params.key_column.filter(|k| !k.is_empty()),
            name_column: params.name_column.filter(|k| !k.is_empty()),
            name_context: params
                .name_context
                .iter()
                .flat_map(|c| c.split(','))
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
            key_type: params
                .key_type
                .as_deref()
                .map(crate::ingest::KeyType::parse)
                .transpose()?
                .unwrap_or_default(),
        },
    };
    let stream = body.into_data_stream().map_err(io::Error::other);
    let mut reader = SyncIoBridge::new(StreamReader::new(stream));
    let store = state.store.clone();
    let started = std::time::Instant::now();
    tracing::info!(partner = %caller.partner, user = %caller.user, dataset = %req.dataset, "upload started");
    let result = blocking(move || {
        let r = store.upload(&req, &mut reader);
        if r.is_err() {
            let _ = io::copy(
                &mut io::Read::take(&mut reader, DRAIN_AFTER_ERROR),
                &mut io::sink(),
            );
        }
        r
    })
    .await;
    match result {
        Ok(outcome) => {
            tracing::info!(
                partner = %caller.partner,
                dataset = %outcome.dataset,
                version = outcome.version,
                rows = outcome.rows,
                bytes = outcome.bytes,
                secs = started.elapsed().as_secs_f64(),
                "upload committed"
            );
            Ok((StatusCode::CREATED, Json(outcome)))
        }
        Err(e) => {
            tracing::info!(partner = %caller.partner, code = %e.0.code(), "upload refused");
            Err(e)
        }
    }
}

#[utoipa::path(delete, path = "/v1/datasets/{name}", tag = "datasets", params(("name" = String, Path)), responses((status = 200, description = "crypto-shredded", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn delete_dataset(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let actor = caller.may(&state, Action::DatasetDelete).await?;
    let store = state.store.clone();
    let n = {
        let name = name.clone();
        blocking(move || store.delete(&actor, &name)).await?
    };
    tracing::info!(partner = %caller.partner, dataset = %name, versions = n, "dataset crypto-shredded");
    Ok(Json(json!({ "dataset": name, "versions_destroyed": n })))
}

#[utoipa::path(get, path = "/v1/policies", tag = "policies", responses((status = 200, description = "grants made and received", body = crate::grants::GrantList), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn list_grants(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<crate::grants::GrantList>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let store = state.store.clone();
    Ok(Json(
        blocking(move || crate::grants::list(&store, &caller.partner)).await?,
    ))
}

/// Grants are made by the data owner: the caller's partner owns the dataset named.
#[utoipa::path(post, path = "/v1/policies/grants", tag = "policies", request_body = crate::grants::GrantRequest, responses((status = 201, description = "granted", body = serde_json::Value), (status = 200, description = "already granted", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn add_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
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
        Json(json!({ "grant": grant, "changed": new })),
    ))
}

#[utoipa::path(post, path = "/v1/policies/revocations", tag = "policies", request_body = crate::grants::GrantRequest, responses((status = 200, description = "revoked", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn revoke_grant(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (_, grant) = owner_change(
        &state,
        &caller,
        Action::PolicyChange,
        &body,
        crate::grants::revoke,
    )
    .await?;
    tracing::info!(partner = %caller.partner, dataset = %grant.dataset, column = %grant.column, to = %grant.to, usage = %grant.usage, "grant revoked");
    Ok(Json(json!({ "revoked": grant })))
}

#[utoipa::path(get, path = "/v1/populations", tag = "populations", responses((status = 200, description = "populations of the caller's datasets and those shared with it", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn list_populations(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.may(&state, Action::PopulationRead).await?;
    let store = state.store.clone();
    let list = blocking(move || crate::populations::list(&store, &caller.partner)).await?;
    Ok(Json(json!({ "populations": list })))
}

/// Populations are defined by the data owner: the caller's partner owns the dataset named.
#[utoipa::path(post, path = "/v1/populations", tag = "populations", request_body = crate::populations::PopulationRequest, responses((status = 201, description = "defined", body = serde_json::Value), (status = 200, description = "unchanged", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn add_population(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let (_, (p, new)) = owner_change(
        &state,
        &caller,
        Action::PopulationChange,
        &body,
        crate::populations::add,
    )
    .await?;
    tracing::info!(partner = %caller.partner, dataset = %p.dataset, population = %p.name, new, "population defined");
    Ok((
        created_if(new),
        Json(json!({ "population": p, "changed": new })),
    ))
}

#[utoipa::path(post, path = "/v1/populations/removals", tag = "populations", request_body = crate::populations::PopulationRequest, responses((status = 200, description = "removed", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn remove_population(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (req, ()) = owner_change(
        &state,
        &caller,
        Action::PopulationChange,
        &body,
        crate::populations::remove,
    )
    .await?;
    let (dataset, name) = (req.dataset, req.name);
    tracing::info!(partner = %caller.partner, dataset = %dataset, population = %name, "population removed");
    Ok(Json(
        json!({ "removed": { "dataset": dataset, "name": name } }),
    ))
}

/// A change the data owner makes: the caller's right to `action`, its JSON request, then
/// `change` on the blocking pool (it writes the catalog and the audit log). Returns the
/// request with the outcome.
async fn owner_change<R, T>(
    state: &AppState,
    caller: &Caller,
    action: Action,
    body: &[u8],
    change: fn(&crate::store::Store, &Actor, &R) -> crate::Result<T>,
) -> Result<(R, T), ApiError>
where
    R: serde::de::DeserializeOwned + Send + 'static,
    T: Send + 'static,
{
    let actor = caller.may(state, action).await?;
    let req: R = json_body(body)?;
    let store = state.store.clone();
    blocking(move || change(&store, &actor, &req).map(|out| (req, out))).await
}

/// 201 for a change that created something, 200 when it was already there.
fn created_if(new: bool) -> StatusCode {
    if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// Parse a JSON request body; malformed bodies get the API's own error shape.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(Error::bad(
            "invalid_request",
            format!("invalid JSON body: {e}"),
        ))
    })
}

/// Owners change the protection settings of their own datasets.
#[utoipa::path(post, path = "/v1/policies/settings", tag = "policies", request_body = crate::settings::SettingsChange, responses((status = 200, description = "the dataset's settings now", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn change_settings(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
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
    Ok(Json(json!({ "dataset": dataset, "settings": settings })))
}

/// The caller's partner's policy versions, oldest first, each with its diff.
#[utoipa::path(get, path = "/v1/policies/versions", tag = "policies", responses((status = 200, description = "policy versions, oldest first", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn policy_history(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let store = state.store.clone();
    let versions = blocking(move || crate::policy::history(&store, &caller.partner)).await?;
    Ok(Json(json!({ "versions": versions })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiffParams {
    from: i64,
    /// Default: the latest version.
    to: Option<i64>,
}

#[utoipa::path(get, path = "/v1/policies/diff", tag = "policies", params(("from" = i64, Query), ("to" = Option<i64>, Query)), responses((status = 200, description = "lines removed and added", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn policy_diff(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<DiffParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let store = state.store.clone();
    let out = blocking(move || {
        let to = match params.to {
            Some(v) => v,
            None => store.catalog().policy_text(&caller.partner, None)?.0,
        };
        let d = crate::policy::diff_versions(&store, &caller.partner, params.from, to)?;
        Ok(json!({ "from": params.from, "to": to, "removed": d.removed, "added": d.added }))
    })
    .await?;
    Ok(Json(out))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VersionParams {
    version: Option<i64>,
}

/// The caller's partner's policy (or one of its versions) as casbin CSV.
#[utoipa::path(get, path = "/v1/policies/export", tag = "policies", params(("version" = Option<i64>, Query)), responses((status = 200, description = "the policy as casbin CSV", body = String, content_type = "text/csv"), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn policy_export(
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackRequest {
    version: i64,
}

/// Make an earlier version the policy in force again (as a new version).
#[utoipa::path(post, path = "/v1/policies/rollback", tag = "policies", request_body = RollbackRequest, responses((status = 200, description = "rolled back, as a new version", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn policy_rollback(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let actor = may_replace_policy(&state, &caller).await?;
    let req: RollbackRequest = json_body(&body)?;
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
    Ok(Json(
        json!({ "version": version, "removed": diff.removed, "added": diff.added }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImportParams {
    #[serde(default)]
    dry_run: bool,
}

/// Replace the caller's partner's policy with a casbin CSV document, validated whole; with
/// `dry_run`, only say what would change.
#[utoipa::path(post, path = "/v1/policies/import", tag = "policies", request_body(content = String, content_type = "text/csv", description = "the whole policy as casbin CSV"), params(("dry_run" = Option<bool>, Query)), responses((status = 200, description = "imported (or the diff of a dry run)", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn policy_import(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<ImportParams>,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
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
    Ok(Json(json!({
        "dry_run": params.dry_run,
        "version": version,
        "removed": diff.removed,
        "added": diff.added,
    })))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ExplainRequest {
    sql: String,
}

/// Why a query would be answered or refused, rule by rule; nothing is read, spent or run.
#[utoipa::path(post, path = "/v1/queries/explain", tag = "queries", request_body = ExplainRequest, responses((status = 200, description = "why the query would be answered or refused", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn explain_query(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<crate::explain::Explanation>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let _permit = state
        .admission
        .admit(&caller.partner, Work::Question)
        .await?;
    let req: ExplainRequest = json_body(&body)?;
    Ok(Json(
        state.queries.explain_sql(&caller.partner, &req.sql).await?,
    ))
}

/// Why an overlap question would be answered or refused.
#[utoipa::path(post, path = "/v1/overlaps/explain", tag = "overlaps", request_body = crate::overlaps::OverlapRequest, responses((status = 200, description = "why the overlap would be answered or refused", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn explain_overlap(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<crate::explain::Explanation>, ApiError> {
    caller.may(&state, Action::PolicyRead).await?;
    let _permit = state
        .admission
        .admit(&caller.partner, Work::Question)
        .await?;
    let req: crate::overlaps::OverlapRequest = json_body(&body)?;
    Ok(Json(
        state.queries.explain_overlap(&caller.partner, &req).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PreviewParams {
    partner: String,
    dataset: Option<String>,
}

/// What another partner can currently ask of the caller's partner's datasets.
#[utoipa::path(get, path = "/v1/policies/preview", tag = "policies", params(("partner" = String, Query), ("dataset" = Option<String>, Query)), responses((status = 200, description = "what the partner can ask of the caller's datasets", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn policy_preview(
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

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct QueryRequest {
    sql: String,
    /// json (default), csv or arrow.
    #[serde(default)]
    format: Option<String>,
}

/// Run a query. Refusals are 4xx `QUERY_REFUSED` with the rule; runtime failures are one
/// generic internal error (details in the server log only).
#[utoipa::path(post, path = "/v1/queries", tag = "queries", request_body = QueryRequest, responses((status = 200, description = "the answer: JSON, CSV or Arrow IPC stream by `format`", content((serde_json::Value = "application/json"), (String = "text/csv"), (Vec<u8> = "application/vnd.apache.arrow.stream"))), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn query(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let actor = caller.may(&state, Action::QueryRun).await?;
    let _permit = state
        .admission
        .admit(&caller.partner, Work::Question)
        .await?;
    let req: QueryRequest = json_body(&body)?;
    let format = req.format.as_deref().unwrap_or("json");
    if !matches!(format, "json" | "csv" | "arrow") {
        return Err(Error::bad("invalid_request", "format must be json, csv or arrow").into());
    }
    let started = std::time::Instant::now();
    let outcome = match state.queries.run(&actor, &req.sql).await {
        Ok(o) => o,
        Err(e) => {
            match &e {
                Error::Refused { rule, .. } => {
                    tracing::info!(partner = %caller.partner, user = %caller.user, %rule, "query refused")
                }
                other => {
                    tracing::info!(partner = %caller.partner, user = %caller.user, code = other.code(), "query failed")
                }
            }
            return Err(e.into());
        }
    };
    let rows: usize = outcome.answer.suppressed.len();
    let suppressed = outcome.answer.suppressed.iter().filter(|s| **s).count();
    tracing::info!(
        partner = %caller.partner,
        user = %caller.user,
        rows,
        suppressed,
        epsilon_spent = outcome.cost.epsilon_spent,
        repeated = outcome.cost.repeated,
        secs = started.elapsed().as_secs_f64(),
        "query answered"
    );
    let meta = [
        ("escrow-suppressed-rows", suppressed.to_string()),
        (
            "escrow-epsilon-spent",
            outcome.cost.epsilon_spent.to_string(),
        ),
    ];
    let (content_type, bytes) = match format {
        "csv" => ("text/csv", crate::queries::output::to_csv(&outcome)?),
        "arrow" => (
            "application/vnd.apache.arrow.stream",
            crate::queries::output::to_arrow(&outcome)?,
        ),
        _ => {
            let v = crate::queries::output::to_json(&outcome)?;
            return Ok(Json(v).into_response());
        }
    };
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        bytes,
    )
        .into_response();
    for (k, v) in meta {
        if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
            resp.headers_mut().insert(k, v);
        }
    }
    Ok(resp)
}

/// A JSON request with an optional `format` (json or csv) beside the request's own fields.
fn with_format<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, bool), ApiError> {
    let mut v: serde_json::Value = json_body(body)?;
    let format = match v.as_object_mut().and_then(|o| o.remove("format")) {
        None => "json".to_string(),
        Some(serde_json::Value::String(f)) => f,
        Some(_) => String::new(),
    };
    let csv = match format.as_str() {
        "json" => false,
        "csv" => true,
        _ => return Err(Error::bad("invalid_request", "format must be json or csv").into()),
    };
    let req = serde_json::from_value(v).map_err(|e| {
        ApiError(Error::bad(
            "invalid_request",
            format!("invalid request: {e}"),
        ))
    })?;
    Ok((req, csv))
}

fn csv_response(bytes: Vec<u8>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/csv")], bytes).into_response()
}

/// Log an overlap or report outcome (never its counts).
fn log_overlap(
    caller: &Caller,
    what: &str,
    result: &Result<&crate::overlaps::OverlapOutcome, &Error>,
    started: std::time::Instant,
) {
    match result {
        Ok(o) => tracing::info!(
            partner = %caller.partner,
            user = %caller.user,
            theirs = %o.theirs,
            cells = o.rows.len(),
            suppressed = o.rows.iter().filter(|r| r.suppressed).count(),
            epsilon_spent = o.cost.epsilon_spent,
            repeated = o.cost.repeated,
            secs = started.elapsed().as_secs_f64(),
            "{what} answered"
        ),
        Err(Error::Refused { rule, .. }) => {
            tracing::info!(partner = %caller.partner, user = %caller.user, %rule, "{what} refused")
        }
        Err(e) => {
            tracing::info!(partner = %caller.partner, user = %caller.user, code = e.code(), "{what} failed")
        }
    }
}

/// The overlap matrix of the caller's populations and another partner's.
#[utoipa::path(post, path = "/v1/overlaps", tag = "overlaps", request_body = crate::overlaps::OverlapRequest, responses((status = 200, description = "the overlap matrix, JSON or CSV by `format`", content((serde_json::Value = "application/json"), (String = "text/csv"))), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn overlap(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let actor = caller.may(&state, Action::OverlapRun).await?;
    let _permit = state
        .admission
        .admit(&caller.partner, Work::Question)
        .await?;
    let (req, csv): (crate::overlaps::OverlapRequest, bool) = with_format(&body)?;
    let started = std::time::Instant::now();
    let result = state.queries.overlap(&actor, &req).await;
    log_overlap(&caller, "overlap", &result.as_ref(), started);
    let o = result?;
    if csv {
        let bytes = crate::overlaps::output::rows_csv(&o.rows, o.by.as_deref())?;
        return Ok(csv_response(bytes));
    }
    Ok(Json(crate::overlaps::output::overlap_json(&o)).into_response())
}

/// The co-selling report.
#[utoipa::path(post, path = "/v1/reports/co-selling", tag = "reports", request_body = crate::overlaps::CoSellingRequest, responses((status = 200, description = "the co-selling report, JSON or CSV by `format`", content((serde_json::Value = "application/json"), (String = "text/csv"))), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn co_selling(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let actor = caller.may(&state, Action::OverlapRun).await?;
    let _permit = state
        .admission
        .admit(&caller.partner, Work::Question)
        .await?;
    let (req, csv): (crate::overlaps::CoSellingRequest, bool) = with_format(&body)?;
    let started = std::time::Instant::now();
    let result = state.queries.co_selling(&actor, &req).await;
    log_overlap(
        &caller,
        "co-selling report",
        &result.as_ref().map(|r| &r.overlap),
        started,
    );
    let r = result?;
    if csv {
        let rows = r.sections.iter().flat_map(|s| &s.rows);
        let bytes = crate::overlaps::output::rows_csv(rows, r.overlap.by.as_deref())?;
        return Ok(csv_response(bytes));
    }
    Ok(Json(crate::overlaps::output::co_selling_json(&r)).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UserRequest {
    /// The partner the user belongs to: must be the caller's own.
    #[serde(default)]
    partner: Option<String>,
    name: String,
    #[serde(default)]
    role: Option<String>,
}

/// The active users of the caller's partner and their roles (admins).
#[utoipa::path(get, path = "/v1/users", tag = "users", responses((status = 200, description = "users of the caller's partner", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn list_users(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.may(&state, Action::UserManage).await?;
    let store = state.store.clone();
    let (rows, _) = blocking(move || store.catalog().role_assignments()).await?;
    let users: Vec<serde_json::Value> = rows
        .into_iter()
        .filter(|r| r.partner == caller.partner)
        .map(|r| json!({ "user": r.user, "role": r.role }))
        .collect();
    Ok(Json(json!({ "partner": caller.partner, "users": users })))
}

/// A partner's admin adds a user of its own partner; the new identity's bundle (certificate,
/// private key, CA) is returned once, over this mutually authenticated connection.
#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = UserRequest, responses((status = 201, description = "added; the identity bundle is returned once", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn add_user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let actor = caller.may(&state, Action::UserManage).await?;
    let req: UserRequest = json_body(&body)?;
    own_partner(&caller, &req)?;
    let role = req
        .role
        .ok_or_else(|| Error::bad("invalid_role", "a user needs a role"))?;
    let dir = state.store.data_dir().clone();
    let partner = caller.partner.clone();
    let (name, r) = (req.name.clone(), role.clone());
    let bundle = blocking(move || {
        let path = crate::admin::add_user(&dir, &actor, &partner, &name, &r)?;
        let read = |f: &str| std::fs::read_to_string(path.join(f)).map_err(Error::from);
        Ok(json!({
            "cert_pem": read("cert.pem")?,
            "key_pem": read("key.pem")?,
            "ca_pem": read("ca.pem")?,
        }))
    })
    .await?;
    tracing::info!(partner = %caller.partner, user = %req.name, %role, by = %caller.user, "user added");
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "partner": caller.partner, "user": req.name, "role": role, "bundle": bundle }),
        ),
    ))
}

#[utoipa::path(post, path = "/v1/users/revocations", tag = "users", request_body = UserRequest, responses((status = 200, description = "revoked", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn revoke_user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let actor = caller.may(&state, Action::UserManage).await?;
    let req: UserRequest = json_body(&body)?;
    own_partner(&caller, &req)?;
    let dir = state.store.data_dir().clone();
    let partner = caller.partner.clone();
    let name = req.name.clone();
    blocking(move || crate::admin::revoke_user(&dir, &actor, &partner, &name)).await?;
    tracing::info!(partner = %caller.partner, user = %req.name, by = %caller.user, "user revoked");
    Ok(Json(
        json!({ "revoked": { "partner": caller.partner, "user": req.name } }),
    ))
}

/// An admin manages the users of its own partner only.
fn own_partner(caller: &Caller, req: &UserRequest) -> Result<(), ApiError> {
    match &req.partner {
        Some(p) if *p != caller.partner => Err(Error::Forbidden(format!(
            "an admin of {} manages {}'s users only",
            caller.partner, caller.partner
        ))
        .into()),
        _ => Ok(()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditParams {
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
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(("since" = Option<String>, Query, description = "RFC 3339")), responses((status = 200, description = "audit records the caller may see", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn audit_list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<AuditParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
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
        crate::audit::list(store.audit_log().path(), &viewer, since)
    })
    .await?;
    Ok(Json(json!({ "records": records })))
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
        crate::audit::export(store.audit_log().path(), &viewer, &mut out)?;
        Ok(out)
    })
    .await
}

/// The whole chain as JSON lines, ending in a fresh signed checkpoint; records the caller's
/// partner may not see are redacted to their hashes and signatures.
#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", responses((status = 200, description = "the chain as JSON lines, redacted for the caller", body = String, content_type = "application/jsonl"), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn audit_export(
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
#[utoipa::path(get, path = "/v1/audit/verification", tag = "audit", responses((status = 200, description = "the caller's export verified on the server", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn audit_verification(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    let out = export_for(&state, &caller, "verification").await?;
    let store = state.store.clone();
    let verdict = blocking(move || {
        let opts = crate::audit::VerifyOptions {
            public_key: Some(store.audit_log().public_key().to_string()),
            whole: true,
            ..Default::default()
        };
        Ok(match crate::audit::verify(&out[..], &opts) {
            Ok(v) => json!({
                "verified": true,
                "records": v.records,
                "redacted": v.redacted,
                "checkpoints": v.checkpoints,
                "head": v.head,
                "public_key": v.public_key,
            }),
            Err(f) => json!({
                "verified": false,
                "line": f.line,
                "seq": f.seq,
                "reason": f.reason,
            }),
        })
    })
    .await?;
    Ok(Json(verdict))
}

/// The latest signed checkpoint (written now if the log has moved on): what a partner keeps
/// to detect a later rewrite. Any authenticated user may fetch it: it reveals only a count
/// and a hash.
#[utoipa::path(get, path = "/v1/audit/checkpoint", tag = "audit", responses((status = 200, description = "the latest signed checkpoint", body = serde_json::Value), (status = "4XX", description = "refused: see `code` (docs/API.md)", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault (an incident id; details in the server log)", body = crate::wire::ErrorBody)))]
pub(super) async fn audit_checkpoint(
    State(state): State<Arc<AppState>>,
    _caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = state.store.clone();
    let c = blocking(move || store.audit_checkpoint()).await?;
    Ok(Json(json!({
        "checkpoint": c,
        "public_key": state.store.audit_log().public_key(),
    })))
}
