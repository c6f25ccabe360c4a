//! The query gate: an allow-list over the DataFusion logical plan (never the SQL text).
//!
//! Accepted shape, top to bottom:
//!
//! ```text
//! [Limit] [Sort by output columns] [Projection of output columns]     top level only
//! Aggregate: GROUP BY dimension columns; COUNT(DISTINCT key), SUM(metric), AVG(metric)
//! row level: TableScan | SubqueryAlias | Projection of plain columns (lineage followed)
//!            | Filter of `col = literal`, `col IN (literals)` conjunctions
//!            | INNER JOIN on equalities of key columns of two tables
//! ```
//!
//! Everything else is refused with a stable rule name. Walking the plan also derives every
//! column use (`join`, `count`, `dimension`, `filter`, `sum`, `avg`) for the owners' policies,
//! following lineage through aliases, derived tables and CTEs.

use std::collections::{BTreeSet, HashMap};

use crate::usage::{ColumnUse, Usage};
use datafusion::common::{Column, DFSchema, JoinType, ScalarValue};
use datafusion::logical_expr::expr::{AggregateFunction, Alias, InList};
use datafusion::logical_expr::{BinaryExpr, Expr, LogicalPlan, Operator, Projection};

use crate::QueryError;

/// One scanned table in the plan (a table joined to itself appears twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInstance {
    pub owner: String,
    pub dataset: String,
    pub key_column: Option<String>,
}

/// What the gate learned about an allowed plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateReport {
    /// Every scanned table instance, in plan order.
    pub tables: Vec<TableInstance>,
    /// Every use of every column, for the owners' policies.
    pub uses: BTreeSet<ColumnUse>,
    /// Join edges between table instances (indices into `tables`).
    pub joins: Vec<(usize, usize)>,
    /// The aggregates computed, in the order of the plan's Aggregate node.
    pub aggregates: Vec<Metric>,
    /// Number of GROUP BY columns.
    pub group_by: usize,
    /// Per GROUP BY column: its values when the query itself enumerates them (the column is
    /// filtered with `=` / `IN` on literals), so every group is known without looking at
    /// the data and a withheld one can be listed as suppressed. `None`: data-derived.
    pub group_domains: Vec<Option<Vec<ScalarValue>>>,
    /// (table instance, column) of each GROUP BY column, in order.
    pub dimensions: Vec<(usize, String)>,
    /// Every filter conjunct: (table instance, column) and the literals it allows. Filters
    /// are conjunctions over inner joins, so each holds for every row and can be applied to
    /// its table alone.
    pub filters: Vec<((usize, String), Vec<ScalarValue>)>,
}

/// One aggregate of an allowed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Metric {
    /// COUNT(DISTINCT key): distinct entities.
    Entities,
    /// SUM(column) of table instance `table`.
    Sum { table: usize, column: String },
    /// AVG(column) of table instance `table`.
    Avg { table: usize, column: String },
}

/// Where a column of an intermediate relation comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lineage {
    /// Unchanged column `column` of table instance `table`.
    Source {
        table: usize,
        column: String,
        is_key: bool,
    },
    /// An aggregate output (only above the Aggregate).
    Aggregate,
}

fn refuse(rule: &'static str, message: impl Into<String>) -> QueryError {
    QueryError::refused(rule, message)
}

/// Look up a table's key column by `owner.dataset`.
pub trait KeyColumns {
    fn key_column(&self, owner: &str, dataset: &str) -> Option<Option<String>>;
}

impl<F: Fn(&str, &str) -> Option<Option<String>>> KeyColumns for F {
    fn key_column(&self, owner: &str, dataset: &str) -> Option<Option<String>> {
        self(owner, dataset)
    }
}

/// Check a plan; on success report its tables and column uses.
pub fn check(plan: &LogicalPlan, keys: &dyn KeyColumns) -> Result<GateReport, QueryError> {
    let mut g = Gate {
        report: GateReport::default(),
        keys,
    };
    g.top(plan)?;
    check_connected(&g.report)?;
    // Filters are conjunctions over inner joins: each one holds for every row, so the values
    // a dimension can take are the intersection of the lists that filter it.
    let domains = g
        .report
        .dimensions
        .iter()
        .map(|dim| {
            g.report.filters.iter().filter(|(src, _)| src == dim).fold(
                None,
                |acc: Option<Vec<ScalarValue>>, (_, values)| {
                    Some(match acc {
                        None => values.iter().fold(Vec::new(), |mut u, v| {
                            if !u.contains(v) {
                                u.push(v.clone());
                            }
                            u
                        }),
                        Some(d) => d.into_iter().filter(|v| values.contains(v)).collect(),
                    })
                },
            )
        })
        .collect();
    g.report.group_domains = domains;
    Ok(g.report)
}

struct Gate<'a> {
    report: GateReport,
    keys: &'a dyn KeyColumns,
}

impl Gate<'_> {
    /// Above the aggregate: limit, sort, plain projections.
    fn top(&mut self, plan: &LogicalPlan) -> Result<Vec<Lineage>, QueryError> {
        match plan {
            LogicalPlan::Limit(l) => {
                // LIMIT/OFFSET must be constants: a subquery there would turn a hidden count
                // into the number of rows returned.
                for e in [&l.skip, &l.fetch].into_iter().flatten() {
                    if !matches!(e.as_ref(), Expr::Literal(..)) {
                        return Err(refuse(
                            "expression_not_allowed",
                            "LIMIT and OFFSET must be numbers",
                        ));
                    }
                }
                self.top(&l.input)
            }
            LogicalPlan::Sort(s) => {
                let lin = self.top(&s.input)?;
                for e in &s.expr {
                    column_of(&e.expr, s.input.schema(), &lin).ok_or_else(|| {
                        refuse(
                            "expression_not_allowed",
                            "ORDER BY may only name output columns",
                        )
                    })?;
                }
                Ok(lin)
            }
            LogicalPlan::Projection(p) => {
                let lin = self.top(&p.input)?;
                self.project(
                    p,
                    &lin,
                    "the result may only list grouped columns and aggregates, without further expressions",
                )
            }
            LogicalPlan::Aggregate(_) => self.aggregate(plan),
            LogicalPlan::Filter(f) if matches!(f.input.as_ref(), LogicalPlan::Aggregate(_)) => {
                Err(refuse(
                    "having",
                    "HAVING filters on exact aggregates and is not allowed",
                ))
            }
            LogicalPlan::Filter(_) => Err(refuse(
                "no_aggregate",
                "a query must aggregate: rows are never returned",
            )),
            LogicalPlan::TableScan(_) | LogicalPlan::Join(_) | LogicalPlan::SubqueryAlias(_) => {
                Err(refuse(
                    "no_aggregate",
                    "a query must aggregate: rows are never returned",
                ))
            }
            other => self.forbidden(other),
        }
    }

    fn forbidden(&self, plan: &LogicalPlan) -> Result<Vec<Lineage>, QueryError> {
        Err(match plan {
            LogicalPlan::Union(_) => refuse(
                "set_operation",
                "UNION / INTERSECT / EXCEPT are not allowed",
            ),
            LogicalPlan::Window(_) => refuse("window_function", "window functions are not allowed"),
            // UNION (without ALL) is planned as DISTINCT over the union.
            LogicalPlan::Distinct(_)
                if matches!(plan.inputs().first(), Some(LogicalPlan::Union(_))) =>
            {
                refuse(
                    "set_operation",
                    "UNION / INTERSECT / EXCEPT are not allowed",
                )
            }
            LogicalPlan::Distinct(_) => refuse("distinct", "SELECT DISTINCT is not allowed"),
            LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => {
                refuse("no_table", "a query must read an escrow dataset")
            }
            LogicalPlan::Subquery(_) => {
                refuse("subquery", "subqueries that select rows are not allowed")
            }
            LogicalPlan::RecursiveQuery(_) => {
                refuse("recursive_query", "recursive queries are not allowed")
            }
            LogicalPlan::Unnest(_) => refuse("unnest", "UNNEST is not allowed"),
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) | LogicalPlan::DescribeTable(_) => {
                refuse(
                    "statement_not_allowed",
                    "EXPLAIN / DESCRIBE are not allowed",
                )
            }
            LogicalPlan::Statement(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Ddl(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::Repartition(_)
            | LogicalPlan::Extension(_) => {
                refuse("statement_not_allowed", "only SELECT queries are allowed")
            }
            _ => refuse(
                "plan_not_allowed",
                format!("{} is not allowed here", plan_name(plan)),
            ),
        })
    }

    fn aggregate(&mut self, plan: &LogicalPlan) -> Result<Vec<Lineage>, QueryError> {
        let LogicalPlan::Aggregate(a) = plan else {
            return self.forbidden(plan);
        };
        let lin = self.rows(&a.input)?;
        let schema = a.input.schema();
        let mut out = Vec::new();
        for e in &a.group_expr {
            if matches!(e, Expr::GroupingSet(_)) {
                return Err(refuse(
                    "grouping_sets",
                    "ROLLUP / CUBE / GROUPING SETS are not allowed",
                ));
            }
            match column_of(e, schema, &lin) {
                Some(Lineage::Source {
                    is_key: true,
                    table,
                    column,
                }) => {
                    let t = &self.report.tables[table];
                    return Err(refuse(
                        "group_by_key",
                        format!(
                            "{}.{}.{column} identifies entities and cannot be grouped by",
                            t.owner, t.dataset
                        ),
                    ));
                }
                Some(src @ Lineage::Source { .. }) => {
                    self.uses_of(&src, Usage::Dimension);
                    self.report.group_by += 1;
                    if let Lineage::Source { table, column, .. } = &src {
                        self.report.dimensions.push((*table, column.clone()));
                    }
                    out.push(src);
                }
                _ => {
                    return Err(self.expression_refusal(
                        e,
                        schema,
                        &lin,
                        "GROUP BY may only name columns",
                    ));
                }
            }
        }
        for e in &a.aggr_expr {
            let inner = strip_alias(e);
            let Expr::AggregateFunction(AggregateFunction { func, params }) = inner else {
                return Err(self.expression_refusal(
                    e,
                    schema,
                    &lin,
                    "only aggregate functions are allowed here",
                ));
            };
            let name = func.name().to_ascii_lowercase();
            if params.filter.is_some() {
                return Err(refuse(
                    "aggregate_filter",
                    "FILTER (WHERE ...) on aggregates is not allowed",
                ));
            }
            if !params.order_by.is_empty() {
                return Err(refuse(
                    "aggregate_order_by",
                    "ordered aggregates are not allowed",
                ));
            }
            let arg = match params.args.as_slice() {
                [one] => column_of(one, schema, &lin),
                _ => None,
            };
            match (name.as_str(), params.distinct, arg) {
                ("count", true, Some(src @ Lineage::Source { is_key: true, .. })) => {
                    self.uses_of(&src, Usage::Count);
                    self.report.aggregates.push(Metric::Entities);
                }
                ("count", true, Some(Lineage::Source { .. })) => {
                    return Err(refuse(
                        "count_non_key",
                        "COUNT(DISTINCT ...) must count a key column (entities)",
                    ));
                }
                ("count", false, _) => {
                    return Err(refuse(
                        "count_rows",
                        "count distinct entities with COUNT(DISTINCT key), never rows",
                    ));
                }
                ("sum" | "avg", false, Some(Lineage::Source { is_key: true, .. })) => {
                    return Err(refuse(
                        "key_in_expression",
                        "key columns may only be joined or counted",
                    ));
                }
                (
                    "sum" | "avg",
                    false,
                    Some(Lineage::Source {
                        table,
                        column,
                        is_key: false,
                    }),
                ) => {
                    let src = Lineage::Source {
                        table,
                        column: column.clone(),
                        is_key: false,
                    };
                    let (usage, metric) = if name == "sum" {
                        (Usage::Sum, Metric::Sum { table, column })
                    } else {
                        (Usage::Avg, Metric::Avg { table, column })
                    };
                    self.uses_of(&src, usage);
                    self.report.aggregates.push(metric);
                }
                ("sum" | "avg", true, _) => {
                    return Err(refuse(
                        "distinct_metric",
                        "SUM/AVG(DISTINCT ...) is not allowed",
                    ));
                }
                (
                    "min"
                    | "max"
                    | "first_value"
                    | "last_value"
                    | "nth_value"
                    | "string_agg"
                    | "array_agg"
                    | "median"
                    | "approx_median"
                    | "approx_percentile_cont"
                    | "percentile_cont"
                    | "approx_distinct"
                    | "mode"
                    | "bit_and"
                    | "bit_or"
                    | "bit_xor"
                    | "bool_and"
                    | "bool_or"
                    | "grouping",
                    _,
                    _,
                ) => {
                    return Err(refuse(
                        "value_revealing_aggregate",
                        format!("{name}() can reveal individual values"),
                    ));
                }
                ("count" | "sum" | "avg", _, None) => {
                    return Err(self.expression_refusal(
                        &params.args[0],
                        schema,
                        &lin,
                        "aggregates take one plain column",
                    ));
                }
                _ => {
                    return Err(refuse(
                        "aggregate_not_allowed",
                        format!("{name}() is not an allowed aggregate"),
                    ));
                }
            }
            out.push(Lineage::Aggregate);
        }
        Ok(out)
    }

    /// Below the aggregate: the row-level relation. Returns the lineage of each output column.
    fn rows(&mut self, plan: &LogicalPlan) -> Result<Vec<Lineage>, QueryError> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                let (Some(owner), dataset) = (scan.table_name.schema(), scan.table_name.table())
                else {
                    return Err(refuse("unknown_table", "tables are named partner.dataset"));
                };
                let key = self.keys.key_column(owner, dataset).ok_or_else(|| {
                    refuse(
                        "unknown_table",
                        format!("{owner}.{dataset} is not a dataset you may query"),
                    )
                })?;
                if !scan.filters.is_empty() || scan.fetch.is_some() {
                    return Err(refuse(
                        "plan_not_allowed",
                        "pushed-down scans are not expected here",
                    ));
                }
                let table = self.report.tables.len();
                self.report.tables.push(TableInstance {
                    owner: owner.to_string(),
                    dataset: dataset.to_string(),
                    key_column: key.clone(),
                });
                Ok(scan
                    .projected_schema
                    .fields()
                    .iter()
                    .map(|f| Lineage::Source {
                        table,
                        column: f.name().clone(),
                        is_key: key.as_deref() == Some(f.name().as_str()),
                    })
                    .collect())
            }
            LogicalPlan::SubqueryAlias(s) => self.rows(&s.input),
            LogicalPlan::Projection(p) => {
                let lin = self.rows(&p.input)?;
                self.project(p, &lin, "derived tables may only select plain columns")
            }
            LogicalPlan::Filter(f) => {
                let lin = self.rows(&f.input)?;
                for conjunct in conjuncts(&f.predicate) {
                    self.filter_predicate(conjunct, f.input.schema(), &lin)?;
                }
                Ok(lin)
            }
            LogicalPlan::Join(j) => {
                match j.join_type {
                    JoinType::Inner => {}
                    JoinType::Left | JoinType::Right | JoinType::Full => {
                        return Err(refuse(
                            "outer_join",
                            "only inner joins on key columns are allowed",
                        ));
                    }
                    // In the unoptimized plan, IN / EXISTS subqueries are still expressions;
                    // semi and anti joins come from INTERSECT / EXCEPT.
                    _ => {
                        return Err(refuse(
                            "set_operation",
                            "UNION / INTERSECT / EXCEPT are not allowed",
                        ));
                    }
                }
                let left = self.rows(&j.left)?;
                let right = self.rows(&j.right)?;
                let mut lin = left.clone();
                lin.extend(right.iter().cloned());
                let schema = j.schema.as_ref();
                let mut pairs: Vec<(Lineage, Lineage)> = Vec::new();
                for (l, r) in &j.on {
                    pairs.push(self.join_side_pair(l, r, schema, &lin)?);
                }
                if let Some(filter) = &j.filter {
                    for c in conjuncts(filter) {
                        match c {
                            Expr::BinaryExpr(BinaryExpr {
                                left: l,
                                op: Operator::Eq,
                                right: r,
                            }) => {
                                pairs.push(self.join_side_pair(l, r, schema, &lin)?);
                            }
                            other => {
                                return Err(self.expression_refusal(
                                    other,
                                    schema,
                                    &lin,
                                    "join conditions must be equalities of key columns",
                                ));
                            }
                        }
                    }
                }
                if pairs.is_empty() {
                    return Err(refuse(
                        "cross_join",
                        "joins must be INNER JOIN ... ON key = key",
                    ));
                }
                for (a, b) in pairs {
                    let (
                        Lineage::Source {
                            table: ta,
                            is_key: ka,
                            ..
                        },
                        Lineage::Source {
                            table: tb,
                            is_key: kb,
                            ..
                        },
                    ) = (&a, &b)
                    else {
                        return Err(refuse("non_key_join", "joins must compare key columns"));
                    };
                    if !ka || !kb {
                        return Err(refuse(
                            "non_key_join",
                            "joins must compare the key columns of both tables",
                        ));
                    }
                    if ta == tb {
                        return Err(refuse(
                            "non_key_join",
                            "a join must compare two different tables",
                        ));
                    }
                    self.uses_of(&a, Usage::Join);
                    self.uses_of(&b, Usage::Join);
                    self.report.joins.push((*ta, *tb));
                }
                Ok(lin)
            }
            LogicalPlan::Aggregate(_) => Err(refuse(
                "nested_aggregate",
                "aggregates over aggregates are not allowed",
            )),
            LogicalPlan::Limit(_) => Err(refuse(
                "limit_below_aggregate",
                "LIMIT is only allowed on the final result",
            )),
            LogicalPlan::Sort(_) => Err(refuse(
                "sort_below_aggregate",
                "ORDER BY is only allowed on the final result",
            )),
            other => self.forbidden(other),
        }
    }

    /// A projection of plain (possibly renamed) columns keeps their lineage.
    fn project(
        &self,
        p: &Projection,
        lin: &[Lineage],
        why: &str,
    ) -> Result<Vec<Lineage>, QueryError> {
        p.expr
            .iter()
            .map(|e| {
                column_of(e, p.input.schema(), lin)
                    .ok_or_else(|| self.expression_refusal(e, p.input.schema(), lin, why))
            })
            .collect()
    }

    fn join_side_pair(
        &self,
        l: &Expr,
        r: &Expr,
        schema: &DFSchema,
        lin: &[Lineage],
    ) -> Result<(Lineage, Lineage), QueryError> {
        let a = column_of(l, schema, lin).ok_or_else(|| {
            self.expression_refusal(
                l,
                schema,
                lin,
                "join conditions must compare plain key columns",
            )
        })?;
        let b = column_of(r, schema, lin).ok_or_else(|| {
            self.expression_refusal(
                r,
                schema,
                lin,
                "join conditions must compare plain key columns",
            )
        })?;
        Ok((a, b))
    }

    /// `col = literal`, `literal = col`, `col IN (literals)` on non-key columns.
    fn filter_predicate(
        &mut self,
        e: &Expr,
        schema: &DFSchema,
        lin: &[Lineage],
    ) -> Result<(), QueryError> {
        let literal = |e: &Expr| match e {
            Expr::Literal(v, _) => Some(v.clone()),
            _ => None,
        };
        let (col, values) = match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Eq,
                right,
            }) => match (left.as_ref(), right.as_ref()) {
                (c, Expr::Literal(v, _)) | (Expr::Literal(v, _), c) => {
                    (column_of(c, schema, lin), vec![v.clone()])
                }
                _ => (None, vec![]),
            },
            Expr::InList(InList {
                expr,
                list,
                negated: false,
            }) if list.iter().all(|v| matches!(v, Expr::Literal(..))) => (
                column_of(expr, schema, lin),
                list.iter().filter_map(literal).collect(),
            ),
            _ => (None, vec![]),
        };
        match col {
            Some(src @ Lineage::Source { is_key: false, .. }) => {
                // Literals carry the column's type (see `typed_literals`): then type
                // coercion casts nothing, and a comparison cannot fail on any value.
                let column_type = match e {
                    Expr::BinaryExpr(BinaryExpr { left, right, .. }) => {
                        [left, right].into_iter().find_map(|x| match x.as_ref() {
                            Expr::Literal(..) => None,
                            c => c.get_type(schema).ok(),
                        })
                    }
                    Expr::InList(InList { expr, .. }) => expr.get_type(schema).ok(),
                    _ => None,
                };
                if values.iter().any(|v| Some(v.data_type()) != column_type) {
                    return Err(refuse(
                        "type_mismatch",
                        "a filter must compare a column with values of the column's own type",
                    ));
                }
                self.uses_of(&src, Usage::Filter);
                if let Lineage::Source { table, column, .. } = src {
                    self.report.filters.push(((table, column), values));
                }
                Ok(())
            }
            Some(Lineage::Source { is_key: true, .. }) => Err(refuse(
                "key_in_expression",
                "key columns cannot be filtered on",
            )),
            _ => Err(self.expression_refusal(
                e,
                schema,
                lin,
                "filters may only be column = value or column IN (values), joined with AND",
            )),
        }
    }

    fn uses_of(&mut self, lineage: &Lineage, usage: Usage) {
        if let Lineage::Source { table, column, .. } = lineage {
            let t = &self.report.tables[*table];
            self.report.uses.insert(ColumnUse {
                owner: t.owner.clone(),
                dataset: t.dataset.clone(),
                column: column.clone(),
                usage,
            });
        }
    }

    /// The refusal for an expression the gate does not allow: the most specific rule wins.
    fn expression_refusal(
        &self,
        e: &Expr,
        schema: &DFSchema,
        lin: &[Lineage],
        otherwise: &str,
    ) -> QueryError {
        let mut found: Option<QueryError> = None;
        let _ = e.apply(|x| {
            let r = match x {
                Expr::ScalarSubquery(_)
                | Expr::Exists(_)
                | Expr::InSubquery(_)
                | Expr::SetComparison(_)
                | Expr::OuterReferenceColumn(..) => {
                    Some(refuse("subquery", "subqueries are not allowed"))
                }
                Expr::WindowFunction(_) => Some(refuse(
                    "window_function",
                    "window functions are not allowed",
                )),
                Expr::Placeholder(_) | Expr::ScalarVariable(..) => Some(refuse(
                    "placeholder",
                    "placeholders and variables are not allowed",
                )),
                Expr::AggregateFunction(_) => Some(refuse(
                    "aggregate_not_allowed",
                    "aggregates are only allowed at the top of the query",
                )),
                Expr::Column(c) => match lineage_of(c, schema, lin) {
                    Some(Lineage::Source { is_key: true, .. }) => Some(refuse(
                        "key_in_expression",
                        "key columns may only be joined or counted, not used in expressions",
                    )),
                    _ => None,
                },
                _ => None,
            };
            Ok(match r {
                Some(r) => {
                    found = Some(r);
                    datafusion::common::tree_node::TreeNodeRecursion::Stop
                }
                None => datafusion::common::tree_node::TreeNodeRecursion::Continue,
            })
        });
        found.unwrap_or_else(|| refuse("expression_not_allowed", otherwise))
    }
}

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::{ExprSchemable, Filter};

/// Give every literal compared with a column (`col = v`, `v = col`, `col IN (v, ...)`) the
/// column's type, at planning time, or refuse the question (`type_mismatch`).
///
/// DataFusion's type coercion would otherwise cast the *column* to the literal's type where
/// the types differ (`text_column = 5` becomes `CAST(text_column AS Int64) = 5`), and such a
/// cast fails at run time only if a row with an unconvertible value reaches it: an error
/// that says whether another partner's rows passed the other conditions. Converted here, a
/// literal either fits the column's type exactly (numbers between numeric types without
/// loss, text between text types, a date or timestamp written as text) or the question is
/// refused before any data is read; the gate then checks that every literal has exactly
/// its column's type.
pub fn typed_literals(plan: LogicalPlan) -> Result<LogicalPlan, QueryError> {
    let mut refusal: Option<QueryError> = None;
    let out = plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::Filter(f) = node else {
            return Ok(Transformed::no(node));
        };
        let schema = f.input.schema().clone();
        let predicate = f
            .predicate
            .clone()
            .transform_up(|e| Ok(typed_comparison(e, &schema, &mut refusal)))?;
        Ok(if predicate.transformed {
            Transformed::yes(LogicalPlan::Filter(Filter::try_new(
                predicate.data,
                f.input,
            )?))
        } else {
            Transformed::no(LogicalPlan::Filter(f))
        })
    })?;
    match refusal {
        Some(r) => Err(r),
        None => Ok(out.data),
    }
}

/// `e` with its literals typed (see [`typed_literals`]); a literal that cannot be is left as
/// it is and the refusal recorded in `refusal` (the first one wins).
fn typed_comparison(
    e: Expr,
    schema: &DFSchema,
    refusal: &mut Option<QueryError>,
) -> Transformed<Expr> {
    let column_type = |c: &Expr| match c {
        Expr::Column(_) => c.get_type(schema).ok(),
        _ => None,
    };
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => {
            let (l, r) = (*left, *right);
            let typed = match (&l, &r) {
                (c, Expr::Literal(v, m)) => column_type(c).map(|t| (true, c, v, m, t)),
                (Expr::Literal(v, m), c) => column_type(c).map(|t| (false, c, v, m, t)),
                _ => None,
            };
            let Some((literal_right, c, v, m, t)) = typed else {
                return Transformed::no(l.eq(r));
            };
            if v.data_type() == t {
                return Transformed::no(l.eq(r));
            }
            let Some(exact) = exact_literal(v, &t) else {
                refusal.get_or_insert(literal_refusal(c, v, &t));
                return Transformed::no(l.eq(r));
            };
            let lit = Expr::Literal(exact, m.clone());
            let c = c.clone();
            Transformed::yes(if literal_right { c.eq(lit) } else { lit.eq(c) })
        }
        Expr::InList(InList {
            expr,
            list,
            negated,
        }) => {
            let original = || Expr::InList(InList::new(expr.clone(), list.clone(), negated));
            let Some(t) = column_type(&expr) else {
                return Transformed::no(original());
            };
            let mut changed = false;
            let mut typed = Vec::with_capacity(list.len());
            for item in &list {
                match item {
                    Expr::Literal(v, m) if v.data_type() != t => match exact_literal(v, &t) {
                        Some(exact) => {
                            changed = true;
                            typed.push(Expr::Literal(exact, m.clone()));
                        }
                        None => {
                            refusal.get_or_insert(literal_refusal(&expr, v, &t));
                            return Transformed::no(original());
                        }
                    },
                    other => typed.push(other.clone()),
                }
            }
            let e = Expr::InList(InList::new(expr, typed, negated));
            if changed {
                Transformed::yes(e)
            } else {
                Transformed::no(e)
            }
        }
        other => Transformed::no(other),
    }
}

fn literal_refusal(column: &Expr, v: &ScalarValue, t: &arrow_schema::DataType) -> QueryError {
    refuse(
        "type_mismatch",
        format!(
            "{column} is {t} and cannot be compared with {v} ({}): write a value of the column's type",
            v.data_type()
        ),
    )
}

/// `v` as a value of type `to`, if it converts without loss between types of one kind
/// (numbers, text) or is text naming a date or time; `None` otherwise. A NULL literal
/// becomes a NULL of `to`.
pub(crate) fn exact_literal(v: &ScalarValue, to: &arrow_schema::DataType) -> Option<ScalarValue> {
    use arrow_schema::DataType as T;
    let from = v.data_type();
    if v.is_null() {
        return ScalarValue::try_from(to).ok();
    }
    let text = |t: &T| matches!(t, T::Utf8 | T::LargeUtf8 | T::Utf8View);
    let number = |t: &T| t.is_numeric();
    let time = |t: &T| matches!(t, T::Date32 | T::Date64 | T::Timestamp(..));
    let converted = v.cast_to(to).ok().filter(|c| !c.is_null())?;
    if (number(&from) && number(to)) || (text(&from) && text(to)) {
        // Lossless: it converts back to the same value (5.5 is no integer, 300 no Int8).
        (converted.cast_to(&from).ok().as_ref() == Some(v)).then_some(converted)
    } else if text(&from) && time(to) {
        Some(converted)
    } else {
        None
    }
}

fn strip_alias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(Alias { expr, .. }) => strip_alias(expr),
        other => other,
    }
}

/// The lineage of `e` if it is a plain (possibly aliased) column reference.
fn column_of(e: &Expr, schema: &DFSchema, lin: &[Lineage]) -> Option<Lineage> {
    match strip_alias(e) {
        Expr::Column(c) => lineage_of(c, schema, lin),
        _ => None,
    }
}

fn lineage_of(c: &Column, schema: &DFSchema, lin: &[Lineage]) -> Option<Lineage> {
    let i = schema.index_of_column(c).ok()?;
    lin.get(i).cloned()
}

fn conjuncts(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            let mut v = conjuncts(left);
            v.extend(conjuncts(right));
            v
        }
        other => vec![other],
    }
}

fn plan_name(plan: &LogicalPlan) -> String {
    let text = plan.display().to_string();
    text.split(':')
        .next()
        .unwrap_or("this plan node")
        .trim()
        .to_string()
}

/// Per table instance of `report`: whether it is one of `from` or joined to one of them by
/// the question's key equalities (directly or through other instances).
pub(crate) fn joined_to(report: &GateReport, from: impl Fn(usize) -> bool) -> Vec<bool> {
    let mut reach: Vec<bool> = (0..report.tables.len()).map(from).collect();
    let mut changed = true;
    while changed {
        changed = false;
        for &(a, b) in &report.joins {
            if reach[a] != reach[b] {
                reach[a] = true;
                reach[b] = true;
                changed = true;
            }
        }
    }
    reach
}

/// Every table instance must be joined to the others by key equalities: a join whose
/// condition compares only tables already joined (`... JOIN c ON a.k = b.k`) leaves `c`
/// joined on nothing, a cross join.
fn check_connected(report: &GateReport) -> Result<(), QueryError> {
    if joined_to(report, |t| t == 0).iter().all(|&r| r) {
        Ok(())
    } else {
        Err(refuse(
            "cross_join",
            "every table must be joined to the others on its key (INNER JOIN ... ON key = key)",
        ))
    }
}

/// Tables of other partners must be joined, on the key, to one of the caller's tables
/// (directly or through other joined tables), unless `standalone` says their owner allows
/// them to be queried on their own.
pub fn check_foreign_joined(
    report: &GateReport,
    caller: &str,
    standalone: &dyn Fn(&TableInstance) -> bool,
) -> Result<(), QueryError> {
    let n = report.tables.len();
    let reach = joined_to(report, |t| report.tables[t].owner == caller);
    let mut unjoined: Vec<String> = (0..n)
        .filter(|&i| !reach[i] && !standalone(&report.tables[i]))
        .map(|i| format!("{}.{}", report.tables[i].owner, report.tables[i].dataset))
        .collect();
    unjoined.dedup();
    if unjoined.is_empty() {
        Ok(())
    } else {
        Err(refuse(
            "unjoined_foreign_dataset",
            format!(
                "{} must be joined on its key with one of your datasets (unless its owner grants the usage standalone)",
                unjoined.join(", ")
            ),
        ))
    }
}

/// Build the key-column lookup from the registered tables.
pub fn keys_of(tables: &[crate::QueryTable]) -> impl Fn(&str, &str) -> Option<Option<String>> + '_ {
    let map: HashMap<(String, String), Option<String>> = tables
        .iter()
        .map(|t| ((t.owner.clone(), t.dataset.clone()), t.key_column.clone()))
        .collect();
    move |o: &str, d: &str| map.get(&(o.to_string(), d.to_string())).cloned()
}

/// Every literal of `plan` (subqueries included), in plan order, as its typed debug text
/// (`Utf8("a\"b")`: quotes escaped), for fingerprints that the plan's display text alone
/// would not make unique.
pub fn literals(plan: &LogicalPlan) -> Vec<String> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut out = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|x| {
                if let Expr::Literal(v, _) = x {
                    out.push(format!("{v:?}"));
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    out
}

/// Every `(owner, dataset)` a plan scans, subqueries included, in first-seen order: what a
/// query touched, known even when the gate then refuses it (for the audit log).
pub fn scanned_tables(plan: &LogicalPlan) -> Vec<(String, String)> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut out: Vec<(String, String)> = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(owner) = scan.table_name.schema()
        {
            let t = (owner.to_string(), scan.table_name.table().to_string());
            if !out.contains(&t) {
                out.push(t);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}
