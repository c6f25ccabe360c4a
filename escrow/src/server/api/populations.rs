//! Populations: named subsets of an owner's dataset that overlaps are asked about.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::{ApiError, Caller, blocking, created_if, owner_change};
use crate::server::AppState;
use crate::wire;
use escrow_policies::roles::Action;

#[utoipa::path(get, path = "/v1/populations", tag = "populations", responses((status = 200, description = "populations of the caller's datasets and those shared with it", body = wire::PopulationList), wire::Errors))]
pub(crate) async fn list_populations(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<wire::PopulationList>, ApiError> {
    caller.may(&state, Action::PopulationRead).await?;
    let store = state.store.clone();
    let list = blocking(move || crate::populations::list(&store, &caller.partner)).await?;
    Ok(Json(wire::PopulationList { populations: list }))
}

/// Populations are defined by the data owner: the caller's partner owns the dataset named.
#[utoipa::path(post, path = "/v1/populations", tag = "populations", request_body = wire::PopulationRequest, responses((status = 201, description = "defined", body = wire::PopulationChanged), (status = 200, description = "unchanged", body = wire::PopulationChanged), wire::Errors))]
pub(crate) async fn add_population(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<wire::PopulationChanged>), ApiError> {
    let (_, (p, new)) = owner_change(
        &state,
        &caller,
        Action::PopulationChange,
        &body,
        crate::populations::add,
    )
    .await?;
    tracing::info!(partner = %caller.partner, dataset = %p.dataset, population = %p.name, new, "population defined");
    if new {
        side_ahead(&state, &caller.partner, &p.dataset);
    }
    Ok((
        created_if(new),
        Json(wire::PopulationChanged {
            population: p,
            changed: new,
        }),
    ))
}

#[utoipa::path(post, path = "/v1/populations/removals", tag = "populations", request_body = wire::PopulationRequest, responses((status = 200, description = "removed", body = wire::PopulationRemoved), wire::Errors))]
pub(crate) async fn remove_population(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<wire::PopulationRemoved>, ApiError> {
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
    side_ahead(&state, &caller.partner, &dataset);
    Ok(Json(wire::PopulationRemoved {
        removed: wire::PopulationRef { dataset, name },
    }))
}

/// The dataset's overlap side with its populations as they now are, reduced in the
/// background (`QueryService::side_ahead`): the next matrix over it finds it reduced.
fn side_ahead(state: &Arc<AppState>, owner: &str, dataset: &str) {
    let (queries, owner, dataset) = (
        state.queries.clone(),
        owner.to_string(),
        dataset.to_string(),
    );
    tokio::spawn(async move { queries.side_ahead(&owner, &dataset).await });
}
