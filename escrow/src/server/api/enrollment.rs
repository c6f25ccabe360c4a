//! Enrollment: the escrow CA's certificate, a token's holder enrolling with a key it made,
//! and an identity renewing its certificate. The private keys stay where they were made:
//! these take certificate signing requests and return certificates.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};

use super::{ApiError, Caller, blocking, json_body};
use crate::server::{AppState, ConnInfo};
use crate::wire::{self, EnrollRequest, RenewRequest};
use crate::{Error, admin};

/// The escrow CA's certificate. Public: `escrow enroll` fetches it and checks it against
/// the fingerprint its token carries before it trusts the server with the token.
#[utoipa::path(get, path = "/v1/ca", tag = "enrollment", security(()), responses((status = 200, description = "the CA certificate client certificates chain to", body = wire::CaCertificate), wire::Errors))]
pub(crate) async fn ca(
    State(state): State<Arc<AppState>>,
) -> Result<Json<wire::CaCertificate>, ApiError> {
    let path = state.store.data_dir().ca_cert();
    let ca_pem = blocking(move || Ok(std::fs::read_to_string(path)?)).await?;
    Ok(Json(wire::CaCertificate { ca_pem }))
}

/// Enroll with an invitation's token (no certificate yet): the certificate for the key
/// whose signing request is sent. The token works once, before it expires, for the
/// identity it was made for; every use of it is audited.
#[utoipa::path(post, path = "/v1/enrollments", tag = "enrollment", security(()), request_body = EnrollRequest, responses((status = 201, description = "enrolled: the certificate", body = wire::Certificate), wire::Errors))]
pub(crate) async fn enroll(
    State(state): State<Arc<AppState>>,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<wire::Certificate>), ApiError> {
    let req: EnrollRequest = json_body(&body)?;
    let dir = state.store.data_dir().clone();
    let done = blocking(move || admin::enroll(&dir, &req.token, &req.csr_pem)).await?;
    tracing::info!(partner = %done.who.partner, user = %done.who.user, "identity enrolled");
    Ok((StatusCode::CREATED, Json(certificate(done))))
}

/// Renew the caller's certificate (with that certificate, before it ends): the new
/// certificate for the key whose signing request is sent. The old one is valid until it
/// ends or is revoked.
#[utoipa::path(post, path = "/v1/renewals", tag = "enrollment", request_body = RenewRequest, responses((status = 201, description = "renewed: the new certificate", body = wire::Certificate), wire::Errors))]
pub(crate) async fn renew(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Extension(conn): Extension<ConnInfo>,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<wire::Certificate>), ApiError> {
    caller.certificate_only("a certificate is renewed with itself: run `escrow renew`")?;
    let serial = conn
        .subject
        .map(|s| s.serial)
        .ok_or_else(|| Error::internal("a certificate caller without a certificate"))?;
    let req: RenewRequest = json_body(&body)?;
    let dir = state.store.data_dir().clone();
    let days = state.cert_days;
    let actor = caller.actor();
    let done = blocking(move || admin::renew(&dir, &actor, &serial, &req.csr_pem, days)).await?;
    tracing::info!(partner = %caller.partner, user = %caller.user, "certificate renewed");
    Ok((StatusCode::CREATED, Json(certificate(done))))
}

fn certificate(done: admin::Enrolled) -> wire::Certificate {
    wire::Certificate {
        partner: done.who.partner,
        user: done.who.user,
        role: done.who.role,
        cert_pem: done.cert.cert_pem,
        ca_pem: done.ca_pem,
        not_after: crate::catalog::rfc3339(done.cert.not_after),
    }
}
