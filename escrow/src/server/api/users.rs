//! Users of the caller's partner (admins).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::{ApiError, Caller, blocking, json_body};
use crate::Error;
use crate::server::AppState;
use crate::wire::{self, InviteRequest, UserRequest};
use escrow_policies::roles::Action;

/// The active users of the caller's partner and their roles (admins).
#[utoipa::path(get, path = "/v1/users", tag = "users", responses((status = 200, description = "users of the caller's partner", body = wire::UserList), wire::Errors))]
pub(crate) async fn list_users(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<wire::UserList>, ApiError> {
    caller.may(&state, Action::UserManage).await?;
    let store = state.store.clone();
    let rows = blocking(move || store.catalog().role_assignments()).await?;
    let users: Vec<wire::UserRole> = rows
        .into_iter()
        .filter(|r| r.partner == caller.partner)
        .map(|r| wire::UserRole {
            user: r.user,
            role: r.role,
        })
        .collect();
    Ok(Json(wire::UserList {
        partner: caller.partner,
        users,
    }))
}

/// A partner's admin adds a user of its own partner; the new identity's bundle (certificate,
/// private key, CA) is returned once, over this mutually authenticated connection.
#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = UserRequest, responses((status = 201, description = "added; the identity bundle is returned once", body = wire::UserAdded), wire::Errors))]
pub(crate) async fn add_user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<wire::UserAdded>), ApiError> {
    let actor = caller.may(&state, Action::UserManage).await?;
    // The answer holds a new identity's private key: a console session must not turn itself
    // into a lasting certificate, so only a certificate holder adds users.
    caller.certificate_only(
        "adding a user hands out a private key: run `escrow user add` with your certificate",
    )?;
    let req: UserRequest = json_body(&body)?;
    own_partner(&caller, req.partner.as_deref())?;
    let role = req
        .role
        .ok_or_else(|| Error::bad("invalid_role", "a user needs a role"))?;
    let dir = state.store.data_dir().clone();
    let partner = caller.partner.clone();
    let (name, r) = (req.name.clone(), role.clone());
    let days = state.cert_days;
    let bundle = blocking(move || {
        let path = crate::admin::add_user(&dir, &actor, (&partner, &name, &r), days)?;
        let read = |f: &str| std::fs::read_to_string(path.join(f)).map_err(Error::from);
        Ok(wire::Bundle {
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
            ca_pem: read("ca.pem")?,
        })
    })
    .await?;
    tracing::info!(partner = %caller.partner, user = %req.name, %role, by = %caller.user, "user added");
    Ok((
        StatusCode::CREATED,
        Json(wire::UserAdded {
            partner: caller.partner,
            user: req.name,
            role,
            bundle,
        }),
    ))
}

/// The open invitations of the caller's partner (admins): who is invited, until when, by
/// whom; never a token.
#[utoipa::path(get, path = "/v1/users/invitations", tag = "users", responses((status = 200, description = "open invitations of the caller's partner", body = wire::InvitationList), wire::Errors))]
pub(crate) async fn list_invitations(
    State(state): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<wire::InvitationList>, ApiError> {
    caller.may(&state, Action::UserManage).await?;
    let store = state.store.clone();
    let partner = caller.partner.clone();
    let open = blocking(move || store.catalog().open_invitations(Some(&partner))).await?;
    Ok(Json(wire::InvitationList {
        partner: caller.partner,
        invitations: open.into_iter().map(Into::into).collect(),
    }))
}

/// The longest an admin's invitation may stay valid.
const MAX_API_INVITATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A partner's admin invites a user of its own partner: a single-use token, returned once,
/// with which the user enrolls a key made on its own machine (`escrow enroll`).
#[utoipa::path(post, path = "/v1/users/invitations", tag = "users", request_body = InviteRequest, responses((status = 201, description = "invited; the token is returned once", body = wire::Invitation), wire::Errors))]
pub(crate) async fn invite_user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<(StatusCode, Json<wire::Invitation>), ApiError> {
    let actor = caller.may(&state, Action::UserManage).await?;
    // A token is an identity to be: a console session must not turn itself into one.
    caller.certificate_only(
        "an invitation hands out an identity: run `escrow user invite` with your certificate",
    )?;
    let req: InviteRequest = json_body(&body)?;
    own_partner(&caller, req.partner.as_deref())?;
    // An admin's token lives a week at most (the operator's, 30 days).
    if req
        .valid_for_secs
        .is_some_and(|s| s > MAX_API_INVITATION.as_secs())
    {
        return Err(Error::bad(
            "bad_validity",
            "an invitation made through the API is valid for one second to 7 days",
        )
        .into());
    }
    let terms = crate::admin::InviteTerms {
        valid_for: req
            .valid_for_secs
            .map_or(crate::admin::DEFAULT_INVITATION, Duration::from_secs),
        cert_days: state.cert_days,
    };
    let dir = state.store.data_dir().clone();
    let partner = caller.partner.clone();
    let (name, role) = (req.name.clone(), req.role.clone());
    let invited =
        blocking(move || crate::admin::invite_user(&dir, &actor, (&partner, &name, &role), terms))
            .await?;
    tracing::info!(partner = %caller.partner, user = %req.name, role = %req.role, by = %caller.user, "user invited");
    Ok((
        StatusCode::CREATED,
        Json(wire::Invitation {
            partner: caller.partner,
            user: req.name,
            role: invited.role,
            token: invited.token.to_string(),
            expires_at: crate::catalog::rfc3339(invited.expires_at),
        }),
    ))
}

#[utoipa::path(post, path = "/v1/users/revocations", tag = "users", request_body = UserRequest, responses((status = 200, description = "revoked", body = wire::UserRevoked), wire::Errors))]
pub(crate) async fn revoke_user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: bytes::Bytes,
) -> Result<Json<wire::UserRevoked>, ApiError> {
    let actor = caller.may(&state, Action::UserManage).await?;
    let req: UserRequest = json_body(&body)?;
    own_partner(&caller, req.partner.as_deref())?;
    let dir = state.store.data_dir().clone();
    let partner = caller.partner.clone();
    let name = req.name.clone();
    blocking(move || crate::admin::revoke_user(&dir, &actor, &partner, &name)).await?;
    tracing::info!(partner = %caller.partner, user = %req.name, by = %caller.user, "user revoked");
    Ok(Json(wire::UserRevoked {
        revoked: wire::UserRef {
            partner: caller.partner,
            user: req.name,
        },
    }))
}

/// An admin manages the users of its own partner only.
fn own_partner(caller: &Caller, partner: Option<&str>) -> Result<(), ApiError> {
    match partner {
        Some(p) if p != caller.partner => Err(Error::Forbidden(format!(
            "an admin of {} manages {}'s users only",
            caller.partner, caller.partner
        ))
        .into()),
        _ => Ok(()),
    }
}
