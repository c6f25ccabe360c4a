//! Execution of an allowed plan, and the output-protection rewrite.
//!
//! A query over the caller's own datasets only runs as planned (its answer is exact: nobody
//! else's data is involved). A query that reads another partner's dataset is rewritten:
//!
//! ```text
//! tables := each table instance reduced on its own: its filters (DataFusion scans and
//!           filters it), then per key its distinct GROUP BY values with its metrics summed
//!           (averaged) over their rows, at most L per key: the first by those values
//!                                                     (`crate::entities::Reduction`)
//!           (instances of one shape, a self-join, once); the caller's own reduced
//!           tables are held in memory first (phase one, under the memory limit); once
//!           `admit` found the rest fits, judged from those sizes and the others' column
//!           types, the question reserves the server's shared memory for the most it could
//!           hold (`crate::memory`), the other partners' tables are reduced and everything
//!           after runs without a limit that could fail on their rows or on how many
//!           companies match                                            (`reduce_tables`)
//! rows   := the reduced tables joined on their keys (the query's join graph), walked per
//!           company of the privacy unit's table: one row per combination of its reduced
//!           rows, each with distinct GROUP BY values and each metric as its table reduced it
//! bound  := per company, its first L rows by the GROUP BY values    (contribution bounding:
//!           an entity reaches at most L groups)
//! stage2 := per group: entities, SUM(grid(clamp(metric))) ...   (`crate::entities::stage_two`)
//! ```
//!
//! These are the rows of the plan `GROUP BY unit, dims` / `ROW_NUMBER() OVER (PARTITION BY
//! unit ORDER BY dims) <= L` / `GROUP BY dims` over the reduced tables joined, computed per
//! company in one pass instead of by DataFusion's sorts and hash tables (the tests keep that
//! plan as the reference and compare).
//!
//! Reducing every table before the join bounds the work of a question by the sizes of its
//! inputs: no company has more than L rows in any table, so a join cannot fan out for one
//! company (its time and memory would otherwise tell whether it matched).
//!
//! Then, per group: a group is released only if it has at least `k` distinct entities and its
//! noisy count reaches `k - 1 + 1 + (L/ε)·ln(L/δ)` (the partition-selection threshold
//! shifted by k), so neither a group's existence nor the exact-k test reveals one entity. Released values
//! carry noise calibrated to the bounded contribution. Withheld rows are listed as suppressed
//! (null values) where that reveals nothing: the one row of a query without GROUP BY, and the
//! groups a query enumerates through its filters (public values). Withheld data-derived groups
//! are not listed: their dimension values would reveal that an entity exists. The final ORDER BY / LIMIT / projection of the
//! user's plan run over the protected rows, never over exact ones.
//!
//! All keys of a joined row are equal (joins are key equalities only), so the foreign key
//! chosen as the privacy unit counts the same entities as any other key in the plan.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Float64Array, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue, TableReference};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::execution::SessionState;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::logical_expr::{Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, col};
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::joins::{
    CrossJoinExec, HashJoinExec, NestedLoopJoinExec, PiecewiseMergeJoinExec, SortMergeJoinExec,
    SymmetricHashJoinExec,
};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties, Partitioning};
use futures_util::StreamExt;

use crate::QueryError;
use crate::entities::{Folder, Instance, Part, Reduction, Totals, stage_two};
use crate::gate::{GateReport, Metric, joined_to};
use crate::memory::{MemoryShare, Reservation};
use crate::noise::{Epsilon, Noise, Sensitivity, Variance, partition_threshold};
use crate::source::{BatchSource, Keeper};
use crate::stop::{Stop, StopExec};

const RESULT: &str = "__escrow_result";
const SUPPRESSED: &str = "__escrow_suppressed";

/// How a query that reads other partners' data is protected. Built by the service from the
/// owners' settings: the strictest value of every dataset involved applies.
#[derive(Debug, Clone)]
pub struct Protection {
    /// Minimum distinct entities in a released row (k).
    pub min_entities: u64,
    /// Privacy loss of this query, split evenly across its noisy statistics.
    pub epsilon: Epsilon,
    /// Groups one entity may contribute to (L).
    pub max_groups_per_entity: u32,
    /// δ of the partition selection for data-derived groups.
    pub delta: f64,
    /// Table instance (index into the gate report) whose key is the privacy unit.
    pub entity_table: usize,
    /// Clamping bounds of each aggregate, in the gate report's order (`None` for counts).
    pub bounds: Vec<Option<(f64, f64)>>,
    /// Per table instance, in the gate report's order: whose dataset it reads.
    pub tables: Vec<Holder>,
    /// The memory admitted questions share, as the asking partner reserves from it
    /// ([`crate::memory`]).
    pub shared: MemoryShare,
    pub noise: Noise,
}

/// Whose dataset a table instance reads, as execution may size it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Holder {
    /// The caller's own: sized by its rows after the caller's filters when the question is
    /// judged against the memory limit ([`admit`]).
    Caller,
    /// Another partner's, with the rows of its stored version: an upper bound of what any
    /// filter keeps, used only for shared memory. Execution sees it only as its
    /// [`size_class`]: its rows after the caller's filters would tell which companies it
    /// holds, and its exact stored rows would too (one company more or less moves them by
    /// one, and a caller can pad its own rows to sit any decision at that edge).
    Partner { stored_rows: u64 },
}

/// What execution may know of another partner's stored rows: the power of two at or above
/// them (at least 1024). One company more or less changes it only when a list's size
/// crosses a power of two; docs/THREAT_MODEL.md states it as disclosed to grantees.
pub fn size_class(stored_rows: u64) -> u64 {
    stored_rows
        .max(1024)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX)
}

/// Rows one company can have in each table instance's reduced form ([`reduced_table`]):
/// `L` for a table instance with a GROUP BY column, 1 for any other.
fn per_company(report: &GateReport, max_groups: u32) -> Vec<u64> {
    (0..report.tables.len())
        .map(|t| {
            if report.dimensions.iter().any(|(d, _)| *d == t) {
                u64::from(max_groups.max(1))
            } else {
                1
            }
        })
        .collect()
}

/// Joined rows one company can yield in a protected question: its rows in every table
/// instance's reduced form ([`per_company`]), multiplied.
pub fn fan_out(report: &GateReport, max_groups: u32) -> u64 {
    per_company(report, max_groups)
        .into_iter()
        .fold(1, u64::saturating_mul)
}

/// What was applied, for the answer's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub min_entities: u64,
    /// Noisy entity count a row needed to be released.
    pub threshold: f64,
    pub epsilon: f64,
    pub max_groups_per_entity: u32,
    /// Standard deviation of the discrete Gaussian noise on each released count.
    pub count_sd: f64,
}

/// A query's answer.
#[derive(Debug)]
pub struct Answer {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// Per output row: withheld by the thresholds (its values are null).
    pub suppressed: Vec<bool>,
    /// `None` for queries over the caller's own datasets only.
    pub protection: Option<Applied>,
    /// How long each stage of a protected question took, in order, for the server's log.
    pub stages: Vec<(&'static str, std::time::Duration)>,
}

/// Run an allowed plan; with `protection`, through the protection rewrite.
pub async fn execute(
    state: &SessionState,
    plan: LogicalPlan,
    report: &GateReport,
    protection: Option<&Protection>,
    stop: &Stop,
) -> Result<Answer, QueryError> {
    let Some(p) = protection else {
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let batches = collect(state, &plan, stop).await?;
        let rows = batches.iter().map(RecordBatch::num_rows).sum();
        return Ok(Answer {
            schema,
            batches,
            suppressed: vec![false; rows],
            protection: None,
            stages: Vec::new(),
        });
    };
    let (top, agg) = split_top(&plan)?;
    // Two phases, so that no memory or time limit can fail on another partner's rows. First
    // the caller's own table instances are reduced, under the memory limit: that depends on
    // the question and the caller's own rows only. The rest is judged against the limit
    // from those sizes (`admit`), and then runs without a limit.
    let mut stages = Vec::new();
    let started = std::time::Instant::now();
    let (instances, _reserved) = reduce_tables(state, agg, report, p, stop, &mut stages).await?;
    let totals = totals(report, p)?;
    let stopping = stop.clone();
    let at = std::time::Instant::now();
    let threads = state.config().target_partitions();
    let exact =
        tokio::task::spawn_blocking(move || stage_two(&instances, &totals, threads, &stopping))
            .await
            .map_err(|e| internal(&format!("stage two: {e}")))??;
    stages.push(("join and totals", at.elapsed()));
    let at = std::time::Instant::now();
    let (rows, applied) = release(agg, report, p, std::slice::from_ref(&exact))?;
    let unbounded = crate::session::with_memory_limit(state, None)?;
    let mut out = replace_aggregate(agg, rows)?;
    for node in top.iter().rev() {
        let mut exprs = node.expressions();
        if matches!(node, LogicalPlan::Projection(_)) {
            exprs.push(col(SUPPRESSED));
        }
        out = node.with_new_exprs(exprs, vec![out])?;
    }
    let batches = collect(&unbounded, &out, stop).await?;
    // The last column is the suppressed flag of each row: strip it from what is returned.
    let full = out.schema().as_arrow().clone();
    let shown: Vec<usize> = (0..full.fields().len() - 1).collect();
    let schema = Arc::new(full.project(&shown)?);
    let mut suppressed = Vec::new();
    let mut answer = Vec::new();
    for b in &batches {
        let flags = b
            .column(shown.len())
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| internal("suppressed flags"))?;
        suppressed.extend(flags.iter().map(|f| f.unwrap_or(true)));
        answer.push(b.project(&shown)?);
    }
    Ok(Answer {
        schema,
        batches: answer,
        suppressed,
        protection: Some(applied),
        stages: {
            stages.push(("release", at.elapsed()));
            stages.push(("all", started.elapsed()));
            stages
        },
    })
}

async fn collect(
    state: &SessionState,
    plan: &LogicalPlan,
    stop: &Stop,
) -> Result<Vec<RecordBatch>, QueryError> {
    let physical = cooperative_joins(state.create_physical_plan(plan).await?, stop)?;
    Ok(datafusion::physical_plan::collect(physical, state.task_ctx()).await?)
}

/// DataFusion's join operators can emit a great many batches for one input batch without
/// returning to tokio (apache/datafusion#19358), so an aborted query would keep its worker
/// until the join is done. Wrapped in a [`CooperativeExec`], each join's output spends
/// tokio's cooperative budget per batch: the task yields, and an abort takes effect there.
/// And each join's output is wrapped in a [`StopExec`]: once `stop` is requested, the join
/// stops at its next batch, on whichever task it runs (see [`crate::stop`]).
fn cooperative_joins(
    plan: Arc<dyn ExecutionPlan>,
    stop: &Stop,
) -> Result<Arc<dyn ExecutionPlan>, QueryError> {
    let wrapped = plan.transform_up(|node| {
        let join = node.is::<HashJoinExec>()
            || node.is::<NestedLoopJoinExec>()
            || node.is::<CrossJoinExec>()
            || node.is::<SortMergeJoinExec>()
            || node.is::<SymmetricHashJoinExec>()
            || node.is::<PiecewiseMergeJoinExec>();
        Ok(if join {
            let cooperative = Arc::new(CooperativeExec::new(node));
            Transformed::yes(
                Arc::new(StopExec::new(cooperative, stop.clone())) as Arc<dyn ExecutionPlan>
            )
        } else {
            Transformed::no(node)
        })
    })?;
    Ok(wrapped.data)
}

/// What stage two totals ([`stage_two`]), from the question and its protection. Every
/// table instance must be joined to the privacy unit's through the question's key
/// equalities ([`stage_two`] joins them all on the key).
fn totals(report: &GateReport, p: &Protection) -> Result<Totals, QueryError> {
    let joined = joined_to(report, |t| t == p.entity_table);
    if p.entity_table >= report.tables.len() || !joined.iter().all(|&j| j) {
        return Err(internal("table instances not joined on keys"));
    }
    let grids = (report.aggregates.iter().enumerate())
        .map(|(j, m)| match m {
            Metric::Entities => Ok(None),
            Metric::Sum { .. } | Metric::Avg { .. } => {
                let (lo, hi) = (p.bounds.get(j).copied().flatten())
                    .ok_or_else(|| internal("metric without bounds"))?;
                Ok(Some((lo, hi, grid_step(lo, hi))))
            }
        })
        .collect::<Result<_, QueryError>>()?;
    Ok(Totals {
        unit: p.entity_table,
        max_groups: p.max_groups_per_entity,
        grids,
        dims: report.dimensions.len(),
    })
}

fn internal(what: &str) -> QueryError {
    QueryError::Internal(format!("protection rewrite: {what}"))
}

/// The nodes above the Aggregate (top-down) and the Aggregate itself.
fn split_top(plan: &LogicalPlan) -> Result<(Vec<&LogicalPlan>, &Aggregate), QueryError> {
    let mut top = Vec::new();
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Aggregate(a) => return Ok((top, a)),
            LogicalPlan::Projection(_) | LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => {
                top.push(node);
                node = node.inputs()[0];
            }
            _ => return Err(internal("unexpected node above the aggregate")),
        }
    }
}

/// The scans of `plan` in the gate's table-instance order (leaves left to right).
fn scans(plan: &LogicalPlan) -> Vec<LogicalPlan> {
    let mut out = Vec::new();
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(_) = node {
            out.push(node.clone());
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    out
}

/// Column `name` of the reduced table instance `table`: `__escrow_t{table}_{what}`.
fn reduced_column(table: usize, what: &str) -> String {
    format!("__escrow_t{table}_{what}")
}

/// What makes two table instances reduce to the same rows ([`reduced_table`]): the table
/// scanned, its filters, its GROUP BY columns and its metrics, each in the query's order
/// (so their reduced columns correspond one to one, under other names).
#[derive(PartialEq)]
struct Shape<'a> {
    scan: (&'a TableReference, &'a [Expr], Option<usize>),
    filters: Vec<(&'a str, &'a [ScalarValue])>,
    dims: Vec<&'a str>,
    metrics: Vec<(bool, &'a str)>,
}

fn shape<'a>(scan: &'a LogicalPlan, t: usize, report: &'a GateReport) -> Option<Shape<'a>> {
    let LogicalPlan::TableScan(ts) = scan else {
        return None;
    };
    Some(Shape {
        scan: (&ts.table_name, &ts.filters, ts.fetch),
        filters: (report.filters.iter())
            .filter(|((u, _), _)| *u == t)
            .map(|((_, c), v)| (c.as_str(), v.as_slice()))
            .collect(),
        dims: (report.dimensions.iter())
            .filter(|(u, _)| *u == t)
            .map(|(_, c)| c.as_str())
            .collect(),
        metrics: (report.aggregates.iter())
            .filter_map(|m| match m {
                Metric::Sum { table, column } if *table == t => Some((true, column.as_str())),
                Metric::Avg { table, column } if *table == t => Some((false, column.as_str())),
                _ => None,
            })
            .collect(),
    })
}

impl Shape<'_> {
    /// A table instance that contributes its keys alone: no filter, GROUP BY column or
    /// metric of its own (over a plain scan: [`Self::kept_as`] checks that first). Its reduction is its companies, whatever the question and L
    /// ([`reduce_keys`]).
    fn is_keys(&self) -> bool {
        self.filters.is_empty() && self.dims.is_empty() && self.metrics.is_empty()
    }

    /// The name its reduction with at most `l` rows per company is kept under
    /// ([`crate::source::Keeper`], per version): every value that makes the reduction, each
    /// text length-prefixed, so that no two shapes share a name (a filter value holding
    /// what another shape's name would continue with included). `None` for a scan with
    /// filters or a limit of its own (none is pushed into a source's scan today).
    fn kept_as(&self, l: u32) -> Option<String> {
        let (_, scan_filters, fetch) = self.scan;
        if !scan_filters.is_empty() || fetch.is_some() {
            return None;
        }
        if self.is_keys() {
            return Some(KEYS_REDUCTION.to_string());
        }
        let mut name = String::from("protected reduction v1;");
        let mut field = |text: &str| name.push_str(&format!("{}:{text};", text.len()));
        field(&format!("filters {}", self.filters.len()));
        for (column, values) in &self.filters {
            field(column);
            field(&format!("values {}", values.len()));
            for v in *values {
                field(&format!("{:?}", v.data_type()));
                field(if v.is_null() { "null" } else { "value" });
                field(&v.to_string());
            }
        }
        field(&format!("dims {}", self.dims.len()));
        for d in &self.dims {
            field(d);
        }
        field(&format!("metrics {}", self.metrics.len()));
        for (sum, column) in &self.metrics {
            field(if *sum { "sum" } else { "avg" });
            field(column);
        }
        field(&format!("L {l}"));
        Some(name)
    }
}

/// The name a table instance that contributes its keys alone ([`Shape::is_keys`]) is kept
/// under ([`crate::source::Keeper`]): one value per version, the same for every question.
pub const KEYS_REDUCTION: &str = "protected reduction v1 of the keys alone";

/// The reduction of a version's key column (its entity ids, in `keys`' batches) as a
/// question whose table instance contributes its keys alone reduces it, to be kept as
/// [`KEYS_REDUCTION`]: its companies, its shards built on `threads` threads. With the bytes
/// it holds.
pub fn reduce_keys(
    keys: impl IntoIterator<Item = ArrayRef>,
    threads: usize,
) -> Result<(Arc<dyn std::any::Any + Send + Sync>, usize), QueryError> {
    let schema = Arc::new(Schema::new(vec![Field::new("key", DataType::UInt64, true)]));
    let mut folder = Folder::new(&schema, 0)?;
    for ids in keys {
        folder.fold(&RecordBatch::try_new(schema.clone(), vec![ids])?)?;
    }
    let reduction = Reduction::finish(vec![folder], 1, threads)?;
    let bytes = reduction.bytes();
    Ok((Arc::new(reduction), bytes))
}

/// A version's companies as [`reduce_keys`] made them, as bytes for the service to seal beside
/// the version (in format [`KEYS_FORMAT`]); `None` for a value that is not such a reduction.
pub fn encode_keys(value: &(dyn std::any::Any + Send + Sync)) -> Option<Vec<u8>> {
    value.downcast_ref::<Reduction>()?.encode_keys()
}

/// [`encode_keys`]'s bytes back as the value [`reduce_keys`] makes, with the bytes it holds.
pub fn decode_keys(
    bytes: &[u8],
) -> Result<(Arc<dyn std::any::Any + Send + Sync>, usize), QueryError> {
    let reduction = Reduction::decode_keys(bytes)?;
    let held = reduction.bytes();
    Ok((Arc::new(reduction), held))
}

/// The format of [`encode_keys`]'s bytes.
pub const KEYS_FORMAT: u32 = crate::entities::KEYS_FORMAT;

/// Per table instance: the first instance of the same [`Shape`] (itself if none before).
fn first_of_shape(scans: &[LogicalPlan], report: &GateReport) -> Vec<usize> {
    let shapes: Vec<Option<Shape>> = (scans.iter().enumerate())
        .map(|(t, scan)| shape(scan, t, report))
        .collect();
    (0..shapes.len())
        .map(|t| match &shapes[t] {
            Some(s) => shapes[..t]
                .iter()
                .position(|o| o.as_ref() == Some(s))
                .unwrap_or(t),
            None => t,
        })
        .collect()
}

/// Table instance `table`'s scan with its own filters (`column IN (literals)`, ANDed), the
/// scan's qualifier and the instance's key column.
fn filtered(
    scan: LogicalPlan,
    table: usize,
    report: &GateReport,
) -> Result<(LogicalPlanBuilder, TableReference, String), QueryError> {
    let LogicalPlan::TableScan(ts) = &scan else {
        return Err(internal("a table instance that is no scan"));
    };
    let qualifier = ts.table_name.clone();
    let column = |name: &str| Expr::Column(Column::new(Some(qualifier.clone()), name));
    let key = report
        .tables
        .get(table)
        .and_then(|t| t.key_column.clone())
        .ok_or_else(|| internal("a joined table without a key column"))?;
    let mut b = LogicalPlanBuilder::from(scan);
    let conjuncts: Vec<Expr> = report
        .filters
        .iter()
        .filter(|((t, _), _)| *t == table)
        .map(|((_, c), values)| {
            column(c).in_list(
                values
                    .iter()
                    .map(|v| Expr::Literal(v.clone(), None))
                    .collect(),
                false,
            )
        })
        .collect();
    if let Some(predicate) = conjuncts.into_iter().reduce(Expr::and) {
        b = b.filter(predicate)?;
    }
    Ok((b, qualifier, key))
}

/// One table instance's input to its reduction ([`Reduction`]): its rows after its own
/// filters, as its key, its GROUP BY columns and its metrics as `Float64`, in the query's
/// order ([`Part`]).
fn input(scan: LogicalPlan, table: usize, report: &GateReport) -> Result<LogicalPlan, QueryError> {
    let (b, qualifier, key) = filtered(scan, table, report)?;
    let column = |name: &str| Expr::Column(Column::new(Some(qualifier.clone()), name));
    let mut columns = vec![column(&key).alias(reduced_column(table, "key"))];
    for (n, (t, c)) in report.dimensions.iter().enumerate() {
        if *t == table {
            columns.push(column(c).alias(reduced_column(table, &format!("d{n}"))));
        }
    }
    for (j, m) in report.aggregates.iter().enumerate() {
        if let Metric::Sum {
            table: t,
            column: c,
        }
        | Metric::Avg {
            table: t,
            column: c,
        } = m
            && *t == table
        {
            let as_float = datafusion::prelude::cast(column(c), DataType::Float64);
            columns.push(as_float.alias(reduced_column(table, &format!("m{j}"))));
        }
    }
    Ok(b.project(columns)?.build()?)
}

/// Table instance `table` reduced ([`Reduction`]) from its `input` run in `state`: its
/// input partitions (at least the session's partitions' worth, batches dealt round robin)
/// folded on their own tasks, then its shards built on as many threads; with `memory`, what
/// it holds is reserved there as it grows (and fails past its limit).
async fn reduce(
    state: &SessionState,
    input: &LogicalPlan,
    part: &Part,
    max_groups: u32,
    memory: Option<&MemoryReservation>,
    stop: &Stop,
) -> Result<Reduction, QueryError> {
    let threads = state.config().target_partitions().max(1);
    let mut physical = state.create_physical_plan(input).await?;
    if physical.output_partitioning().partition_count() < threads {
        physical = Arc::new(RepartitionExec::try_new(
            physical,
            Partitioning::RoundRobinBatch(threads),
        )?);
    }
    let schema = input.schema().as_arrow();
    let streams =
        datafusion::physical_plan::execute_stream_partitioned(physical, state.task_ctx())?;
    let tasks = streams
        .into_iter()
        .map(|mut batches| {
            let mut folder = Folder::new(schema, part.dims.len())?;
            let held = memory.map(MemoryReservation::new_empty);
            let stop = stop.clone();
            Ok(SpawnedTask::spawn(async move {
                while let Some(batch) = batches.next().await {
                    if stop.requested() {
                        return Err(Stop::error().into());
                    }
                    folder.fold(&batch?)?;
                    if let Some(held) = &held {
                        held.try_resize(folder.bytes())?;
                    }
                }
                Ok::<_, QueryError>((folder, held))
            }))
        })
        .collect::<Result<Vec<_>, QueryError>>()?;
    // The first failure ends the others (a task dropped is aborted).
    let folded = futures_util::future::try_join_all(tasks.into_iter().map(|task| async {
        task.join_unwind()
            .await
            .map_err(|e| internal(&format!("folding a partition: {e}")))?
    }))
    .await?;
    let (mut folders, partial): (Vec<Folder>, Vec<_>) = folded.into_iter().unzip();
    if folders.is_empty() {
        folders.push(Folder::new(schema, part.dims.len())?);
    }
    let reduction =
        tokio::task::spawn_blocking(move || Reduction::finish(folders, max_groups, threads))
            .await
            .map_err(|e| internal(&format!("building a reduction: {e}")))??;
    // The staged rows are gone: what is held now is the reduction.
    drop(partial);
    if let Some(memory) = memory {
        memory.try_resize(reduction.bytes())?;
    }
    Ok(reduction)
}

/// Every table instance reduced ([`Reduction`]), in the order of the gate report's tables;
/// instances of one [`Shape`] (a self-join) are reduced once. Phase one: the caller's own
/// tables, each under what is left of the memory limit once the ones before are held (that
/// depends on the caller's own rows only); then [`admit`] and [`Stop::admit`]. After
/// admission: the question reserves shared memory for what it could hold at most
/// ([`crate::memory`]), then another partner's tables are reduced without a limit that
/// could fail; neither a refusal nor a time limit may depend on how many of their rows pass
/// the caller's filters (a filter on a company's name would make it tell whether the
/// company is there). Returns the reduced instances and the reservation, to be held until
/// the answer is out.
async fn reduce_tables(
    state: &SessionState,
    agg: &Aggregate,
    report: &GateReport,
    p: &Protection,
    stop: &Stop,
    stages: &mut Vec<(&'static str, std::time::Duration)>,
) -> Result<(Vec<Instance>, Reservation), QueryError> {
    let scans = scans(&agg.input);
    if scans.len() != report.tables.len() || p.tables.len() != report.tables.len() {
        return Err(internal("scans and table instances differ"));
    }
    let limit = match state.runtime_env().memory_pool.memory_limit() {
        datafusion::execution::memory_pool::MemoryLimit::Finite(bytes) => Some(bytes),
        _ => None,
    };
    let first = first_of_shape(&scans, report);
    let l = p.max_groups_per_entity;
    // Another partner's table instance as reduced for an earlier question of the caller's is
    // kept by the service under how it was reduced: its shape and L.
    let mut kept_as: Vec<Option<(Arc<dyn BatchSource>, String)>> = (scans.iter().enumerate())
        .map(|(t, scan)| {
            let LogicalPlan::TableScan(ts) = scan else {
                return None;
            };
            let table = datafusion::datasource::source_as_provider(&ts.source).ok()?;
            let name = shape(scan, t, report)?.kept_as(l)?;
            Some((crate::source::source_of(table.as_ref())?, name))
        })
        .collect();
    let inputs = scans
        .into_iter()
        .enumerate()
        .map(|(t, scan)| input(scan, t, report))
        .collect::<Result<Vec<_>, _>>()?;
    // What a kept reduction counts as (`Reduced::held`) is a bound from the column types, which
    // holds for fixed widths only: one with a text GROUP BY column holds its distinct values,
    // as long as they are, so it is not kept.
    for (t, input) in inputs.iter().enumerate() {
        let fields = input.schema().fields();
        if fields
            .iter()
            .any(|f| f.data_type().primitive_width().is_none())
        {
            kept_as[t] = None;
        }
    }
    let parts: Vec<Part> = (0..inputs.len()).map(|t| Part::of(report, t)).collect();
    // Another partner's table joined on its key alone is its version's companies, which
    // depend on no question and are kept for every asker: looked up (from memory, or read
    // back from their seal) while the caller's own tables are reduced. Whether they are
    // found and how long that takes follow that list alone, and nothing of them is used
    // before admission.
    let mut looked_up: Vec<Option<SpawnedTask<LookedUp>>> = (kept_as.iter().enumerate())
        .map(|(t, kept)| match (kept, &p.tables[t]) {
            (Some((source, name)), Holder::Partner { .. })
                if first[t] == t && name == KEYS_REDUCTION =>
            {
                Some(look_up(source.clone(), name.clone()))
            }
            _ => None,
        })
        .collect();
    // The caller's own tables first, each under what is left of the limit.
    let mut sizes = Vec::new();
    let mut held = 0usize;
    let mut reduced: Vec<Option<Arc<Reduction>>> = vec![None; inputs.len()];
    for (t, input) in inputs.iter().enumerate() {
        let Holder::Partner { stored_rows } = p.tables[t] else {
            let reduction = match &reduced[first[t]] {
                Some(same) => same.clone(),
                None => {
                    let at = std::time::Instant::now();
                    let left = limit.map(|l| l.saturating_sub(held));
                    let session = crate::session::with_memory_limit(state, left)?;
                    let memory = MemoryConsumer::new("escrow: reduce your table")
                        .register(&session.runtime_env().memory_pool);
                    let r = reduce(&session, input, &parts[t], l, Some(&memory), stop).await?;
                    held += r.bytes();
                    stages.push(("reduce a table of the caller's", at.elapsed()));
                    Arc::new(r)
                }
            };
            sizes.push(Reduced::Own {
                rows: reduction.rows(),
                bytes: reduction.bytes(),
            });
            reduced[t] = Some(reduction);
            continue;
        };
        sizes.push(Reduced::Theirs {
            typed_width: typed_width(input.schema().as_arrow()),
            stored_rows: size_class(stored_rows),
        });
    }
    let per_company = per_company(report, p.max_groups_per_entity);
    let most = admit(&sizes, &first, &per_company, limit, &p.shared)?;
    // Admitted: from here the question is not cut off by its time limit. Another partner's
    // tables are reduced now, without a memory limit: how long that takes and how much it
    // holds depend on how many of their rows pass the caller's filters, so neither may
    // decide whether the question is answered. What bounds it is the shared memory, reserved
    // for the most it could hold (their stored rows), waited for, never refused.
    if !stop.admit() {
        return Err(Stop::error().into());
    }
    let reservation = p.shared.reserve(most).await;
    let unbounded = crate::session::with_memory_limit(state, None)?;
    for (t, input) in inputs.iter().enumerate() {
        if reduced[t].is_none() {
            let at = std::time::Instant::now();
            if let Some(same) = &reduced[first[t]] {
                reduced[t] = Some(same.clone());
                continue;
            }
            let lookup = (looked_up[t].take()).or_else(|| {
                kept_as[t]
                    .clone()
                    .map(|(source, name)| look_up(source, name))
            });
            let (keeper, kept) = match lookup {
                Some(task) => (task.join_unwind().await)
                    .map_err(|e| internal(&format!("a source's keeper: {e}")))?,
                None => (None, None),
            };
            let kept = kept.and_then(|v| v.downcast::<Reduction>().ok());
            if let Some(kept) = kept {
                reduced[t] = Some(kept);
                stages.push(("another partner's table as reduced before", at.elapsed()));
                continue;
            }
            let reduction = Arc::new(reduce(&unbounded, input, &parts[t], l, None, stop).await?);
            if let Some((k, name)) = &keeper {
                // Counted as the most it could hold ([`Reduced::held`]), never its real size:
                // that depends on how many of its rows pass the caller's filters (one
                // company's name, say), and the service's cache evicts by what its entries
                // count, so evictions the caller can time would tell it.
                k.keep(name, reduction.clone(), sizes[t].held() as usize);
            }
            reduced[t] = Some(reduction);
            stages.push(("reduce another partner's table", at.elapsed()));
        }
    }
    let instances = (reduced.into_iter().zip(parts))
        .map(|(r, part)| {
            Ok(Instance {
                reduction: r.ok_or_else(|| internal("a table instance not reduced"))?,
                part,
            })
        })
        .collect::<Result<_, QueryError>>()?;
    Ok((instances, reservation))
}

/// The keeper of a source with the name a reduction is kept as, and what it kept so.
type LookedUp = (
    Option<(Box<dyn Keeper>, String)>,
    Option<Arc<dyn std::any::Any + Send + Sync>>,
);

/// What `source`'s keeper kept as `name`, and the keeper with that name to keep it, looked
/// up on the blocking pool: a keeper may read what it kept from storage.
fn look_up(source: Arc<dyn BatchSource>, name: String) -> SpawnedTask<LookedUp> {
    SpawnedTask::spawn_blocking(move || {
        let keeper = source.keeper();
        let kept = keeper.as_ref().and_then(|k| k.get(&name));
        (keeper.map(|k| (k, name)), kept)
    })
}

/// How a refusal by [`admit`] begins: it depends on the caller's own rows, the question,
/// the settings and the other partners' [`size_class`]es only, and its message carries no
/// estimate (an estimate in MiB, computed from a caller's padded rows, would read a size
/// class as a number): it may be shown whole.
pub const ADMISSION_REFUSAL: &str = "judged from the sizes of your own tables it reads";

/// One reduced table instance as [`admit`] may see it.
enum Reduced {
    /// The caller's own, as phase one measured it: its rows and the bytes they hold.
    Own { rows: usize, bytes: usize },
    /// Another partner's, not reduced yet: bytes per row judged from its column types
    /// alone ([`typed_width`]), and the [`size_class`] of its stored version's rows.
    Theirs { typed_width: f64, stored_rows: u64 },
}

impl Reduced {
    /// The bytes it holds: the caller's own as measured; another partner's at the most it
    /// could hold, its stored rows' size class at its column types' width with
    /// [`PER_ROW_OVERHEAD`] (what the shared memory reserves for it, whatever the filters keep).
    fn held(&self) -> f64 {
        match *self {
            Reduced::Own { bytes, .. } => bytes as f64,
            Reduced::Theirs {
                typed_width,
                stored_rows,
            } => stored_rows as f64 * (typed_width + PER_ROW_OVERHEAD),
        }
    }
}

/// Bytes a value of a variable-width type (a string) is taken to hold when only its type
/// may be looked at.
const VARIABLE_WIDTH: usize = 32;

/// Bytes per joined row that the operators keep beside the row itself (hash table entries,
/// group states, row numbers).
const PER_ROW_OVERHEAD: f64 = 64.0;

/// Bytes per row of `schema`'s columns from their types alone: fixed widths as they are,
/// a string as [`VARIABLE_WIDTH`] bytes and its offset; one validity bit per value rounded
/// up to a byte.
fn typed_width(schema: &Schema) -> f64 {
    schema
        .fields()
        .iter()
        .map(|f| {
            let t = f.data_type();
            t.primitive_width().unwrap_or(VARIABLE_WIDTH + 4) as f64 + 1.0
        })
        .sum()
}

/// About the bytes a question holds over the reduced tables `sizes`: the tables, and the
/// joins and aggregates over them. With `theirs`, another partner's tables count at their
/// stored rows (the most any filter keeps); without, they count by their width only, and a
/// question with none of the caller's own tables gives `None` (nothing the caller may know
/// bounds its join). Instances of one shape (`first`: [`first_of_shape`]) are held once.
///
/// Table instance `t` holds at most `per_company[t]` rows per company, so the join yields
/// at most `rows(t) x fan / per_company[t]` rows for any `t` (`fan` the product). A joined
/// row is as wide as the caller's own reduced rows and the others' column types
/// ([`typed_width`]); joins, the per-entity aggregate and the window hold it about four
/// times, with [`PER_ROW_OVERHEAD`] bytes of their own.
fn needed(sizes: &[Reduced], first: &[usize], per_company: &[u64], theirs: bool) -> Option<f64> {
    let fan: f64 = per_company.iter().map(|&n| n as f64).product();
    let mut joined = f64::INFINITY;
    let (mut width, mut held) = (0.0, 0.0);
    for (t, size) in sizes.iter().enumerate() {
        let rows = match *size {
            Reduced::Own { rows, bytes } => {
                width += bytes as f64 / rows.max(1) as f64;
                rows as f64
            }
            Reduced::Theirs {
                typed_width,
                stored_rows,
            } => {
                width += typed_width;
                if !theirs {
                    continue;
                }
                stored_rows as f64
            }
        };
        if first[t] == t {
            held += size.held();
        }
        joined = joined.min(rows * fan / per_company[t].max(1) as f64);
    }
    (!joined.is_infinite()).then_some(held + joined * (4.0 * width + PER_ROW_OVERHEAD))
}

/// Whether the question fits, judged without looking at which of another partner's rows
/// pass its filters:
/// - the per-query `limit` ([`needed`] without theirs: from the question, the settings and
///   the caller's own rows only; a question with none of the caller's own tables is not
///   judged here);
/// - one partner's share of the shared memory ([`needed`] with theirs at the rows of their
///   stored versions, whatever the filters keep, rounded up to a power of two of MiB): the
///   most it could hold after admission must be reservable ([`crate::memory`]), so that no
///   question of one partner makes another's wait (docs/THREAT_MODEL.md).
///
/// Returns that most, in bytes: what the question reserves once admitted.
fn admit(
    sizes: &[Reduced],
    first: &[usize],
    per_company: &[u64],
    limit: Option<usize>,
    shared: &MemoryShare,
) -> Result<f64, QueryError> {
    let pool = shared.pool();
    let most = needed(sizes, first, per_company, true).unwrap_or(0.0);
    if pool.rounded(most).is_none() {
        return Err(QueryError::ResourcesExhausted(format!(
            "{ADMISSION_REFUSAL} and the size classes of the other partners' tables (their stored rows rounded up to a power of two), the question could hold more than one partner's share of the server's shared memory ({} MiB, half of --admitted-memory-mb)",
            pool.share_mib()
        )));
    }
    let (Some(limit), Some(needed)) = (limit, needed(sizes, first, per_company, false)) else {
        return Ok(most);
    };
    if needed > limit as f64 {
        return Err(QueryError::ResourcesExhausted(format!(
            "{ADMISSION_REFUSAL}, the question needs about {} MiB, more than the per-query limit of {} MiB",
            mib(needed),
            limit >> 20
        )));
    }
    Ok(most)
}

/// `bytes` in whole MiB, rounded up.
fn mib(bytes: f64) -> u64 {
    (bytes / (1u64 << 20) as f64).ceil() as u64
}

/// Sums are released on a grid of `2^GRID_BITS` steps per bound: each entity's clamped value
/// `v` counts as the integer `trunc(v / g)` with `g = max(|low|, |high|) / 2^GRID_BITS`, so
/// one entity moves a sum by at most `2^GRID_BITS` grid units whatever the bounds are, the
/// noise is drawn in grid units by the exact sampler, and the released sum is
/// `(grid sum + noise) · g`: post-processing of an integer. Bounds that are tiny, huge or
/// sub-normal therefore cannot shrink the noise relative to what one entity contributes
/// (the side door of floating-point Laplace, where a sub-normal scale drew exactly 0).
pub const GRID_BITS: i32 = 20;

/// The grid step of bounds `[lo, hi]` (see [`GRID_BITS`]); exact (a power-of-two scaling of
/// a normal number: owners' bounds are validated to be normal and within range).
pub fn grid_step(lo: f64, hi: f64) -> f64 {
    lo.abs().max(hi.abs()) * 2f64.powi(-GRID_BITS)
}

/// Most groups a query may enumerate through its filters (the product of the lists).
const MAX_ENUMERATED_GROUPS: usize = 10_000;

/// One row of the protected answer, in the Aggregate's layout.
struct Released {
    dims: Vec<ScalarValue>,
    values: Vec<Option<f64>>,
    suppressed: bool,
}

/// Every group the query enumerates through its filters (each GROUP BY column filtered with
/// `=` / `IN` on literals), cast to the output types; `None` if any group is data-derived.
fn enumerated_groups(
    report: &GateReport,
    types: &[DataType],
) -> Result<Option<Vec<Vec<ScalarValue>>>, QueryError> {
    let mut groups: Vec<Vec<ScalarValue>> = vec![Vec::new()];
    for (d, t) in types.iter().enumerate() {
        let Some(Some(domain)) = report.group_domains.get(d) else {
            return Ok(None);
        };
        let Ok(values) = domain
            .iter()
            .map(|v| v.cast_to(t))
            .collect::<Result<Vec<_>, _>>()
        else {
            return Ok(None);
        };
        if groups.len().saturating_mul(values.len()) > MAX_ENUMERATED_GROUPS {
            return Ok(None);
        }
        groups = groups
            .into_iter()
            .flat_map(|g| {
                values.iter().map(move |v| {
                    let mut g = g.clone();
                    g.push(v.clone());
                    g
                })
            })
            .collect();
    }
    Ok(Some(groups))
}

/// The noisy entity count a row must reach to be released (besides >= k exact entities):
/// `k - 1` + the partition-selection threshold for counts of `sensitivity` with noise of
/// variance `count_noise`.
pub(crate) fn release_threshold(
    min_entities: u64,
    count_noise: Variance,
    sensitivity: Sensitivity,
    delta: f64,
) -> f64 {
    (min_entities as f64 - 1.0) + partition_threshold(count_noise, sensitivity, delta)
}

/// Thresholds and noise over the exact stage-2 rows. Returns the answer rows in the
/// Aggregate's output layout plus a last column, the suppressed flag, and what was applied.
///
/// Which rows are listed: released groups; every group the query enumerated itself (see
/// [`enumerated_groups`]), withheld ones marked suppressed with null values; and the single
/// row of a query without GROUP BY. A withheld data-derived group is not listed: its values
/// would tell that some entity has them.
fn release(
    agg: &Aggregate,
    report: &GateReport,
    p: &Protection,
    exact: &[RecordBatch],
) -> Result<(RecordBatch, Applied), QueryError> {
    let dims = agg.group_expr.len();
    let statistics: usize = 1 + report
        .aggregates
        .iter()
        .map(|m| match m {
            Metric::Entities => 0,
            Metric::Sum { .. } => 1,
            Metric::Avg { .. } => 2,
        })
        .sum::<usize>();
    // One company is in at most L groups and moves each group's count by at most 1 and
    // each sum by at most one grid step per unit of the bound, 2^GRID_BITS grid units. The
    // question's ρ = ε²/2 is split evenly over its statistics (noise::Variance).
    let l = u64::from(p.max_groups_per_entity.max(1));
    let counts = Sensitivity::groups(l, 1);
    let count_noise = Variance::gaussian(counts, statistics as u64, p.epsilon);
    let sum_noise = Variance::gaussian(
        Sensitivity::groups(l, 1 << GRID_BITS),
        statistics as u64,
        p.epsilon,
    );
    // Released only with at least k exact entities AND a noisy count of at least
    // (k - 1) + the partition-selection threshold. The margin makes the exact k test
    // invisible: a row at exactly k (or a group of one entity) is released with probability
    // at most about δ, so adding or removing one entity cannot be seen through suppression.
    let threshold = release_threshold(p.min_entities, count_noise, counts, p.delta);
    let applied = Applied {
        min_entities: p.min_entities,
        threshold,
        epsilon: p.epsilon.as_f64(),
        max_groups_per_entity: p.max_groups_per_entity,
        count_sd: count_noise.sd(),
    };

    let mut out_fields: Vec<Field> = agg
        .schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| Field::new(format!("c{i}"), f.data_type().clone(), true))
        .collect();
    let dim_types: Vec<DataType> = out_fields[..dims]
        .iter()
        .map(|f| f.data_type().clone())
        .collect();
    let enumerated = if dims == 0 {
        None
    } else {
        enumerated_groups(report, &dim_types)?
    };
    let mut rows: Vec<Released> = Vec::new();
    for batch in exact {
        let n_col = as_i64(batch.column(dims))?;
        for row in 0..batch.num_rows() {
            let dim_values = (0..dims)
                .map(|d| ScalarValue::try_from_array(batch.column(d), row))
                .collect::<Result<Vec<_>, _>>()?;
            let mut group = Vec::new();
            for v in &dim_values {
                let text = format!("{v:?}");
                group.extend_from_slice(&(text.len() as u64).to_be_bytes());
                group.extend_from_slice(text.as_bytes());
            }
            let n = n_col.value(row);
            let noisy_n = n + p.noise.discrete_gaussian(&group, 0, count_noise);
            if n < p.min_entities as i64 || (noisy_n as f64) < threshold {
                continue;
            }
            let mut values = Vec::new();
            let mut col = dims + 1;
            for (j, m) in report.aggregates.iter().enumerate() {
                let stat = 1 + 2 * j as u32;
                values.push(match m {
                    Metric::Entities => Some(noisy_n as f64),
                    Metric::Sum { .. } | Metric::Avg { .. } => {
                        let (lo, hi) = p.bounds[j].ok_or_else(|| internal("bounds"))?;
                        let total = as_i64(batch.column(col))?;
                        let grid = if total.is_null(row) {
                            0
                        } else {
                            total.value(row)
                        };
                        let noisy =
                            grid.saturating_add(p.noise.discrete_gaussian(&group, stat, sum_noise));
                        let s = noisy as f64 * grid_step(lo, hi);
                        col += 1;
                        if matches!(m, Metric::Sum { .. }) {
                            Some(s)
                        } else {
                            let c = as_i64(batch.column(col))?.value(row);
                            col += 1;
                            let noisy_c =
                                c + p.noise.discrete_gaussian(&group, stat + 1, count_noise);
                            (noisy_c > 0).then(|| (s / noisy_c as f64).clamp(lo, hi))
                        }
                    }
                });
            }
            rows.push(Released {
                dims: dim_values,
                values,
                suppressed: false,
            });
        }
    }
    let withheld = |dims: Vec<ScalarValue>| Released {
        dims,
        values: vec![None; report.aggregates.len()],
        suppressed: true,
    };
    if dims == 0 && rows.is_empty() {
        rows.push(withheld(Vec::new()));
    }
    if let Some(groups) = enumerated {
        // Up to MAX_ENUMERATED_GROUPS on each side: a set, not a scan per group.
        let released: std::collections::HashSet<&[ScalarValue]> =
            rows.iter().map(|r| r.dims.as_slice()).collect();
        let missing: Vec<Vec<ScalarValue>> = groups
            .into_iter()
            .filter(|g| !released.contains(g.as_slice()))
            .collect();
        rows.extend(missing.into_iter().map(withheld));
    }

    let mut columns: Vec<ArrayRef> = Vec::new();
    for (d, t) in dim_types.iter().enumerate() {
        columns.push(if rows.is_empty() {
            datafusion::arrow::array::new_empty_array(t)
        } else {
            ScalarValue::iter_to_array(rows.iter().map(|r| r.dims[d].clone()))?
        });
    }
    for j in 0..report.aggregates.len() {
        let target = out_fields[dims + j].data_type();
        let v = rows.iter().map(|r| r.values[j]);
        let array: ArrayRef = if target.is_integer() {
            Arc::new(Int64Array::from(
                v.map(|x| x.map(|x| x.round() as i64)).collect::<Vec<_>>(),
            ))
        } else {
            Arc::new(Float64Array::from(v.collect::<Vec<_>>()))
        };
        columns.push(cast(&array, target)?);
    }
    for (c, f) in columns.iter_mut().zip(&out_fields) {
        if c.data_type() != f.data_type() {
            *c = cast(c, f.data_type())?;
        }
    }
    columns.push(Arc::new(BooleanArray::from(
        rows.iter().map(|r| r.suppressed).collect::<Vec<_>>(),
    )));
    out_fields.push(Field::new(SUPPRESSED, DataType::Boolean, false));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(out_fields)), columns)?;
    Ok((batch, applied))
}

fn as_i64(a: &ArrayRef) -> Result<&Int64Array, QueryError> {
    a.as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| internal("count column type"))
}

/// A plan that yields `rows` under the Aggregate's own column names and qualifiers, so the
/// user's ORDER BY / LIMIT / projection apply unchanged.
fn replace_aggregate(agg: &Aggregate, rows: RecordBatch) -> Result<LogicalPlan, QueryError> {
    let schema = rows.schema();
    let table = MemTable::try_new(schema.clone(), vec![vec![rows]])?;
    let scan = LogicalPlanBuilder::scan(RESULT, provider_as_source(Arc::new(table)), None)?;
    let mut exprs: Vec<Expr> = agg
        .schema
        .iter()
        .zip(schema.fields())
        .map(|((q, f), c)| {
            Expr::Column(Column::new(Some(RESULT), c.name())).alias_qualified(q.cloned(), f.name())
        })
        .collect();
    exprs.push(Expr::Column(Column::new(Some(RESULT), SUPPRESSED)).alias(SUPPRESSED));
    Ok(scan.project(exprs)?.build()?)
}

#[cfg(test)]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::SharedMemory;

    fn theirs(stored_rows: u64) -> Reduced {
        Reduced::Theirs {
            typed_width: 40.0,
            stored_rows,
        }
    }

    #[test]
    fn instances_of_one_shape_are_counted_once() {
        let four = [
            theirs(1_000_000),
            theirs(1_000_000),
            theirs(1_000_000),
            theirs(1_000_000),
        ];
        let once = needed(&four, &[0, 0, 0, 0], &[1; 4], true).expect("sized");
        let each = needed(&four, &[0, 1, 2, 3], &[1; 4], true).expect("sized");
        // The joined rows are the same; the table is held once, not four times.
        let table = 1e6 * (40.0 + PER_ROW_OVERHEAD);
        assert!((each - once - 3.0 * table).abs() < 1.0, "{each} {once}");
        // Without theirs, a question of theirs only is not sized.
        assert_eq!(needed(&four, &[0, 0, 0, 0], &[1; 4], false), None);
    }

    #[test]
    fn a_question_over_one_partners_share_is_refused_before_admission() {
        let share = SharedMemory::new(64 << 20).share("acme");
        let own = Reduced::Own {
            rows: 1_000,
            bytes: 40_000,
        };
        admit(
            &[own, theirs(10_000)],
            &[0, 1],
            &[1, 1],
            Some(1 << 30),
            &share,
        )
        .expect("fits");
        let own = Reduced::Own {
            rows: 1_000,
            bytes: 40_000,
        };
        // 10M stored rows: over the 32 MiB share whatever the filters keep of them.
        let e = admit(
            &[own, theirs(10_000_000)],
            &[0, 1],
            &[1, 1],
            Some(1 << 30),
            &share,
        )
        .expect_err("over the share");
        assert!(
            matches!(&e, QueryError::ResourcesExhausted(m)
                if m.starts_with(ADMISSION_REFUSAL) && m.contains("share of the server's shared memory (32 MiB")),
            "{e}"
        );
    }
}
