//! The HTTP API (axum). Thin handlers: authenticate, call the store on the blocking pool,
//! map the result. `ApiError` is the one place errors become HTTP responses.
//!
//! There is deliberately no route that returns dataset rows.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{AppState, ConnInfo};
use crate::Error;
use crate::audit::Actor;
use escrow_policies::roles::Action;

pub(crate) mod audit;
pub(crate) mod datasets;
pub(crate) mod enrollment;
pub(crate) mod policies;
pub(crate) mod populations;
pub(crate) mod questions;
pub(crate) mod users;

/// The API's operations, each routed from its own OpenAPI annotation: one list, so the
/// router and the document (`openapi.rs`) cannot disagree.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::default()
        .routes(routes!(whoami))
        .routes(routes!(datasets::list_datasets))
        .routes(routes!(datasets::upload, datasets::delete_dataset))
        .routes(routes!(datasets::dataset_versions))
        .routes(routes!(policies::list_grants))
        .routes(routes!(policies::add_grant))
        .routes(routes!(policies::revoke_grant))
        .routes(routes!(policies::list_settings, policies::change_settings))
        .routes(routes!(policies::policy_history))
        .routes(routes!(policies::policy_diff))
        .routes(routes!(policies::policy_export))
        .routes(routes!(policies::policy_rollback))
        .routes(routes!(policies::policy_import))
        .routes(routes!(policies::policy_preview))
        .routes(routes!(
            populations::list_populations,
            populations::add_population
        ))
        .routes(routes!(populations::remove_population))
        .routes(routes!(questions::query))
        .routes(routes!(questions::explain_query))
        .routes(routes!(questions::overlap))
        .routes(routes!(questions::explain_overlap))
        .routes(routes!(questions::overlap_history))
        .routes(routes!(questions::co_selling))
        .routes(routes!(users::list_users, users::add_user))
        .routes(routes!(users::revoke_user))
        .routes(routes!(users::list_invitations, users::invite_user))
        .routes(routes!(enrollment::ca))
        .routes(routes!(enrollment::enroll))
        .routes(routes!(enrollment::renew))
        .routes(routes!(audit::audit_list))
        .routes(routes!(audit::audit_export))
        .routes(routes!(audit::audit_checkpoint))
        .routes(routes!(audit::audit_verification))
        .merge(super::console::api())
}

/// Build the router with its state: the API, its document, the console's pages.
pub fn router(state: Arc<AppState>) -> Router {
    let (api, _) = routes().split_for_parts();
    api.route("/v1/openapi.json", get(super::openapi::document))
        .merge(super::console::pages())
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
        // The catalog's generations read with the caller serve the request's first policy
        // read (one round trip fewer on PostgreSQL); what a question assumes is noted there.
        .layer(axum::middleware::from_fn_with_state(state.clone(), scoped))
        // (uploads stream their `Body`, which this does not limit: they have their own)
        .layer(axum::extract::DefaultBodyLimit::max(
            MAX_REQUEST_BODY as usize,
        ))
        .with_state(state)
}

/// Largest request body other than an upload (JSON requests, policy documents).
const MAX_REQUEST_BODY: u64 = 2 << 20;

/// Handle a request in a scope of its own (`assumed::request_scope`). A response given on a
/// caller the request only assumed (a question refused before it started: a bad request,
/// too busy) leaves only if the caller still holds: else 401, as a read would have given.
async fn scoped(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    crate::assumed::request_scope(async move {
        let response = next.run(req).await;
        let caller = crate::assumed::take_assumed().take_caller();
        if caller.is_empty() {
            return response;
        }
        let store = state.store.clone();
        match blocking(move || store.catalog().read(|tx| caller.hold(tx))).await {
            Ok(true) => response,
            Ok(false) => ApiError(revoked()).into_response(),
            Err(e) => e.into_response(),
        }
    })
    .await
}

/// The refusal of a caller whose identity is not (or no longer) active.
fn revoked() -> Error {
    Error::Unauthenticated("the identity is not registered or was revoked".into())
}

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
/// | InvalidField    | 400    | per error, + `field`       |
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
            Error::BadInput { .. } | Error::InvalidField { .. } | Error::Interrupted => {
                StatusCode::BAD_REQUEST
            }
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
            Error::Integrity(_) | Error::Changed(_) | Error::Stale | Error::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
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
            Error::Integrity(_) | Error::Changed(_) | Error::Stale | Error::Internal(_) => {
                Some("internal error")
            }
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
        let field = match &e {
            Error::InvalidField { field, .. } => Some(field.clone()),
            _ => None,
        };
        let body = crate::wire::ErrorBody {
            error: crate::wire::ErrorDetail {
                code: e.code().to_string(),
                message,
                rule,
                field,
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

/// The authenticated caller (`wire::Caller`): a registered, unrevoked identity, known by the
/// certificate verified in the TLS handshake or by a console session minted with one
/// (`console.rs`). Handlers that take a `Caller` cannot run for anyone else.
pub use crate::wire::{Caller, Via};

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let (serial, partner, user, via) = presented(parts, state).await?;
        read_caller(state, serial, partner, user, via).await
    }
}

/// Who the request says it is: the certificate verified in the TLS handshake, or else a
/// console session (serial, partner, user, how).
async fn presented(
    parts: &Parts,
    state: &Arc<AppState>,
) -> Result<(String, String, String, Via), ApiError> {
    let subject = parts
        .extensions
        .get::<ConnInfo>()
        .and_then(|c| c.subject.clone());
    Ok(match subject {
        Some(s) => (s.serial, s.partner, s.user, Via::Certificate),
        None => {
            let session = super::console::session(&parts.method, &parts.headers, state).await?;
            let id = session.identity;
            (id.serial, id.partner, id.user, Via::Console)
        }
    })
}

/// The caller whose certificate (or console session) names `serial`, `partner` and `user`,
/// read from the catalog with the catalog's generations (which serve the request's first
/// policy read); the node keeps a copy for the questions that follow (`Asking`).
async fn read_caller(
    state: &AppState,
    serial: String,
    partner: String,
    user: String,
    via: Via,
) -> Result<Caller, ApiError> {
    let store = state.store.clone();
    let s = serial.clone();
    let ((row, at), read) = blocking(move || {
        let read = std::time::Instant::now();
        Ok((store.catalog().active_identity(&s)?, read))
    })
    .await?;
    crate::assumed::generations_with_caller(read, at);
    state
        .queries
        .copies
        .read_caller(&serial, row.as_ref(), read, at);
    match row {
        // Checked per request, so a revocation also ends keep-alive connections' access
        // and the console sessions of the identity.
        Some(id) if id.partner == partner && id.user == user => Ok(Caller {
            partner: id.partner,
            user: id.user,
            role: id.role,
            via,
        }),
        _ => Err(revoked().into()),
    }
}

/// The caller of a question (SQL, overlap, co-selling report). As [`Caller`], except that
/// a certificate whose identity this node read before, with nothing read since finding the
/// catalog changed, is not read again: its identity and the generations are assumed as read
/// then (`crate::assumed`) and confirmed with the question's audit record, or before it
/// charges or computes anything. [`Asking::answer`] asks a question whose assumptions no
/// longer held again, on fresh reads (a revoked identity then gets 401).
pub(crate) struct Asking {
    pub caller: Caller,
    serial: String,
}

impl FromRequestParts<Arc<AppState>> for Asking {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        crate::assumed::may_assume(true);
        let (serial, partner, user, via) = presented(parts, state).await?;
        // (A console session was read with its session already.)
        if via == Via::Certificate
            && crate::assumed::assuming()
            && let Some((id, at)) = state.queries.copies.caller(&serial)
            && id.partner == partner
            && id.user == user
        {
            crate::assumed::generations_with_caller(std::time::Instant::now(), at);
            crate::assumed::assume(|a| {
                a.identity(&serial, &id);
                a.generations(at);
            });
            let caller = Caller {
                partner: id.partner,
                user: id.user,
                role: id.role,
                via,
            };
            return Ok(Asking { caller, serial });
        }
        let caller = read_caller(state, serial.clone(), partner, user, via).await?;
        Ok(Asking { caller, serial })
    }
}

impl Asking {
    /// The outcome of `question`, asked as `actor` (the caller, allowed `action`); if what
    /// it assumed no longer holds (nothing of it was recorded or released), asked once more
    /// with the caller and everything else read afresh (which may refuse the caller).
    pub(crate) async fn answer<T, F, Fut>(
        &self,
        state: &AppState,
        action: Action,
        actor: Actor,
        question: F,
    ) -> Result<crate::Result<T>, ApiError>
    where
        F: Fn(Actor) -> Fut,
        Fut: Future<Output = crate::Result<T>>,
    {
        match question(actor).await {
            Err(Error::Stale) => {}
            other => return Ok(other),
        }
        let caller = self.afresh(state).await?;
        let actor = caller.may(state, action).await?;
        Ok(question(actor).await)
    }

    /// The caller allowed `action`, and admitted (`questions::admitted`); a refusal is given
    /// (and audited) only once the caller it names is confirmed: a revoked caller gets 401.
    pub(crate) async fn admitted(
        &mut self,
        state: &AppState,
        action: Action,
    ) -> Result<(Actor, crate::server::limits::Permit), ApiError> {
        match questions::admitted(state, &self.caller, action).await {
            Err(ApiError(Error::Stale)) => {
                self.caller = self.afresh(state).await?;
                questions::admitted(state, &self.caller, action).await
            }
            other => other,
        }
    }

    /// The caller read afresh, and the rest of the request on fresh reads: what it assumed
    /// no longer held (its copies go).
    async fn afresh(&self, state: &AppState) -> Result<Caller, ApiError> {
        crate::assumed::may_assume(false);
        let c = &self.caller;
        state.queries.copies.forget(&self.serial, &c.partner);
        let (partner, user) = (c.partner.clone(), c.user.clone());
        read_caller(state, self.serial.clone(), partner, user, c.via).await
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

    /// Refused (403, `why`) unless the caller holds its certificate: what would let a console
    /// session outlive itself (minting sign-in links, receiving a new identity's key).
    pub(crate) fn certificate_only(&self, why: &str) -> Result<(), ApiError> {
        if self.via == Via::Certificate {
            return Ok(());
        }
        Err(Error::Forbidden(why.to_string()).into())
    }

    /// The caller, if its role may take `action` (casbin role policy); refusals are audited.
    pub(crate) async fn may(&self, state: &AppState, action: Action) -> Result<Actor, ApiError> {
        let actor = self.actor();
        state.access.require(&actor, action).await?;
        Ok(actor)
    }
}

/// Run blocking store work on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("blocking task failed: {e}")))?
        .map_err(ApiError)
}

#[utoipa::path(get, path = "/v1/whoami", tag = "whoami", responses((status = 200, description = "the caller", body = Caller), crate::wire::Errors))]
pub(crate) async fn whoami(caller: Caller) -> Json<Caller> {
    Json(caller)
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
