//! The API's OpenAPI 3.1 document, generated from the handlers' own annotations and the
//! request/response types they use (utoipa), served at `/v1/openapi.json` and committed as
//! docs/openapi.json (a test keeps the two equal).

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{api, console};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "escrow",
        description = "A self-hostable data clean room. Programs authenticate with a client \
                       certificate from the escrow's CA (mutual TLS); the web console with a \
                       session cookie minted from one (`escrow console`), whose requests other \
                       than GET/HEAD carry its CSRF token in `x-csrf-token`. No endpoint returns \
                       dataset rows. Error codes: docs/API.md."
    ),
    modifiers(&Authentication),
    security(("client_certificate" = []), ("console_session" = []))
)]
pub struct ApiDoc;

struct Authentication;

impl Modify for Authentication {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "A client certificate from the escrow's CA (`escrow enroll` with an invitation's token; `partner add`/`user add` for trials)"
                        .into(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
        components.add_security_scheme(
            "console_session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                console::COOKIE,
                "A console session (`escrow console`); changes also carry `x-csrf-token`",
            ))),
        );
    }
}

/// The document: the description and security schemes above, and the operations the
/// router serves (`api::routes`, where each is routed from its own annotation).
pub fn document_value() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    DOC.get_or_init(|| {
        let (_, operations) = api::routes().split_for_parts();
        ApiDoc::openapi().merge_from(operations)
    })
}

/// The document as JSON text (what is served and committed).
pub fn json() -> String {
    document_value()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `GET /v1/openapi.json`: public (it describes the API, no data).
pub async fn document() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(document_value())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/openapi.json is the generated document; `UPDATE_OPENAPI=1 cargo test -p escrow
    /// openapi` writes it after an API change.
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let generated = json() + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is out of date: run UPDATE_OPENAPI=1 cargo test -p escrow openapi"
        );
        let doc: serde_json::Value = serde_json::from_str(&generated).expect("json");
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
