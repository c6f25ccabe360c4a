//! Request and response bodies of the API, typed once for the server (handlers return them),
//! the CLI (`client.rs` reads them) and the OpenAPI document (docs/openapi.json, which the
//! console follows). Value types the engine owns (dataset metadata, grants, settings,
//! explanations) are re-exported here, so this module is the whole boundary; the engine
//! never imports it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::audit::{Checkpoint, Record};
pub use crate::catalog::{ColumnInfo, DatasetInfo, Population, VersionInfo};
pub use crate::explain::{Explanation, Preview};
pub use crate::grants::{GrantList, GrantRequest, GrantView};
pub use crate::overlaps::{CoSellingRequest, OverlapRequest, ReleasedCount, ReleasedOverlap};
pub use crate::policy::{HistoryEntry, PolicyDiff};
pub use crate::populations::PopulationRequest;
pub use crate::queries::BudgetView;
pub use crate::settings::{DatasetSettings, SettingsChange};
pub use crate::store::UploadOutcome;

// ---- errors -----------------------------------------------------------------------------

/// Every refusal and failure: `{"error": {"code", "message", "rule"?}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable code (docs/API.md), a message for people, and for a refused
/// question the rule that refused it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The request field at fault, for a form to show the reason beside it (e.g.
    /// `epsilon`, `bounds.revenue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The error responses every operation can give (for the OpenAPI document).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum Errors {
    /// Refused: see `code` (docs/API.md).
    #[response(status = "4XX")]
    Refused(ErrorBody),
    /// Server fault: an incident id; details in the server log.
    #[response(status = "5XX")]
    Fault(ErrorBody),
}

// ---- who is asking ------------------------------------------------------------------------

/// The authenticated caller (`GET /v1/whoami`): a registered, unrevoked identity.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Caller {
    pub partner: String,
    pub user: String,
    pub role: String,
    /// How the caller authenticated.
    pub via: Via,
}

/// How a caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Its client certificate (programs, the CLI).
    Certificate,
    /// A browser session of the web console.
    Console,
}

/// `POST /v1/console/links`: a single-use sign-in link for the caller's identity.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsoleLink {
    /// Path of the link on the server (`/login/<token>`).
    pub path: String,
    /// Seconds the link stays valid.
    pub expires_in_secs: u64,
}

/// `GET /v1/console/session`: who the caller is, and the CSRF token a console request that
/// changes something must carry (`None` for a client with its certificate).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConsoleSession {
    pub partner: String,
    pub user: String,
    pub role: String,
    pub csrf: Option<String>,
}

// ---- datasets ---------------------------------------------------------------------------

/// `GET /v1/datasets`: the caller's datasets, each at its live version.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DatasetList {
    pub datasets: Vec<DatasetInfo>,
}

/// `GET /v1/datasets/{name}/versions`: every version of one of the caller's datasets,
/// oldest first, with how its companies were matched.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DatasetVersions {
    pub dataset: String,
    pub versions: Vec<VersionInfo>,
}

/// `DELETE /v1/datasets/{name}`: every version crypto-shredded.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DatasetDeleted {
    pub dataset: String,
    pub versions_destroyed: u64,
}

// ---- policies ---------------------------------------------------------------------------

/// `POST /v1/policies/grants`: the grant, and whether it is new.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GrantChanged {
    pub grant: GrantView,
    pub changed: bool,
}

/// `POST /v1/policies/revocations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GrantRevoked {
    pub revoked: GrantView,
}

/// `POST /v1/policies/settings`: the dataset's protection settings now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SettingsNow {
    pub dataset: String,
    pub settings: DatasetSettings,
}

/// `GET /v1/policies/settings`: the settings in force of each of your datasets.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SettingsList {
    pub datasets: Vec<SettingsNow>,
}

/// `GET /v1/policies/versions`: the policy's versions, oldest first, each with its diff.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyHistory {
    pub versions: Vec<HistoryEntry>,
}

/// `GET /v1/policies/diff`: the lines (casbin CSV) one version removed and added.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyVersionsDiff {
    pub from: i64,
    pub to: i64,
    #[serde(flatten)]
    pub diff: PolicyDiff,
}

/// `POST /v1/policies/rollback` and `/import`: the new version (none when nothing changed
/// or on a dry run) and what it changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyReplaced {
    #[serde(default)]
    pub dry_run: bool,
    pub version: Option<i64>,
    #[serde(flatten)]
    pub diff: PolicyDiff,
}

/// `POST /v1/policies/rollback`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub version: i64,
}

// ---- populations ------------------------------------------------------------------------

/// `GET /v1/populations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PopulationList {
    pub populations: Vec<Population>,
}

/// `POST /v1/populations`: the population, and whether it changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PopulationChanged {
    pub population: Population,
    pub changed: bool,
}

/// `POST /v1/populations/removals`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PopulationRemoved {
    pub removed: PopulationRef,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PopulationRef {
    pub dataset: String,
    pub name: String,
}

// ---- users ------------------------------------------------------------------------------

/// `POST /v1/users` and `/v1/users/revocations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserRequest {
    /// The partner the user belongs to: must be the caller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// `POST /v1/users/invitations`: an admin invites a user of its own partner.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// The partner the user belongs to: must be the caller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner: Option<String>,
    pub name: String,
    pub role: String,
    /// How long the token may be used, in seconds (1 to 7 days' worth; default one day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_for_secs: Option<u64>,
}

/// An invitation: the single-use token `escrow enroll --token` takes, shown once.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct Invitation {
    pub partner: String,
    pub user: String,
    pub role: String,
    pub token: String,
    /// When the token stops working (RFC 3339).
    pub expires_at: String,
}

impl std::fmt::Debug for Invitation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invitation")
            .field("partner", &self.partner)
            .field("user", &self.user)
            .field("role", &self.role)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// `GET /v1/users/invitations`: the open invitations of the caller's partner.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InvitationList {
    pub partner: String,
    pub invitations: Vec<PendingInvitation>,
}

/// An invitation not yet used, withdrawn or expired (`escrow user revoke` withdraws it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PendingInvitation {
    pub user: String,
    pub role: String,
    /// When its token stops working (RFC 3339).
    pub expires_at: String,
    /// Who made it: `PARTNER/USER`, or `operator`.
    pub invited_by: String,
}

impl From<crate::catalog::identities::OpenInvitation> for PendingInvitation {
    fn from(i: crate::catalog::identities::OpenInvitation) -> Self {
        PendingInvitation {
            invited_by: match &i.by_partner {
                Some(p) => format!("{p}/{}", i.by_user),
                None => i.by_user.clone(),
            },
            user: i.user,
            role: i.role,
            expires_at: crate::catalog::rfc3339(i.expires_at),
        }
    }
}

/// `POST /v1/enrollments`: a token's holder asks for its certificate.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// A PKCS #10 certificate signing request (PEM) naming the token's identity: O =
    /// partner, CN = user.
    pub csr_pem: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest").finish_non_exhaustive()
    }
}

/// `POST /v1/renewals`: an identity asks for a new certificate for a new key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A PKCS #10 certificate signing request (PEM) naming the caller's identity.
    pub csr_pem: String,
}

/// A certificate issued for a key its holder made (enrollment, renewal).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Certificate {
    pub partner: String,
    pub user: String,
    pub role: String,
    pub cert_pem: String,
    /// The escrow CA's certificate (the bundle's ca.pem).
    pub ca_pem: String,
    /// When the certificate ends (RFC 3339); `escrow renew` before then.
    pub not_after: String,
}

/// `GET /v1/ca`: the escrow CA's certificate, which client certificates chain to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CaCertificate {
    pub ca_pem: String,
}

/// `GET /v1/users`: the active users of the caller's partner.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserList {
    pub partner: String,
    pub users: Vec<UserRole>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserRole {
    pub user: String,
    pub role: String,
}

/// `POST /v1/users`: the new identity's bundle, returned once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserAdded {
    pub partner: String,
    pub user: String,
    pub role: String,
    pub bundle: Bundle,
}

/// An identity bundle: what `--identity DIR` holds (cert.pem, key.pem, ca.pem).
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct Bundle {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle").finish_non_exhaustive()
    }
}

/// `POST /v1/users/revocations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserRevoked {
    pub revoked: UserRef,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserRef {
    pub partner: String,
    pub user: String,
}

// ---- audit ------------------------------------------------------------------------------

/// `GET /v1/audit`: the records the caller may see.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditRecords {
    pub records: Vec<Record>,
}

/// `GET /v1/audit/verification`: the caller's export verified on the server.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AuditVerification {
    Verified {
        /// Always true.
        verified: bool,
        records: u64,
        redacted: u64,
        checkpoints: u64,
        /// The last record's hash (hex).
        head: String,
        public_key: String,
    },
    Broken {
        /// Always false.
        verified: bool,
        line: u64,
        seq: Option<u64>,
        reason: String,
    },
}

/// `GET /v1/audit/checkpoint`: the latest signed checkpoint and the key that signs them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditCheckpoint {
    /// None while the log has no record to certify.
    pub checkpoint: Option<Checkpoint>,
    pub public_key: String,
}

// ---- questions --------------------------------------------------------------------------

/// `POST /v1/queries/explain`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    pub sql: String,
}

/// `POST /v1/queries`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    pub sql: String,
    /// json (default), csv or arrow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// The answer's columns, its rows (values as JSON), which rows were withheld, the
/// protection applied and what the question cost.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueryAnswer {
    pub columns: Vec<AnswerColumn>,
    /// One array per row, in `columns` order.
    #[schema(value_type = Vec<Vec<Object>>)]
    pub rows: Vec<Vec<serde_json::Value>>,
    /// Per row: true when the row stands for groups withheld below the threshold.
    pub suppressed: Vec<bool>,
    /// Absent for a question over the caller's own data only.
    pub protection: Option<Protection>,
    #[serde(flatten)]
    pub cost: Charge,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AnswerColumn {
    pub name: String,
    /// The Arrow type.
    #[serde(rename = "type")]
    pub data_type: String,
}

/// The protection applied to an answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Protection {
    pub min_entities: u64,
    /// Noisy counts below this are withheld.
    pub release_threshold: f64,
    pub epsilon: f64,
    pub max_groups_per_entity: u32,
    /// Sensitivity of the overlap cells (overlaps only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitivity: Option<u32>,
    /// The mechanism, in words.
    pub noise: String,
    /// Standard deviation of the noise on each count.
    pub noise_sd: f64,
    /// Questions: what happens to groups below the threshold, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld_groups: Option<String>,
    /// Overlaps: what happens to cells below the threshold, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppressed_cells: Option<String>,
}

/// What a question cost: ε charged (0 when repeated or own data only), whether it was
/// answered from its kept answer, and the budgets after it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Charge {
    pub epsilon_spent: f64,
    pub repeated: bool,
    pub budgets: Vec<BudgetView>,
}

/// `POST /v1/overlaps`: the matrix of the caller's populations x the other partner's.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OverlapAnswer {
    /// `owner.dataset` of each side.
    pub mine: String,
    pub theirs: String,
    /// The breakdown column, if any.
    pub by: Option<String>,
    pub populations: Populations,
    pub rows: Vec<OverlapCell>,
    pub protection: Protection,
    #[serde(flatten)]
    pub cost: Charge,
}

/// The populations of each side, in order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Populations {
    pub mine: Vec<String>,
    pub theirs: Vec<String>,
}

/// One cell: companies in my population `mine` and their population `theirs` (and the
/// breakdown value, under the breakdown column's name, or `value` when that name is taken).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OverlapCell {
    pub mine: String,
    pub theirs: String,
    /// Noisy count; null when withheld.
    pub count: Option<u64>,
    pub suppressed: bool,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub breakdown: BTreeMap<String, Option<String>>,
}

/// `GET /v1/overlaps/history?with=PARTNER`: the overlaps released to you with `with`,
/// oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OverlapHistory {
    pub with: String,
    pub released: Vec<ReleasedOverlap>,
}

/// `POST /v1/reports/co-selling`: sections of one overlap question.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CoSellingAnswer {
    /// Always `co-selling`.
    pub report: String,
    pub mine: String,
    pub theirs: String,
    pub by: Option<String>,
    pub sections: Vec<CoSellingSection>,
    pub protection: Protection,
    #[serde(flatten)]
    pub cost: Charge,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CoSellingSection {
    pub mine: String,
    pub theirs: String,
    pub rows: Vec<OverlapCell>,
}

// ---- answers from the engine's outcomes ---------------------------------------------------

impl Charge {
    fn of(c: &crate::queries::Cost) -> Self {
        Charge {
            epsilon_spent: c.epsilon_spent,
            repeated: c.repeated,
            budgets: c.budgets.clone(),
        }
    }
}

impl Protection {
    fn of(p: &escrow_query::Applied) -> Self {
        Protection {
            min_entities: p.min_entities,
            release_threshold: p.threshold,
            epsilon: p.epsilon,
            max_groups_per_entity: p.max_groups_per_entity,
            sensitivity: None,
            noise: String::new(),
            noise_sd: p.count_sd,
            withheld_groups: None,
            suppressed_cells: None,
        }
    }
}

impl QueryAnswer {
    pub fn of(o: &crate::queries::QueryOutcome) -> crate::Result<Self> {
        let a = &o.answer;
        Ok(QueryAnswer {
            columns: a
                .schema
                .fields()
                .iter()
                .map(|f| AnswerColumn {
                    name: f.name().clone(),
                    data_type: f.data_type().to_string(),
                })
                .collect(),
            rows: crate::queries::output::rows(a)?,
            suppressed: a.suppressed.clone(),
            protection: a.protection.as_ref().map(|p| Protection {
                noise: "discrete Gaussian (exact sampler) on entity counts and on clamped sums on a grid"
                    .into(),
                withheld_groups: Some("groups below the threshold are not listed".into()),
                ..Protection::of(p)
            }),
            cost: Charge::of(&o.cost),
        })
    }
}

/// Row keys of the overlap cell; a breakdown column with one of these names is reported
/// under `value`.
const CELL_KEYS: [&str; 4] = ["mine", "theirs", "count", "suppressed"];

impl OverlapCell {
    fn of(r: &crate::overlaps::OverlapRow, by: Option<&str>) -> Self {
        let breakdown = by
            .map(|by| {
                let key = if CELL_KEYS.contains(&by) { "value" } else { by };
                (key.to_string(), r.value.clone())
            })
            .into_iter()
            .collect();
        OverlapCell {
            mine: r.mine.clone(),
            theirs: r.theirs.clone(),
            count: r.count,
            suppressed: r.suppressed,
            breakdown,
        }
    }

    /// The breakdown value, when the answer has one (`by`).
    pub fn value(&self) -> Option<&str> {
        self.breakdown.values().next().and_then(|v| v.as_deref())
    }
}

fn cells(rows: &[crate::overlaps::OverlapRow], by: Option<&str>) -> Vec<OverlapCell> {
    rows.iter().map(|r| OverlapCell::of(r, by)).collect()
}

fn overlap_protection(o: &crate::overlaps::OverlapOutcome) -> Protection {
    Protection {
        sensitivity: Some(o.sensitivity),
        noise: "discrete Gaussian on each cell's company count".into(),
        suppressed_cells: Some(
            if o.by.is_some() {
                "cells below the threshold are not listed (their values would reveal companies)"
            } else {
                "cells below the threshold are listed with count null and suppressed true"
            }
            .into(),
        ),
        ..Protection::of(&o.protection)
    }
}

impl OverlapAnswer {
    pub fn of(o: &crate::overlaps::OverlapOutcome) -> Self {
        OverlapAnswer {
            mine: o.mine.clone(),
            theirs: o.theirs.clone(),
            by: o.by.clone(),
            populations: Populations {
                mine: o.mine_populations.clone(),
                theirs: o.their_populations.clone(),
            },
            rows: cells(&o.rows, o.by.as_deref()),
            protection: overlap_protection(o),
            cost: Charge::of(&o.cost),
        }
    }
}

impl CoSellingAnswer {
    pub fn of(r: &crate::overlaps::CoSellingOutcome) -> Self {
        let o = &r.overlap;
        CoSellingAnswer {
            report: "co-selling".into(),
            mine: o.mine.clone(),
            theirs: o.theirs.clone(),
            by: o.by.clone(),
            sections: r
                .sections
                .iter()
                .map(|s| CoSellingSection {
                    mine: s.mine.clone(),
                    theirs: s.theirs.clone(),
                    rows: cells(&s.rows, o.by.as_deref()),
                })
                .collect(),
            protection: overlap_protection(o),
            cost: Charge::of(&o.cost),
        }
    }
}
