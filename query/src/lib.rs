//! escrow-query: the clean-room query engine. SQL -> DataFusion `LogicalPlan` -> gate
//! (an allow-list over the plan, deriving every column use for the owners' policies) ->
//! (next: rewrite with thresholds and noise) -> execution over decrypting table providers.
//! Knows nothing of HTTP and nothing of casbin: policy decisions come in as a function.

pub mod gate;
pub mod session;

pub use gate::{GateReport, TableInstance};
pub use session::{QueryTable, plan_sql};

/// Errors of the query engine.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The query is not allowed; `rule` is stable (see docs/API.md), `message` names the
    /// construct or the missing grant but never any data.
    #[error("query refused ({rule}): {message}")]
    Refused { rule: &'static str, message: String },
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
        QueryError::Internal(e.to_string())
    }
}
