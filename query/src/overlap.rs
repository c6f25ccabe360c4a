//! Overlap counts: how many companies two partners' datasets have in common, per pair of
//! populations and optionally per value of a shared dimension (the account-mapping matrix).
//!
//! The matrix is a fixed-shape question, so it does not go through SQL: each side is read
//! once, straight from its verified batches (key column as entity ids), and reduced to one
//! entry per company before the two sides meet.
//!
//! ```text
//! side   := entity -> bitmask of the populations any of its rows is in (definition order)
//!           [+ the dimension values of its rows]           (duplicates are one entity)
//! fold   := a name-only entity (rows without a usable website, keyed by their name) whose
//!           name is carried by exactly one website entity of the same list is that entity
//! join   := the smaller side's entities probed in the larger side's map (two name-only
//!           entities placed apart, as for a link below, do not match)
//! link   := a name-only entity left unmatched, whose name no website entity of its own list
//!           carries, is the other side's entity carrying that name if exactly one does (and
//!           that entity is not in its own list), unless both lists have places of the same
//!           kinds and the two entities each have one known place, and they differ. A website
//!           entity carries one name: the smallest name id of its rows, so no two names can
//!           claim it. An entity's place comes from its own rows only (a fold does not
//!           change it), so whether a pair passes depends on the pair alone.
//! cells  := a common entity counts in the cells (population a, population b [, value]) in
//!           the order (a's position, b's position, value), at most L of them. The value is
//!           one both sides agree on, or null when they share none.
//! release:= per cell, discrete Gaussian noise of standard deviation Δ₂/ε (the whole
//!           matrix is one release, of L2 sensitivity Δ₂), and the release rule of every
//!           answer: >= k exact entities and a noisy count >= k - 1 + the
//!           partition-selection threshold for S.
//! ```
//!
//! S is the matrix's sensitivity: how much one company's rows can change the cells (L1;
//! the L2 sensitivity is at most √(S · the most one cell can change)).
//! Without names a company is its own pair only: S = L. With names, its presence also
//! decides folds and links of other entities carrying its one name; working through the
//! cases (website company: its pair, the pair of the other side's name-only entity that
//! links to the remaining carrier or stops matching, the fold of its own side's name-only
//! entity into that carrier; name-only company: its pair or its fold) bounds the change by
//! 4L cells in all and 4 in any one cell (a pair that appears or goes moves at most L cells,
//! a pair whose populations change through a fold at most 2L, and the cases add up to at
//! most 4L): S = [`NAME_SENSITIVITY`] x L. Places veto matches by name per pair, from the
//! two entities' own rows, after the carrier is chosen: the matches can only be fewer, and
//! one company changes a subset of the ones it changed without places.
//!
//! Both partners get the same numbers for the same cell: every population of both datasets
//! takes part in the bounding (whatever subset a caller is shown), the sides come in a
//! canonical order chosen by the service, and each cell's noise is keyed by the question and
//! the cell's names in that order, never by who asks.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, StringArray, UInt64Array};
use datafusion::arrow::compute::{cast, prep_null_mask_filter};
use datafusion::arrow::datatypes::{DataType, UInt64Type};
use datafusion::arrow::record_batch::RecordBatch;
pub use datafusion::physical_expr::PhysicalExpr;

use crate::QueryError;
use crate::exec::{Applied, release_threshold};
use crate::hashing::{FastMap, SHARDS, Sharded, on_lanes, reserved_for_ids, shard_of};
use crate::noise::{Noise, Sensitivity, Variance};

mod kept;
pub use kept::FORMAT as KEPT_FORMAT;

/// Populations of one dataset that can take part in a matrix (one bit each).
pub const MAX_POPULATIONS: usize = 64;

/// How many pairs one company can change when names fold and link (see the module docs).
pub const NAME_SENSITIVITY: u32 = 4;

/// Dimension values one company keeps on one side of a breakdown (its smallest); a company
/// counts in at most L cells anyway.
pub const MAX_VALUES_PER_COMPANY: usize = 16;

/// No name (a name id is a keyed 64-bit hash; 0 stands for none, a 2^-64 loss).
const NO_NAME: u64 = 0;

/// No known place (place ids are keyed 64-bit hashes, as names).
const NO_PLACE: u64 = 0;

/// Rows of one entity in different places.
const MIXED_PLACES: u64 = u64::MAX;

/// Places compared on name links: the column of place ids and the kinds of place it holds.
pub struct Places {
    /// Index of the place ids (`UInt64`; null where the row's place is not known).
    pub index: usize,
    /// The kinds of its place columns (e.g. `country,region`): two lists' places are
    /// compared only when their kinds are the same.
    pub kinds: String,
}

/// One side of a matrix: how to read a dataset version's batches.
pub struct Side {
    /// Every population of the dataset, in definition order, compiled over the schema the
    /// version executes with ([`crate::population::compile`]).
    pub populations: Vec<Arc<dyn PhysicalExpr>>,
    /// Index of the key column (entity ids, `UInt64`).
    pub key_index: usize,
    /// Index of the dimension column of a breakdown.
    pub dimension: Option<usize>,
    /// Index of the name ids (`UInt64`): per row, the entity id its name (with its context)
    /// would have as a name-only key, null without a name. A row whose entity id equals its
    /// name id is name-only. `None`: no name fallback, nothing folds or links.
    pub names: Option<usize>,
    /// Places of the rows, compared on name links (with `names` only).
    pub places: Option<Places>,
}

const NO_VALUE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Member {
    mask: u64,
    /// First dimension value seen (interned), or `NO_VALUE`.
    value: u32,
    /// A name-only entity whose name no website entity of its list carries: it may link to
    /// the other side by name.
    linkable: bool,
    /// Keyed by its name (its rows have no usable website).
    name_only: bool,
    /// A website entity's name: the smallest name id of its rows, or `NO_NAME`.
    name: u64,
    /// The place of its own rows: `NO_PLACE` when none is known, `MIXED_PLACES` when they
    /// name several.
    place: u64,
}

impl Member {
    const EMPTY: Member = Member {
        mask: 0,
        value: NO_VALUE,
        linkable: false,
        name_only: false,
        name: NO_NAME,
        place: NO_PLACE,
    };
}

/// Whether two entities' places allow a name link: unless each has one known place and
/// they differ.
fn places_agree(x: u64, y: u64) -> bool {
    x == y || [x, y].iter().any(|p| *p == NO_PLACE || *p == MIXED_PLACES)
}

/// One side reduced to its entities: the populations each is in and, for a breakdown, its
/// dimension values.
#[derive(Debug, Default)]
pub struct Membership {
    /// Every entity of the list, in a population or not (mask 0: counts in no cell, but is
    /// a company of the list when names link).
    members: Sharded<Member>,
    /// Read with a name column: names fold and link.
    named: bool,
    /// The kinds of the places read (see [`Places`]).
    place_kinds: Option<String>,
    /// Name-only entities folded into a website entity of the list: from -> into.
    folded: FastMap<u64>,
    /// Entities whose rows carry more than one dimension value: all of them.
    more_values: FastMap<Vec<u32>>,
    /// Interned dimension values.
    values: Vec<String>,
    index: HashMap<String, u32>,
    /// The most its reduction held (bytes, as checked against its limit): a side read back
    /// ([`Membership::decode`]) is refused under a limit its reduction would have exceeded.
    peak: usize,
}

impl Membership {
    /// Entities in at least one population.
    pub fn entities(&self) -> usize {
        self.members.values().filter(|m| m.mask != 0).count()
    }

    /// The entity a row keyed `id` counts as: its own, or the one its name folded into.
    pub fn entity_of(&self, id: u64) -> u64 {
        self.folded.get(&id).copied().unwrap_or(id)
    }

    /// Name-only entities folded into a website entity of the list.
    pub fn folded(&self) -> usize {
        self.folded.len()
    }

    /// Memory held (estimate: table slots, value lists and interned values).
    pub fn memory_bytes(&self) -> usize {
        let slot = size_of::<(u64, Member)>() + 1;
        let list = size_of::<(u64, Vec<u32>)>() + 1;
        self.members.capacity() * slot
            + self.folded.capacity() * (size_of::<(u64, u64)>() + 1)
            + self.more_values.capacity() * list
            + self
                .more_values
                .values()
                .map(|v| v.capacity() * 4)
                .sum::<usize>()
            + self.values.iter().map(|v| 2 * v.len() + 64).sum::<usize>()
    }

    fn intern(&mut self, v: &str) -> u32 {
        if let Some(&i) = self.index.get(v) {
            return i;
        }
        let i = self.values.len() as u32;
        self.values.push(v.to_string());
        self.index.insert(v.to_string(), i);
        i
    }

    /// Fold name-only entities into the one website entity of this list that carries their
    /// name; a name-only entity whose name several website entities carry stays on its own
    /// and never links (which company it is cannot be told).
    fn fold_names(&mut self) {
        let linkable = self
            .members
            .iter()
            .filter(|(_, m)| m.linkable)
            .map(|(id, _)| *id);
        for (name, carrier) in carriers(linkable, &self.members) {
            match carrier {
                Carrier::Nobody => {}
                Carrier::Several => {
                    if let Some(m) = self.members.get_mut(&name) {
                        m.linkable = false;
                    }
                }
                Carrier::One(target) => {
                    let Some(from) = self.members.remove(&name) else {
                        continue;
                    };
                    let values = self.values_of(name, &from);
                    self.more_values.remove(&name);
                    self.folded.insert(name, target);
                    let m = self.members.entry(target).or_insert(Member::EMPTY);
                    m.mask |= from.mask;
                    for v in values {
                        add_value(m, &mut self.more_values, target, v);
                    }
                }
            }
        }
    }

    /// Keep at most [`MAX_VALUES_PER_COMPANY`] dimension values per entity, its smallest:
    /// counting a company intersects its values on both sides, so the time that takes
    /// stays bounded whatever one list holds for one company (its own share of the time
    /// would otherwise grow with the values the caller gave it, but only when it matched).
    fn cap_values(&mut self) {
        let values = &self.values;
        for all in self.more_values.values_mut() {
            if all.len() > MAX_VALUES_PER_COMPANY {
                all.sort_unstable_by(|x, y| values[*x as usize].cmp(&values[*y as usize]));
                all.truncate(MAX_VALUES_PER_COMPANY);
            }
        }
    }

    fn values_of(&self, id: u64, m: &Member) -> Vec<u32> {
        match self.more_values.get(&id) {
            Some(all) => all.clone(),
            None if m.value != NO_VALUE => vec![m.value],
            None => Vec::new(),
        }
    }
}

/// A row of one side, staged in its entity's shard ([`memberships`]): 40 bytes, a side's
/// rows all staged before its shards are built.
struct Staged {
    id: u64,
    mask: u64,
    /// `NO_NAME` for none.
    name: u64,
    /// `NO_PLACE` for none.
    place: u64,
    value: u32,
}

/// Record that entity `id` (member `m`) has dimension value `value`.
fn add_value(m: &mut Member, more_values: &mut FastMap<Vec<u32>>, id: u64, value: u32) {
    if value == NO_VALUE || m.value == value {
        return;
    }
    if m.value == NO_VALUE {
        m.value = value;
        return;
    }
    let first = m.value;
    let all = more_values.entry(id).or_insert_with(|| vec![first]);
    if !all.contains(&value) {
        all.push(value);
    }
}

fn internal(m: impl Into<String>) -> QueryError {
    QueryError::Internal(m.into())
}

/// A side that needs more than its limit of `memory_limit` bytes.
fn over_limit(memory_limit: usize) -> QueryError {
    QueryError::ResourcesExhausted(format!(
        "the overlap of a dataset needs more than the per-query limit of {} MiB",
        memory_limit >> 20
    ))
}

/// Reduce one side's batches to its entities. Rows without an entity id (unmatched keys) and
/// rows in no population count nowhere. Fails with [`QueryError::ResourcesExhausted`] when
/// the reduced side outgrows `memory_limit` bytes.
pub fn memberships(
    side: &Side,
    batches: impl Iterator<Item = Result<RecordBatch, String>> + Send,
    memory_limit: usize,
) -> Result<Membership, QueryError> {
    if side.populations.len() > MAX_POPULATIONS {
        return Err(too_many_populations());
    }
    let mut out = Membership {
        named: side.names.is_some(),
        place_kinds: side
            .places
            .as_ref()
            .filter(|_| side.names.is_some())
            .map(|p| p.kinds.clone()),
        ..Membership::default()
    };
    let over = || over_limit(memory_limit);
    // Rows are staged in their entity's shard as they come, then each shard is built on its
    // own: its entities fit in a core's cache while it is (one table of them all would
    // take a cache miss per row). Batches are staged on two threads, each pulling the next
    // batch and staging it in shards of its own; on one when a breakdown's values are
    // interned (their codes follow the order rows come in). Without values, what a shard's
    // rows build does not depend on their order (see `build_shard`).
    let workers = if side.dimension.is_some() {
        1
    } else {
        STAGE_THREADS
    };
    let base = out.memory_bytes();
    let mut parts: Vec<Vec<Vec<Staged>>> = Vec::with_capacity(workers);
    if workers == 1 {
        let (mut staged, mut masks) = staging::<Staged>();
        for batch in batches {
            let batch = batch.map_err(internal)?;
            stage(side, &batch, &mut masks, &mut staged, &mut |v| {
                out.intern(v)
            })?;
            if out.memory_bytes() + held(&staged) > memory_limit {
                return Err(over());
            }
        }
        parts.push(staged);
    } else {
        let limit = (base, memory_limit);
        let lanes = on_batches(
            workers,
            batches,
            limit,
            staging,
            |(staged, masks), batch| {
                stage(side, batch, masks, staged, &mut |_| NO_VALUE)?;
                Ok(held(staged))
            },
        )?;
        parts.extend(lanes.into_iter().map(|(staged, _)| staged));
    }
    // The most staging held: what was checked last (staged bytes only grow).
    out.peak = out.memory_bytes() + parts.iter().map(|p| held(p)).sum::<usize>();
    let built = by_shard(parts, |s, rows| {
        let (members, more_values) = build_shard(rows);
        (s, members, more_values)
    });
    for lane in built {
        let lane = lane.map_err(|_| internal("overlap: a thread building shards"))?;
        for (s, members, more_values) in lane {
            *out.members.shard_mut(s) = members;
            out.more_values.extend(more_values);
        }
    }
    out.peak = out.peak.max(out.memory_bytes());
    if out.peak > memory_limit {
        return Err(over());
    }
    out.fold_names();
    out.cap_values();
    Ok(out)
}

impl Membership {
    /// This side as [`memberships`] reduces the same rows over other populations, without
    /// reducing them again: population `j` of the new side is the one at `kept[j]` among
    /// this side's (the same filter over the same rows) or, where that is `None`, the next of
    /// `added.populations`, evaluated over `batches` (the key column and what those filters
    /// read; not read when there is none). For a side without a breakdown only.
    ///
    /// Why it is the reduced side: what a reduction keeps of an entity (that it is one, its
    /// name, its place, whether it is name-only) and which name-only entities fold into which
    /// come from the rows' keys, names and places, never from the populations; an entity's
    /// mask is the union of its rows' masks and of the entities' folded into it. So a kept
    /// population's bit moves to its new place, and a new population's bit is set on the
    /// entity each of its rows counts as ([`Membership::entity_of`]). The peak is the
    /// reduction's too: its staging holds every row with an id and its table every entity,
    /// whatever the populations; the side is refused under a limit the reduction would
    /// have been refused under. What this holds beside the side it starts from is a copy of
    /// that side (about the reduction's table) and 16 bytes per row of a new population
    /// (a reduction stages 40 bytes per row of every population).
    pub fn repopulated(
        &self,
        kept: &[Option<usize>],
        added: &Side,
        batches: impl Iterator<Item = Result<RecordBatch, String>> + Send,
        memory_limit: usize,
    ) -> Result<Membership, QueryError> {
        if kept.len() > MAX_POPULATIONS {
            return Err(too_many_populations());
        }
        let breakdown = added.dimension.is_some() || !self.values.is_empty();
        let new_bits: Vec<usize> = (kept.iter().enumerate())
            .filter(|(_, k)| k.is_none())
            .map(|(j, _)| j)
            .collect();
        if breakdown
            || new_bits.len() != added.populations.len()
            || kept.iter().flatten().any(|i| *i >= MAX_POPULATIONS)
        {
            return Err(internal(
                "overlap: a side repopulated other than it was reduced",
            ));
        }
        if self.peak > memory_limit {
            return Err(over_limit(memory_limit));
        }
        // Rows of the new populations, each as (its entity, its new bits), in the entity's
        // shard, staged on two threads.
        let mut staged: Vec<Vec<NewBits>> = Vec::new();
        if !new_bits.is_empty() {
            let lanes = on_batches(
                STAGE_THREADS,
                batches,
                (0, usize::MAX),
                staging,
                |state: &mut (Vec<NewBits>, Vec<u64>), batch| {
                    let (rows, masks) = state;
                    let ids = entity_ids(batch, added.key_index)?;
                    masks_of(&added.populations, batch, masks, |i| new_bits[i])?;
                    for (i, &mask) in masks.iter().enumerate() {
                        if mask != 0 && ids.is_valid(i) {
                            let entity = self.entity_of(ids.value(i));
                            rows[shard_of(entity)].push((entity, mask));
                        }
                    }
                    Ok(0)
                },
            )?;
            staged.extend(lanes.into_iter().map(|(rows, _)| rows));
        }
        let moves: Vec<(usize, usize)> = (kept.iter().enumerate())
            .filter_map(|(j, k)| k.map(|i| (i, j)))
            .collect();
        let remap = |mask: u64| {
            (moves.iter()).fold(0u64, |m, &(from, to)| m | (((mask >> from) & 1) << to))
        };
        let built = by_shard(staged, |s, rows| {
            let mut members = self.members.shard(s).clone();
            for m in members.values_mut() {
                m.mask = remap(m.mask);
            }
            for (entity, mask) in rows.into_iter().flatten() {
                let m = members
                    .get_mut(&entity)
                    .ok_or_else(|| internal("overlap: a row of an entity the side lacks"))?;
                m.mask |= mask;
            }
            Ok::<_, QueryError>((s, members))
        });
        let mut out = Membership {
            named: self.named,
            place_kinds: self.place_kinds.clone(),
            folded: self.folded.clone(),
            peak: self.peak,
            ..Membership::default()
        };
        for lane in built {
            let lane = lane.map_err(|_| internal("overlap: a thread repopulating shards"))?;
            for shard in lane {
                let (s, members) = shard?;
                *out.members.shard_mut(s) = members;
            }
        }
        Ok(out)
    }
}

/// Rows of new populations staged in one shard by one thread: (entity, its new bits).
type NewBits = Vec<(u64, u64)>;

/// What one thread stages a side's rows in: its rows by shard, and scratch for each row's
/// populations ([`masks_of`]).
fn staging<T>() -> (Vec<Vec<T>>, Vec<u64>) {
    ((0..SHARDS).map(|_| Vec::new()).collect(), Vec::new())
}

fn too_many_populations() -> QueryError {
    QueryError::refused(
        "too_many_populations",
        format!("a matrix takes at most {MAX_POPULATIONS} populations per dataset"),
    )
}

/// Threads that build a side's shards.
const BUILD_THREADS: usize = 2;

/// `build(shard, rows)` for every shard on [`BUILD_THREADS`] threads, `rows` being every
/// staging thread's rows of that shard (`parts`: per staging thread, its rows by shard, or
/// none), each shard's rows freed once it is built; per lane, what its shards built (`Err`
/// if it panicked).
fn by_shard<T: Send, R: Send>(
    parts: Vec<Vec<Vec<T>>>,
    build: impl Fn(usize, Vec<Vec<T>>) -> R + Sync,
) -> Vec<std::thread::Result<Vec<R>>> {
    let mut staged: Vec<Vec<Vec<T>>> = (0..SHARDS).map(|_| Vec::new()).collect();
    for part in parts {
        for (s, rows) in part.into_iter().enumerate() {
            staged[s].push(rows);
        }
    }
    let staged: Vec<std::sync::Mutex<Vec<Vec<T>>>> =
        staged.into_iter().map(std::sync::Mutex::new).collect();
    on_lanes(BUILD_THREADS, |_, shards| {
        shards
            .map(|s| {
                let rows =
                    std::mem::take(&mut *staged[s].lock().unwrap_or_else(|p| p.into_inner()));
                build(s, rows)
            })
            .collect()
    })
}

/// Threads that stage a side's rows (without a breakdown).
const STAGE_THREADS: usize = 2;

/// Bytes held by staged rows.
fn held(staged: &[Vec<Staged>]) -> usize {
    staged.iter().map(|s| s.len() * size_of::<Staged>()).sum()
}

/// `stage_one(state, batch)` for every batch, on `workers` threads: each pulls the next
/// batch and stages it in a state of its own (`fresh()`), and returns how many bytes that
/// state holds now. Fails with [`over_limit`] when `base` and what all states hold together
/// pass `memory_limit` (checked on their total, so whether a side is refused does not
/// depend on how batches fell to the threads), on a batch that fails, and when a thread
/// does; the states, one per thread, otherwise.
fn on_batches<S: Send>(
    workers: usize,
    batches: impl Iterator<Item = Result<RecordBatch, String>> + Send,
    (base, memory_limit): (usize, usize),
    fresh: impl Fn() -> S + Sync,
    stage_one: impl Fn(&mut S, &RecordBatch) -> Result<usize, QueryError> + Sync,
) -> Result<Vec<S>, QueryError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    // Fused: each thread asks for more at the end (a store's read checks its end once).
    let source = std::sync::Mutex::new(batches.fuse());
    let failed = AtomicBool::new(false);
    let total = AtomicUsize::new(0);
    let lanes = std::thread::scope(|scope| {
        let (source, failed, total, fresh, stage_one) =
            (&source, &failed, &total, &fresh, &stage_one);
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(move || {
                    let mut state = fresh();
                    let mut holds = 0;
                    let result = loop {
                        if failed.load(Relaxed) {
                            break Ok(());
                        }
                        // A thread that panicked while reading poisoned the source: the
                        // read is not finished, and nothing more is read from it.
                        let Ok(mut batches) = source.lock() else {
                            break Err(internal("overlap: a thread reading batches"));
                        };
                        let next = batches.next();
                        drop(batches);
                        let Some(batch) = next else { break Ok(()) };
                        let now = match batch
                            .map_err(internal)
                            .and_then(|b| stage_one(&mut state, &b))
                        {
                            Ok(now) => now,
                            Err(e) => break Err(e),
                        };
                        let added = now.saturating_sub(holds);
                        holds = now;
                        if base + total.fetch_add(added, Relaxed) + added > memory_limit {
                            break Err(over_limit(memory_limit));
                        }
                    };
                    if result.is_err() {
                        failed.store(true, Relaxed);
                    }
                    result.map(|()| state)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    });
    lanes
        .into_iter()
        .map(|lane| lane.map_err(|_| internal("overlap: a thread staging rows"))?)
        .collect()
}

/// The entity ids of a batch (its key column).
fn entity_ids(batch: &RecordBatch, key_index: usize) -> Result<&UInt64Array, QueryError> {
    batch
        .column(key_index)
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| internal("overlap: the key column is not entity ids"))
}

/// Per row of `batch`, the populations it is in (`masks`, one per row): population `i`'s
/// bit is `bit(i)`.
fn masks_of(
    populations: &[Arc<dyn PhysicalExpr>],
    batch: &RecordBatch,
    masks: &mut Vec<u64>,
    bit: impl Fn(usize) -> usize,
) -> Result<(), QueryError> {
    let rows = batch.num_rows();
    masks.clear();
    masks.resize(rows, 0u64);
    for (i, p) in populations.iter().enumerate() {
        let result = p.evaluate(batch)?.into_array(rows)?;
        let inside: &BooleanArray = result
            .as_boolean_opt()
            .ok_or_else(|| internal("overlap: a population filter is not boolean"))?;
        let inside = match inside.nulls() {
            Some(_) => prep_null_mask_filter(inside),
            None => inside.clone(),
        };
        let bit = 1u64 << bit(i);
        for row in inside.values().set_indices() {
            masks[row] |= bit;
        }
    }
    Ok(())
}

/// Stages one batch of a side: per row with an entity id, the populations it is in (`masks`
/// is scratch), its breakdown value (`intern`ed), name and place, in its entity's shard.
fn stage(
    side: &Side,
    batch: &RecordBatch,
    masks: &mut Vec<u64>,
    staged: &mut [Vec<Staged>],
    intern: &mut dyn FnMut(&str) -> u32,
) -> Result<(), QueryError> {
    let ids = entity_ids(batch, side.key_index)?;
    masks_of(&side.populations, batch, masks, |bit| bit)?;
    let values: Option<StringArray> = match side.dimension {
        Some(d) => Some(
            cast(batch.column(d), &DataType::Utf8)?
                .as_string_opt::<i32>()
                .ok_or_else(|| internal("overlap: dimension cast"))?
                .clone(),
        ),
        None => None,
    };
    let names = match side.names {
        Some(n) => Some(
            batch
                .column(n)
                .as_primitive_opt::<UInt64Type>()
                .ok_or_else(|| internal("overlap: the name column is not name ids"))?,
        ),
        None => None,
    };
    let places = match side.places.as_ref().filter(|_| names.is_some()) {
        Some(p) => Some(
            batch
                .column(p.index)
                .as_primitive_opt::<UInt64Type>()
                .ok_or_else(|| internal("overlap: the place column is not place ids"))?,
        ),
        None => None,
    };
    for (i, &mask) in masks.iter().enumerate() {
        if ids.is_null(i) {
            continue;
        }
        let id = ids.value(i);
        let value = match &values {
            Some(v) if mask != 0 && v.is_valid(i) => intern(v.value(i)),
            _ => NO_VALUE,
        };
        staged[shard_of(id)].push(Staged {
            id,
            mask,
            name: names
                .filter(|n| n.is_valid(i))
                .map_or(NO_NAME, |n| n.value(i)),
            place: places
                .filter(|p| p.is_valid(i))
                .map_or(NO_PLACE, |p| p.value(i)),
            value,
        });
    }
    Ok(())
}

/// One shard's members from its staged rows (each worker's part in turn), and those of them
/// with more than one dimension value. Without dimension values the order of the rows does
/// not matter: a member's mask is the union of its rows', its name the least, its place the
/// one all rows agree on (else mixed), and it is name-only if any row says so. With values
/// one worker staged the rows, in the order they came.
fn build_shard(parts: Vec<Vec<Staged>>) -> (FastMap<Member>, FastMap<Vec<u32>>) {
    let mut members = FastMap::default();
    let mut more_values = FastMap::default();
    members.reserve(reserved_for_ids(parts.iter().flatten().map(|r| r.id)));
    for r in parts.into_iter().flatten() {
        let m = members.entry(r.id).or_insert(Member::EMPTY);
        m.mask |= r.mask;
        match r.name {
            NO_NAME => {}
            n if n == r.id => {
                m.linkable = true;
                m.name_only = true;
            }
            n if m.name == NO_NAME || n < m.name => m.name = n,
            _ => {}
        }
        if r.place != NO_PLACE {
            m.place = match m.place {
                NO_PLACE => r.place,
                same if same == r.place => same,
                _ => MIXED_PLACES,
            };
        }
        add_value(m, &mut more_values, r.id, r.value);
    }
    (members, more_values)
}

/// The companies two sides have in common, as (entity of a, entity of b): the entities both
/// hold, then the name links. Whatever their populations.
pub fn matches<'m>(a: &'m Membership, b: &'m Membership) -> impl Iterator<Item = (u64, u64)> + 'm {
    matched(a, b).map(|(ia, _, ib, _)| (ia, ib))
}

/// [`matches`] with each side's member.
fn matched<'m>(
    a: &'m Membership,
    b: &'m Membership,
) -> impl Iterator<Item = (u64, &'m Member, u64, &'m Member)> + 'm {
    direct(a, b, 0..SHARDS).chain(linked(a, b, links(a, b)))
}

/// A company with each side's entity and member.
type Matched<'m> = (u64, &'m Member, u64, &'m Member);

/// The entities both sides hold, in `shards`: the smaller side's walked, the other's looked
/// up (in the same shard).
fn direct<'m>(
    a: &'m Membership,
    b: &'m Membership,
    shards: impl Iterator<Item = usize> + 'm,
) -> impl Iterator<Item = Matched<'m>> + 'm {
    let (small, large, small_is_a) = if a.members.len() <= b.members.len() {
        (a, b, true)
    } else {
        (b, a, false)
    };
    // Two name-only entities with one key are two lists' rows of one name: a name match
    // like a link, vetoed like one when the places differ.
    let compare = compares_places(a, b);
    shards
        .flat_map(move |s| small.members.shard(s).iter())
        .filter_map(move |(id, ms)| {
            let ml = large.members.get(id)?;
            if compare && ms.name_only && !places_agree(ms.place, ml.place) {
                return None;
            }
            Some(if small_is_a {
                (*id, ms, *id, ml)
            } else {
                (*id, ml, *id, ms)
            })
        })
}

/// The companies of name links `pairs` (entity of a, entity of b).
fn linked<'m>(
    a: &'m Membership,
    b: &'m Membership,
    pairs: Vec<(u64, u64)>,
) -> impl Iterator<Item = Matched<'m>> + 'm {
    pairs
        .into_iter()
        .filter_map(|(ia, ib)| Some((ia, a.members.get(&ia)?, ib, b.members.get(&ib)?)))
}

/// Whether name matches between the sides compare places: both have places of the same kinds.
fn compares_places(a: &Membership, b: &Membership) -> bool {
    a.place_kinds.is_some() && a.place_kinds == b.place_kinds
}

/// Which website entities of a side carry a name.
#[derive(Debug, Clone, Copy)]
enum Carrier {
    Nobody,
    One(u64),
    Several,
}

/// For each of `names`, which website entity of `members` carries it.
fn carriers(names: impl Iterator<Item = u64>, members: &Sharded<Member>) -> FastMap<Carrier> {
    let mut slots: FastMap<Carrier> = names.map(|n| (n, Carrier::Nobody)).collect();
    if slots.is_empty() {
        return slots;
    }
    for (&entity, m) in members.iter() {
        if m.name == NO_NAME {
            continue;
        }
        if let Some(slot) = slots.get_mut(&m.name) {
            *slot = match slot {
                Carrier::Nobody => Carrier::One(entity),
                _ => Carrier::Several,
            };
        }
    }
    slots
}

/// Name links between the sides: (entity of a, entity of b) pairs of companies a name-only
/// entity of one side shares with a website entity of the other (see the module's `link`).
/// Symmetric: `links(b, a)` gives the same pairs swapped. A website entity carries one name,
/// so at most one name-only entity of the other side can claim it.
fn links(a: &Membership, b: &Membership) -> Vec<(u64, u64)> {
    let mut pairs = one_way(a, b);
    pairs.extend(one_way(b, a).into_iter().map(|(from, to)| (to, from)));
    pairs
}

/// The links from `from`'s name-only entities to `to`'s website entities, as (entity of
/// `from`, entity of `to`): names of `from`'s linkable entities that `to` does not hold as a
/// key -> the one entity of `to` carrying that name, if exactly one does, `from` does not
/// hold it itself, and (when both lists have places of the same kinds) their places agree.
fn one_way(from: &Membership, to: &Membership) -> Vec<(u64, u64)> {
    let compare = compares_places(from, to);
    let place = |m: &Membership, id: &u64| m.members.get(id).map_or(NO_PLACE, |m| m.place);
    let names = from
        .members
        .iter()
        .filter(|(id, m)| m.linkable && !to.members.contains_key(id))
        .map(|(id, _)| *id);
    carriers(names, &to.members)
        .into_iter()
        .filter_map(|(name, carrier)| match carrier {
            Carrier::One(target)
                if !from.members.contains_key(&target)
                    && (!compare || places_agree(place(from, &name), place(to, &target))) =>
            {
                Some((name, target))
            }
            _ => None,
        })
        .collect()
}

/// The exact entity count of one cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellCount {
    /// Population index on side a, on side b.
    pub a: usize,
    pub b: usize,
    /// Dimension value of a breakdown (`None`: the sides agree on no value).
    pub value: Option<String>,
    pub entities: u64,
}

/// Count the entities common to both sides, per cell, each in at most `max_groups` cells.
/// `a` and `b` must come in the service's canonical order (it decides which cells an entity
/// keeps when it is bounded). Cells with no entity are not returned.
pub fn count(a: &Membership, b: &Membership, max_groups: u32, by: bool) -> Vec<CellCount> {
    let limit = max_groups.max(1) as usize;
    // Dimension values: b's ids mapped to a's, and a's ids ranked by value.
    let b_to_a: Vec<u32> = b
        .values
        .iter()
        .map(|v| a.index.get(v).copied().unwrap_or(NO_VALUE))
        .collect();
    let mut order: Vec<u32> = (0..a.values.len() as u32).collect();
    order.sort_by(|x, y| a.values[*x as usize].cmp(&a.values[*y as usize]));
    let mut rank = vec![0u32; a.values.len()];
    for (r, id) in order.iter().enumerate() {
        rank[*id as usize] = r as u32;
    }

    let tally = Tally {
        a,
        b,
        by,
        limit,
        b_to_a: &b_to_a,
        rank: &rank,
    };
    // Two lanes: each the direct matches of every other shard and the name links one way.
    let lanes = on_lanes(COUNT_THREADS, |lane, shards| {
        let (mut cells, mut common) = (FastMap::default(), Vec::new());
        for m in direct(a, b, shards) {
            tally.company(&mut cells, &mut common, m);
        }
        let pairs = match lane {
            0 => one_way(a, b),
            1 => (one_way(b, a).into_iter())
                .map(|(from, to)| (to, from))
                .collect(),
            _ => Vec::new(),
        };
        for m in linked(a, b, pairs) {
            tally.company(&mut cells, &mut common, m);
        }
        cells
    });
    let mut cells: FastMap<u64> = FastMap::default();
    for lane in lanes {
        // A lane's panic (a bug) is the count's, as on one thread.
        let lane = lane.unwrap_or_else(|p| std::panic::resume_unwind(p));
        for (key, n) in lane {
            *cells.entry(key).or_insert(0) += n;
        }
    }
    let mut out: Vec<CellCount> = cells
        .into_iter()
        .map(|(key, n)| {
            let v = key as u32;
            CellCount {
                a: (key >> 40) as usize,
                b: ((key >> 32) & 0xff) as usize,
                value: (v != NO_VALUE).then(|| a.values[v as usize].clone()),
                entities: n,
            }
        })
        .collect();
    out.sort_by(|x, y| (x.a, x.b, &x.value).cmp(&(y.a, y.b, &y.value)));
    out
}

/// Threads [`count`] runs on (the direct matches shard by shard; the name links one way
/// each).
const COUNT_THREADS: usize = 2;

/// What [`count`] adds up per company.
struct Tally<'a> {
    a: &'a Membership,
    b: &'a Membership,
    by: bool,
    limit: usize,
    /// b's dimension values as a's; a's values' ranks.
    b_to_a: &'a [u32],
    rank: &'a [u32],
}

impl Tally<'_> {
    /// One company: entity `ia` of a (member `ma`), entity `ib` of b, into `cells`
    /// (`common`: the lane's list of the values both sides give it, reused).
    fn company(
        &self,
        cells: &mut FastMap<u64>,
        common: &mut Vec<u32>,
        (ia, ma, ib, mb): Matched<'_>,
    ) {
        if ma.mask == 0 || mb.mask == 0 {
            return;
        }
        common.clear();
        if self.by {
            let in_b: Vec<u32> = (self.b.values_of(ib, mb).into_iter())
                .map(|v| self.b_to_a[v as usize])
                .collect();
            common.extend((self.a.values_of(ia, ma).into_iter()).filter(|v| in_b.contains(v)));
            common.sort_by_key(|v| self.rank[*v as usize]);
        }
        if common.is_empty() {
            common.push(NO_VALUE);
        }
        let mut kept = 0;
        'cells: for pa in bits(ma.mask) {
            for pb in bits(mb.mask) {
                for v in common.iter() {
                    let key = (pa as u64) << 40 | (pb as u64) << 32 | u64::from(*v);
                    *cells.entry(key).or_insert(0) += 1;
                    kept += 1;
                    if kept == self.limit {
                        break 'cells;
                    }
                }
            }
        }
    }
}

fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1 << i) != 0)
}

/// The sensitivity of a matrix of `a` and `b` with contribution bound `max_groups`: L cells
/// by 1 each, or, when either side's names fold and link, [`NAME_SENSITIVITY`] pairs of L
/// cells each, which may share cells (up to [`NAME_SENSITIVITY`] in one cell).
pub fn sensitivity(a: &Membership, b: &Membership, max_groups: u32) -> Sensitivity {
    let l = u64::from(max_groups.max(1));
    if a.named || b.named {
        let pairs = u64::from(NAME_SENSITIVITY);
        Sensitivity {
            l1: l * pairs,
            linf: pairs,
        }
    } else {
        Sensitivity::groups(l, 1)
    }
}

/// How a matrix is protected (the strictest settings of both datasets).
#[derive(Debug, Clone)]
pub struct OverlapProtection {
    pub min_entities: u64,
    pub epsilon: crate::noise::Epsilon,
    pub max_groups_per_entity: u32,
    /// How much one company can change the cells ([`sensitivity`]).
    pub sensitivity: Sensitivity,
    pub delta: f64,
    pub noise: Noise,
}

/// A cell as released: `count` is `None` when the cell is suppressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedCell {
    pub a: usize,
    pub b: usize,
    pub value: Option<String>,
    pub count: Option<u64>,
}

/// Release the cells a caller may see (`shown(a, b)`). Without a breakdown every shown cell
/// is listed (population names are known to the caller), suppressed when it fails the
/// release rule; with one, cells whose value fails the rule are not listed at all (the value
/// itself would tell that some company has it). `names_a` / `names_b` are the populations'
/// names, part of each cell's noise key.
pub fn release(
    cells: &[CellCount],
    names_a: &[String],
    names_b: &[String],
    shown: impl Fn(usize, usize) -> bool,
    by: bool,
    p: &OverlapProtection,
) -> (Vec<ReleasedCell>, Applied) {
    // The whole matrix is one release: every cell gets noise for the matrix's L2
    // sensitivity, so the question costs ρ = ε²/2 however many cells it has.
    let variance = Variance::gaussian(p.sensitivity, 1, p.epsilon);
    let threshold = release_threshold(p.min_entities, variance, p.sensitivity, p.delta);
    let noisy = |a: usize, b: usize, value: Option<&str>, n: u64| -> Option<u64> {
        let mut group = Vec::new();
        for part in [Some(names_a[a].as_str()), Some(names_b[b].as_str()), value] {
            match part {
                Some(s) => {
                    group.extend_from_slice(&(s.len() as u64).to_be_bytes());
                    group.extend_from_slice(s.as_bytes());
                }
                None => group.extend_from_slice(&u64::MAX.to_be_bytes()),
            }
        }
        let noisy = n as i64 + p.noise.discrete_gaussian(&group, 0, variance);
        (n >= p.min_entities && noisy as f64 >= threshold).then_some(noisy as u64)
    };
    let mut out = Vec::new();
    if by {
        for c in cells.iter().filter(|c| shown(c.a, c.b)) {
            if let Some(count) = noisy(c.a, c.b, c.value.as_deref(), c.entities) {
                out.push(ReleasedCell {
                    a: c.a,
                    b: c.b,
                    value: c.value.clone(),
                    count: Some(count),
                });
            }
        }
    } else {
        let exact: HashMap<(usize, usize), u64> =
            cells.iter().map(|c| ((c.a, c.b), c.entities)).collect();
        for a in 0..names_a.len() {
            for b in (0..names_b.len()).filter(|b| shown(a, *b)) {
                let n = exact.get(&(a, b)).copied().unwrap_or(0);
                out.push(ReleasedCell {
                    a,
                    b,
                    value: None,
                    count: noisy(a, b, None, n),
                });
            }
        }
    }
    let applied = Applied {
        min_entities: p.min_entities,
        threshold,
        epsilon: p.epsilon.as_f64(),
        max_groups_per_entity: p.max_groups_per_entity,
        count_sd: variance.sd(),
    };
    (out, applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::NoiseKey;
    use datafusion::arrow::array::{ArrayRef, UInt64Array};
    use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::UInt64, true),
            Field::new("status", DataType::Utf8, true),
            Field::new("industry", DataType::Utf8, true),
        ]))
    }

    fn declared() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("status", DataType::Utf8, true),
            Field::new("industry", DataType::Utf8, true),
        ]))
    }

    fn side(filters: &[&str], by: bool) -> Side {
        Side {
            populations: filters
                .iter()
                .map(|f| {
                    crate::population::compile(f, &declared(), &schema(), Some("id"))
                        .expect("filter")
                })
                .collect(),
            key_index: 0,
            dimension: by.then_some(2),
            names: None,
            places: None,
        }
    }

    fn batch(rows: &[(Option<u64>, &str, Option<&str>)]) -> RecordBatch {
        let ids: ArrayRef = Arc::new(UInt64Array::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        ));
        let status: ArrayRef = Arc::new(StringArray::from(
            rows.iter().map(|r| Some(r.1)).collect::<Vec<_>>(),
        ));
        let industry: ArrayRef = Arc::new(StringArray::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        ));
        RecordBatch::try_new(schema(), vec![ids, status, industry]).expect("batch")
    }

    const POPS: [&str; 3] = [
        "status = 'customer'",
        "status = 'opportunity'",
        "status = 'prospect'",
    ];

    /// Rows of few companies, each in many rows (so both threads stage rows of most
    /// companies), with names (some name-only: name = id, most folding into the one company
    /// that carries their name), places that agree or not, rows without an id and rows in no
    /// population; and a side reading them with `filters`.
    fn named_rows(filters: &[&str]) -> (RecordBatch, Side) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::UInt64, true),
            Field::new("status", DataType::Utf8, true),
            Field::new("name", DataType::UInt64, true),
            Field::new("place", DataType::UInt64, true),
        ]));
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let statuses = ["customer", "opportunity", "prospect", "none"];
        let rows = 6000;
        let (mut ids, mut status, mut names, mut places) = (vec![], vec![], vec![], vec![]);
        // Spread over all 64 shards: ids are keyed hashes in real lists.
        let hashed = |k: u64| k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for _ in 0..rows {
            // Companies 1-150 have websites, each carrying one name: names 152-180 two
            // companies (no fold), 151 and 181-270 one (the name-only company of that name
            // folds into it); companies 151-300 are name-only (271-300 carried by nobody).
            let k = next(300) + 1;
            let id = hashed(k);
            ids.push((next(20) != 0).then_some(id));
            status.push(Some(statuses[next(4) as usize]));
            names.push(match (k > 150, next(4)) {
                (_, 0) => None,
                (true, _) => Some(id),
                (false, _) => Some(hashed(151 + k % 120)),
            });
            places.push((next(4) != 0).then(|| next(3) + 1));
        }
        let whole = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(UInt64Array::from(ids)),
                Arc::new(StringArray::from(status)),
                Arc::new(UInt64Array::from(names)),
                Arc::new(UInt64Array::from(places)),
            ],
        )
        .expect("batch");
        let declared = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("status", DataType::Utf8, true),
        ]));
        let side = Side {
            populations: filters
                .iter()
                .map(|f| {
                    crate::population::compile(f, &declared, &schema, Some("id")).expect("filter")
                })
                .collect(),
            key_index: 0,
            dimension: None,
            names: Some(2),
            places: Some(Places {
                index: 3,
                kinds: "country".into(),
            }),
        };
        (whole, side)
    }

    /// Members and folds of a side, in order.
    type Listed = (Vec<(u64, u64, bool, bool, u64, u64)>, Vec<(u64, u64)>);

    fn sorted(m: &Membership) -> Listed {
        let mut all: Vec<_> = (m.members.iter())
            .map(|(id, m)| (*id, m.mask, m.linkable, m.name_only, m.name, m.place))
            .collect();
        all.sort_unstable();
        let mut folded: Vec<(u64, u64)> = m.folded.iter().map(|(a, b)| (*a, *b)).collect();
        folded.sort_unstable();
        (all, folded)
    }

    #[test]
    fn a_side_staged_on_two_threads_is_the_side_staged_on_one() {
        let (whole, side) = named_rows(&POPS);
        let rows = whole.num_rows();
        let one = memberships(&side, std::iter::once(Ok(whole.clone())), 1 << 30).expect("one");
        let batches: Vec<_> = (0..rows)
            .step_by(97)
            .map(|at| Ok(whole.slice(at, 97.min(rows - at))))
            .collect();
        let many = memberships(&side, batches.into_iter(), 1 << 30).expect("many");
        // Of 300 companies, those of names 151 and 181-270 folded into the one carrying it.
        assert!(one.members.len() > 180, "{}", one.members.len());
        assert!(one.folded.len() > 50, "{}", one.folded.len());
        assert!(sorted(&one).0.iter().any(|m| m.5 == MIXED_PLACES));
        assert_eq!(sorted(&one), sorted(&many));
        // Read back from its bytes, it is the same side, counts the same and is refused
        // under the same limits; cut short or of another format, it is an error.
        let bytes = one.encode("x");
        let (sealed_for, back) = Membership::decode(&bytes, 1 << 30).expect("read back");
        assert_eq!(sealed_for, "x");
        assert_eq!(sorted(&back), sorted(&one));
        assert_eq!(
            (back.named, &back.place_kinds),
            (one.named, &one.place_kinds)
        );
        let cells = |a: &Membership| {
            let mut c: Vec<(usize, usize, u64)> = (count(a, &many, 3, false).iter())
                .map(|c| (c.a, c.b, c.entities))
                .collect();
            c.sort_unstable();
            c
        };
        assert!(!cells(&one).is_empty());
        assert_eq!(cells(&back), cells(&one));
        assert!(Membership::decode(&bytes, one.peak).is_ok());
        // The peak is the reduction's own: it fits in exactly that much, not a byte less.
        let all = || std::iter::once(Ok(whole.clone()));
        assert!(memberships(&side, all(), one.peak).is_ok());
        assert!(matches!(
            memberships(&side, all(), one.peak - 1),
            Err(QueryError::ResourcesExhausted(_))
        ));
        assert!(matches!(
            Membership::decode(&bytes, one.peak - 1),
            Err(QueryError::ResourcesExhausted(_))
        ));
        for cut in (0..bytes.len()).step_by(37) {
            assert!(Membership::decode(&bytes[..cut], 1 << 30).is_err(), "{cut}");
        }
        let mut other = bytes.clone();
        other[8] ^= 1;
        assert!(Membership::decode(&other, 1 << 30).is_err());
        // A failing batch fails the side, whichever thread takes it.
        let mut failing: Vec<Result<RecordBatch, String>> =
            (0..20).map(|_| Ok(whole.slice(0, 10))).collect();
        failing.push(Err("read failed".into()));
        assert!(memberships(&side, failing.into_iter(), 1 << 30).is_err());
        // So does one past the memory limit.
        let batches = (0..rows)
            .step_by(97)
            .map(|at| Ok(whole.slice(at, 97.min(rows - at))));
        assert!(matches!(
            memberships(&side, batches, 4096),
            Err(QueryError::ResourcesExhausted(_))
        ));
    }

    #[test]
    fn a_side_repopulated_is_the_side_reduced_over_its_new_populations() {
        // From the side of some populations, the side of others: some kept (moved to other
        // places), some dropped, some new (filters over the rows, matching rows of folded
        // name-only entities too); equal to reducing the rows over the new ones, peak and
        // refusals included.
        let from = [
            "status = 'prospect'",
            "status = 'customer'",
            "status = 'none'",
        ];
        let to = [
            "status = 'customer'",
            "status IN ('opportunity', 'none')",
            "status = 'prospect'",
            "status <> 'customer'",
        ];
        let (whole, base_side) = named_rows(&from);
        let base =
            memberships(&base_side, std::iter::once(Ok(whole.clone())), 1 << 30).expect("base");
        let (_, target) = named_rows(&to);
        let reduced =
            memberships(&target, std::iter::once(Ok(whole.clone())), 1 << 30).expect("reduced");
        let kept = [Some(1), None, Some(0), None];
        let (_, added) = named_rows(&[to[1], to[3]]);
        let rows = whole.num_rows();
        let batches = || {
            (0..rows)
                .step_by(101)
                .map(|at| Ok(whole.slice(at, 101.min(rows - at))))
        };
        let derived = base
            .repopulated(&kept, &added, batches(), 1 << 30)
            .expect("repopulated");
        assert!(sorted(&reduced).0.iter().any(|m| m.1 & 0b1010 != 0));
        assert!(!reduced.folded.is_empty());
        assert_eq!(sorted(&derived), sorted(&reduced));
        assert_eq!(derived.peak, reduced.peak);
        assert_eq!(derived.entities(), reduced.entities());
        assert_eq!(
            (derived.named, &derived.place_kinds),
            (reduced.named, &reduced.place_kinds)
        );
        // Read back from its seal, it repopulates the same; only kept populations: no rows.
        let (_, back) = Membership::decode(&base.encode("b"), 1 << 30).expect("back");
        let again = back
            .repopulated(&kept, &added, batches(), 1 << 30)
            .expect("again");
        assert_eq!(sorted(&again), sorted(&reduced));
        let (_, none) = named_rows(&[]);
        let failing = std::iter::once(Err("never read".to_string()));
        let moved = base
            .repopulated(&[Some(2), Some(0)], &none, failing, 1 << 30)
            .expect("moved");
        let (_, two) = named_rows(&[from[2], from[0]]);
        let two = memberships(&two, std::iter::once(Ok(whole.clone())), 1 << 30).expect("two");
        assert_eq!(sorted(&moved), sorted(&two));
        // Refused under the limits the reduction is refused under, and as it is.
        assert!(
            base.repopulated(&kept, &added, batches(), reduced.peak)
                .is_ok()
        );
        assert!(matches!(
            base.repopulated(&kept, &added, batches(), reduced.peak - 1),
            Err(QueryError::ResourcesExhausted(_))
        ));
        let failing = batches().chain(std::iter::once(Err("read failed".to_string())));
        assert!(base.repopulated(&kept, &added, failing, 1 << 30).is_err());
        // Rows that are not the side's: an error, not a side.
        let (other, _) = named_rows(&[]);
        let shifted = other.slice(1, 1);
        let (_, one_new) = named_rows(&["status <> ''"]);
        let ids: UInt64Array = (0..1).map(|_| Some(12345u64)).collect();
        let stranger = RecordBatch::try_new(
            shifted.schema(),
            vec![
                Arc::new(ids),
                shifted.column(1).clone(),
                shifted.column(2).clone(),
                shifted.column(3).clone(),
            ],
        )
        .expect("stranger");
        assert!(
            base.repopulated(&[None], &one_new, std::iter::once(Ok(stranger)), 1 << 30)
                .is_err()
        );
    }

    #[test]
    fn a_company_keeps_its_smallest_values_only() {
        // Company 1 has 40 industries on side a (i00..i39) and two on side b: one among
        // a's smallest 16, one not. Only the first is counted; the work of the count is
        // bounded by the cap whatever one list holds for one company.
        let names: Vec<String> = (0..40).rev().map(|i| format!("i{i:02}")).collect();
        let rows: Vec<(Option<u64>, &str, Option<&str>)> = names
            .iter()
            .map(|n| (Some(1), "customer", Some(n.as_str())))
            .collect();
        let ma = memberships(
            &side(&POPS, true),
            std::iter::once(Ok(batch(&rows))),
            1 << 30,
        )
        .expect("a");
        assert_eq!(
            ma.values_of(1, &ma.members[&1]).len(),
            MAX_VALUES_PER_COMPANY
        );
        let b = batch(&[
            (Some(1), "customer", Some("i03")),
            (Some(1), "customer", Some("i30")),
        ]);
        let mb = memberships(&side(&POPS, true), std::iter::once(Ok(b)), 1 << 30).expect("b");
        let cells = count(&ma, &mb, 3, true);
        // Read back from its bytes, a side keeps its values and counts the same.
        let (_, back) = Membership::decode(&ma.encode(""), 1 << 30).expect("read back");
        assert_eq!(back.values, ma.values);
        assert_eq!(back.more_values, ma.more_values);
        assert_eq!(count(&back, &mb, 3, true), cells);
        let got: Vec<(Option<&str>, u64)> = cells
            .iter()
            .map(|c| (c.value.as_deref(), c.entities))
            .collect();
        assert_eq!(got, vec![(Some("i03"), 1)]);
    }

    #[test]
    fn duplicates_are_one_entity_in_their_first_population() {
        let a = batch(&[
            (Some(1), "prospect", Some("retail")),
            (Some(1), "customer", Some("retail")), // duplicate: best status first
            (Some(2), "opportunity", Some("energy")),
            (Some(3), "customer", None),
            (None, "customer", Some("retail")), // unmatched: counts nowhere
            (Some(9), "churned", Some("retail")), // in no population
        ]);
        let b = batch(&[
            (Some(1), "prospect", Some("retail")),
            (Some(2), "customer", Some("media")), // the sides disagree on the industry
            (Some(3), "prospect", Some("energy")),
            (Some(9), "customer", Some("retail")),
            (Some(4), "customer", Some("retail")),
        ]);
        let ma =
            memberships(&side(&POPS, false), std::iter::once(Ok(a.clone())), 1 << 30).expect("a");
        let mb =
            memberships(&side(&POPS, false), std::iter::once(Ok(b.clone())), 1 << 30).expect("b");
        assert_eq!((ma.entities(), mb.entities()), (3, 5));
        let cells = count(&ma, &mb, 1, false);
        let pairs: Vec<(usize, usize, u64)> =
            cells.iter().map(|c| (c.a, c.b, c.entities)).collect();
        assert_eq!(pairs, vec![(0, 2, 2), (1, 0, 1)]);
        // L = 3 lets entity 1 count as customer and as prospect on side a.
        let wide = count(&ma, &mb, 3, false);
        assert_eq!(
            wide.iter()
                .map(|c| (c.a, c.b, c.entities))
                .collect::<Vec<_>>(),
            vec![(0, 2, 2), (1, 0, 1), (2, 2, 1)]
        );
        // Breakdown: a value both sides agree on, else null.
        let ma = memberships(&side(&POPS, true), std::iter::once(Ok(a)), 1 << 30).expect("a");
        let mb = memberships(&side(&POPS, true), std::iter::once(Ok(b)), 1 << 30).expect("b");
        let by = count(&ma, &mb, 1, true);
        let got: Vec<(usize, usize, Option<&str>, u64)> = by
            .iter()
            .map(|c| (c.a, c.b, c.value.as_deref(), c.entities))
            .collect();
        assert_eq!(
            got,
            vec![(0, 2, None, 1), (0, 2, Some("retail"), 1), (1, 0, None, 1)]
        );
    }

    #[test]
    fn sides_count_the_same_cells_whichever_is_smaller() {
        let rows: Vec<(Option<u64>, &str, Option<&str>)> = (0..500u64)
            .map(|i| (Some(i * 7 % 311), POPS_STATUS[(i % 3) as usize], None))
            .collect();
        let other: Vec<(Option<u64>, &str, Option<&str>)> = (0..200u64)
            .map(|i| (Some(i), POPS_STATUS[(i % 2) as usize], None))
            .collect();
        let ma = memberships(
            &side(&POPS, false),
            std::iter::once(Ok(batch(&rows))),
            1 << 30,
        )
        .expect("a");
        let mb = memberships(
            &side(&POPS, false),
            std::iter::once(Ok(batch(&other))),
            1 << 30,
        )
        .expect("b");
        // Swapping which side is probed changes nothing; transposing the sides transposes.
        let ab = count(&ma, &mb, 1, false);
        let ba = count(&mb, &ma, 1, false);
        let mut transposed: Vec<(usize, usize, u64)> =
            ba.iter().map(|c| (c.b, c.a, c.entities)).collect();
        transposed.sort();
        assert_eq!(
            ab.iter()
                .map(|c| (c.a, c.b, c.entities))
                .collect::<Vec<_>>(),
            transposed
        );
        let total: u64 = ab.iter().map(|c| c.entities).sum();
        assert_eq!(total, 200, "every common entity once with L = 1");
    }

    const POPS_STATUS: [&str; 3] = ["customer", "opportunity", "prospect"];

    /// Rows (entity id, name id, status) of a list with a name fallback: a row whose entity
    /// id is its name id is name-only.
    type NamedRow<'a> = (u64, Option<u64>, &'a str);

    fn named(rows: &[NamedRow<'_>], names: bool) -> Membership {
        placed(rows, &vec![None; rows.len()], names, None)
    }

    /// [`named`] with each row's place id, places of `kinds` (none: no places).
    fn placed(
        rows: &[NamedRow<'_>],
        places: &[Option<u64>],
        names: bool,
        kinds: Option<&str>,
    ) -> Membership {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::UInt64, true),
            Field::new("status", DataType::Utf8, true),
            Field::new("industry", DataType::Utf8, true),
            Field::new("name", DataType::UInt64, true),
            Field::new("place", DataType::UInt64, true),
        ]));
        let column = |f: &dyn Fn(&NamedRow<'_>) -> Option<u64>| -> ArrayRef {
            Arc::new(UInt64Array::from(rows.iter().map(f).collect::<Vec<_>>()))
        };
        let batch = RecordBatch::try_new(
            schema,
            vec![
                column(&|r| Some(r.0)),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| Some(r.2)).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(vec![None::<&str>; rows.len()])),
                column(&|r| r.1),
                Arc::new(UInt64Array::from(places.to_vec())),
            ],
        )
        .expect("batch");
        let mut side = side(&POPS, false);
        side.names = names.then_some(3);
        side.places = kinds.map(|k| Places {
            index: 4,
            kinds: k.into(),
        });
        memberships(&side, std::iter::once(Ok(batch)), 1 << 30).expect("side")
    }

    /// The sensitivity the noise is calibrated to, checked against the engine itself: in
    /// hundreds of random small lists whose names collide, folding and linking (between
    /// places that agree or not, or are unknown or mixed), removing any one company (all rows
    /// of one entity) changes the cells by at most S = 4L in all and by at most 4 in any one
    /// cell (so Δ₂² <= 16L), and without names by at most L, 1 each.
    #[test]
    fn one_company_moves_the_cells_by_at_most_the_sensitivity() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::from_seed([5; 32]);
        let statuses = ["customer", "opportunity", "prospect", "churned"];
        type PlacedRow = (NamedRow<'static>, Option<u64>);
        // A company mostly has one place (sometimes none known), a few rows another.
        let list = |rng: &mut rand_chacha::ChaCha20Rng| -> Vec<PlacedRow> {
            let home: Vec<Option<u64>> = (0..2000)
                .map(|_| rng.random_bool(0.85).then(|| 7 + rng.random_range(0..2u64)))
                .collect();
            (0..rng.random_range(1..14))
                .map(|_| {
                    let name = 1000 + rng.random_range(0..4u64);
                    let status = statuses[rng.random_range(0..statuses.len())];
                    let row = if rng.random_bool(0.35) {
                        (name, Some(name), status) // name-only
                    } else {
                        let site = 100 + rng.random_range(0..8u64);
                        (site, rng.random_bool(0.85).then_some(name), status)
                    };
                    let place = match rng.random_bool(0.1) {
                        true => rng.random_bool(0.5).then(|| 7 + rng.random_range(0..2u64)),
                        false => home[row.0 as usize],
                    };
                    (row, place)
                })
                .collect()
        };
        let named = |rows: &[PlacedRow], names: bool, kinds: Option<&str>| -> Membership {
            let (rows, places): (Vec<NamedRow<'_>>, Vec<Option<u64>>) =
                rows.iter().copied().unzip();
            placed(&rows, &places, names, kinds)
        };
        let cells = |a: &Membership, b: &Membership, l: u32| -> HashMap<(usize, usize), i64> {
            count(a, b, l, false)
                .into_iter()
                .map(|c| ((c.a, c.b), c.entities as i64))
                .collect()
        };
        // Places of the sides' kinds: none, the same, different, on one side only; and
        // without names.
        let region = Some("region");
        let modes = [
            (true, None, None),
            (true, region, region),
            (true, region, Some("country")),
            (true, region, None),
            (false, None, None),
        ];
        let (mut worst, mut vetoed) = ((0i64, 0i64), 0usize);
        for _ in 0..300 {
            let (a, b) = (list(&mut rng), list(&mut rng));
            let links = |ka, kb| matches(&named(&a, true, ka), &named(&b, true, kb)).count();
            vetoed += links(None, None) - links(region, region);
            for (names, ka, kb) in modes {
                for l in [1u32, 2, 4] {
                    let (ma, mb) = (named(&a, names, ka), named(&b, names, kb));
                    let s = sensitivity(&ma, &mb, l);
                    let full = cells(&ma, &mb, l);
                    for (side, rows) in [(0, &a), (1, &b)] {
                        for company in rows.iter().map(|r| r.0.0) {
                            let rest: Vec<PlacedRow> =
                                rows.iter().copied().filter(|r| r.0.0 != company).collect();
                            let less = if side == 0 {
                                cells(&named(&rest, names, ka), &mb, l)
                            } else {
                                cells(&ma, &named(&rest, names, kb), l)
                            };
                            let keys: std::collections::BTreeSet<_> =
                                full.keys().chain(less.keys()).collect();
                            let d: Vec<i64> = keys
                                .iter()
                                .map(|k| {
                                    full.get(k).copied().unwrap_or(0)
                                        - less.get(k).copied().unwrap_or(0)
                                })
                                .collect();
                            let l1: i64 = d.iter().map(|x| x.abs()).sum();
                            let linf = d.iter().map(|x| x.abs()).max().unwrap_or(0);
                            assert!(
                                l1 <= s.l1 as i64 && linf <= s.linf as i64,
                                "L {l}, names {names}, places {ka:?}/{kb:?}: removing {company} \
                                 from side {side} moves the cells by {d:?} (sensitivity {s:?})\n\
                                 a {a:?}\nb {b:?}"
                            );
                            if names && l == 1 {
                                worst = (worst.0.max(l1), worst.1.max(linf));
                            }
                        }
                    }
                }
            }
        }
        // The random lists reach the name cases (more than one pair moves) and places veto
        // links.
        eprintln!("largest change with names at L = 1: {worst:?} (L1, one cell); {vetoed} vetoed");
        assert!(worst.0 >= 2, "{worst:?}");
        assert!(vetoed > 0);
    }

    #[test]
    fn names_fold_duplicates_and_link_unique_companies_only() {
        let a = [
            (100, Some(1000), "prospect"),
            (1000, Some(1000), "customer"), // same company without a website: folds into 100
            (2000, Some(2000), "customer"), // links to b's 200, the one company named so
            (3000, Some(3000), "customer"), // b has two companies of that name: no link
            (4000, Some(4000), "customer"), // two companies of a carry that name: no link
            (400, Some(4000), "prospect"),
            (401, Some(4000), "prospect"),
            (5000, Some(5000), "customer"), // b's 500 carries 5000 (its smallest name): links
            (5001, Some(5001), "customer"), // ... so 5001 finds no company
            (6000, Some(6000), "customer"), // b's 600 is a company of a already: no link
            (600, None, "customer"),
            (700, Some(7000), "prospect"), // b's name-only 7000 links here
        ];
        let b = [
            (100, Some(1000), "opportunity"),
            (200, Some(2000), "opportunity"),
            (300, Some(3000), "customer"),
            (301, Some(3000), "customer"),
            (4000, Some(4000), "prospect"), // name-only on both sides: one key, one company
            (500, Some(5000), "customer"),
            (500, Some(5001), "customer"),
            (600, Some(6000), "opportunity"),
            (7000, Some(7000), "customer"),
        ];
        let cells = |m: &Membership, n: &Membership| -> Vec<(usize, usize, u64)> {
            count(m, n, 1, false)
                .iter()
                .map(|c| (c.a, c.b, c.entities))
                .collect()
        };
        let (ma, mb) = (named(&a, true), named(&b, true));
        // customer x customer: 500 (linked); customer x opportunity: 100 (best status after
        // the fold), 200 (linked), 600; customer x prospect: 4000; prospect x customer: 700
        // (linked from b).
        assert_eq!(
            cells(&ma, &mb),
            vec![(0, 0, 1), (0, 1, 3), (0, 2, 1), (2, 0, 1)]
        );
        assert_eq!(
            sensitivity(&ma, &mb, 2),
            Sensitivity {
                l1: 2 * u64::from(NAME_SENSITIVITY),
                linf: u64::from(NAME_SENSITIVITY)
            }
        );
        // Links are symmetric: the transposed question transposes the cells.
        let mut t: Vec<_> = cells(&mb, &ma)
            .into_iter()
            .map(|(x, y, n)| (y, x, n))
            .collect();
        t.sort();
        assert_eq!(t, cells(&ma, &mb));
        // Without a name fallback nothing folds or links: 100 counts as a prospect.
        let (ma, mb) = (named(&a, false), named(&b, false));
        assert_eq!(cells(&ma, &mb), vec![(0, 1, 1), (0, 2, 1), (2, 1, 1)]);
        assert_eq!(sensitivity(&ma, &mb, 2), Sensitivity::groups(2, 1));
    }

    #[test]
    fn names_link_only_where_places_agree() {
        // a's name-only 2000 and 3000 against b's website companies 200 and 300 carrying
        // those names; 4000 against 400, whose rows are in two places.
        let a = [
            (2000, Some(2000), "customer"),
            (3000, Some(3000), "customer"),
            (4000, Some(4000), "customer"),
            (5000, Some(5000), "customer"),
        ];
        let b = [
            (200, Some(2000), "customer"),
            (300, Some(3000), "customer"),
            (400, Some(4000), "customer"),
            (400, Some(4000), "customer"),
            (500, Some(5000), "customer"),
        ];
        let pairs = |ma: &Membership, mb: &Membership| -> Vec<(u64, u64)> {
            let mut p: Vec<_> = matches(ma, mb).collect();
            p.sort();
            p
        };
        let region = Some("region");
        let ma = placed(&a, &[Some(1), Some(1), Some(1), None], true, region);
        let b_places = [Some(1), Some(2), Some(1), Some(2), Some(2)];
        let mb = placed(&b, &b_places, true, region);
        // 3000 and 300 are in different places; a mixed or unknown place is no evidence.
        assert_eq!(pairs(&ma, &mb), vec![(2000, 200), (4000, 400), (5000, 500)]);
        assert_eq!(pairs(&mb, &ma), vec![(200, 2000), (400, 4000), (500, 5000)]);
        // Places of other kinds than the other list's are not compared.
        let other = placed(&b, &b_places, true, Some("country"));
        assert_eq!(pairs(&ma, &other).len(), 4);
        // Nor without places on one side.
        assert_eq!(pairs(&ma, &named(&b, true)).len(), 4);
        // Name-only on both sides (one key): vetoed alike when placed apart.
        let both = [(6000, Some(6000), "customer")];
        let here = placed(&both, &[Some(1)], true, region);
        let there = placed(&both, &[Some(2)], true, region);
        assert_eq!(pairs(&here, &there), vec![]);
        assert_eq!(pairs(&here, &placed(&both, &[None], true, region)).len(), 1);
        // A name carried by two website companies of b, one of them in a's place: no link
        // (places veto a link; they never choose among carriers).
        let a = [(7000, Some(7000), "customer")];
        let b = [(700, Some(7000), "customer"), (701, Some(7000), "customer")];
        let (ma, mb) = (
            placed(&a, &[Some(1)], true, region),
            placed(&b, &[Some(1), Some(2)], true, region),
        );
        assert_eq!(pairs(&ma, &mb), vec![]);
    }

    #[test]
    fn memory_limit_is_a_clean_refusal() {
        let rows: Vec<(Option<u64>, &str, Option<&str>)> = (0..10_000u64)
            .map(|i| (Some(i), "customer", None))
            .collect();
        let e = memberships(&side(&POPS, false), std::iter::once(Ok(batch(&rows))), 4096)
            .expect_err("over the limit");
        assert!(matches!(e, QueryError::ResourcesExhausted(_)), "{e:?}");
    }

    #[test]
    fn release_lists_every_shown_cell_and_suppresses_small_ones() {
        let names: Vec<String> = POPS_STATUS.iter().map(|s| s.to_string()).collect();
        let cells = vec![
            CellCount {
                a: 0,
                b: 0,
                value: None,
                entities: 10_000,
            },
            CellCount {
                a: 0,
                b: 1,
                value: None,
                entities: 3,
            },
        ];
        let p = OverlapProtection {
            min_entities: 5,
            epsilon: crate::noise::Epsilon::at_most(1.0),
            max_groups_per_entity: 1,
            sensitivity: Sensitivity::groups(1, 1),
            delta: 1e-6,
            noise: Noise::new(NoiseKey::new([1; 32]), [2; 32]),
        };
        let (out, applied) = release(&cells, &names, &names, |_, b| b < 2, false, &p);
        assert_eq!(out.len(), 6, "3 x 2 shown cells, all listed");
        let big = out[0].count.expect("released");
        assert!(big.abs_diff(10_000) < 40, "{big}");
        assert!(out[1..].iter().all(|c| c.count.is_none()));
        assert!(applied.threshold > 5.0);
        // The same question gives the same numbers; the transposed question too.
        let (again, _) = release(&cells, &names, &names, |_, b| b < 2, false, &p);
        assert_eq!(again, out);
        // Breakdowns list released cells only.
        let (by, _) = release(&cells, &names, &names, |_, _| true, true, &p);
        assert_eq!(by.len(), 1);
    }
}
