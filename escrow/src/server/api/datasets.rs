//! Datasets: list, upload (streamed), delete (crypto-shredding).

use std::io;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::{ApiError, Caller, blocking};
use crate::Error;
use crate::ingest::Format;
use crate::server::AppState;
use crate::server::limits::Work;
use crate::store::UploadRequest;
use crate::wire;
use escrow_policies::roles::Action;

#[utoipa::path(get, path = "/v1/datasets", tag = "datasets", responses((status = 200, description = "the caller's datasets", body = wire::DatasetList), wire::Errors))]
pub(crate) async fn list_datasets(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<wire::DatasetList>, ApiError> {
    caller.may(&state, Action::DatasetList).await?;
    let store = state.store.clone();
    let datasets = blocking(move || store.list(&caller.partner)).await?;
    Ok(Json(wire::DatasetList { datasets }))
}

#[derive(Debug, Deserialize)]
pub(crate) struct UploadParams {
    format: Option<String>,
    key_column: Option<String>,
    name_column: Option<String>,
    /// Comma-separated name-context columns.
    name_context: Option<String>,
    /// Place columns, comma-separated, or `none`; detected when absent.
    places: Option<String>,
    key_type: Option<String>,
    /// Declared CSV column types, `COL=TYPE,...`.
    schema: Option<String>,
}

/// Bytes of a refused upload read and discarded so the client can read the error response.
const DRAIN_AFTER_ERROR: u64 = 64 << 20;

/// The longest a refused upload's body is read for.
const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

#[utoipa::path(put, path = "/v1/datasets/{name}", tag = "datasets", request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's bytes: CSV, Parquet, Arrow IPC file or stream"), params(("name" = String, Path, description = "dataset name, [a-z][a-z0-9_]{0,62}"), ("format" = Option<String>, Query, description = "csv, arrow, arrow-stream, parquet; sniffed when absent"), ("key_column" = Option<String>, Query), ("name_column" = Option<String>, Query), ("name_context" = Option<String>, Query, description = "comma-separated columns"), ("places" = Option<String>, Query, description = "place columns compared when a name links two companies, comma-separated, or none; detected from the headers (country, region, state) when absent"), ("key_type" = Option<String>, Query, description = "website or id"), ("schema" = Option<String>, Query, description = "CSV column types over the inferred ones: COLUMN=TYPE,... with TYPE one of string, integer, float, boolean, date, timestamp")), responses((status = 201, description = "the version committed", body = wire::UploadOutcome), wire::Errors))]
pub(crate) async fn upload(
    State(state): State<Arc<AppState>>,
    caller: Result<Caller, ApiError>,
    Path(name): Path<String>,
    params: Result<Query<UploadParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<wire::UploadOutcome>), ApiError> {
    let limit = state.store.config().max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let checked = async {
        let caller = caller?;
        let Query(params) = params.map_err(|e| Error::bad("invalid_request", e.body_text()))?;
        caller.may(&state, Action::DatasetUpload).await?;
        let permit = state.admission.admit(&caller.partner, Work::Upload).await?;
        crate::datadir::validate_name("dataset", &name)?;
        if declared.is_some_and(|n| n > limit) {
            return Err(Error::TooLarge { limit }.into());
        }
        let req = upload_request(&state, &caller, name, params)?;
        Ok::<_, ApiError>((caller, req, permit))
    };
    let (caller, req, _permit) = match checked.await {
        Ok(checked) => checked,
        Err(e) => {
            // Refused before its body was read: what an identified client is still sending
            // is read (within bounds) so that it reads the refusal rather than a reset
            // connection. Not for a caller the server does not know, nor when it sheds load.
            let unknown_or_busy = matches!(e.0, Error::Unauthenticated(_) | Error::Busy { .. });
            if !unknown_or_busy && declared.is_none_or(|n| n <= DRAIN_AFTER_ERROR) {
                drain(body).await;
            }
            return Err(e);
        }
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
            let (queries, owner) = (state.queries.clone(), caller.partner.clone());
            let (dataset, number) = (outcome.dataset.clone(), outcome.version);
            let key = outcome.key_column.clone();
            tokio::spawn(async move { queries.after_upload(&owner, &dataset, number, key).await });
            Ok((StatusCode::CREATED, Json(outcome)))
        }
        Err(e) => {
            tracing::info!(partner = %caller.partner, code = %e.0.code(), "upload refused");
            Err(e)
        }
    }
}

#[utoipa::path(delete, path = "/v1/datasets/{name}", tag = "datasets", params(("name" = String, Path)), responses((status = 200, description = "crypto-shredded", body = wire::DatasetDeleted), wire::Errors))]
pub(crate) async fn delete_dataset(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<wire::DatasetDeleted>, ApiError> {
    let actor = caller.may(&state, Action::DatasetDelete).await?;
    let store = state.store.clone();
    let n = {
        let name = name.clone();
        blocking(move || store.delete(&actor, &name)).await?
    };
    tracing::info!(partner = %caller.partner, dataset = %name, versions = n, "dataset crypto-shredded");
    Ok(Json(wire::DatasetDeleted {
        dataset: name,
        versions_destroyed: n as u64,
    }))
}

/// Every version of one of the caller's own datasets, oldest first (never another
/// partner's: their versions are theirs to see).
#[utoipa::path(get, path = "/v1/datasets/{name}/versions", tag = "datasets", params(("name" = String, Path)), responses((status = 200, description = "the dataset's versions, oldest first", body = wire::DatasetVersions), wire::Errors))]
pub(crate) async fn dataset_versions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<wire::DatasetVersions>, ApiError> {
    caller.may(&state, Action::DatasetList).await?;
    crate::datadir::validate_name("dataset", &name)?;
    let store = state.store.clone();
    let versions = {
        let name = name.clone();
        blocking(move || store.versions(&caller.partner, &name)).await?
    };
    Ok(Json(wire::DatasetVersions {
        dataset: name,
        versions,
    }))
}

/// What an upload asks for, from its parameters.
fn upload_request(
    state: &AppState,
    caller: &Caller,
    name: String,
    params: UploadParams,
) -> Result<UploadRequest, ApiError> {
    let format = params.format.as_deref().map(Format::parse).transpose()?;
    Ok(UploadRequest {
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
            places: crate::ingest::Places::parse(params.places.as_deref()),
            key_type: params
                .key_type
                .as_deref()
                .map(crate::ingest::KeyType::parse)
                .transpose()?
                .unwrap_or_default(),
            ids: Some(crate::queries::stored_ids(&state.queries.entity_hasher)),
            declared: crate::ingest::DeclaredSchema::parse(
                params
                    .schema
                    .iter()
                    .flat_map(|s| s.split(','))
                    .filter(|d| !d.trim().is_empty()),
            )?,
        },
    })
}

/// Reads and drops what is left of a refused upload's body, at most [`DRAIN_AFTER_ERROR`]
/// bytes for at most [`DRAIN_WITHIN`].
async fn drain(body: Body) {
    let mut stream = body.into_data_stream();
    let mut left = DRAIN_AFTER_ERROR;
    let _ = tokio::time::timeout(DRAIN_WITHIN, async {
        while let Some(Ok(chunk)) = stream.next().await {
            left = left.saturating_sub(chunk.len() as u64);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}
