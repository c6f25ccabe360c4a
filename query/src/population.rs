//! Population filters: a data owner's named subset of one of its datasets (customers, open
//! opportunities, ...), written as a SQL predicate over the dataset's own columns.
//!
//! A predicate is parsed as one expression (never spliced into a statement), planned against
//! the dataset's declared schema, and must be a boolean over plain columns: no subqueries,
//! aggregates, windows or placeholders, and never the key column (a population defined by
//! identifiers would single companies out: `website = 'acme.com'`).

use std::sync::Arc;

use arrow_schema::{DataType, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, ExprSchemable};
use datafusion::physical_expr::PhysicalExpr;

use crate::QueryError;
use crate::session::{Limits, QueryTable};

/// Longest predicate accepted.
pub const MAX_FILTER_BYTES: usize = 4096;

fn refuse(rule: &'static str, message: impl Into<String>) -> QueryError {
    QueryError::refused(rule, message)
}

/// Check a population predicate over `schema` (the declared columns) and return it planned.
pub fn check_filter(
    filter: &str,
    schema: &SchemaRef,
    key_column: Option<&str>,
) -> Result<Expr, QueryError> {
    if filter.trim().is_empty() {
        return Err(refuse("invalid_filter", "the filter is empty"));
    }
    if filter.len() > MAX_FILTER_BYTES {
        return Err(refuse(
            "invalid_filter",
            format!("filters are limited to {MAX_FILTER_BYTES} bytes"),
        ));
    }
    let table = QueryTable::declared("owner", "dataset", key_column, schema.clone())?;
    let state = crate::session::planning_session(std::slice::from_ref(&table), &Limits::default())?;
    let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
    let expr = state.create_logical_expr(filter, &df_schema).map_err(|e| {
        let text = e.find_root().to_string();
        let first = text.lines().next().unwrap_or_default().chars().take(300);
        refuse("invalid_filter", first.collect::<String>())
    })?;
    let mut problem: Option<QueryError> = None;
    expr.apply(|e| {
        let p = match e {
            Expr::Column(c) if Some(c.name.as_str()) == key_column => Some(refuse(
                "population_names_key",
                format!(
                    "{} identifies companies: a population cannot be defined by it",
                    c.name
                ),
            )),
            Expr::ScalarSubquery(_)
            | Expr::Exists(_)
            | Expr::InSubquery(_)
            | Expr::SetComparison(_)
            | Expr::OuterReferenceColumn(..) => {
                Some(refuse("invalid_filter", "subqueries are not allowed"))
            }
            Expr::AggregateFunction(_) | Expr::WindowFunction(_) => Some(refuse(
                "invalid_filter",
                "aggregate and window functions are not allowed",
            )),
            Expr::Placeholder(_) | Expr::ScalarVariable(..) => Some(refuse(
                "invalid_filter",
                "placeholders and variables are not allowed",
            )),
            _ => None,
        };
        Ok(match p {
            Some(p) => {
                problem = Some(p);
                TreeNodeRecursion::Stop
            }
            None => TreeNodeRecursion::Continue,
        })
    })?;
    if let Some(p) = problem {
        return Err(p);
    }
    let t = expr.get_type(&df_schema)?;
    if t != DataType::Boolean {
        return Err(refuse(
            "invalid_filter",
            format!("the filter must be true or false for a row, not {t}"),
        ));
    }
    Ok(expr)
}

/// A checked population predicate ready to evaluate over batches of `executes` (the schema a
/// version executes with: the declared columns, the key column as entity ids).
pub fn compile(
    filter: &str,
    declared: &SchemaRef,
    executes: &SchemaRef,
    key_column: Option<&str>,
) -> Result<Arc<dyn PhysicalExpr>, QueryError> {
    let expr = check_filter(filter, declared, key_column)?;
    let state = crate::session::planning_session(&[], &Limits::default())?;
    let df_schema = DFSchema::try_from(executes.as_ref().clone())?;
    Ok(state.create_physical_expr(expr, &df_schema)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_schema::{Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("website", DataType::Utf8, true),
            Field::new("status", DataType::Utf8, true),
            Field::new("region", DataType::Utf8, true),
            Field::new("arr_usd", DataType::Float64, true),
        ]))
    }

    #[test]
    fn predicates_over_the_owners_columns() {
        for ok in [
            "status = 'customer'",
            "status IN ('customer', 'opportunity') AND region <> 'APAC'",
            "arr_usd > 100000 OR status LIKE 'open%'",
            "NOT (status = 'prospect')",
            "arr_usd IS NOT NULL",
        ] {
            check_filter(ok, &schema(), Some("website")).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let rule = |f: &str| match check_filter(f, &schema(), Some("website")) {
            Err(QueryError::Refused { rule, .. }) => rule,
            other => panic!("{f}: {other:?}"),
        };
        for (bad, want) in [
            ("website = 'acme.com'", "population_names_key"),
            (
                "status = 'customer' OR website LIKE '%acme%'",
                "population_names_key",
            ),
            ("lower(website) = 'x'", "population_names_key"),
            ("nope = 1", "invalid_filter"),
            ("status", "invalid_filter"),
            ("arr_usd + 1", "invalid_filter"),
            ("status = 'a') OR (1 = 1", "invalid_filter"),
            ("status = 'a'; DROP TABLE x", "invalid_filter"),
            ("status IN (SELECT 1)", "invalid_filter"),
            ("count(*) > 1", "invalid_filter"),
            ("", "invalid_filter"),
            ("status = $1", "invalid_filter"),
        ] {
            assert_eq!(rule(bad), want, "{bad}");
        }
    }
}
