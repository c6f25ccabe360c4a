//! escrow-query: the clean-room query engine. SQL -> DataFusion `LogicalPlan` -> gate
//! (an allow-list over the plan, deriving every column use for the owners' policies) ->
//! -> protection rewrite (thresholds, contribution bounding, noise) -> execution over table
//! providers that decrypt and verify as they read. Knows nothing of HTTP, of casbin or of how
//! data is sealed: policy decisions, settings and batch sources come in from the service.

mod entities;
pub mod exec;
pub mod executor;
pub mod gate;
mod hashing;
mod kept;
pub mod memory;
pub mod noise;
pub mod overlap;
pub mod population;
pub mod session;
pub mod source;
pub mod stop;
pub mod usage;

pub use datafusion::logical_expr::LogicalPlan;
pub use exec::{Answer, Applied, Holder, Protection, execute};
pub use executor::{Executor, QueryTask};
pub use gate::{GateReport, Metric, TableInstance};
pub use memory::{MemoryShare, SharedMemory};
pub use noise::{Epsilon, Noise, NoiseKey, Sensitivity, Variance};
pub use session::{Limits, QueryTable, is_planning_rule, plan_for_execution, plan_sql};
pub use source::{BatchIter, BatchSource, EntityHasher, Keeper};
pub use stop::Stop;
pub use usage::{ColumnUse, Usage};

/// Errors of the query engine.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The query is not allowed; `rule` is stable (see docs/API.md), `message` names the
    /// construct or the missing grant but never any data.
    #[error("query refused ({rule}): {message}")]
    Refused { rule: &'static str, message: String },
    /// The query needs more memory than its limit.
    #[error("resources exhausted: {0}")]
    ResourcesExhausted(String),
    /// Anything else: logged server-side, shown to clients as a generic error.
    #[error("query engine: {0}")]
    Internal(String),
}

impl QueryError {
    pub fn refused(rule: &'static str, message: impl Into<String>) -> Self {
        QueryError::Refused {
            rule,
            message: message.into(),
        }
    }
}

impl From<datafusion::error::DataFusionError> for QueryError {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        match e.find_root() {
            datafusion::error::DataFusionError::ResourcesExhausted(m) => {
                QueryError::ResourcesExhausted(m.clone())
            }
            _ => QueryError::Internal(e.to_string()),
        }
    }
}

impl From<datafusion::arrow::error::ArrowError> for QueryError {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        QueryError::Internal(e.to_string())
    }
}
