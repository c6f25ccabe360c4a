//! escrow-policies: the casbin model of column-level consent and the library that validates
//! and evaluates data owners' grants ("may globex use acme.accounts.website as a join
//! key?"). Storage, versioning and HTTP live elsewhere; this crate only decides.
//!
//! The model is `policies/model.conf`, compiled in. Grants become casbin `p` lines
//! `grantee, owner, dataset, column, usage`. Every decision says which rule allowed it, or
//! that none did, so refusals can name the missing grant.

pub mod roles;

use std::fmt;

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, MgmtApi};

/// The uses a question makes of columns are the query engine's vocabulary; this crate
/// decides on them.
pub use escrow_query::usage::{ColumnUse, UnknownUsage, Usage};

/// The casbin model text (policies/model.conf).
pub const MODEL: &str = include_str!("../model.conf");

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A rule is malformed; the whole set is rejected.
    #[error("invalid rule: {0}")]
    InvalidRule(String),
    /// casbin refused the model or a request (a bug, not a user error).
    #[error("policy engine: {0}")]
    Engine(String),
}

impl From<UnknownUsage> for PolicyError {
    fn from(e: UnknownUsage) -> Self {
        PolicyError::InvalidRule(e.to_string())
    }
}

impl From<casbin::Error> for PolicyError {
    fn from(e: casbin::Error) -> Self {
        PolicyError::Engine(e.to_string())
    }
}

/// One grant by a data owner: `grantee` may use `column` (or every column) of
/// `owner.dataset` as `usage`. For `overlap`, `column` is a population of the dataset (or
/// every population).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grant {
    pub owner: String,
    pub dataset: String,
    /// `None`: every column of the dataset (for `overlap`: a population name, `None` = every
    /// population).
    pub column: Option<String>,
    /// A partner name, or `*` for every partner.
    pub grantee: String,
    pub usage: Usage,
}

impl Grant {
    /// Check the grant's fields (names, usage); the caller checks that the dataset exists.
    pub fn validate(&self) -> Result<(), PolicyError> {
        valid_name("owner", &self.owner)?;
        valid_name("dataset", &self.dataset)?;
        if self.grantee != "*" {
            valid_name("grantee", &self.grantee)?;
        }
        if self.grantee == self.owner {
            return Err(PolicyError::InvalidRule(
                "a partner needs no grant for its own datasets".into(),
            ));
        }
        if self.usage.is_dataset_wide() && self.column.is_some() {
            return Err(PolicyError::InvalidRule(format!(
                "usage {} applies to a whole dataset, not to a column",
                self.usage
            )));
        }
        if self.usage.names_population()
            && let Some(p) = &self.column
        {
            valid_name("population", p)?;
        }
        if let Some(c) = &self.column
            && (c.is_empty() || c == "*" || c.contains([',', '"', '\n', '\r']))
        {
            return Err(PolicyError::InvalidRule(format!(
                "invalid column name {c:?}"
            )));
        }
        Ok(())
    }

    /// The casbin `p` line of this grant.
    pub fn to_casbin(&self) -> Vec<String> {
        vec![
            self.grantee.clone(),
            self.owner.clone(),
            self.dataset.clone(),
            self.column.clone().unwrap_or_else(|| "*".into()),
            self.usage.as_str().into(),
        ]
    }

    /// Parse a casbin `p` line back into a grant.
    pub fn from_casbin(line: &[String]) -> Result<Self, PolicyError> {
        let [grantee, owner, dataset, column, usage] = line else {
            return Err(PolicyError::InvalidRule(format!(
                "expected 5 fields, got {}",
                line.len()
            )));
        };
        let g = Grant {
            owner: owner.clone(),
            dataset: dataset.clone(),
            column: (column != "*").then(|| column.clone()),
            grantee: grantee.clone(),
            usage: usage.parse()?,
        };
        g.validate()?;
        Ok(g)
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = if self.grantee == "*" {
            "every partner"
        } else {
            &self.grantee
        };
        if self.usage == Usage::Standalone {
            return write!(
                f,
                "{who} may query {}.{} without joining it to their own data",
                self.owner, self.dataset
            );
        }
        if self.usage == Usage::Overlap {
            return match &self.column {
                Some(p) => write!(
                    f,
                    "{who} may see overlap counts of population {p} of {}.{}",
                    self.owner, self.dataset
                ),
                None => write!(
                    f,
                    "{who} may see overlap counts of every population of {}.{}",
                    self.owner, self.dataset
                ),
            };
        }
        match &self.column {
            Some(c) => write!(
                f,
                "{who} may use {}.{}.{c} as {}",
                self.owner, self.dataset, self.usage
            ),
            None => write!(
                f,
                "{who} may use every column of {}.{} as {}",
                self.owner, self.dataset, self.usage
            ),
        }
    }
}

/// Names of partners, users and datasets: lowercase, start with a letter, `[a-z0-9_]`, at
/// most 63 characters. They become SQL identifiers (`partner.dataset`) and path parts.
pub fn is_valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn valid_name(kind: &str, name: &str) -> Result<(), PolicyError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(PolicyError::InvalidRule(format!(
            "{kind} {name:?} is not a valid name"
        )))
    }
}

/// Why a use is allowed or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The caller owns the dataset.
    Owner,
    /// Allowed by this grant.
    Granted(Grant),
    /// No grant allows it.
    Missing,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        !matches!(self, Decision::Missing)
    }
}

/// A validated, loaded set of grants, ready to answer.
pub struct PolicySet {
    enforcer: Enforcer,
    grants: Vec<Grant>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("grants", &self.grants.len())
            .finish()
    }
}

impl PolicySet {
    /// Validate every grant and load them all; one bad grant rejects the whole set, so a
    /// broken policy never half-loads.
    pub async fn build(grants: Vec<Grant>) -> Result<Self, PolicyError> {
        for g in &grants {
            g.validate()?;
        }
        let model = DefaultModel::from_str(MODEL).await?;
        let mut enforcer = Enforcer::new(model, MemoryAdapter::default()).await?;
        let mut lines: Vec<Vec<String>> = grants.iter().map(Grant::to_casbin).collect();
        lines.sort();
        lines.dedup();
        if !lines.is_empty() {
            enforcer.add_policies(lines).await?;
        }
        Ok(PolicySet { enforcer, grants })
    }

    /// The grants in this set.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// May `subject` (a partner) make this use?
    pub fn decide(&self, subject: &str, u: &ColumnUse) -> Result<Decision, PolicyError> {
        if subject == u.owner {
            return Ok(Decision::Owner);
        }
        let (allowed, rules) = self.enforcer.enforce_ex((
            subject,
            u.owner.as_str(),
            u.dataset.as_str(),
            u.column.as_str(),
            u.usage.as_str(),
        ))?;
        if !allowed {
            return Ok(Decision::Missing);
        }
        let rule = rules
            .first()
            .ok_or_else(|| PolicyError::Engine("allowed without a matching rule".into()))?;
        Ok(Decision::Granted(Grant::from_casbin(rule)?))
    }
}
