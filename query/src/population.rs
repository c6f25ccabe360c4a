//! Population filters: a data owner's named subset of one of its datasets (customers, open
//! opportunities, ...), written as a SQL predicate over the dataset's own columns.
//!
//! A predicate is parsed as one expression (never spliced into a statement), planned against
//! the dataset's declared schema, and must be a boolean over plain columns: no subqueries,
//! aggregates, windows or placeholders, and never the key column (a population defined by
//! identifiers would single companies out: `website = 'acme.com'`).
//!
//! It is evaluated over the owner's rows while another partner waits for an overlap, so it
//! must not be able to fail on any value (a failure would tell the other partner that such a
//! row exists): the language is comparisons of a column with a literal of the column's own
//! type (converted at definition, as query filters are) or with a column of the same type,
//! `IN` lists, `BETWEEN`, `LIKE` / `ILIKE` on text, `IS [NOT] NULL`, `IS [NOT] TRUE / FALSE`,
//! and boolean columns, combined with `AND`, `OR` and `NOT`. No function, cast or arithmetic.

use std::sync::Arc;

use arrow_schema::{DataType, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
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
    infallible(expr, &df_schema)
}

fn not_allowed(what: impl std::fmt::Display) -> QueryError {
    refuse(
        "invalid_filter",
        format!(
            "{what}: a population filter compares columns with values of their own type (=, <>, <, >, IN, BETWEEN, LIKE, IS NULL) joined by AND, OR, NOT; no functions, casts or arithmetic, so that it cannot fail on any row"
        ),
    )
}

/// `e` with every literal in its column's type, if `e` is in the filter language that cannot
/// fail on a value (see the module comment); refused otherwise.
fn infallible(e: Expr, schema: &DFSchema) -> Result<Expr, QueryError> {
    use datafusion::logical_expr::expr::{Between, InList, Like};
    use datafusion::logical_expr::{BinaryExpr, Operator};
    let column_type = |c: &Expr| match c {
        Expr::Column(_) => c.get_type(schema).ok(),
        _ => None,
    };
    let typed = |c: &Expr, v: &Expr| -> Result<Expr, QueryError> {
        let (Some(t), Expr::Literal(v, m)) = (column_type(c), v) else {
            return Err(not_allowed(v));
        };
        crate::gate::exact_literal(v, &t)
            .map(|x| Expr::Literal(x, m.clone()))
            .ok_or_else(|| {
                refuse(
                    "invalid_filter",
                    format!(
                        "{c} is {t} and cannot be compared with {v}: write a value of its type"
                    ),
                )
            })
    };
    if let Expr::IsTrue(c)
    | Expr::IsFalse(c)
    | Expr::IsNotTrue(c)
    | Expr::IsNotFalse(c)
    | Expr::IsUnknown(c)
    | Expr::IsNotUnknown(c) = &e
    {
        return if column_type(c) == Some(DataType::Boolean) {
            Ok(e)
        } else {
            Err(not_allowed(&e))
        };
    }
    Ok(match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And | Operator::Or => Expr::BinaryExpr(BinaryExpr::new(
                Box::new(infallible(*left, schema)?),
                op,
                Box::new(infallible(*right, schema)?),
            )),
            Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq => {
                let (l, r) = (*left, *right);
                let (l, r) = match (column_type(&l), column_type(&r)) {
                    (Some(a), Some(b)) if a == b => (l, r),
                    (Some(_), None) => {
                        let r = typed(&l, &r)?;
                        (l, r)
                    }
                    (None, Some(_)) => {
                        let l = typed(&r, &l)?;
                        (l, r)
                    }
                    _ => return Err(not_allowed(format!("{l} {op} {r}"))),
                };
                Expr::BinaryExpr(BinaryExpr::new(Box::new(l), op, Box::new(r)))
            }
            _ => return Err(not_allowed(format!("{left} {op} {right}"))),
        },
        Expr::Not(inner) => Expr::Not(Box::new(infallible(*inner, schema)?)),
        Expr::InList(InList {
            expr,
            list,
            negated,
        }) => {
            let list = list
                .iter()
                .map(|v| typed(&expr, v))
                .collect::<Result<Vec<_>, _>>()?;
            Expr::InList(InList::new(expr, list, negated))
        }
        Expr::Between(Between {
            expr,
            negated,
            low,
            high,
        }) => {
            let (low, high) = (typed(&expr, &low)?, typed(&expr, &high)?);
            Expr::Between(Between::new(expr, negated, Box::new(low), Box::new(high)))
        }
        Expr::Like(Like {
            negated,
            expr,
            pattern,
            escape_char,
            case_insensitive,
        }) if matches!(
            column_type(&expr),
            Some(DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
        ) =>
        {
            let pattern = typed(&expr, &pattern)?;
            Expr::Like(Like::new(
                negated,
                expr,
                Box::new(pattern),
                escape_char,
                case_insensitive,
            ))
        }
        Expr::IsNull(c) if matches!(*c, Expr::Column(_)) => Expr::IsNull(c),
        Expr::IsNotNull(c) if matches!(*c, Expr::Column(_)) => Expr::IsNotNull(c),
        c @ Expr::Column(_) if column_type(&c) == Some(DataType::Boolean) => c,
        Expr::Literal(ScalarValue::Boolean(b), m) => Expr::Literal(ScalarValue::Boolean(b), m),
        other => return Err(not_allowed(other)),
    })
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

/// The columns a compiled filter reads, by name.
pub fn columns(expr: &Arc<dyn PhysicalExpr>) -> Vec<String> {
    datafusion::physical_expr::utils::collect_columns(expr)
        .into_iter()
        .map(|c| c.name().to_string())
        .collect()
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
            "arr_usd BETWEEN 10 AND 20.5",
            "status NOT IN ('a', 'b') AND NOT (region = 'x' OR region IS NULL)",
            "status ILIKE 'Cust%'",
            "region = status",
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
            // could fail on some row's value, so an overlap would fail exactly then
            ("CAST(status AS INT) = 1", "invalid_filter"),
            ("status = 5", "invalid_filter"),
            ("arr_usd / 0 > 1", "invalid_filter"),
            ("arr_usd + 1 > 2", "invalid_filter"),
            ("upper(status) = 'X'", "invalid_filter"),
            (
                "to_timestamp(status) > to_timestamp('2024-01-01')",
                "invalid_filter",
            ),
            (
                "CASE WHEN status = 'x' THEN arr_usd / 0 > 1 ELSE true END",
                "invalid_filter",
            ),
            ("arr_usd = status", "invalid_filter"),
            ("arr_usd LIKE '1%'", "invalid_filter"),
        ] {
            assert_eq!(rule(bad), want, "{bad}");
        }
    }
}
