//! The gate on real DataFusion plans: allowed shapes with their derived column uses, and
//! refusals with their rule names. (The full corpus through the service runs in tests/.)

#![allow(clippy::expect_used)]

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema};
use escrow_query::Usage;
use escrow_query::session::{Limits, QueryTable};
use escrow_query::{QueryError, gate, plan_for_execution, plan_sql};

fn table(owner: &str, dataset: &str, key: Option<&str>) -> QueryTable {
    let schema = Arc::new(Schema::new(vec![
        Field::new("account_id", DataType::Utf8, false),
        Field::new("website", DataType::Utf8, true),
        Field::new("industry", DataType::Utf8, true),
        Field::new("region", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, true),
        Field::new("arr_usd", DataType::Float64, true),
        Field::new("employees", DataType::Int64, true),
    ]));
    QueryTable::declared(owner, dataset, key, schema).expect("key column")
}

fn tables() -> Vec<QueryTable> {
    vec![
        table("acme", "accounts", Some("website")),
        table("globex", "accounts", Some("website")),
        table("globex", "pipeline", Some("website")),
        table("initech", "nokey", None),
    ]
}

async fn run(sql: &str) -> Result<gate::GateReport, QueryError> {
    let t = tables();
    let plan = plan_sql(sql, &t).await?;
    let report = gate::check(&plan, &gate::keys_of(&t))?;
    gate::check_foreign_joined(&report, "acme", &|_| false)?;
    // What runs is planned again over the key columns as entity ids, and must pass the gate
    // with the same report.
    plan_for_execution(sql, &t, &Limits::default(), &report)
        .await
        .unwrap_or_else(|e| panic!("{sql}: execution plan: {e}"));
    Ok(report)
}

/// (owner, column, usage) a case must derive.
type Want = (&'static str, &'static str, Usage);

const JOIN: &str = "FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website";

#[tokio::test]
async fn allowed_queries_and_their_uses() {
    let cases: Vec<(String, Vec<Want>)> = vec![
        (
            format!("SELECT a.industry, COUNT(DISTINCT a.website) {JOIN} GROUP BY a.industry"),
            vec![("acme", "industry", Usage::Dimension), ("acme", "website", Usage::Count), ("acme", "website", Usage::Join), ("globex", "website", Usage::Join)],
        ),
        (
            format!("SELECT b.region AS r, COUNT(DISTINCT b.website) AS n {JOIN} WHERE b.status = 'customer' GROUP BY b.region ORDER BY n DESC LIMIT 10"),
            vec![("globex", "region", Usage::Dimension), ("globex", "status", Usage::Filter), ("globex", "website", Usage::Count)],
        ),
        (
            format!("SELECT SUM(a.arr_usd), AVG(b.employees) {JOIN} WHERE a.region IN ('NA', 'EMEA')"),
            vec![("acme", "arr_usd", Usage::Sum), ("globex", "employees", Usage::Avg), ("acme", "region", Usage::Filter)],
        ),
        (
            "SELECT COUNT(DISTINCT website) FROM acme.accounts".to_string(),
            vec![("acme", "website", Usage::Count)],
        ),
        (
            // derived table and CTE: lineage through aliases
            "WITH c AS (SELECT website AS site, industry AS ind FROM acme.accounts WHERE status = 'customer')
             SELECT c.ind, COUNT(DISTINCT c.site) FROM c JOIN (SELECT website FROM globex.pipeline) p ON c.site = p.website GROUP BY c.ind"
                .to_string(),
            vec![("acme", "industry", Usage::Dimension), ("acme", "status", Usage::Filter), ("globex", "website", Usage::Join)],
        ),
        (
            "SELECT a.industry, COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website JOIN globex.pipeline p ON b.website = p.website GROUP BY a.industry".to_string(),
            vec![("globex", "website", Usage::Join)],
        ),
        (
            // the planner drops ORDER BY without LIMIT in a derived table: nothing to refuse
            "SELECT COUNT(DISTINCT website) FROM (SELECT * FROM acme.accounts ORDER BY arr_usd) t".to_string(),
            vec![("acme", "website", Usage::Count)],
        ),
    ];
    for (sql, want) in cases {
        let report = run(&sql).await.unwrap_or_else(|e| panic!("{sql}\n => {e}"));
        for (owner, column, usage) in want {
            assert!(
                report
                    .uses
                    .iter()
                    .any(|u| u.owner == owner && u.column == column && u.usage == usage),
                "{sql}\n missing {owner}.{column} as {usage} in {:?}",
                report.uses
            );
        }
    }
}

#[tokio::test]
async fn refused_queries_name_their_rule() {
    let cases: Vec<(String, &str)> = vec![
        ("SELECT * FROM acme.accounts".into(), "no_aggregate"),
        ("SELECT website FROM acme.accounts".into(), "no_aggregate"),
        (format!("SELECT a.website, COUNT(DISTINCT a.website) {JOIN} GROUP BY a.website"), "group_by_key"),
        (format!("SELECT COUNT(*) {JOIN}"), "count_rows"),
        (format!("SELECT COUNT(a.industry) {JOIN}"), "count_rows"),
        (format!("SELECT COUNT(DISTINCT a.industry) {JOIN}"), "count_non_key"),
        (format!("SELECT MIN(a.website) {JOIN}"), "value_revealing_aggregate"),
        (format!("SELECT MAX(a.arr_usd) {JOIN}"), "value_revealing_aggregate"),
        (format!("SELECT string_agg(a.industry, ',') {JOIN}"), "value_revealing_aggregate"),
        (format!("SELECT array_agg(a.website) {JOIN}"), "value_revealing_aggregate"),
        (format!("SELECT SUM(a.website) {JOIN}"), "type_mismatch"),
        (format!("SELECT AVG(CAST(a.website AS BIGINT)) {JOIN}"), "key_in_expression"),
        (format!("SELECT COUNT(DISTINCT a.website) {JOIN} WHERE a.website = 'acme.com'"), "key_in_expression"),
        (format!("SELECT COUNT(DISTINCT a.website) {JOIN} WHERE a.website LIKE 'a%'"), "key_in_expression"),
        (format!("SELECT COUNT(DISTINCT a.website) {JOIN} WHERE a.website > 'm'"), "key_in_expression"),
        (format!("SELECT CASE WHEN a.website = 'x' THEN 1 ELSE 0 END AS f, COUNT(DISTINCT a.website) {JOIN} GROUP BY 1"), "key_in_expression"),
        (format!("SELECT CAST(a.website AS VARCHAR) AS w, COUNT(DISTINCT b.website) {JOIN} GROUP BY 1"), "key_in_expression"),
        (format!("SELECT COUNT(DISTINCT a.website) {JOIN} WHERE a.arr_usd > 1000"), "expression_not_allowed"),
        (format!("SELECT COUNT(DISTINCT a.website) {JOIN} WHERE a.region = 'NA' OR a.region = 'EMEA'"), "expression_not_allowed"),
        (format!("SELECT a.industry, COUNT(DISTINCT a.website) {JOIN} GROUP BY a.industry HAVING COUNT(DISTINCT a.website) > 3"), "having"),
        (format!("SELECT COUNT(DISTINCT a.website) * 2 {JOIN}"), "expression_not_allowed"),
        ("SELECT COUNT(DISTINCT a.website) FROM acme.accounts a LEFT JOIN globex.accounts b ON a.website = b.website".into(), "outer_join"),
        ("SELECT COUNT(DISTINCT a.website) FROM acme.accounts a FULL JOIN globex.accounts b ON a.website = b.website".into(), "outer_join"),
        ("SELECT COUNT(DISTINCT a.website) FROM acme.accounts a CROSS JOIN globex.accounts b".into(), "cross_join"),
        ("SELECT COUNT(DISTINCT a.website) FROM acme.accounts a, globex.accounts b WHERE a.website = b.website".into(), "cross_join"),
        ("SELECT COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website JOIN globex.pipeline p ON a.website = b.website".into(), "cross_join"),
        ("SELECT COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.industry = b.industry".into(), "non_key_join"),
        ("SELECT COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website AND a.region = b.region".into(), "non_key_join"),
        ("SELECT COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website <> b.website".into(), "key_in_expression"),
        ("SELECT COUNT(DISTINCT b.website) FROM globex.accounts b".into(), "unjoined_foreign_dataset"),
        ("SELECT COUNT(DISTINCT b.website) FROM globex.accounts b JOIN globex.pipeline p ON b.website = p.website".into(), "unjoined_foreign_dataset"),
        ("SELECT COUNT(DISTINCT website) FROM acme.accounts UNION ALL SELECT COUNT(DISTINCT website) FROM acme.accounts".into(), "set_operation"),
        ("SELECT industry, COUNT(DISTINCT website) OVER (PARTITION BY industry) FROM acme.accounts".into(), "window_function"),
        ("SELECT COUNT(DISTINCT website) FROM acme.accounts WHERE website IN (SELECT website FROM globex.accounts)".into(), "subquery"),
        ("SELECT COUNT(DISTINCT website) FROM acme.accounts a WHERE EXISTS (SELECT 1 FROM globex.accounts b WHERE b.website = a.website)".into(), "subquery"),
        ("SELECT (SELECT COUNT(DISTINCT website) FROM globex.accounts) AS n".into(), "no_table"),
        ("SELECT COUNT(DISTINCT website), (SELECT COUNT(DISTINCT website) FROM globex.accounts) FROM acme.accounts".into(), "subquery"),
        ("SELECT DISTINCT industry FROM acme.accounts".into(), "distinct"),
        ("SELECT COUNT(DISTINCT website) FROM (SELECT * FROM acme.accounts LIMIT 5) t".into(), "limit_below_aggregate"),
        ("SELECT COUNT(DISTINCT website) FROM (SELECT * FROM acme.accounts ORDER BY arr_usd LIMIT 10) t".into(), "limit_below_aggregate"),
        ("SELECT COUNT(DISTINCT w) FROM (SELECT lower(website) AS w FROM acme.accounts) t".into(), "key_in_expression"),
        ("SELECT COUNT(DISTINCT w) FROM (SELECT sha256(website) AS w FROM acme.accounts) t".into(), "function_not_allowed"),
        ("SELECT COUNT(DISTINCT w) FROM (SELECT substr(website, 1, 3) AS w FROM acme.accounts) t".into(), "function_not_allowed"),
        ("SELECT i, COUNT(DISTINCT website) FROM (SELECT upper(industry) AS i, website FROM acme.accounts) t GROUP BY i".into(), "expression_not_allowed"),
        ("SELECT SUM(n) FROM (SELECT industry, COUNT(DISTINCT website) AS n FROM acme.accounts GROUP BY industry) t".into(), "nested_aggregate"),
        ("SELECT industry, region, COUNT(DISTINCT website) FROM acme.accounts GROUP BY ROLLUP(industry, region)".into(), "grouping_sets"),
        ("SELECT COUNT(DISTINCT website) FILTER (WHERE status = 'customer') FROM acme.accounts".into(), "aggregate_filter"),
        ("SELECT industry, COUNT(DISTINCT website) FROM acme.accounts GROUP BY industry LIMIT (SELECT COUNT(DISTINCT website) FROM globex.accounts)".into(), "expression_not_allowed"),
        ("SELECT 1".into(), "no_table"),
        ("VALUES (1)".into(), "no_table"),
        ("EXPLAIN SELECT COUNT(DISTINCT website) FROM acme.accounts".into(), "statement_not_allowed"),
        ("DESCRIBE acme.accounts".into(), "statement_not_allowed"),
        ("CREATE TABLE t AS SELECT 1".into(), "statement_not_allowed"),
        ("SET datafusion.execution.batch_size = 1".into(), "statement_not_allowed"),
        ("SELECT COUNT(DISTINCT website) FROM acme.accounts; SELECT 1".into(), "multiple_statements"),
        ("SELECT COUNT(DISTINCT website) FROM accounts".into(), "unknown_table"),
        ("SELECT COUNT(DISTINCT website) FROM information_schema.tables".into(), "unknown_table"),
        ("SELECT COUNT(DISTINCT website) FROM 'escrow-data/escrow.db'".into(), "unknown_table"),
        ("SELECT * FROM generate_series(1, 10)".into(), "function_not_allowed"),
        ("SELECT COUNT(DISTINCT website) FROM hooli.accounts".into(), "unknown_table"),
        ("SELECT COUNT(DISTINCT nope) FROM acme.accounts".into(), "unknown_column"),
        ("SELEC 1".into(), "syntax_error"),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT COUNT(*) FROM r".into(), "recursive_query"),
    ];
    let mut wrong = Vec::new();
    for (sql, rule) in &cases {
        match run(sql).await {
            Err(QueryError::Refused { rule: got, .. }) if got == *rule => {}
            other => wrong.push(format!(
                "{sql}\n   want {rule}, got {:?}",
                other.map(|r| r.uses)
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

#[tokio::test]
async fn group_domains_come_from_the_query_filters() {
    use datafusion::common::ScalarValue;
    let s = |v: &str| ScalarValue::Utf8(Some(v.into()));
    let cases: Vec<(String, Vec<Option<Vec<ScalarValue>>>)> = vec![
        (
            format!(
                "SELECT a.region, COUNT(DISTINCT a.website) {JOIN} WHERE a.region IN ('NA', 'EMEA', 'NA') GROUP BY a.region"
            ),
            vec![Some(vec![s("NA"), s("EMEA")])],
        ),
        (
            format!(
                "SELECT a.region, COUNT(DISTINCT a.website) {JOIN} WHERE a.region IN ('NA', 'EMEA') AND a.region = 'EMEA' GROUP BY a.region"
            ),
            vec![Some(vec![s("EMEA")])],
        ),
        // Through a derived table's alias: the same source column.
        (
            "SELECT x.r, COUNT(DISTINCT x.w) FROM (SELECT region AS r, website AS w FROM acme.accounts WHERE region = 'NA') x JOIN globex.accounts b ON x.w = b.website GROUP BY x.r".to_string(),
            vec![Some(vec![s("NA")])],
        ),
        // The same column name of another table instance is another column.
        (
            format!(
                "SELECT a.region, b.region, COUNT(DISTINCT a.website) {JOIN} WHERE b.region = 'NA' GROUP BY a.region, b.region"
            ),
            vec![None, Some(vec![s("NA")])],
        ),
        (
            format!("SELECT a.region, COUNT(DISTINCT a.website) {JOIN} GROUP BY a.region"),
            vec![None],
        ),
    ];
    for (sql, want) in cases {
        let report = run(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(report.group_domains, want, "{sql}");
    }
}
