//! A DataFusion session built per query: only the tables the caller may see, no file or URL
//! tables, no table functions, no information_schema, no spilling to disk, a memory limit.

use std::sync::Arc;

use arrow_schema::SchemaRef;
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider,
};
use datafusion::datasource::TableProvider;
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionConfig;

use crate::QueryError;
use crate::gate::GateReport;

/// The catalog name every escrow table lives in; schemas are partner names.
pub const CATALOG: &str = "escrow";
/// Default schema for unqualified names: always empty, so `accounts` alone never resolves.
const NO_SCHEMA: &str = "no_default_schema";

/// A table the caller may query, named `owner.dataset`.
pub struct QueryTable {
    pub owner: String,
    pub dataset: String,
    /// The column that identifies an entity (company), if the owner declared one.
    pub key_column: Option<String>,
    /// The declared schema: queries are planned, gated and explained over it.
    pub schema: SchemaRef,
    /// The data, as the query executes over it: the key column as entity ids
    /// ([`crate::source::EntityHasher`]), every other column as declared.
    pub provider: Arc<dyn TableProvider>,
}

impl QueryTable {
    /// A table without data: planned, gated and explained over `schema`, executing as an
    /// empty table of its execution form (the key column as entity ids). For checks that
    /// need no rows (population filters, the gate's tests and fuzzing).
    pub fn declared(
        owner: &str,
        dataset: &str,
        key_column: Option<&str>,
        schema: SchemaRef,
    ) -> Result<QueryTable, QueryError> {
        let executes = match key_column {
            Some(k) => crate::source::entity_schema(&schema, k)?,
            None => schema.clone(),
        };
        Ok(QueryTable {
            owner: owner.into(),
            dataset: dataset.into(),
            key_column: key_column.map(Into::into),
            schema,
            provider: Arc::new(EmptyTable::new(executes)),
        })
    }
}

impl std::fmt::Debug for QueryTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.owner, self.dataset)
    }
}

/// Limits of one query's execution.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_bytes: usize,
    pub target_partitions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            target_partitions: 2,
        }
    }
}

/// Which provider of each table a session registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The declared schemas, no data: for planning and the gate.
    Plan,
    /// The execution providers.
    Execute,
}

/// The runtime of a query: `memory_bytes` for its memory pool (`None`: no limit), and no
/// spill files ever (they would be plaintext Arrow IPC in the OS temp dir).
fn runtime(
    memory_bytes: Option<usize>,
) -> Result<Arc<datafusion::execution::runtime_env::RuntimeEnv>, QueryError> {
    let mut builder = RuntimeEnvBuilder::new().with_disk_manager_builder(
        DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
    );
    if let Some(bytes) = memory_bytes {
        builder = builder.with_memory_limit(bytes, 1.0);
    }
    Ok(builder.build_arc()?)
}

/// `state` with a memory limit of its own (`None`: none; spill files still off): for the
/// stages of a protected question (exec.rs, `execute`): the caller's own tables under what
/// is left of the limit, the rest without one, once its inputs were sized.
pub(crate) fn with_memory_limit(
    state: &datafusion::execution::SessionState,
    memory_bytes: Option<usize>,
) -> Result<datafusion::execution::SessionState, QueryError> {
    Ok(SessionStateBuilder::new_from_existing(state.clone())
        .with_runtime_env(runtime(memory_bytes)?)
        .build())
}

/// Build the session for one query with exactly `tables` registered.
fn session(
    tables: &[QueryTable],
    limits: &Limits,
    stage: Stage,
) -> Result<datafusion::execution::SessionState, QueryError> {
    let runtime = runtime(Some(limits.memory_bytes))?;
    let config = SessionConfig::new()
        .with_information_schema(false)
        .with_default_catalog_and_schema(CATALOG, NO_SCHEMA)
        .with_create_default_catalog_and_schema(false)
        .with_target_partitions(limits.target_partitions);
    let catalog = Arc::new(MemoryCatalogProvider::new());
    catalog.register_schema(NO_SCHEMA, Arc::new(MemorySchemaProvider::new()))?;
    for t in tables {
        let schema = match catalog.schema(&t.owner) {
            Some(s) => s,
            None => {
                let s: Arc<dyn SchemaProvider> = Arc::new(MemorySchemaProvider::new());
                catalog.register_schema(&t.owner, s.clone())?;
                s
            }
        };
        let provider: Arc<dyn TableProvider> = match stage {
            Stage::Plan => Arc::new(EmptyTable::new(t.schema.clone())),
            Stage::Execute => t.provider.clone(),
        };
        schema.register_table(t.dataset.clone(), provider)?;
    }
    let catalogs = Arc::new(datafusion::catalog::MemoryCatalogProviderList::new());
    datafusion::catalog::CatalogProviderList::register_catalog(
        &*catalogs,
        CATALOG.to_string(),
        catalog,
    );
    Ok(SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_catalog_list(catalogs)
        // Functions: aggregates and core scalar functions only, so the planner can name what a
        // query uses; the gate decides what may run. No table functions, no file formats.
        .with_aggregate_functions(
            datafusion::functions_aggregate::all_default_aggregate_functions(),
        )
        .with_scalar_functions(datafusion::functions::all_default_functions())
        .build())
}

/// A session over the declared schemas of `tables` (no data), for planning and checks.
pub fn planning_session(
    tables: &[QueryTable],
    limits: &Limits,
) -> Result<datafusion::execution::SessionState, QueryError> {
    session(tables, limits, Stage::Plan)
}

/// Parse and plan one SQL statement against the declared schemas of `tables`, for the gate.
/// Planning errors are refusals that say what was not understood (unknown table, function
/// or column; more than one statement).
pub async fn plan_sql(sql: &str, tables: &[QueryTable]) -> Result<LogicalPlan, QueryError> {
    let state = session(tables, &Limits::default(), Stage::Plan)?;
    plan_in(&state, sql).await
}

/// The plan that runs: `sql` planned again over the execution providers (key columns as
/// entity ids), in a session with the memory limit. It must pass the gate with exactly the
/// report of the gated plan, or the query fails.
pub async fn plan_for_execution(
    sql: &str,
    tables: &[QueryTable],
    limits: &Limits,
    gated: &GateReport,
) -> Result<(LogicalPlan, datafusion::execution::SessionState), QueryError> {
    let state = session(tables, limits, Stage::Execute)?;
    let plan = plan_in(&state, sql)
        .await
        .map_err(|e| QueryError::Internal(format!("execution plan of a gated query: {e}")))?;
    let keys = crate::gate::keys_of(tables);
    let report = crate::gate::check(&plan, &keys)?;
    if &report != gated {
        return Err(QueryError::Internal(
            "execution plan differs from the gated plan".into(),
        ));
    }
    Ok((plan, state))
}

/// Parse and plan one SQL statement in `state` (a [`planning_session`]): what [`plan_sql`]
/// does, for callers that plan many statements over the same tables (the fuzz target).
pub async fn plan_in(
    state: &datafusion::execution::SessionState,
    sql: &str,
) -> Result<LogicalPlan, QueryError> {
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state
        .sql_to_statement(sql, &dialect)
        .map_err(planning_refusal)?;
    // Statement-level allow-list before planning: only a query (SELECT, WITH ... SELECT, set
    // operations, which the plan gate then judges). DDL, DML, COPY, SET, EXPLAIN, DESCRIBE,
    // SHOW and every extension statement stop here.
    use datafusion::sql::parser::Statement as Df;
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    match &statement {
        Df::Statement(s) if matches!(s.as_ref(), Sql::Query(_)) => {}
        _ => {
            return Err(QueryError::refused(
                "statement_not_allowed",
                "only SELECT queries are allowed",
            ));
        }
    }
    let plan = state
        .statement_to_plan(statement)
        .await
        .map_err(planning_refusal)?;
    crate::gate::typed_literals(plan)
}

/// Rules that mean "the query was not understood" rather than "not allowed".
pub const PLANNING_RULES: [&str; 8] = [
    "syntax_error",
    "function_not_allowed",
    "unknown_table",
    "unknown_column",
    "multiple_statements",
    "type_mismatch",
    "not_supported",
    "planning_error",
];

pub fn is_planning_rule(rule: &str) -> bool {
    PLANNING_RULES.contains(&rule)
}

fn planning_refusal(e: datafusion::error::DataFusionError) -> QueryError {
    use datafusion::error::DataFusionError as E;
    let root = e.find_root();
    let text = root.to_string();
    let rule = match root {
        E::SQL(..) => "syntax_error",
        _ if text.contains("Invalid function")
            || text.contains("could not be planned by registered expr planner")
            || text.contains("function") && text.contains("not found") =>
        {
            "function_not_allowed"
        }
        _ if text.contains("table") && text.contains("not found") => "unknown_table",
        _ if text.contains("No field named") || text.contains("Schema error") => "unknown_column",
        _ if text.contains("only supports a single") || text.contains("multiple statements") => {
            "multiple_statements"
        }
        _ if text.contains("failed to match any signature")
            || text.contains("requires") && text.contains("received") =>
        {
            "type_mismatch"
        }
        E::NotImplemented(_) => "not_supported",
        _ => "planning_error",
    };
    // Planner messages name identifiers from the query text, never data values.
    let first_line: String = text
        .lines()
        .next()
        .unwrap_or_default()
        .split(". Hint")
        .next()
        .unwrap_or_default()
        // "Did you mean 'a.secret_score'?" would name a column the query did not.
        .split(". Did you mean")
        .next()
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    QueryError::refused(rule, first_line)
}
