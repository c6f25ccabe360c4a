//! The audit log's values: who did what, and how it ended.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Who did something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Actor {
    /// The partner of the identity; `None` for the operator and the escrow itself.
    pub partner: Option<String>,
    pub user: String,
    pub role: String,
    /// `console` when the action came from a browser session of the web console (absent
    /// for a client with its certificate, the operator and the escrow itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

impl Actor {
    /// An authenticated user of a partner.
    pub fn user(partner: &str, user: &str, role: &str) -> Self {
        Actor {
            partner: Some(partner.into()),
            user: user.into(),
            role: role.into(),
            via: None,
        }
    }

    /// The partner acting; an operator or the escrow own no datasets.
    pub fn partner_name(&self) -> Result<&str> {
        self.partner
            .as_deref()
            .ok_or_else(|| Error::internal("a partner's action without a partner"))
    }

    /// Someone running operator commands on the data directory.
    pub fn operator() -> Self {
        Actor {
            partner: None,
            user: "operator".into(),
            role: "operator".into(),
            via: None,
        }
    }

    /// The escrow service itself (startup, recovery, shutdown).
    pub fn system() -> Self {
        Actor {
            partner: None,
            user: "escrow".into(),
            role: "system".into(),
            via: None,
        }
    }
}

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done (and answered, for questions).
    Ok,
    /// Refused: bad input, a rule, a missing grant or role.
    Refused,
    /// Failed on the server side.
    Failed,
}

/// One audited event, as the code describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// What happened: `upload`, `delete`, `query`, `overlap`, `report`, `grant`, ...
    pub kind: String,
    pub actor: Actor,
    /// Partners whose datasets or rules the event touched (their compliance officers see it).
    pub parties: Vec<String>,
    pub outcome: Outcome,
    /// The refusal rule or error code, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Kind-specific facts (the SQL, datasets and versions, rows, ε, the change, ...).
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Event {
    pub fn new(kind: &str, actor: Actor, outcome: Outcome, detail: serde_json::Value) -> Self {
        let parties = actor.partner.iter().cloned().collect();
        Event {
            kind: kind.into(),
            actor,
            parties,
            outcome,
            code: None,
            detail,
        }
    }

    /// Add the fields of `detail` (an object) to the event's detail.
    pub fn with(mut self, detail: serde_json::Value) -> Self {
        if let serde_json::Value::Object(extra) = detail {
            if !self.detail.is_object() {
                self.detail = serde_json::Value::Object(Default::default());
            }
            if let serde_json::Value::Object(d) = &mut self.detail {
                d.extend(extra);
            }
        }
        self
    }

    /// Add partners the event touched.
    pub fn touching<'a>(mut self, partners: impl IntoIterator<Item = &'a str>) -> Self {
        for p in partners {
            if !self.parties.iter().any(|q| q == p) {
                self.parties.push(p.to_string());
            }
        }
        self
    }

    /// The same event for a failed action: `refused` for client faults, `failed` otherwise.
    pub fn failed(mut self, e: &Error) -> Self {
        self.outcome = match e {
            Error::Internal(_)
            | Error::Changed(_)
            | Error::Stale
            | Error::Integrity(_)
            | Error::AuditUnavailable(_)
            | Error::StorageFull(_) => Outcome::Failed,
            _ => Outcome::Refused,
        };
        self.code = Some(match e {
            Error::Refused { rule, .. } => (*rule).to_string(),
            other => other.code().to_string(),
        });
        if let Error::Refused { message, .. } | Error::BadInput { message, .. } = e {
            self.detail["message"] = serde_json::Value::String(message.clone());
        }
        self
    }

    /// May a compliance officer of `partner` see this event?
    pub fn visible_to(&self, partner: &str) -> bool {
        self.actor.partner.as_deref() == Some(partner) || self.parties.iter().any(|p| p == partner)
    }
}

/// A stored record: the event with its place and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
}
