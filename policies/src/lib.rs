//! escrow-policies: the casbin model of column-level consent and the library that validates
//! and evaluates data owners' grants ("may globex use acme.accounts.website as a join
//! key?"). Storage, versioning and HTTP live elsewhere; this crate only decides.
//!
//! The model is `policies/model.conf`, compiled in. Grants become casbin `p` lines
//! `grantee, owner, dataset, column, usage`. Every decision says which rule allowed it, or
//! that none did, so refusals can name the missing grant.

pub mod roles;

use std::fmt;
use std::str::FromStr;

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, MgmtApi};

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

impl From<casbin::Error> for PolicyError {
    fn from(e: casbin::Error) -> Self {
        PolicyError::Engine(e.to_string())
    }
}

/// How a query uses a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Usage {
    /// Equality join with another party's key column.
    Join,
    /// Inside COUNT(DISTINCT key).
    Count,
    /// Grouped by.
    Dimension,
    /// Compared with `=` / `IN` against literals.
    Filter,
    /// Summed (numeric metric).
    Sum,
    /// Averaged (numeric metric).
    Avg,
    /// The dataset as a whole (column `*`): queried without being joined on its key to one
    /// of the caller's datasets. Without it, another partner's dataset is only ever seen
    /// through the caller's own list.
    Standalone,
    /// Overlap counts of a population of the dataset (the casbin column slot holds the
    /// population name; `*` = every population): how many of the grantee's companies are in
    /// it, without using any of its columns.
    Overlap,
}

impl Usage {
    pub const ALL: [Usage; 8] = [
        Usage::Join,
        Usage::Count,
        Usage::Dimension,
        Usage::Filter,
        Usage::Sum,
        Usage::Avg,
        Usage::Standalone,
        Usage::Overlap,
    ];

    /// Usages of one column, in the order they are shown.
    pub const COLUMN: [Usage; 6] = [
        Usage::Join,
        Usage::Count,
        Usage::Dimension,
        Usage::Filter,
        Usage::Sum,
        Usage::Avg,
    ];

    /// Usages of a whole dataset rather than of a column.
    pub fn is_dataset_wide(self) -> bool {
        self == Usage::Standalone
    }

    /// Usages whose target is a population of the dataset, not a column.
    pub fn names_population(self) -> bool {
        self == Usage::Overlap
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Usage::Join => "join",
            Usage::Count => "count",
            Usage::Dimension => "dimension",
            Usage::Filter => "filter",
            Usage::Sum => "sum",
            Usage::Avg => "avg",
            Usage::Standalone => "standalone",
            Usage::Overlap => "overlap",
        }
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Usage {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Usage::ALL
            .into_iter()
            .find(|u| u.as_str() == s)
            .ok_or_else(|| {
                PolicyError::InvalidRule(format!(
                    "unknown usage {s:?} (one of join, count, dimension, filter, sum, avg, standalone, overlap)"
                ))
            })
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

/// One use of one column that a query makes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnUse {
    pub owner: String,
    pub dataset: String,
    pub column: String,
    pub usage: Usage,
}

impl ColumnUse {
    /// Overlap counts of one population of a dataset.
    pub fn overlap(owner: &str, dataset: &str, population: &str) -> Self {
        ColumnUse {
            owner: owner.into(),
            dataset: dataset.into(),
            column: population.into(),
            usage: Usage::Overlap,
        }
    }

    /// A use of a whole dataset (column `*`).
    pub fn dataset_wide(owner: &str, dataset: &str, usage: Usage) -> Self {
        ColumnUse {
            owner: owner.into(),
            dataset: dataset.into(),
            column: "*".into(),
            usage,
        }
    }
}

impl fmt::Display for ColumnUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.usage.is_dataset_wide() {
            return write!(f, "{}.{} as {}", self.owner, self.dataset, self.usage);
        }
        if self.usage.names_population() {
            return write!(
                f,
                "population {} of {}.{} as {}",
                self.column, self.owner, self.dataset, self.usage
            );
        }
        write!(
            f,
            "{}.{}.{} as {}",
            self.owner, self.dataset, self.column, self.usage
        )
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
