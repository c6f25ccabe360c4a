//! The uses a question makes of columns: what the gate derives from a plan and what data
//! owners grant (escrow-policies decides on them with casbin; this crate knows nothing of
//! casbin).

use std::fmt;
use std::str::FromStr;

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

/// A usage name that is none of [`Usage::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown usage {0:?} (one of join, count, dimension, filter, sum, avg, standalone, overlap)"
)]
pub struct UnknownUsage(pub String);

impl FromStr for Usage {
    type Err = UnknownUsage;
    fn from_str(s: &str) -> Result<Self, UnknownUsage> {
        Usage::ALL
            .into_iter()
            .find(|u| u.as_str() == s)
            .ok_or_else(|| UnknownUsage(s.to_string()))
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
