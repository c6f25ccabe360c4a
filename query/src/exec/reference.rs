//! The protection rewrite as the DataFusion plan it was before `crate::entities`: the
//! reference that the per-company stage is compared with, on random lists and questions.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::functions_aggregate::expr_fn::{avg, count, sum};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{ExprFunctionExt, lit, when};
use rand::{Rng, SeedableRng};

use super::*;
use crate::memory::SharedMemory;
use crate::noise::NoiseKey;
use crate::session::{QueryTable, plan_for_execution, plan_sql};

const ENTITY: &str = "__escrow_entity";
const ROW_NUMBER: &str = "__escrow_rn";

/// One table instance in its contribution-bounded form: its own filters applied, then one
/// row per company and group (the key and this table's GROUP BY columns), with each of its
/// metrics summed (or averaged) within the row, then at most `L` rows per company (the first
/// by its group values). Columns: `key`, `d{n}` for the n-th GROUP BY column of the query if
/// it is this table's, `m{j}` for the j-th aggregate if it is this table's metric.
///
/// Whatever the rows are, the table has at most `L` rows per company afterwards: a join of
/// such tables on the key yields at most [`fan_out`] rows per company, so a question's time
/// and memory are bounded by the sizes of its inputs, never by how many rows one company has
/// in each table (before, the caller's own tables with thousands of rows for one target
/// company made the join fan out only when the target was in the other list).
fn reduced_table(
    scan: LogicalPlan,
    table: usize,
    report: &GateReport,
    p: &Protection,
) -> Result<LogicalPlan, QueryError> {
    let (mut b, qualifier, key) = filtered(scan, table, report)?;
    let column = |name: &str| Expr::Column(Column::new(Some(qualifier.clone()), name));
    let mut group = vec![column(&key).alias(reduced_column(table, "key"))];
    let mut dims = Vec::new();
    for (n, (t, c)) in report.dimensions.iter().enumerate() {
        if *t == table {
            let name = reduced_column(table, &format!("d{n}"));
            group.push(column(c).alias(&name));
            dims.push(col(name));
        }
    }
    let mut metrics = Vec::new();
    for (j, m) in report.aggregates.iter().enumerate() {
        let name = reduced_column(table, &format!("m{j}"));
        let (per_row, t, c): (fn(Expr) -> Expr, _, _) = match m {
            Metric::Sum {
                table: t,
                column: c,
            } => (sum, t, c),
            Metric::Avg {
                table: t,
                column: c,
            } => (avg, t, c),
            Metric::Entities => continue,
        };
        if *t == table {
            metrics
                .push(per_row(datafusion::prelude::cast(column(c), DataType::Float64)).alias(name));
        }
    }
    b = b.aggregate(group, metrics)?;
    if !dims.is_empty() {
        let rn = row_number()
            .partition_by(vec![col(reduced_column(table, "key"))])
            .order_by(dims.iter().map(|d| d.clone().sort(true, true)).collect())
            .build()?
            .alias(ROW_NUMBER);
        let keep: Vec<Expr> = b.schema().fields().iter().map(|f| col(f.name())).collect();
        b = b
            .window(vec![rn])?
            .filter(col(ROW_NUMBER).lt_eq(lit(u64::from(p.max_groups_per_entity))))?
            .project(keep)?;
    }
    Ok(b.build()?)
}

fn protected_stage(
    report: &GateReport,
    p: &Protection,
    reduced: Vec<LogicalPlan>,
) -> Result<LogicalPlan, QueryError> {
    let mut reduced: Vec<Option<LogicalPlan>> = reduced.into_iter().map(Some).collect();
    // Join the reduced tables along the query's key equalities (a connected graph: the
    // gate allows no other joins), starting from the privacy unit's table.
    let take = |reduced: &mut Vec<Option<LogicalPlan>>, t: usize| {
        reduced
            .get_mut(t)
            .and_then(Option::take)
            .ok_or_else(|| internal("table instance"))
    };
    let mut joined = vec![p.entity_table];
    let mut b = LogicalPlanBuilder::from(take(&mut reduced, p.entity_table)?);
    while joined.len() < report.tables.len() {
        let next = report.joins.iter().find_map(|&(x, y)| {
            match (joined.contains(&x), joined.contains(&y)) {
                (true, false) => Some((x, y)),
                (false, true) => Some((y, x)),
                _ => None,
            }
        });
        let Some((have, new)) = next else {
            return Err(internal("table instances not joined on keys"));
        };
        b = b.join(
            take(&mut reduced, new)?,
            datafusion::common::JoinType::Inner,
            (
                vec![Column::from_name(reduced_column(have, "key"))],
                vec![Column::from_name(reduced_column(new, "key"))],
            ),
            None,
        )?;
        joined.push(new);
    }
    let entity = col(reduced_column(p.entity_table, "key")).alias(ENTITY);
    let dims: Vec<Expr> = report
        .dimensions
        .iter()
        .enumerate()
        .map(|(n, (t, _))| col(reduced_column(*t, &format!("d{n}"))))
        .collect();

    let mut per_entity = Vec::new();
    for (j, m) in report.aggregates.iter().enumerate() {
        let of = |t: &usize| col(reduced_column(*t, &format!("m{j}")));
        match m {
            Metric::Entities => {}
            Metric::Sum { table, .. } => {
                per_entity.push(sum(of(table)).alias(format!("__escrow_m{j}")))
            }
            Metric::Avg { table, .. } => {
                per_entity.push(avg(of(table)).alias(format!("__escrow_m{j}")))
            }
        }
    }
    let mut b = b.aggregate(
        std::iter::once(entity).chain(dims.iter().cloned()),
        per_entity,
    )?;
    if !dims.is_empty() {
        let rn = row_number()
            .partition_by(vec![col(ENTITY)])
            .order_by(dims.iter().map(|d| d.clone().sort(true, true)).collect())
            .build()?
            .alias(ROW_NUMBER);
        b = b
            .window(vec![rn])?
            .filter(col(ROW_NUMBER).lt_eq(lit(u64::from(p.max_groups_per_entity))))?;
    }
    let mut totals = vec![count(lit(1)).alias("__escrow_n")];
    for (j, m) in report.aggregates.iter().enumerate() {
        if matches!(m, Metric::Entities) {
            continue;
        }
        let (lo, hi) = p
            .bounds
            .get(j)
            .copied()
            .flatten()
            .ok_or_else(|| internal("metric without bounds"))?;
        let v = col(format!("__escrow_m{j}"));
        // Clamped (NaN and infinities too: comparisons order floats totally), then on the
        // grid: an integer in [-2^GRID_BITS, 2^GRID_BITS] that cannot fail to cast.
        let clamped = when(v.clone().lt(lit(lo)), lit(lo))
            .when(v.clone().gt(lit(hi)), lit(hi))
            .otherwise(v.clone())?;
        let on_grid = datafusion::prelude::cast(clamped / lit(grid_step(lo, hi)), DataType::Int64);
        totals.push(sum(on_grid).alias(format!("__escrow_s{j}")));
        if matches!(m, Metric::Avg { .. }) {
            totals.push(count(v).alias(format!("__escrow_c{j}")));
        }
    }
    Ok(b.aggregate(dims, totals)?.build()?)
}

/// The exact stage-two rows of the reference plan.
async fn reference(
    state: &SessionState,
    agg: &Aggregate,
    report: &GateReport,
    p: &Protection,
) -> Vec<RecordBatch> {
    let mut reduced = Vec::new();
    for (t, scan) in scans(&agg.input).into_iter().enumerate() {
        let plan = reduced_table(scan, t, report, p).expect("reduced table");
        let batches = collect(state, &plan, &Stop::default())
            .await
            .expect("reduce");
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let table = MemTable::try_new(schema, vec![batches]).expect("table");
        let scan = LogicalPlanBuilder::scan(
            format!("__escrow_reduced{t}"),
            provider_as_source(Arc::new(table)),
            None,
        )
        .expect("scan");
        reduced.push(scan.build().expect("plan"));
    }
    let stage = protected_stage(report, p, reduced).expect("stage");
    collect(state, &stage, &Stop::default())
        .await
        .expect("stage two")
}

/// Rows as text, sorted: the same rows whatever their order and their batches.
fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            out.push(
                (b.columns().iter())
                    .map(|c| {
                        let v = ScalarValue::try_from_array(c, r).expect("value");
                        if v.is_null() {
                            "null".into()
                        } else {
                            v.to_string()
                        }
                    })
                    .collect(),
            );
        }
    }
    out.sort();
    out
}

/// A list of `rows` rows over `companies` companies (some rows without a key), in two
/// partitions; values drawn from small sets with nulls, metrics whole numbers (so sums do
/// not depend on their order).
fn list(owner: &str, rows: usize, companies: u64, rng: &mut rand_chacha::ChaCha8Rng) -> QueryTable {
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray, UInt64Array};
    let declared = Arc::new(Schema::new(vec![
        Field::new("website", DataType::Utf8, true),
        Field::new("industry", DataType::Utf8, true),
        Field::new("region", DataType::Utf8, true),
        Field::new("employees", DataType::Int64, true),
        Field::new("score", DataType::Float64, true),
    ]));
    let executes = crate::source::entity_schema(&declared, "website").expect("entity schema");
    let pick = |rng: &mut rand_chacha::ChaCha8Rng, of: &[&str]| -> Option<String> {
        let i = rng.random_range(0..=of.len());
        of.get(i).map(|s| s.to_string())
    };
    let mut partitions = Vec::new();
    for _ in 0..2 {
        let n = rows / 2;
        let keys: Vec<Option<u64>> = (0..n)
            .map(|_| {
                // Spread over every shard, as keyed hashes are.
                (rng.random_range(0..20) != 0).then(|| {
                    rng.random_range(0..companies)
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                })
            })
            .collect();
        let industry: Vec<Option<String>> = (0..n)
            .map(|_| pick(rng, &["retail", "energy", "finance", "health", "media"]))
            .collect();
        let region: Vec<Option<String>> =
            (0..n).map(|_| pick(rng, &["EU", "US", "APAC"])).collect();
        let employees: Vec<Option<i64>> = (0..n)
            .map(|_| (rng.random_range(0..8) != 0).then(|| rng.random_range(-50..700)))
            .collect();
        let score: Vec<Option<f64>> = (0..n)
            .map(|_| (rng.random_range(0..8) != 0).then(|| f64::from(rng.random_range(0..100))))
            .collect();
        let batch = RecordBatch::try_new(
            executes.clone(),
            vec![
                Arc::new(UInt64Array::from(keys)) as ArrayRef,
                Arc::new(StringArray::from(industry)),
                Arc::new(StringArray::from(region)),
                Arc::new(Int64Array::from(employees)),
                Arc::new(Float64Array::from(score)),
            ],
        )
        .expect("batch");
        partitions.push(vec![batch]);
    }
    QueryTable {
        owner: owner.into(),
        dataset: "accounts".into(),
        key_column: Some("website".into()),
        schema: declared,
        provider: Arc::new(MemTable::try_new(executes, partitions).expect("table")),
    }
}

#[tokio::test]
async fn the_per_company_stage_computes_the_rows_of_the_reference_plan() {
    let questions = [
        "SELECT COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website",
        "SELECT a.industry, COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website GROUP BY a.industry",
        "SELECT a.industry, b.region, COUNT(DISTINCT b.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website GROUP BY a.industry, b.region",
        "SELECT b.region, a.industry, a.region, COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website WHERE b.industry IN ('retail', 'energy') GROUP BY b.region, a.industry, a.region",
        "SELECT b.industry, SUM(b.employees), AVG(b.score), COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website WHERE a.region IN ('EU', 'US') GROUP BY b.industry",
        "SELECT a.industry, SUM(a.employees), AVG(b.employees) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website GROUP BY a.industry",
        "SELECT SUM(b.score), AVG(a.score) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website",
        "SELECT b.region, c.industry, COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website JOIN globex.accounts c ON b.website = c.website GROUP BY b.region, c.industry",
        "SELECT a.region, COUNT(DISTINCT a.website) FROM acme.accounts a JOIN globex.accounts b ON a.website = b.website JOIN globex.accounts c ON a.website = c.website WHERE c.region = 'EU' GROUP BY a.region",
        "SELECT region, COUNT(DISTINCT website), SUM(employees) FROM globex.accounts GROUP BY region",
        "SELECT COUNT(DISTINCT website) FROM globex.accounts WHERE industry = 'nothing'",
    ];
    let mut compared = 0;
    for seed in 0..6u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let companies = [40, 300, 5][seed as usize % 3];
        let tables = vec![
            list("acme", 400, companies, &mut rng),
            list("globex", 600, companies, &mut rng),
        ];
        for sql in questions {
            let gated = plan_sql(sql, &tables).await.expect("plan");
            let report = crate::gate::check(&gated, &crate::gate::keys_of(&tables))
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let (plan, state) = plan_for_execution(sql, &tables, &Default::default(), &report)
                .await
                .expect("execution plan");
            let (_, agg) = split_top(&plan).expect("aggregate");
            for l in [1, 2, 3] {
                let p = Protection {
                    min_entities: 1,
                    epsilon: Epsilon::at_most(1.0),
                    max_groups_per_entity: l,
                    delta: 1e-6,
                    entity_table: (report.tables.iter())
                        .position(|t| t.owner == "globex")
                        .expect("globex"),
                    bounds: (report.aggregates.iter())
                        .map(|m| (!matches!(m, Metric::Entities)).then_some((-40.0, 300.0)))
                        .collect(),
                    tables: (report.tables.iter())
                        .map(|t| match t.owner.as_str() {
                            "acme" => Holder::Caller,
                            _ => Holder::Partner { stored_rows: 600 },
                        })
                        .collect(),
                    shared: SharedMemory::new(64 << 20).share("acme"),
                    noise: Noise::new(NoiseKey::new([3; 32]), [1; 32]),
                };
                let stop = Stop::default();
                let (instances, _reserved) =
                    reduce_tables(&state, agg, &report, &p, &stop, &mut Vec::new())
                        .await
                        .expect("reduce");
                let fast = stage_two(&instances, &totals(&report, &p).expect("totals"), 2, &stop)
                    .expect("stage two");
                // Rows come in the order of their GROUP BY values, whoever is in them.
                let dims = report.dimensions.len();
                if dims > 0 {
                    let fields = (fast.schema().fields()[..dims].iter())
                        .map(|f| SortField::new(f.data_type().clone()))
                        .collect();
                    let rows = (RowConverter::new(fields).expect("converter"))
                        .convert_columns(&fast.columns()[..dims])
                        .expect("rows");
                    assert!(
                        rows.iter().zip(rows.iter().skip(1)).all(|(x, y)| x < y),
                        "{sql}: rows not in the order of their groups"
                    );
                }
                let slow = reference(&state, agg, &report, &p).await;
                let (fast, slow) = (rows(&[fast]), rows(&slow));
                assert!(!slow.is_empty(), "{sql}");
                assert_eq!(fast, slow, "seed {seed}, L {l}: {sql}");
                compared += slow.len();
            }
        }
    }
    assert!(compared > 500, "{compared} rows compared");
}
