//! Questions: SQL queries, overlaps, the co-selling report, and their explanations.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, Asking, Caller, json_body};
use crate::Error;
use crate::server::AppState;
use crate::server::limits::{Permit, Work};
use crate::wire;
use escrow_policies::roles::Action;

/// Why a query would be answered or refused, rule by rule; nothing is read, spent or run.
#[utoipa::path(post, path = "/v1/queries/explain", tag = "queries", request_body = wire::ExplainRequest, responses((status = 200, description = "why the query would be answered or refused", body = wire::Explanation), wire::Errors))]
pub(crate) async fn explain_query(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<crate::explain::Explanation>, ApiError> {
    let (_, _permit) = admitted(&state, &caller, Action::PolicyRead).await?;
    let req: wire::ExplainRequest = json_body(&body)?;
    Ok(Json(
        state.queries.explain_sql(&caller.partner, &req.sql).await?,
    ))
}

/// Why an overlap question would be answered or refused.
#[utoipa::path(post, path = "/v1/overlaps/explain", tag = "overlaps", request_body = wire::OverlapRequest, responses((status = 200, description = "why the overlap would be answered or refused", body = wire::Explanation), wire::Errors))]
pub(crate) async fn explain_overlap(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<crate::explain::Explanation>, ApiError> {
    let (_, _permit) = admitted(&state, &caller, Action::PolicyRead).await?;
    let req: crate::overlaps::OverlapRequest = json_body(&body)?;
    Ok(Json(
        state.queries.explain_overlap(&caller.partner, &req).await?,
    ))
}

/// Run a query. Refusals are 4xx `QUERY_REFUSED` with the rule; runtime failures are one
/// generic internal error (details in the server log only).
#[utoipa::path(post, path = "/v1/queries", tag = "queries", request_body = wire::QueryRequest, responses((status = 200, description = "the answer: JSON, CSV or Arrow IPC stream by `format`", content((wire::QueryAnswer = "application/json"), (String = "text/csv"), (Vec<u8> = "application/vnd.apache.arrow.stream"))), wire::Errors))]
pub(crate) async fn query(
    State(state): State<Arc<AppState>>,
    mut asking: Asking,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let (actor, _permit) = asking.admitted(&state, Action::QueryRun).await?;
    let caller = &asking.caller;
    let req: wire::QueryRequest = json_body(&body)?;
    let format = req.format.as_deref().unwrap_or("json");
    if !matches!(format, "json" | "csv" | "arrow") {
        return Err(Error::bad("invalid_request", "format must be json, csv or arrow").into());
    }
    let started = std::time::Instant::now();
    let (queries, sql) = (&state.queries, req.sql.as_str());
    let result = (asking.answer(&state, Action::QueryRun, actor, move |actor| async move {
        queries.run(&actor, sql).await
    }))
    .await?;
    let outcome = match result {
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
            return Ok(Json(wire::QueryAnswer::of(&outcome)?).into_response());
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

/// What every question handler does first: the caller may do `action`, then a question slot
/// of its partner's is admitted (`server::limits`), held while the permit lives.
pub(super) async fn admitted(
    state: &AppState,
    caller: &Caller,
    action: Action,
) -> Result<(crate::audit::Actor, Permit), ApiError> {
    let actor = caller.may(state, action).await?;
    let permit = state
        .admission
        .admit(&caller.partner, Work::Question)
        .await?;
    Ok((actor, permit))
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
#[utoipa::path(post, path = "/v1/overlaps", tag = "overlaps", request_body = wire::OverlapRequest, responses((status = 200, description = "the overlap matrix, JSON or CSV by `format`", content((wire::OverlapAnswer = "application/json"), (String = "text/csv"))), wire::Errors))]
pub(crate) async fn overlap(
    State(state): State<Arc<AppState>>,
    mut asking: Asking,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let (actor, _permit) = asking.admitted(&state, Action::OverlapRun).await?;
    let caller = &asking.caller;
    let (req, csv): (crate::overlaps::OverlapRequest, bool) = with_format(&body)?;
    let started = std::time::Instant::now();
    let (queries, req) = (&state.queries, &req);
    let result = (asking.answer(&state, Action::OverlapRun, actor, move |actor| async move {
        queries.overlap(&actor, req).await
    }))
    .await?;
    log_overlap(caller, "overlap", &result.as_ref(), started);
    let o = result?;
    if csv {
        let bytes = crate::overlaps::output::rows_csv(&o.rows, o.by.as_deref())?;
        return Ok(csv_response(bytes));
    }
    Ok(Json(wire::OverlapAnswer::of(&o)).into_response())
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryParams {
    /// The other partner.
    with: String,
}

/// The overlap matrices (without a breakdown) released to the caller's partner with another
/// partner, oldest first: the account mapping over both sides' dataset versions. Only what
/// was released to the caller; nothing is counted, spent or run.
#[utoipa::path(get, path = "/v1/overlaps/history", tag = "overlaps", params(HistoryParams), responses((status = 200, description = "overlaps released before, oldest first", body = wire::OverlapHistory), wire::Errors))]
pub(crate) async fn overlap_history(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    axum::extract::Query(params): axum::extract::Query<HistoryParams>,
) -> Result<Json<wire::OverlapHistory>, ApiError> {
    caller.may(&state, Action::OverlapRun).await?;
    let released = state
        .queries
        .overlap_history(&caller.partner, &params.with)
        .await?;
    Ok(Json(wire::OverlapHistory {
        with: params.with,
        released,
    }))
}

/// The co-selling report.
#[utoipa::path(post, path = "/v1/reports/co-selling", tag = "reports", request_body = wire::CoSellingRequest, responses((status = 200, description = "the co-selling report, JSON or CSV by `format`", content((wire::CoSellingAnswer = "application/json"), (String = "text/csv"))), wire::Errors))]
pub(crate) async fn co_selling(
    State(state): State<Arc<AppState>>,
    mut asking: Asking,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let (actor, _permit) = asking.admitted(&state, Action::OverlapRun).await?;
    let caller = &asking.caller;
    let (req, csv): (crate::overlaps::CoSellingRequest, bool) = with_format(&body)?;
    let started = std::time::Instant::now();
    let (queries, req) = (&state.queries, &req);
    let result = (asking.answer(&state, Action::OverlapRun, actor, move |actor| async move {
        queries.co_selling(&actor, req).await
    }))
    .await?;
    log_overlap(
        caller,
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
    Ok(Json(wire::CoSellingAnswer::of(&r)).into_response())
}
