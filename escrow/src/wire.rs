//! Request and response bodies of the API, typed once for the server, the CLI and the
//! console.

use serde::{Deserialize, Serialize};

/// `POST /v1/console/links`: a single-use sign-in link for the caller's identity.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConsoleLink {
    /// Path of the link on the server (`/login/<token>`).
    pub path: String,
    /// Seconds the link stays valid.
    pub expires_in_secs: u64,
}

/// `GET /v1/console/session`: who the caller is, and the CSRF token a console request that
/// changes something must carry (`None` for a client with its certificate).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConsoleSession {
    pub partner: String,
    pub user: String,
    pub role: String,
    pub csrf: Option<String>,
}

/// Every refusal and failure: `{"error": {"code", "message", "rule"?}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable code (docs/API.md), a message for people, and for a refused
/// question the rule that refused it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}
