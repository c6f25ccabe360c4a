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

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, UInt32Array};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, UInt64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::logical_expr::EmitTo;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

use crate::QueryError;
use crate::gate::{GateReport, Metric};
use crate::hashing::{FastMap, FastSet, SHARDS, on_lanes, reserved_for_ids, shard_of};

mod kept;
use crate::stop::Stop;
pub(crate) use kept::FORMAT as KEYS_FORMAT;

/// No entry.
const NONE: u32 = u32::MAX;

/// Companies walked between two checks of a stop request.
const STOP_EVERY: usize = 1 << 16;

fn internal(what: &str) -> QueryError {
    QueryError::Internal(format!("protected stage: {what}"))
}

/// The distinct values of one GROUP BY column of a finished [`Reduction`], in the order of
/// `ORDER BY column ASC NULLS FIRST` (arrow's row format orders them). A value's code is its
/// rank there, so codes compare as their values do.
struct Values {
    /// As interned ([`interned_type`]).
    sorted: ArrayRef,
    /// The type they leave in ([`output_type`]).
    output: DataType,
}

impl Values {
    /// The values of `codes`, as an array of the column's output type.
    fn array(&self, codes: impl Iterator<Item = u32>) -> Result<ArrayRef, QueryError> {
        let indices = UInt32Array::from_iter_values(codes);
        let values = take(self.sorted.as_ref(), &indices, None)?;
        Ok(match values.data_type() == &self.output {
            true => values,
            false => cast(&values, &self.output)?,
        })
    }

    fn bytes(&self) -> usize {
        self.sorted.get_array_memory_size()
    }
}

/// The type a GROUP BY column's values are interned as: a dictionary's as its values, and
/// strings and bytes with 64-bit offsets. DataFusion's interners would fail or stop where the
/// column's own type runs out: a dictionary past its key type's range of distinct values
/// (128 for `Int8` keys), 32-bit offsets past 2 GiB of distinct values. Either depends on
/// the rows, another partner's too, so it must not happen after admission.
fn interned_type(t: &DataType) -> DataType {
    match t {
        DataType::Dictionary(_, values) => interned_type(values),
        DataType::Utf8 => DataType::LargeUtf8,
        DataType::Binary => DataType::LargeBinary,
        other => other.clone(),
    }
}

/// The type a GROUP BY column's values leave the stage in: a dictionary's values' type (as
/// the exact rows held them before), else its own.
fn output_type(t: &DataType) -> DataType {
    match t {
        DataType::Dictionary(_, values) => output_type(values),
        other => other.clone(),
    }
}

/// DataFusion's interner of one GROUP BY column's values (the one its hash aggregate uses:
/// values equal as a GROUP BY makes them equal, so -0.0 and 0.0 are one value). Its hash has
/// a fixed seed: values chosen to collide make it slow (on questions that group by them),
/// not wrong.
fn interner(field: &Field) -> Result<Box<dyn GroupValues>, QueryError> {
    let schema = Arc::new(Schema::new(vec![field.clone()]));
    Ok(new_group_values(schema, &GroupOrdering::None)?)
}

/// The values an interner holds, in the order of their codes (its group ids).
fn emitted(interner: &mut dyn GroupValues, field: &Field) -> Result<ArrayRef, QueryError> {
    if interner.is_empty() {
        return Ok(datafusion::arrow::array::new_empty_array(field.data_type()));
    }
    interner
        .emit(EmitTo::All)?
        .pop()
        .ok_or_else(|| internal("the values of an interner"))
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

/// Rows of one shard as they stream in, before the shard is built: per row its entity id,
/// its GROUP BY values' codes (the partition's own, see [`Folder`]), its metrics (0 where
/// null) and whether each was there.
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

/// One input partition of a table instance as its rows stream in ([`Folder::fold`]): each
/// row staged in its entity's shard (the rows without a key apart), its GROUP BY values
/// interned in the partition's own codes. Partitions fold on their own threads;
/// [`Reduction::finish`] brings their codes together and builds the shards.
pub(crate) struct Folder {
    /// The GROUP BY columns as interned ([`interned_type`]), and their output types.
    fields: Vec<Field>,
    outputs: Vec<DataType>,
    interners: Vec<Box<dyn GroupValues>>,
    /// [`SHARDS`] shards, then the rows without a key.
    staged: Vec<Staged>,
    metrics: usize,
    scratch: Vec<Vec<usize>>,
}

impl Folder {
    /// `schema`: the input batches' (key, GROUP BY columns, metrics).
    pub fn new(schema: &Schema, dims: usize) -> Result<Folder, QueryError> {
        let fields = schema.fields();
        if fields.is_empty() || fields.len() < 1 + dims {
            return Err(internal("input columns"));
        }
        let dims_fields = &fields[1..1 + dims];
        let outputs = dims_fields
            .iter()
            .map(|f| output_type(f.data_type()))
            .collect();
        let fields: Vec<Field> = (dims_fields.iter())
            .map(|f| Field::new(f.name(), interned_type(f.data_type()), true))
            .collect();
        Ok(Folder {
            outputs,
            interners: fields.iter().map(interner).collect::<Result<_, _>>()?,
            metrics: schema.fields().len() - 1 - dims,
            fields,
            staged: (0..=SHARDS).map(|_| Staged::default()).collect(),
            scratch: vec![Vec::new(); dims],
        })
    }

    /// Bytes held: rows staged, values interned.
    pub fn bytes(&self) -> usize {
        self.staged.iter().map(Staged::bytes).sum::<usize>()
            + self.interners.iter().map(|i| i.size()).sum::<usize>()
    }

    /// Stages a batch of input rows.
    pub fn fold(&mut self, batch: &RecordBatch) -> Result<(), QueryError> {
        let (dims, width) = (self.fields.len(), self.metrics);
        if batch.num_columns() != 1 + dims + width {
            return Err(internal("input columns"));
        }
        let keys = batch
            .column(0)
            .as_primitive_opt::<UInt64Type>()
            .ok_or_else(|| internal("key column type"))?;
        for (d, out) in self.scratch.iter_mut().enumerate() {
            out.clear();
            let column = batch.column(1 + d);
            let column = match column.data_type() == self.fields[d].data_type() {
                true => column.clone(),
                false => cast(column, self.fields[d].data_type())?,
            };
            self.interners[d].intern(&[column], out)?;
            if self.interners[d].len() >= NONE as usize {
                return Err(internal("too many distinct values"));
            }
        }
        let metrics: Vec<&Float64Array> = (0..width)
            .map(|i| batch.column(1 + dims + i).as_primitive_opt::<Float64Type>())
            .collect::<Option<_>>()
            .ok_or_else(|| internal("metric column type"))?;
        for row in 0..batch.num_rows() {
            let (shard, key) = match keys.is_valid(row) {
                true => (shard_of(keys.value(row)), keys.value(row)),
                false => (SHARDS, 0),
            };
            let staged = &mut self.staged[shard];
            staged.keys.push(key);
            for codes in &self.scratch {
                staged.codes.push(codes[row] as u32);
            }
            for m in &metrics {
                let valid = m.is_valid(row);
                staged.metrics.push(if valid { m.value(row) } else { 0.0 });
                staged.valid.push(valid);
            }
        }
        Ok(())
    }
}

/// One shard of a reduction: its companies and their reduced rows.
struct Shard {
    companies: Companies,
    entries: Entries,
}

/// A shard's companies: each with the chain of its entries; or, where a company keeps
/// nothing but being there (no GROUP BY column, no metric: one empty entry each, as
/// another partner's table joined on its key alone reduces), their ids alone, half the
/// memory and no entries: each stands for the shard's one empty entry ([`ONE`]).
enum Companies {
    Chains(FastMap<Chain>),
    Keys(FastSet),
}

/// The chain of a company in a shard of [`Companies::Keys`]: its one entry, empty.
const ONE: Chain = Chain { head: 0, len: 1 };

impl Companies {
    fn get(&self, key: &u64) -> Option<Chain> {
        match self {
            Companies::Chains(m) => m.get(key).copied(),
            Companies::Keys(s) => s.contains(key).then_some(ONE),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Companies::Chains(m) => m.capacity() * (size_of::<u64>() + size_of::<Chain>() + 1),
            Companies::Keys(s) => s.capacity() * (size_of::<u64>() + 1),
        }
    }
}

/// A table instance reduced per company (see the module's doc), from the [`Folder`]s of its
/// input partitions. Its input batches are the key (entity ids), its GROUP BY columns and
/// its metrics as `Float64`, in [`Part`] order.
pub(crate) struct Reduction {
    values: Vec<Values>,
    shards: Vec<Shard>,
    /// Rows with a null key: one company when the question reads one table instance (as a
    /// GROUP BY on the key makes it), none in a join (a null key equals nothing).
    null: (Chain, Entries),
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

/// Where [`Entries::stage`] finds a row's company: the one chain of the rows without a key,
/// or a shard's companies.
enum Chains<'a> {
    One(&'a mut Chain),
    ByKey(&'a mut FastMap<Chain>),
}

impl Chains<'_> {
    fn of(&mut self, key: u64) -> &mut Chain {
        match self {
            Chains::One(chain) => chain,
            Chains::ByKey(companies) => companies.entry(key).or_insert(EMPTY),
        }
    }
}

/// One partition's staged rows of one shard, and per GROUP BY column the codes its own
/// codes stand for in the reduction.
type Input<'a> = (Staged, &'a [Vec<u32>]);

impl Reduction {
    /// The reduction of the rows `folders` staged, keeping at most `limit` rows per company
    /// (L), its shards built on `threads` threads.
    pub fn finish(
        mut folders: Vec<Folder>,
        limit: u32,
        threads: usize,
    ) -> Result<Reduction, QueryError> {
        let (fields, outputs, width) = match folders.first() {
            Some(f) => (f.fields.clone(), f.outputs.clone(), f.metrics),
            None => return Err(internal("no partition folded")),
        };
        let dims = fields.len();
        // Per GROUP BY column: every partition's values interned once more, ranked by their
        // order; each partition's codes mapped to those ranks.
        let mut values = Vec::with_capacity(dims);
        let mut remaps: Vec<Vec<Vec<u32>>> = vec![Vec::with_capacity(dims); folders.len()];
        for (d, field) in fields.iter().enumerate() {
            let mut all = interner(field)?;
            let mut global = Vec::with_capacity(folders.len());
            for f in folders.iter_mut() {
                let local = emitted(f.interners[d].as_mut(), field)?;
                let mut ids = Vec::new();
                if !local.is_empty() {
                    all.intern(&[local], &mut ids)?;
                }
                global.push(ids);
            }
            let distinct = emitted(all.as_mut(), field)?;
            if distinct.len() >= NONE as usize {
                return Err(internal("too many distinct values"));
            }
            let converter = RowConverter::new(vec![SortField::new(field.data_type().clone())])?;
            let rows = converter.convert_columns(std::slice::from_ref(&distinct))?;
            let mut order: Vec<u32> = (0..distinct.len() as u32).collect();
            order.sort_unstable_by(|&a, &b| rows.row(a as usize).cmp(&rows.row(b as usize)));
            let mut rank = vec![0u32; order.len()];
            for (r, &g) in order.iter().enumerate() {
                rank[g as usize] = r as u32;
            }
            for (f, ids) in global.iter().enumerate() {
                remaps[f].push(ids.iter().map(|&g| rank[g]).collect());
            }
            let order = UInt32Array::from(order);
            values.push(Values {
                sorted: take(distinct.as_ref(), &order, None)?,
                output: outputs[d].clone(),
            });
        }
        let template = Entries {
            limit: if dims == 0 { 1 } else { limit.max(1) },
            dims,
            metrics: width,
            codes: Vec::new(),
            sums: Vec::new(),
            counts: Vec::new(),
            next: Vec::new(),
        };
        // Shard by shard, every partition's rows of it (each shard's staged rows are freed
        // once it is built).
        let mut inputs: Vec<Vec<Input<'_>>> = (0..=SHARDS).map(|_| Vec::new()).collect();
        for (f, folder) in folders.iter_mut().enumerate() {
            for (s, staged) in folder.staged.iter_mut().enumerate() {
                inputs[s].push((std::mem::take(staged), &remaps[f]));
            }
        }
        let null = inputs
            .pop()
            .ok_or_else(|| internal("the rows without a key"))?;
        let mut null_entries = template.empty();
        let mut null_chain = EMPTY;
        for (staged, remap) in null {
            null_entries.stage(&staged, remap, Chains::One(&mut null_chain));
        }
        let threads = threads.clamp(1, SHARDS);
        let template = &template;
        let built: Vec<Option<Vec<(usize, Shard)>>> = std::thread::scope(|s| {
            let mut lanes: Vec<Vec<(usize, Vec<Input<'_>>)>> =
                (0..threads).map(|_| Vec::new()).collect();
            for (i, input) in inputs.into_iter().enumerate() {
                lanes[i % threads].push((i, input));
            }
            let handles: Vec<_> = lanes
                .into_iter()
                .map(|lane| {
                    s.spawn(move || {
                        lane.into_iter()
                            .map(|(i, input)| (i, build(input, template)))
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
        Ok(Reduction {
            values,
            shards: built.into_iter().map(|(_, s)| s).collect(),
            null: (null_chain, null_entries),
        })
    }

    /// Reduced rows held.
    pub fn rows(&self) -> usize {
        self.null.1.next.len()
            + (self.shards.iter())
                .map(|s| match &s.companies {
                    Companies::Keys(keys) => keys.len(),
                    Companies::Chains(_) => s.entries.next.len(),
                })
                .sum::<usize>()
    }

    /// Bytes held: shards built, values.
    pub fn bytes(&self) -> usize {
        self.null.1.bytes()
            + (self.shards.iter())
                .map(|s| s.companies.bytes() + s.entries.bytes())
                .sum::<usize>()
            + self.values.iter().map(Values::bytes).sum::<usize>()
    }
}

/// One shard built from its partitions' staged rows.
fn build(input: Vec<Input<'_>>, template: &Entries) -> Shard {
    let rows = reserved_for_ids(input.iter().flat_map(|(s, _)| s.keys.iter().copied()));
    let mut entries = template.empty();
    if template.dims == 0 && template.metrics == 0 {
        let mut keys = FastSet::default();
        keys.reserve(rows);
        for (staged, _) in input {
            // One by one: `extend` would reserve for every row it is given.
            for &key in &staged.keys {
                keys.insert(key);
            }
        }
        entries.next.push(NONE);
        return Shard {
            companies: Companies::Keys(keys),
            entries,
        };
    }
    let mut companies = FastMap::default();
    companies.reserve(rows);
    for (staged, remap) in input {
        entries.stage(&staged, remap, Chains::ByKey(&mut companies));
    }
    Shard {
        companies: Companies::Chains(companies),
        entries,
    }
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

    /// Places `staged`'s rows, their codes mapped by `remap` (per GROUP BY column), in their
    /// companies' chains.
    fn stage(&mut self, staged: &Staged, remap: &[Vec<u32>], mut chains: Chains<'_>) {
        let (dims, width) = (self.dims, self.metrics);
        let mut tuple = vec![0u32; dims];
        for (r, &key) in staged.keys.iter().enumerate() {
            for (d, code) in tuple.iter_mut().enumerate() {
                *code = remap[d][staged.codes[r * dims + d] as usize];
            }
            if let Some(e) = self.place(chains.of(key), &tuple) {
                let at = r * width;
                self.add(
                    e,
                    (at..at + width).map(|i| staged.valid[i].then(|| staged.metrics[i])),
                );
            }
        }
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
    fn place(&mut self, chain: &mut Chain, tuple: &[u32]) -> Option<u32> {
        let dims = tuple.len();
        let mut last = NONE;
        let mut e = chain.head;
        while e != NONE {
            let at = e as usize * dims;
            if self.codes[at..at + dims] == *tuple {
                return Some(e);
            }
            if last == NONE || self.order(last, &self.codes[at..at + dims]) == Ordering::Less {
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
        if self.order(last, tuple) != Ordering::Greater {
            return None;
        }
        let at = last as usize * dims;
        self.codes[at..at + dims].copy_from_slice(tuple);
        let m = last as usize * self.metrics;
        self.sums[m..m + self.metrics].fill(0.0);
        self.counts[m..m + self.metrics].fill(0);
        Some(last)
    }

    /// How entry `e`'s GROUP BY values compare with `tuple`'s (codes are ranks).
    fn order(&self, e: u32, tuple: &[u32]) -> Ordering {
        let at = e as usize * tuple.len();
        self.codes[at..at + tuple.len()].cmp(tuple)
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

/// Most tuples of GROUP BY codes [`Groups`] index densely (256 KiB of indices).
const DENSE_GROUPS: u64 = 1 << 16;

/// The totals of the groups met so far: per group its GROUP BY codes, companies, and per
/// aggregate the grid total (null while no company had a value) and how many had one.
struct Groups {
    /// Groups by their codes as one number (codes are ranks below each column's count of
    /// values: a mixed-radix number of `strides`), where the counts' product fits; else by
    /// their codes.
    strides: Option<Vec<u64>>,
    /// Where there are at most [`DENSE_GROUPS`] tuples of codes: per packed tuple, its
    /// group (`NONE`: none yet), looked up without hashing.
    dense: Option<Vec<u32>>,
    packed: FastMap<usize>,
    index: HashMap<Vec<u32>, usize>,
    tuples: Vec<Vec<u32>>,
    companies: Vec<i64>,
    sums: Vec<Option<i64>>,
    counts: Vec<i64>,
}

impl Groups {
    /// No groups yet, of GROUP BY columns with `counts` values each.
    fn new(counts: &[usize]) -> Groups {
        let mut strides = Vec::with_capacity(counts.len());
        let mut product: Option<u64> = Some(1);
        for &n in counts.iter().rev() {
            strides.push(product.unwrap_or(0));
            product = product.and_then(|p| p.checked_mul(n.max(1) as u64));
        }
        strides.reverse();
        Groups {
            dense: product
                .filter(|&p| p <= DENSE_GROUPS)
                .map(|p| vec![NONE; p as usize]),
            strides: product.map(|_| strides),
            packed: FastMap::default(),
            index: HashMap::new(),
            tuples: Vec::new(),
            companies: Vec::new(),
            sums: Vec::new(),
            counts: Vec::new(),
        }
    }

    /// The index of the group of `tuple`, added if new.
    fn of(&mut self, tuple: &[u32], aggs: usize) -> usize {
        let g = self.companies.len();
        match &self.strides {
            Some(strides) => {
                let key: u64 = (tuple.iter().zip(strides))
                    .map(|(&c, &s)| u64::from(c) * s)
                    .sum();
                if let Some(dense) = &mut self.dense {
                    match dense[key as usize] {
                        NONE => dense[key as usize] = g as u32,
                        known => return known as usize,
                    }
                } else {
                    match self.packed.entry(key) {
                        std::collections::hash_map::Entry::Occupied(e) => return *e.get(),
                        std::collections::hash_map::Entry::Vacant(e) => e.insert(g),
                    };
                }
            }
            None => {
                if let Some(&g) = self.index.get(tuple) {
                    return g;
                }
                self.index.insert(tuple.to_vec(), g);
            }
        }
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

/// Where each GROUP BY column and each aggregate comes from.
struct Layout {
    /// Per GROUP BY column: (instance, its position there).
    dims: Vec<(usize, usize)>,
    /// Per aggregate: (instance, position, average) of a metric, `None` for a count.
    metrics: Vec<Option<(usize, usize, bool)>>,
    /// Per GROUP BY column: how many values it has.
    counts: Vec<usize>,
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
        let counts = (dims.iter())
            .map(|&(t, d)| instances[t].reduction.values[d].sorted.len())
            .collect();
        Ok(Layout {
            dims,
            metrics,
            counts,
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
        let mut groups = Groups::new(&layout.counts);
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
            for &(t, d) in &self.layout.dims {
                let e = chains[t].1;
                self.tuples
                    .push(e.codes[self.cursor[t] as usize * e.dims + d]);
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
        match &unit.companies {
            Companies::Chains(m) => {
                self.companies(instances, s, unit, m.iter().map(|(k, c)| (*k, *c)), stop)
            }
            Companies::Keys(keys) => {
                self.companies(instances, s, unit, keys.iter().map(|&k| (k, ONE)), stop)
            }
        }
    }

    /// The privacy unit's `companies` of its shard `unit` (number `s`), each with its chain
    /// there, found in every instance.
    fn companies(
        &mut self,
        instances: &[Instance],
        s: usize,
        unit: &Shard,
        companies: impl Iterator<Item = (u64, Chain)>,
        stop: &Stop,
    ) -> Result<(), QueryError> {
        let mut chains: Vec<(Chain, &Entries)> = Vec::with_capacity(instances.len());
        for (n, (key, chain)) in companies.enumerate() {
            if n % STOP_EVERY == 0 && stop.requested() {
                return Err(Stop::error().into());
            }
            chains.clear();
            for (t, inst) in instances.iter().enumerate() {
                let shard = &inst.reduction.shards[s];
                if t == self.totals.unit {
                    chains.push((chain, &unit.entries));
                } else if let Some(c) = shard.companies.get(&key) {
                    chains.push((c, &shard.entries));
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
    let partial = on_lanes(threads, |_, shards| {
        let mut walk = Walk::new(&layout, totals, tables);
        for s in shards {
            walk.shard(instances, s, stop)?;
        }
        Ok::<_, QueryError>(walk.groups)
    });
    // Each part holds the one row of a question without GROUP BY (`Walk::new`).
    let mut groups = Groups::new(&layout.counts);
    for p in partial {
        groups.merge(p.unwrap_or_else(|_| Err(internal("a join thread")))?, aggs);
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
        let array = values.array(order.iter().map(|&g| groups.tuples[g][n]))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{DictionaryArray, StringArray, UInt64Array};
    use datafusion::arrow::datatypes::Int8Type;

    /// A table instance that keeps its companies alone (no GROUP BY column, no metric) holds
    /// them as sets of ids: each company once, duplicates and rows without a key not, in
    /// less memory than chains of entries would take, and found by the join as one entry.
    #[test]
    fn a_reduction_of_keys_alone_holds_each_company_once() {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::UInt64, true)]));
        let id = |i: u64| (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let partition = |from: u64| {
            let mut folder = Folder::new(&schema, 0).unwrap();
            // 3000 rows: 1000 companies three times each, and a row without a key.
            let ids: UInt64Array = (0..3000u64)
                .map(|i| Some(id(from + i % 1000)))
                .chain([None])
                .collect();
            let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids)]).unwrap();
            folder.fold(&batch).unwrap();
            folder
        };
        // Two partitions sharing 500 companies: 1500 in all, and the rows without a key
        // (one company of their own when a question reads one table instance).
        let reduction = Reduction::finish(vec![partition(0), partition(500)], 3, 2).unwrap();
        assert_eq!(reduction.rows(), 1500 + 1);
        assert!(
            reduction
                .shards
                .iter()
                .all(|s| matches!(s.companies, Companies::Keys(_)))
        );
        // As bytes and back (sealed beside a version): the same companies, and the rows
        // without a key.
        let back = Reduction::decode_keys(&reduction.encode_keys().expect("keys")).unwrap();
        assert_eq!(back.rows(), reduction.rows());
        assert_eq!(
            (back.null.0.head, back.null.0.len, &back.null.1.next),
            (
                reduction.null.0.head,
                reduction.null.0.len,
                &reduction.null.1.next
            )
        );
        for (b, r) in back.shards.iter().zip(&reduction.shards) {
            let (Companies::Keys(b), Companies::Keys(r)) = (&b.companies, &r.companies) else {
                unreachable!()
            };
            assert_eq!(b, r);
        }
        // One partition (as a version's companies are reduced after its upload): its sets
        // hold room for half its 3000 rows, not one slot a row, and in less memory than
        // the same companies as chains of entries (one metric makes them chains).
        let alone = Reduction::finish(vec![partition(0)], 3, 2).unwrap();
        let slots: usize = (alone.shards.iter())
            .map(|s| match &s.companies {
                Companies::Keys(keys) => keys.capacity(),
                Companies::Chains(_) => unreachable!(),
            })
            .sum();
        assert!(
            slots < 3000,
            "{slots} slots for 3000 rows of 1000 companies"
        );
        let with_metric = Arc::new(Schema::new(vec![
            Field::new("k", DataType::UInt64, true),
            Field::new("m", DataType::Float64, true),
        ]));
        let mut folder = Folder::new(&with_metric, 0).unwrap();
        let ids: UInt64Array = (0..3000u64)
            .map(|i| Some(id(i % 1000)))
            .chain([None])
            .collect();
        let metric = Float64Array::from(vec![None::<f64>; 3001]);
        let batch =
            RecordBatch::try_new(with_metric, vec![Arc::new(ids), Arc::new(metric)]).unwrap();
        folder.fold(&batch).unwrap();
        let chains = Reduction::finish(vec![folder], 3, 2).unwrap();
        assert_eq!(chains.rows(), alone.rows());
        assert!((chains.shards.iter()).all(|s| matches!(s.companies, Companies::Chains(_))));
        assert!(alone.bytes() < chains.bytes());
        assert!(
            chains.encode_keys().is_none(),
            "chains are not sealed as keys"
        );
        let found = (0..2000u64)
            .filter(|&i| {
                let key = id(i);
                reduction.shards[shard_of(key)]
                    .companies
                    .get(&key)
                    .is_some()
            })
            .count();
        assert_eq!(found, 1500);
        assert_eq!(
            reduction.shards[shard_of(id(7))]
                .companies
                .get(&id(7))
                .map(|c| (c.head, c.len)),
            Some((0, 1))
        );
    }

    /// Groups are indexed densely up to [`DENSE_GROUPS`] tuples of codes and by hash past
    /// that: the same tuples met in the same order make the same groups either way.
    #[test]
    fn groups_are_the_same_indexed_densely_or_hashed() {
        let mut dense = Groups::new(&[250, 200]);
        let mut hashed = Groups::new(&[300, 300]);
        assert!(dense.dense.is_some());
        assert!(hashed.dense.is_none() && hashed.strides.is_some());
        // 3000 rows of 1000 distinct tuples, each met three times.
        for i in 0..3000u32 {
            let tuple = [i * 7 % 250, i * 13 % 200];
            let (d, h) = (dense.of(&tuple, 1), hashed.of(&tuple, 1));
            assert_eq!(d, h);
            dense.companies[d] += 1;
            hashed.companies[h] += 1;
        }
        assert_eq!(dense.tuples.len(), 1000);
        assert_eq!(dense.tuples, hashed.tuples);
        assert_eq!(dense.companies, hashed.companies);
        assert!(dense.companies.iter().all(|&n| n == 3));
    }

    /// Two partitions of 100 distinct values each in an `Int8`-keyed dictionary: 200 in all,
    /// more than its keys reach. Interned as their values, they reduce; as a dictionary they
    /// would fail, and whether they did would depend on the rows.
    #[test]
    fn a_dictionary_column_with_more_values_than_its_keys_reach_is_reduced() {
        let dictionary = DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8));
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::UInt64, true),
            Field::new("d", dictionary, true),
        ]));
        let partition = |from: usize| {
            let mut folder = Folder::new(&schema, 1).unwrap();
            let ids =
                (from..from + 100).map(|i| (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let names: Vec<String> = (from..from + 100)
                .rev()
                .map(|i| format!("v{i:03}"))
                .collect();
            let values: DictionaryArray<Int8Type> = names.iter().map(String::as_str).collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(UInt64Array::from_iter_values(ids)),
                    Arc::new(values),
                ],
            )
            .unwrap();
            folder.fold(&batch).unwrap();
            folder
        };
        let reduction = Reduction::finish(vec![partition(0), partition(100)], 1, 2).unwrap();
        assert_eq!(reduction.rows(), 200);
        assert_eq!(reduction.values[0].sorted.len(), 200);
        // Codes are ranks: the first three values in order, in the dictionary's value type.
        let first = reduction.values[0].array(0..3).unwrap();
        let first = first.as_any().downcast_ref::<StringArray>().unwrap();
        let first: Vec<&str> = first.iter().map(Option::unwrap).collect();
        assert_eq!(first, ["v000", "v001", "v002"]);
    }
}
