//! The exact rows of a protected question, computed per company over entity ids.
//!
//! ```text
//! reduce   each table instance as its rows stream in, its filters applied (DataFusion
//!          scans and filters): per company (entity id), its distinct GROUP BY values of
//!          this table, each with the table's metrics summed (averaged) over its rows, at
//!          most L of them, the first by those values (ascending, nulls first); a table
//!          without a GROUP BY column keeps one per company                 (`Reduction`)
//! join     per company of the privacy unit's table instance: its reduced rows in every
//!          other instance (joins are key equalities only, so all keys of a joined row are
//!          equal); each combination is one joined row, with distinct GROUP BY values
//! bound    of a company's joined rows, the first L by the GROUP BY values
//! total    per group: companies, and per metric the sum of each company's clamped value on
//!          the grid (and how many had one, for an average)                   (`stage_two`)
//! ```
//!
//! These are the rows that `exec.rs` releases with thresholds and noise. They are the rows
//! the rewrite planned in DataFusion computed before (its windows sorted every table by key,
//! then every joined row again); the tests keep that plan as the reference and compare the
//! two on random lists.
//!
//! What the work follows: reducing a table instance takes time and memory by its rows after
//! the question's filters and by its companies; the join, by the privacy unit's companies and
//! by how many of them every other instance has, each with at most the fan-out
//! (`exec::fan_out`) of joined rows. One company more or less moves either by one company's
//! bounded work, as the planned rewrite did. Which instance is walked is fixed by the question
//! (the privacy unit's), never chosen by sizes.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, UInt64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, Rows, SortField};

use crate::QueryError;
use crate::gate::{GateReport, Metric};
use crate::hashing::{FastMap, SHARDS, shard_of};
use crate::stop::Stop;

/// No entry.
const NONE: u32 = u32::MAX;

/// Companies walked between two checks of a stop request.
const STOP_EVERY: usize = 1 << 16;

fn internal(what: &str) -> QueryError {
    QueryError::Internal(format!("protected stage: {what}"))
}

/// The distinct values of one GROUP BY column, in the row format: their bytes compare as
/// `ORDER BY column ASC NULLS FIRST` does. A value's code is its index.
struct Values {
    converter: RowConverter,
    rows: Rows,
    index: HashMap<Box<[u8]>, u32>,
}

impl Values {
    fn new(data_type: &DataType) -> Result<Self, QueryError> {
        let converter = RowConverter::new(vec![SortField::new(data_type.clone())])?;
        let rows = converter.empty_rows(0, 0);
        Ok(Values {
            converter,
            rows,
            index: HashMap::default(),
        })
    }

    /// The codes of `column`'s values into `out`, new values interned.
    fn codes(&mut self, column: &ArrayRef, out: &mut Vec<u32>) -> Result<(), QueryError> {
        let rows = self
            .converter
            .convert_columns(std::slice::from_ref(column))?;
        out.clear();
        for row in rows.iter() {
            let bytes = row.data();
            let code = match self.index.get(bytes) {
                Some(&c) => c,
                None => {
                    let c = u32::try_from(self.rows.num_rows())
                        .ok()
                        .filter(|&c| c != NONE)
                        .ok_or_else(|| internal("too many distinct values"))?;
                    self.rows.push(row);
                    self.index.insert(bytes.into(), c);
                    c
                }
            };
            out.push(code);
        }
        Ok(())
    }

    fn cmp(&self, a: u32, b: u32) -> Ordering {
        self.rows.row(a as usize).cmp(&self.rows.row(b as usize))
    }

    /// The codes in the values' order.
    fn ordered(&self) -> Vec<u32> {
        let mut codes: Vec<u32> = (0..self.rows.num_rows() as u32).collect();
        codes.sort_unstable_by(|&a, &b| self.cmp(a, b));
        codes
    }

    /// The values of `codes`, as an array of the column's type.
    fn array(&self, codes: impl Iterator<Item = u32>) -> Result<ArrayRef, QueryError> {
        let rows = codes.map(|c| self.rows.row(c as usize));
        self.converter
            .convert_rows(rows)?
            .pop()
            .ok_or_else(|| internal("a column of values"))
    }

    fn bytes(&self) -> usize {
        self.rows.size()
            + self.index.capacity() * (size_of::<Box<[u8]>>() + 4 + 1)
            + self.rows.num_rows() * 16
    }
}

/// What one table instance contributes: its GROUP BY columns (positions in the query's GROUP
/// BY) and its metrics (positions in the query's aggregates, and whether each is an
/// average), both in the query's order. Instances of one shape (`exec.rs`) share one
/// [`Reduction`] and correspond position by position.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    pub dims: Vec<usize>,
    pub metrics: Vec<(usize, bool)>,
}

impl Part {
    pub fn of(report: &GateReport, table: usize) -> Part {
        Part {
            dims: (report.dimensions.iter().enumerate())
                .filter(|(_, (t, _))| *t == table)
                .map(|(n, _)| n)
                .collect(),
            metrics: (report.aggregates.iter().enumerate())
                .filter_map(|(j, m)| match m {
                    Metric::Sum { table: t, .. } if *t == table => Some((j, false)),
                    Metric::Avg { table: t, .. } if *t == table => Some((j, true)),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// A company's reduced rows: the first of its entries and how many.
#[derive(Debug, Clone, Copy)]
struct Chain {
    head: u32,
    len: u32,
}

const EMPTY: Chain = Chain { head: NONE, len: 0 };

/// Rows of one shard as they stream in, before the shard is built.
#[derive(Default)]
struct Staged {
    keys: Vec<u64>,
    codes: Vec<u32>,
    metrics: Vec<f64>,
    valid: Vec<bool>,
}

impl Staged {
    fn bytes(&self) -> usize {
        self.keys.capacity() * 8
            + self.codes.capacity() * 4
            + self.metrics.capacity() * 8
            + self.valid.capacity()
    }
}

/// One shard of a reduction: its companies and their reduced rows.
struct Shard {
    companies: FastMap<Chain>,
    entries: Entries,
}

/// A table instance reduced per company (see the module's doc). Its input batches are the
/// key (entity ids), its GROUP BY columns and its metrics as `Float64`, in [`Part`] order.
/// Rows are staged per shard as they come ([`Reduction::fold`]), then the shards are built
/// ([`Reduction::finish`]).
pub(crate) struct Reduction {
    values: Vec<Values>,
    staged: Vec<Staged>,
    shards: Vec<Shard>,
    /// Rows with a null key: one company when the question reads one table instance (as a
    /// GROUP BY on the key makes it), none in a join (a null key equals nothing).
    null: (Chain, Entries),
    scratch: Vec<Vec<u32>>,
}

/// Reduced rows of companies.
struct Entries {
    /// Rows kept per company: L with GROUP BY columns, else 1.
    limit: u32,
    dims: usize,
    metrics: usize,
    /// Per entry: its codes (one per GROUP BY column), its metrics' sums and counts of
    /// non-null values, the next entry of its company.
    codes: Vec<u32>,
    sums: Vec<f64>,
    counts: Vec<u32>,
    next: Vec<u32>,
}

impl Reduction {
    /// `schema`: the input batches' (key, GROUP BY columns, metrics).
    pub fn new(schema: &Schema, dims: usize, limit: u32) -> Result<Self, QueryError> {
        let fields = schema.fields();
        if fields.is_empty() || fields.len() < 1 + dims {
            return Err(internal("input columns"));
        }
        let values = (fields[1..1 + dims].iter())
            .map(|f| Values::new(f.data_type()))
            .collect::<Result<Vec<_>, _>>()?;
        let entries = Entries {
            limit: if dims == 0 { 1 } else { limit.max(1) },
            dims,
            metrics: fields.len() - 1 - dims,
            codes: Vec::new(),
            sums: Vec::new(),
            counts: Vec::new(),
            next: Vec::new(),
        };
        Ok(Reduction {
            values,
            staged: (0..SHARDS).map(|_| Staged::default()).collect(),
            shards: Vec::new(),
            null: (EMPTY, entries),
            scratch: vec![Vec::new(); dims],
        })
    }

    /// Reduced rows held (once finished).
    pub fn rows(&self) -> usize {
        self.null.1.next.len()
            + self
                .shards
                .iter()
                .map(|s| s.entries.next.len())
                .sum::<usize>()
    }

    /// Bytes held: rows staged, shards built, interned values.
    pub fn bytes(&self) -> usize {
        self.null.1.bytes()
            + self.staged.iter().map(Staged::bytes).sum::<usize>()
            + (self.shards.iter())
                .map(|s| {
                    s.companies.capacity() * (size_of::<u64>() + size_of::<Chain>() + 1)
                        + s.entries.bytes()
                })
                .sum::<usize>()
            + self.values.iter().map(Values::bytes).sum::<usize>()
    }

    /// Stages a batch of input rows.
    pub fn fold(&mut self, batch: &RecordBatch) -> Result<(), QueryError> {
        let (dims, width) = (self.values.len(), self.null.1.metrics);
        if batch.num_columns() != 1 + dims + width {
            return Err(internal("input columns"));
        }
        let keys = batch
            .column(0)
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| internal("key column type"))?;
        let mut scratch = std::mem::take(&mut self.scratch);
        for (d, out) in scratch.iter_mut().enumerate() {
            self.values[d].codes(batch.column(1 + d), out)?;
        }
        let metrics: Vec<&Float64Array> = (0..width)
            .map(|i| batch.column(1 + dims + i).as_primitive_opt::<Float64Type>())
            .collect::<Option<_>>()
            .ok_or_else(|| internal("metric column type"))?;
        let mut tuple = vec![0u32; dims];
        for row in 0..batch.num_rows() {
            for (d, codes) in scratch.iter().enumerate() {
                tuple[d] = codes[row];
            }
            if keys.is_null(row) {
                let (chain, entries) = &mut self.null;
                if let Some(e) = entries.place(chain, &tuple, &self.values) {
                    entries.add(
                        e,
                        metrics
                            .iter()
                            .map(|m| m.is_valid(row).then(|| m.value(row))),
                    );
                }
                continue;
            }
            let key = keys.value(row);
            let staged = &mut self.staged[shard_of(key)];
            staged.keys.push(key);
            staged.codes.extend_from_slice(&tuple);
            for m in &metrics {
                staged
                    .metrics
                    .push(if m.is_valid(row) { m.value(row) } else { 0.0 });
                staged.valid.push(m.is_valid(row));
            }
        }
        self.scratch = scratch;
        Ok(())
    }

    /// Builds the shards from the staged rows, on `threads` threads.
    pub fn finish(&mut self, threads: usize) -> Result<(), QueryError> {
        let staged: Vec<(usize, Staged)> = std::mem::take(&mut self.staged)
            .into_iter()
            .enumerate()
            .collect();
        let template = &self.null.1;
        let values = &self.values;
        let threads = threads.clamp(1, SHARDS);
        let built: Vec<Option<Vec<(usize, Shard)>>> = std::thread::scope(|s| {
            let mut lanes: Vec<Vec<(usize, Staged)>> = (0..threads).map(|_| Vec::new()).collect();
            for (i, st) in staged {
                lanes[i % threads].push((i, st));
            }
            let handles: Vec<_> = lanes
                .into_iter()
                .map(|lane| {
                    s.spawn(move || {
                        lane.into_iter()
                            .map(|(i, st)| (i, build(st, template, values)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().ok()).collect()
        });
        let mut built: Vec<(usize, Shard)> = (built.into_iter())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| internal("a thread building shards"))?
            .into_iter()
            .flatten()
            .collect();
        built.sort_unstable_by_key(|(i, _)| *i);
        self.shards = built.into_iter().map(|(_, s)| s).collect();
        Ok(())
    }
}

/// One shard built from its staged rows.
fn build(staged: Staged, template: &Entries, values: &[Values]) -> Shard {
    let (dims, width) = (template.dims, template.metrics);
    let mut companies = FastMap::default();
    companies.reserve(staged.keys.len());
    let mut entries = template.empty();
    for (r, &key) in staged.keys.iter().enumerate() {
        let chain = companies.entry(key).or_insert(EMPTY);
        let tuple = &staged.codes[r * dims..(r + 1) * dims];
        if let Some(e) = entries.place(chain, tuple, values) {
            let at = r * width;
            entries.add(
                e,
                (at..at + width).map(|i| staged.valid[i].then(|| staged.metrics[i])),
            );
        }
    }
    Shard { companies, entries }
}

impl Entries {
    fn empty(&self) -> Entries {
        Entries {
            limit: self.limit,
            dims: self.dims,
            metrics: self.metrics,
            codes: Vec::new(),
            sums: Vec::new(),
            counts: Vec::new(),
            next: Vec::new(),
        }
    }

    fn bytes(&self) -> usize {
        self.codes.capacity() * 4
            + self.sums.capacity() * 8
            + self.counts.capacity() * 4
            + self.next.capacity() * 4
    }

    /// Adds a row's metric values to entry `e`.
    fn add(&mut self, e: u32, values: impl Iterator<Item = Option<f64>>) {
        let at = e as usize * self.metrics;
        for (i, v) in values.enumerate() {
            if let Some(v) = v {
                self.sums[at + i] += v;
                self.counts[at + i] += 1;
            }
        }
    }

    /// The entry of `tuple` in `chain`: found, added while the company has fewer than its
    /// limit, or in place of its last (by GROUP BY values) if `tuple` comes before it. `None`
    /// if the company keeps `limit` entries that all come before `tuple`: a dropped entry
    /// never comes back, as every later one of the company would come before it too.
    fn place(&mut self, chain: &mut Chain, tuple: &[u32], values: &[Values]) -> Option<u32> {
        let dims = tuple.len();
        let mut last = NONE;
        let mut e = chain.head;
        while e != NONE {
            let at = e as usize * dims;
            if self.codes[at..at + dims] == *tuple {
                return Some(e);
            }
            if last == NONE
                || self.order(last, &self.codes[at..at + dims], values) == Ordering::Less
            {
                last = e;
            }
            e = self.next[e as usize];
        }
        if chain.len < self.limit {
            let e = u32::try_from(self.next.len()).ok().filter(|&e| e != NONE)?;
            self.codes.extend_from_slice(tuple);
            self.sums.extend(std::iter::repeat_n(0.0, self.metrics));
            self.counts.extend(std::iter::repeat_n(0, self.metrics));
            self.next.push(chain.head);
            *chain = Chain {
                head: e,
                len: chain.len + 1,
            };
            return Some(e);
        }
        if self.order(last, tuple, values) != Ordering::Greater {
            return None;
        }
        let at = last as usize * dims;
        self.codes[at..at + dims].copy_from_slice(tuple);
        let m = last as usize * self.metrics;
        self.sums[m..m + self.metrics].fill(0.0);
        self.counts[m..m + self.metrics].fill(0);
        Some(last)
    }

    /// How entry `e`'s GROUP BY values compare with `tuple`'s.
    fn order(&self, e: u32, tuple: &[u32], values: &[Values]) -> Ordering {
        let at = e as usize * tuple.len();
        (values.iter().zip(&self.codes[at..at + tuple.len()]))
            .zip(tuple)
            .map(|((v, &a), &b)| if a == b { Ordering::Equal } else { v.cmp(a, b) })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }

    /// Metric `i` of entry `e`, as its reduced row holds it: the sum (or average) of the
    /// row's non-null values, null if none.
    fn metric(&self, e: u32, i: usize, average: bool) -> Option<f64> {
        let at = e as usize * self.metrics + i;
        let (sum, n) = (self.sums[at], self.counts[at]);
        (n > 0).then(|| if average { sum / f64::from(n) } else { sum })
    }
}

/// A table instance in the join: its reduction (shared by instances of one shape) and what
/// it contributes.
pub(crate) struct Instance {
    pub reduction: Arc<Reduction>,
    pub part: Part,
}

/// What [`stage_two`] totals, from the protection's settings.
pub(crate) struct Totals {
    /// The privacy unit's table instance.
    pub unit: usize,
    /// L: groups one company reaches.
    pub max_groups: u32,
    /// Per aggregate, its clamping bounds and grid step (`None` for counts).
    pub grids: Vec<Option<(f64, f64, f64)>>,
    /// GROUP BY columns of the question.
    pub dims: usize,
}

/// A value clamped to `[lo, hi]` (NaN and infinities too, in floats' total order), then on
/// the grid of `step`: truncated towards zero as a cast to an integer does.
fn on_grid(v: f64, lo: f64, hi: f64, step: f64) -> i64 {
    let clamped = if v.total_cmp(&lo) == Ordering::Less {
        lo
    } else if v.total_cmp(&hi) == Ordering::Greater {
        hi
    } else {
        v
    };
    (clamped / step) as i64
}

/// The totals of the groups met so far: per group its GROUP BY ranks, companies, and per
/// aggregate the grid total (null while no company had a value) and how many had one.
#[derive(Default)]
struct Groups {
    index: HashMap<Vec<u32>, usize>,
    tuples: Vec<Vec<u32>>,
    companies: Vec<i64>,
    sums: Vec<Option<i64>>,
    counts: Vec<i64>,
}

impl Groups {
    /// The index of the group of `tuple`, added if new.
    fn of(&mut self, tuple: &[u32], aggs: usize) -> usize {
        if let Some(&g) = self.index.get(tuple) {
            return g;
        }
        let g = self.companies.len();
        self.index.insert(tuple.to_vec(), g);
        self.tuples.push(tuple.to_vec());
        self.companies.push(0);
        self.sums.resize(self.sums.len() + aggs, None);
        self.counts.resize(self.counts.len() + aggs, 0);
        g
    }

    /// `other`'s totals added to these.
    fn merge(&mut self, other: Groups, aggs: usize) {
        for (o, tuple) in other.tuples.iter().enumerate() {
            let g = self.of(tuple, aggs);
            self.companies[g] += other.companies[o];
            for j in 0..aggs {
                if let Some(v) = other.sums[o * aggs + j] {
                    let s = &mut self.sums[g * aggs + j];
                    *s = Some(s.unwrap_or(0).saturating_add(v));
                }
                self.counts[g * aggs + j] += other.counts[o * aggs + j];
            }
        }
    }
}

/// Where each GROUP BY column and each aggregate comes from, and the ranks of the values.
struct Layout {
    /// Per GROUP BY column: (instance, its position there).
    dims: Vec<(usize, usize)>,
    /// Per aggregate: (instance, position, average) of a metric, `None` for a count.
    metrics: Vec<Option<(usize, usize, bool)>>,
    /// Per GROUP BY column: the codes in the values' order, and each code's rank.
    ordered: Vec<Vec<u32>>,
    ranks: Vec<Vec<u32>>,
}

impl Layout {
    fn of(instances: &[Instance], totals: &Totals) -> Result<Layout, QueryError> {
        let mut dims = vec![(usize::MAX, 0); totals.dims];
        let mut metrics = vec![None; totals.grids.len()];
        for (t, inst) in instances.iter().enumerate() {
            for (d, &n) in inst.part.dims.iter().enumerate() {
                *dims.get_mut(n).ok_or_else(|| internal("GROUP BY column"))? = (t, d);
            }
            for (i, &(j, avg)) in inst.part.metrics.iter().enumerate() {
                *metrics.get_mut(j).ok_or_else(|| internal("aggregate"))? = Some((t, i, avg));
            }
        }
        if dims.iter().any(|&(t, _)| t == usize::MAX) {
            return Err(internal("a GROUP BY column of no table"));
        }
        let ordered: Vec<Vec<u32>> = (dims.iter())
            .map(|&(t, d)| instances[t].reduction.values[d].ordered())
            .collect();
        let ranks = (ordered.iter())
            .map(|codes| {
                let mut rank = vec![0u32; codes.len()];
                for (r, &c) in codes.iter().enumerate() {
                    rank[c as usize] = r as u32;
                }
                rank
            })
            .collect();
        Ok(Layout {
            dims,
            metrics,
            ordered,
            ranks,
        })
    }
}

/// Joins companies and totals their bounded rows into [`Groups`].
struct Walk<'a> {
    layout: &'a Layout,
    totals: &'a Totals,
    groups: Groups,
    /// Per company: its entries in every instance, its joined rows (entries per instance,
    /// ranks per GROUP BY column), their order.
    cursor: Vec<u32>,
    entries: Vec<u32>,
    tuples: Vec<u32>,
    order: Vec<usize>,
}

impl<'a> Walk<'a> {
    fn new(layout: &'a Layout, totals: &'a Totals, tables: usize) -> Self {
        let mut groups = Groups::default();
        if totals.dims == 0 {
            // A question without GROUP BY has its one row, with or without companies.
            groups.of(&[], totals.grids.len());
        }
        Walk {
            layout,
            totals,
            groups,
            cursor: vec![0; tables],
            entries: Vec::new(),
            tuples: Vec::new(),
            order: Vec::new(),
        }
    }

    /// One company, with its chain (and the entries it points into) in every instance.
    fn company(&mut self, chains: &[(Chain, &Entries)]) {
        let (tables, dims, aggs) = (chains.len(), self.totals.dims, self.totals.grids.len());
        self.entries.clear();
        self.tuples.clear();
        // Every combination of one entry per instance.
        for (t, (c, _)) in chains.iter().enumerate() {
            self.cursor[t] = c.head;
        }
        'rows: loop {
            self.entries.extend_from_slice(&self.cursor);
            for (n, &(t, d)) in self.layout.dims.iter().enumerate() {
                let e = chains[t].1;
                let code = e.codes[self.cursor[t] as usize * e.dims + d];
                self.tuples.push(self.layout.ranks[n][code as usize]);
            }
            for t in (0..tables).rev() {
                let next = chains[t].1.next[self.cursor[t] as usize];
                if next != NONE {
                    self.cursor[t] = next;
                    for (u, (c, _)) in chains.iter().enumerate().skip(t + 1) {
                        self.cursor[u] = c.head;
                    }
                    continue 'rows;
                }
            }
            break;
        }
        let rows = self.entries.len() / tables;
        self.order.clear();
        self.order.extend(0..rows);
        let keep = self.totals.max_groups.max(1) as usize;
        if dims > 0 && rows > keep {
            let tuples = &self.tuples;
            self.order.sort_unstable_by(|&a, &b| {
                tuples[a * dims..(a + 1) * dims].cmp(&tuples[b * dims..(b + 1) * dims])
            });
            self.order.truncate(keep);
        }
        for &row in &self.order {
            let g = self
                .groups
                .of(&self.tuples[row * dims..(row + 1) * dims], aggs);
            self.groups.companies[g] += 1;
            for (j, grid) in self.totals.grids.iter().enumerate() {
                let (Some((lo, hi, step)), Some((t, i, avg))) = (grid, self.layout.metrics[j])
                else {
                    continue;
                };
                let Some(v) = chains[t].1.metric(self.entries[row * tables + t], i, avg) else {
                    continue;
                };
                let s = &mut self.groups.sums[g * aggs + j];
                *s = Some(s.unwrap_or(0).saturating_add(on_grid(v, *lo, *hi, *step)));
                self.groups.counts[g * aggs + j] += 1;
            }
        }
    }

    /// Every company of the privacy unit's shard `s` found in every instance.
    fn shard(&mut self, instances: &[Instance], s: usize, stop: &Stop) -> Result<(), QueryError> {
        let unit = &instances[self.totals.unit].reduction.shards[s];
        let mut chains: Vec<(Chain, &Entries)> = Vec::with_capacity(instances.len());
        for (n, (key, chain)) in unit.companies.iter().enumerate() {
            if n % STOP_EVERY == 0 && stop.requested() {
                return Err(Stop::error().into());
            }
            chains.clear();
            for (t, inst) in instances.iter().enumerate() {
                let shard = &inst.reduction.shards[s];
                if t == self.totals.unit {
                    chains.push((*chain, &unit.entries));
                } else if let Some(c) = shard.companies.get(key) {
                    chains.push((*c, &shard.entries));
                } else {
                    break;
                }
            }
            if chains.len() == instances.len() {
                self.company(&chains);
            }
        }
        Ok(())
    }
}

/// The exact stage-two rows of a protected question over `instances` (in the gate report's
/// order, each finished), on `threads` threads (shard by shard): its GROUP BY columns, then
/// the companies (`Int64`), then per SUM its grid total (`Int64`, null when no company had
/// a value) and per AVG its grid total and how many companies had a value. A question
/// without GROUP BY has exactly one row.
pub(crate) fn stage_two(
    instances: &[Instance],
    totals: &Totals,
    threads: usize,
    stop: &Stop,
) -> Result<RecordBatch, QueryError> {
    let unit = instances
        .get(totals.unit)
        .ok_or_else(|| internal("privacy unit"))?;
    if instances.iter().any(|i| i.reduction.shards.len() != SHARDS) {
        return Err(internal("a reduction not finished"));
    }
    let layout = Layout::of(instances, totals)?;
    let tables = instances.len();
    let aggs = totals.grids.len();
    let threads = threads.clamp(1, SHARDS);
    let partial: Vec<Result<Groups, QueryError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|lane| {
                let layout = &layout;
                scope.spawn(move || {
                    let mut walk = Walk::new(layout, totals, tables);
                    for s in (lane..SHARDS).step_by(threads) {
                        walk.shard(instances, s, stop)?;
                    }
                    Ok(walk.groups)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(internal("a join thread"))))
            .collect()
    });
    // Each part holds the one row of a question without GROUP BY (`Walk::new`).
    let mut groups = Groups::default();
    for p in partial {
        groups.merge(p?, aggs);
    }
    // The company without a key, in a question of one table instance.
    let (null, entries) = &unit.reduction.null;
    if tables == 1 && null.len > 0 {
        let mut walk = Walk::new(&layout, totals, tables);
        walk.company(&[(*null, entries)]);
        groups.merge(walk.groups, aggs);
    }

    // The rows in the order of their GROUP BY values, never in the order their groups were
    // met: that follows the walk over companies (shard by shard, each in its map's order,
    // fixed by the companies' ids), so an answer's row order (or the one row a LIMIT keeps)
    // would tell which companies were in which group, beside the noise.
    let mut order: Vec<usize> = (0..groups.tuples.len()).collect();
    order.sort_unstable_by(|&x, &y| groups.tuples[x].cmp(&groups.tuples[y]));
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (n, &(t, d)) in layout.dims.iter().enumerate() {
        let values = &instances[t].reduction.values[d];
        let array = values
            .array((order.iter()).map(|&g| layout.ordered[n][groups.tuples[g][n] as usize]))?;
        fields.push(Field::new(format!("d{n}"), array.data_type().clone(), true));
        columns.push(array);
    }
    fields.push(Field::new("n", DataType::Int64, false));
    let companies: Vec<i64> = order.iter().map(|&g| groups.companies[g]).collect();
    columns.push(Arc::new(Int64Array::from(companies)));
    for (j, m) in layout.metrics.iter().enumerate() {
        let Some((_, _, avg)) = m else { continue };
        let s: Vec<Option<i64>> = order.iter().map(|&g| groups.sums[g * aggs + j]).collect();
        fields.push(Field::new(format!("s{j}"), DataType::Int64, true));
        columns.push(Arc::new(Int64Array::from(s)));
        if *avg {
            let c: Vec<i64> = order.iter().map(|&g| groups.counts[g * aggs + j]).collect();
            fields.push(Field::new(format!("c{j}"), DataType::Int64, false));
            columns.push(Arc::new(Int64Array::from(c)));
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}
