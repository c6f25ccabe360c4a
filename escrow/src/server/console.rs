//! The web console: its pages and assets (embedded in the binary), the login link, the
//! browser session and logout. Every page action goes through the same `/v1` API, roles,
//! validation and audit log as a program's; a session is only another way to be a
//! [`Caller`] (`api.rs`), and its audit records say `via: console`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::AppState;
use super::api::{ApiError, Caller, Via, blocking};
use super::sessions::{self, Identity, Session};
use crate::Error;
use crate::audit::{Actor, Event, Outcome};
use crate::wire::{ConsoleLink, ConsoleSession};

/// The session cookie. `__Host-`: the browser keeps it only if Secure, for this host alone
/// and for path `/`.
pub const COOKIE: &str = "__Host-escrow_session";
/// The header a state-changing console request carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/console.js");
const STYLE: &str = include_str!("../../console/console.css");

/// The console's routes (pages, assets, login) and its API (links, session, logout).
pub fn pages() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/assets/console.js", get(script))
        .route("/assets/console.css", get(style))
        .route("/login/{token}", get(confirm_login).post(login))
}

/// The console's API operations (documented in the OpenAPI document with the rest).
pub fn api() -> utoipa_axum::router::OpenApiRouter<Arc<AppState>> {
    utoipa_axum::router::OpenApiRouter::default()
        .routes(utoipa_axum::routes!(mint_link))
        .routes(utoipa_axum::routes!(current_session))
        .routes(utoipa_axum::routes!(logout))
}

/// The session of a request without a client certificate: its cookie names a live session,
/// and a request that may change something carries the session's CSRF token.
pub(super) async fn session(
    method: &Method,
    headers: &HeaderMap,
    state: &Arc<AppState>,
) -> Result<Session, ApiError> {
    let token = cookie(headers).ok_or_else(|| {
        Error::Unauthenticated(
            "no client certificate and no console session (sign in with `escrow console`)".into(),
        )
    })?;
    let st = state.clone();
    let found = blocking(move || st.sessions.get(st.store.catalog(), &token)).await?;
    let session = found.ok_or_else(|| {
        Error::Unauthenticated(
            "the console session ended; sign in again with `escrow console`".into(),
        )
    })?;
    if !matches!(*method, Method::GET | Method::HEAD) {
        let sent = headers
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Compared by digest: the time of `==` tells nothing about the token itself.
        if Sha256::digest(sent) != Sha256::digest(session.csrf.as_bytes()) {
            return Err(Error::Forbidden(format!(
                "a console request that changes something must carry the session's CSRF token in {CSRF_HEADER}"
            ))
            .into());
        }
    }
    Ok(session)
}

/// The session token in the request's cookies.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

fn set_cookie(value: &str, max_age: u64) -> HeaderValue {
    let cookie =
        format!("{COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Headers of every console page: no framing, scripts and styles from this origin only, no
/// referrer (a login URL holds its token), nothing cached.
fn page(status: StatusCode, body: String) -> Response {
    let mut r = (status, Html(body)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    page(StatusCode::OK, INDEX.to_string())
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// A login link for the caller's identity: only over mutual TLS (a console session cannot
/// extend itself past its expiry by minting links).
#[utoipa::path(post, path = "/v1/console/links", tag = "console", responses((status = 200, description = "a single-use sign-in link", body = ConsoleLink), (status = "4XX", description = "refused", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault", body = crate::wire::ErrorBody)))]
pub(super) async fn mint_link(
    State(state): State<Arc<AppState>>,
    Extension(conn): Extension<super::ConnInfo>,
    caller: Caller,
) -> Result<Json<ConsoleLink>, ApiError> {
    caller
        .certificate_only("a login link is minted with a client certificate (`escrow console`)")?;
    let serial = conn
        .subject
        .map(|s| s.serial)
        .ok_or_else(|| Error::internal("a certificate caller without a subject"))?;
    let identity = Identity {
        serial,
        partner: caller.partner.clone(),
        user: caller.user.clone(),
    };
    let st = state.clone();
    let token = blocking(move || st.sessions.mint_link(st.store.catalog(), identity)).await?;
    audit(&state, caller.actor(), "console_link", Outcome::Ok).await?;
    Ok(Json(ConsoleLink {
        path: format!("/login/{token}"),
        expires_in_secs: state.sessions.link_ttl().as_secs(),
    }))
}

async fn audit(
    state: &AppState,
    actor: Actor,
    kind: &str,
    outcome: Outcome,
) -> Result<(), ApiError> {
    let store = state.store.clone();
    let event = Event::new(kind, actor, outcome, json!({}));
    blocking(move || store.record(&event)).await
}

fn link_refused(status: StatusCode) -> Response {
    page(
        status,
        shell(
            "Sign-in link not valid",
            "<p>This sign-in link was used already, has expired, or was never issued. \
             A link works once, for a few minutes.</p>\
             <p>Run <code>escrow console</code> with your identity bundle for a new one.</p>",
        ),
    )
}

/// Open a login link: a page that says whose it is and asks to sign in (a POST of this page).
/// Opening it uses nothing and signs in nobody, so another site that makes a browser open a
/// link (its own partner's, to sign a victim into the wrong account), or a link preview that
/// fetches one, achieves nothing.
async fn confirm_login(State(state): State<Arc<AppState>>, Path(token): Path<String>) -> Response {
    let st = state.clone();
    let who = match blocking(move || st.sessions.peek(st.store.catalog(), &token)).await {
        Ok(Some(who)) => who,
        Ok(None) => return link_refused(StatusCode::FORBIDDEN),
        Err(e) => return e.into_response(),
    };
    // Names are [a-z0-9_-] (datadir::validate_name), but escaped anyway.
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let (user, partner) = (esc(&who.user), esc(&who.partner));
    page(
        StatusCode::OK,
        shell(
            "Sign in to escrow",
            &format!(
                "<p>This link signs you in as <strong>{user}</strong> of <strong>{partner}</strong>. \
                 Sign in only if you asked for it (<code>escrow console</code>) yourself.</p>\
                 <form method=\"post\"><button type=\"submit\" class=\"primary\">\
                 Sign in as {user} · {partner}</button></form>"
            ),
        ),
    )
}

/// End a session just made whose sign-in could not finish (a failure to end it is logged:
/// the sign-in is refused either way, and the session ends by itself when idle).
async fn end_session(state: &Arc<AppState>, session: String) {
    let st = state.clone();
    if let Err(e) = blocking(move || st.sessions.end(st.store.catalog(), &session)).await {
        tracing::error!(error = %e.0, "console session not ended");
    }
}

/// Whether a POST came from this origin's own page: browsers send `Sec-Fetch-Site` and
/// `Origin` on a form post, so one from another site is refused; a program sending neither
/// is not a browser that another site could drive.
fn same_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    // Browsers send `Sec-Fetch-Site`; it says who initiated the request whatever the page's
    // referrer policy (under `no-referrer` a form post's `Origin` is the opaque "null").
    if let Some(site) = headers.get("sec-fetch-site") {
        return matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    // HTTP/1 names the host in `Host`, HTTP/2 in the `:authority` of the URI.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        None => true,
        Some(o) => host.is_some_and(|h| o == format!("https://{h}")),
    }
}

/// Sign in with a link (the POST of the page above): the session cookie, then on to the
/// console (a same-origin redirect, so the SameSite=Strict cookie goes with it).
async fn login(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    if !same_origin(&headers, &uri) {
        return ApiError(Error::Forbidden(
            "a sign-in is posted by escrow's own sign-in page, not from another site".into(),
        ))
        .into_response();
    }
    let st = state.clone();
    let redeemed = match blocking(move || st.sessions.redeem(st.store.catalog(), &token)).await {
        Ok(Some(r)) => r,
        Ok(None) => return link_refused(StatusCode::FORBIDDEN),
        Err(e) => return e.into_response(),
    };
    let (identity, session) = redeemed;
    let store = state.store.clone();
    let serial = identity.serial.clone();
    let active = match blocking(move || store.catalog().active_identity(&serial)).await {
        Ok((a, _)) => a,
        Err(e) => return e.into_response(),
    };
    let Some(id) = active.filter(|i| i.partner == identity.partner && i.user == identity.user)
    else {
        end_session(&state, session).await;
        return link_refused(StatusCode::FORBIDDEN);
    };
    let mut actor = Actor::user(&id.partner, &id.user, &id.role);
    actor.via = Some("console".into());
    if let Err(e) = audit(&state, actor, "console_login", Outcome::Ok).await {
        end_session(&state, session).await;
        return e.into_response();
    }
    let mut r = page(
        StatusCode::SEE_OTHER,
        shell(
            "Signed in",
            "<p>Signed in. <a href=\"/\">Continue to the console</a>.</p>",
        ),
    );
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/"));
    r.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&session, sessions::ABSOLUTE.as_secs()),
    );
    r
}

/// A minimal page around `body` (sign-in outcomes).
fn shell(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · escrow</title><link rel=\"stylesheet\" href=\"/assets/console.css\">\
         </head><body><main class=\"narrow\"><h1>{title}</h1>{body}</main></body></html>"
    )
}

/// Who the console session is, with its CSRF token (read by the console's script; another
/// site cannot read it: no CORS, and the cookie is not sent from other sites).
#[utoipa::path(get, path = "/v1/console/session", tag = "console", responses((status = 200, description = "the session and its CSRF token", body = ConsoleSession), (status = "4XX", description = "refused", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault", body = crate::wire::ErrorBody)))]
pub(super) async fn current_session(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    caller: Caller,
) -> Result<Json<ConsoleSession>, ApiError> {
    let csrf = match caller.via {
        Via::Console => Some(session(&Method::GET, &headers, &state).await?.csrf),
        Via::Certificate => None,
    };
    Ok(Json(ConsoleSession {
        partner: caller.partner,
        user: caller.user,
        role: caller.role,
        csrf,
    }))
}

#[utoipa::path(post, path = "/v1/console/logout", tag = "console", responses((status = 204, description = "signed out; the cookie is cleared"), (status = "4XX", description = "refused", body = crate::wire::ErrorBody), (status = "5XX", description = "server fault", body = crate::wire::ErrorBody)))]
pub(super) async fn logout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    caller: Caller,
) -> Result<Response, ApiError> {
    if let Some(token) = cookie(&headers) {
        let st = state.clone();
        blocking(move || st.sessions.end(st.store.catalog(), &token)).await?;
    }
    audit(&state, caller.actor(), "console_logout", Outcome::Ok).await?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie("", 0));
    Ok(r)
}
