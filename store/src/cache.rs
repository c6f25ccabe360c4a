//! A bounded in-memory cache of verified plaintext columns, per dataset version and column
//! of its query form.
//!
//! Decrypting and authenticating a whole dataset on every query costs about 1 s per GB on
//! one core; repeated questions over the same lists are the common case. A question reads
//! only the columns it uses, and keeps those: a column is cached as the chunks of one read of
//! the version (one per record batch; every read of a version cuts it the same way). Entries
//! are only ever inserted after a complete, authenticated read; eviction is
//! least-recently-used by Arrow memory size. The cache lives in process memory only (never on disk), and deleting a
//! dataset or uploading a new version drops its entries, so crypto-shredding also forgets
//! the plaintext.
//!
//! Beside columns, it keeps values computed from a version's plaintext (a list reduced to its
//! companies for the overlap matrix, say: [`PlaintextCache::derived`]), under the same
//! budget, eviction and forgetting: they are plaintext too.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_data::ArrayData;
use arrow_schema::SchemaRef;

/// One verified column of a version, in its chunks.
pub type Chunks = Arc<Vec<ArrayRef>>;

/// A value computed from a version's plaintext.
pub type Derived = Arc<dyn Any + Send + Sync>;

/// (dataset id, version id, what of it)
type Key = (String, String, Slot);

/// A column of the version's query form, or a derived value under its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Slot {
    Column(usize),
    Derived(String),
}

/// What an entry holds.
#[derive(Clone)]
enum Held {
    Chunks(Chunks),
    Derived(Derived),
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::Chunks(c) => write!(f, "Chunks({})", c.len()),
            Held::Derived(_) => write!(f, "Derived"),
        }
    }
}

#[derive(Debug)]
pub struct PlaintextCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    schemas: HashMap<(String, String), SchemaRef>,
    bytes: usize,
    tick: u64,
    /// The latest forgettings (a delete, a new version, versions no longer listed), each
    /// with its tick: a read that began before one keeps nothing of a version it forgot
    /// (see [`PlaintextCache::mark`]).
    forgets: std::collections::VecDeque<Forget>,
    /// A read that began before this tick keeps nothing: forgettings older than the ones
    /// above are no longer listed.
    forgot_before: u64,
}

/// Which (dataset id, version id) pairs a forgetting kept.
type Keep = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// One forgetting ([`PlaintextCache::retain`]): its tick, and the versions it kept.
struct Forget(u64, Keep);

impl std::fmt::Debug for Forget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Forget({})", self.0)
    }
}

/// Forgettings listed at most (the oldest goes first; a read older than it keeps nothing).
const FORGETS: usize = 64;

#[derive(Debug)]
struct Entry {
    held: Held,
    bytes: usize,
    used: u64,
    stamp: Stamp,
}

/// Running total of the memory of batches, each allocation counted once. Batches decoded
/// from an IPC stream slice every column out of one message buffer, so
/// `get_array_memory_size` (which counts the whole buffer once per column) overstates them
/// several times over.
#[derive(Debug, Default)]
pub struct MemoryMeter {
    seen: HashSet<usize>,
    total: usize,
}

impl MemoryMeter {
    pub fn add(&mut self, batch: &RecordBatch) {
        for c in batch.columns() {
            self.add_array(c.as_ref());
        }
    }

    pub fn add_array(&mut self, array: &dyn Array) {
        self.visit(&array.to_data());
    }

    pub fn bytes(&self) -> usize {
        self.total
    }

    fn visit(&mut self, data: &ArrayData) {
        let nulls = data.nulls().map(|n| n.buffer());
        for b in data.buffers().iter().chain(nulls) {
            if self.seen.insert(b.data_ptr().as_ptr() as usize) {
                // Externally owned buffers report capacity 0: count what they show.
                self.total += b.capacity().max(b.len());
            }
        }
        for c in data.child_data() {
            self.visit(c);
        }
    }
}

/// Size and modification time of the sealed file an entry was read from: an entry is only
/// served while the file is unchanged, so tampering with a cached file still fails queries.
pub type Stamp = (u64, i128);

impl PlaintextCache {
    pub fn new(max_bytes: usize) -> Self {
        PlaintextCache {
            max_bytes,
            inner: Mutex::default(),
        }
    }

    /// Where the cache stands, taken when a read begins and given back when what it read is
    /// kept: if a dataset was forgotten in between (deleted while the read ran, say), what
    /// was read is not kept, so nothing of a deleted version outlives its delete in memory.
    pub fn mark(&self) -> u64 {
        self.lock().tick
    }

    /// Largest single entry worth collecting while reading.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The cached chunks of each of `columns` of a version (`None` where not cached).
    pub fn columns(
        &self,
        dataset_id: &str,
        version_id: &str,
        stamp: Stamp,
        columns: &[usize],
    ) -> Vec<Option<Chunks>> {
        columns
            .iter()
            .map(
                |&c| match self.get(dataset_id, version_id, Slot::Column(c), stamp) {
                    Some(Held::Chunks(chunks)) => Some(chunks),
                    _ => None,
                },
            )
            .collect()
    }

    /// The value kept as `name` for a version, if any (and the file it came from is
    /// unchanged).
    pub fn derived(
        &self,
        dataset_id: &str,
        version_id: &str,
        stamp: Stamp,
        name: &str,
    ) -> Option<Derived> {
        match self.get(
            dataset_id,
            version_id,
            Slot::Derived(name.to_string()),
            stamp,
        ) {
            Some(Held::Derived(value)) => Some(value),
            _ => None,
        }
    }

    /// Keep `value`, computed from a version's plaintext read under `stamp`, as `name`
    /// (it holds about `bytes`).
    pub fn insert_derived(
        &self,
        (dataset_id, version_id, name): (&str, &str, &str),
        (stamp, since): (Stamp, u64),
        value: Derived,
        bytes: usize,
    ) {
        let key = (
            dataset_id.to_string(),
            version_id.to_string(),
            Slot::Derived(name.to_string()),
        );
        self.put(key, (stamp, since), Held::Derived(value), bytes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, dataset_id: &str, version_id: &str, slot: Slot, stamp: Stamp) -> Option<Held> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let key = (dataset_id.to_string(), version_id.to_string(), slot);
        let e = inner.entries.get_mut(&key)?;
        if e.stamp != stamp {
            if let Some(e) = inner.entries.remove(&key) {
                inner.bytes -= e.bytes;
            }
            return None;
        }
        e.used = tick;
        Some(e.held.clone())
    }

    /// Keep a column's `chunks` (which hold `bytes`, as measured by [`MemoryMeter`]).
    pub fn insert(
        &self,
        (dataset_id, version_id, column): (&str, &str, usize),
        (stamp, since): (Stamp, u64),
        chunks: Chunks,
        bytes: usize,
    ) {
        let key = (
            dataset_id.to_string(),
            version_id.to_string(),
            Slot::Column(column),
        );
        self.put(key, (stamp, since), Held::Chunks(chunks), bytes);
    }

    fn put(&self, key: Key, (stamp, since): (Stamp, u64), held: Held, bytes: usize) {
        if bytes > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
        let (d, v, _) = &key;
        if since < inner.forgot_before
            || (inner.forgets.iter()).any(|Forget(tick, keep)| *tick > since && !keep(d, v))
        {
            return;
        }
        while inner.bytes + bytes > self.max_bytes {
            let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = inner.entries.remove(&oldest) {
                inner.bytes -= e.bytes;
            }
        }
        inner.tick += 1;
        let used = inner.tick;
        if let Some(old) = inner.entries.insert(
            key,
            Entry {
                held,
                bytes,
                used,
                stamp,
            },
        ) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
    }

    pub fn schema(&self, dataset_id: &str, version_id: &str) -> Option<SchemaRef> {
        self.lock()
            .schemas
            .get(&(dataset_id.to_string(), version_id.to_string()))
            .cloned()
    }

    pub fn insert_schema(&self, dataset_id: &str, version_id: &str, schema: SchemaRef) {
        self.lock()
            .schemas
            .insert((dataset_id.to_string(), version_id.to_string()), schema);
    }

    /// Drop every entry of a dataset except `keep` (a version id), e.g. after a new upload
    /// (keep the new live version) or a delete (keep nothing).
    pub fn forget_dataset(&self, dataset_id: &str, keep: Option<&str>) {
        let (dataset_id, keep) = (dataset_id.to_string(), keep.map(str::to_string));
        self.retain(move |d, v| d != dataset_id || Some(v) == keep.as_deref());
    }

    /// Keep only the entries of the (dataset id, version id) pairs `keep` accepts; a read
    /// that began before keeps nothing of the others. A read of a version it accepts keeps
    /// what it read (the catalog's every policy change forgets the versions no longer
    /// listed, and a read of a listed version under way goes on to be kept).
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool + Send + Sync + 'static) {
        let keep: Keep = Arc::new(keep);
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if inner.forgets.len() == FORGETS
            && let Some(Forget(oldest, _)) = inner.forgets.pop_front()
        {
            inner.forgot_before = oldest;
        }
        inner.forgets.push_back(Forget(tick, keep.clone()));
        let gone: Vec<Key> = (inner.entries.keys())
            .filter(|(d, v, _)| !keep(d, v))
            .cloned()
            .collect();
        for k in gone {
            if let Some(e) = inner.entries.remove(&k) {
                inner.bytes -= e.bytes;
            }
        }
        inner.schemas.retain(|(d, v), _| keep(d, v));
    }

    /// Bytes held (for logs and tests).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, RecordBatch, StringArray};

    use super::{MemoryMeter, PlaintextCache};

    #[test]
    fn derived_values_are_kept_and_forgotten_as_columns_are() {
        let cache = PlaintextCache::new(1000);
        let stamp = (10, 1);
        cache.insert_derived(
            ("d", "v1", "side"),
            (stamp, cache.mark()),
            Arc::new(7u32),
            100,
        );
        let got = cache.derived("d", "v1", stamp, "side").unwrap();
        assert_eq!(got.downcast_ref::<u32>(), Some(&7));
        // Another name, another version, a changed file: not that value.
        assert!(cache.derived("d", "v1", stamp, "other").is_none());
        assert!(cache.derived("d", "v2", stamp, "side").is_none());
        assert!(cache.derived("d", "v1", (10, 2), "side").is_none());
        // The changed file dropped it.
        assert!(cache.derived("d", "v1", stamp, "side").is_none());
        assert_eq!(cache.bytes(), 0);
        // A new version (or a delete) forgets the old version's values with its columns.
        cache.insert_derived(
            ("d", "v1", "side"),
            (stamp, cache.mark()),
            Arc::new(7u32),
            100,
        );
        cache.insert(
            ("d", "v1", 0),
            (stamp, cache.mark()),
            Arc::new(Vec::new()),
            100,
        );
        cache.forget_dataset("d", Some("v2"));
        assert!(cache.derived("d", "v1", stamp, "side").is_none());
        assert_eq!(cache.bytes(), 0);
        // Counted in the budget: the least recently used goes first, column or value.
        cache.insert_derived(("d", "v2", "a"), (stamp, cache.mark()), Arc::new(1u32), 600);
        cache.insert_derived(("d", "v2", "b"), (stamp, cache.mark()), Arc::new(2u32), 600);
        assert!(cache.derived("d", "v2", stamp, "a").is_none());
        assert!(cache.derived("d", "v2", stamp, "b").is_some());
        assert_eq!(cache.bytes(), 600);
        // Larger than the whole budget: not kept.
        cache.insert_derived(
            ("d", "v2", "c"),
            (stamp, cache.mark()),
            Arc::new(3u32),
            2000,
        );
        assert!(cache.derived("d", "v2", stamp, "c").is_none());
        // A read that began before a dataset was forgotten keeps nothing of it (a delete
        // while a question or the warm-up after an upload read it); a read of a version
        // that was not forgotten keeps what it read (the catalog's policy changes forget
        // the versions it no longer lists, while reads of the others are under way).
        let since = cache.mark();
        cache.forget_dataset("d", None);
        cache.insert_derived(("d", "v2", "a"), (stamp, since), Arc::new(1u32), 10);
        cache.insert(("e", "v1", 0), (stamp, since), Arc::new(Vec::new()), 10);
        assert!(cache.derived("d", "v2", stamp, "a").is_none());
        assert_eq!(cache.bytes(), 10);
        let since = cache.mark();
        cache.insert_derived(("d", "v2", "a"), (stamp, since), Arc::new(1u32), 10);
        assert!(cache.derived("d", "v2", stamp, "a").is_some());
        // Past the forgettings listed, a read that began before the oldest keeps nothing.
        let since = cache.mark();
        cache.forget_dataset("d", None);
        for _ in 0..super::FORGETS {
            cache.retain(|_, _| true);
        }
        cache.insert(("e", "v2", 0), (stamp, since), Arc::new(Vec::new()), 10);
        cache.insert(
            ("e", "v2", 1),
            (stamp, cache.mark()),
            Arc::new(Vec::new()),
            10,
        );
        assert_eq!(cache.bytes(), 20, "e/v1/0 and e/v2/1");
    }

    fn memory_size(batches: &[RecordBatch]) -> usize {
        let mut m = MemoryMeter::default();
        batches.iter().for_each(|b| m.add(b));
        m.bytes()
    }

    /// A batch read back from an IPC stream: all eight columns live in one message buffer.
    fn decoded(columns: usize, rows: usize) -> (RecordBatch, usize) {
        let cols: Vec<(String, ArrayRef)> = (0..columns)
            .map(|c| {
                let v: Vec<String> = (0..rows).map(|r| format!("value-{c}-{r:08}")).collect();
                (format!("c{c}"), Arc::new(StringArray::from(v)) as ArrayRef)
            })
            .collect();
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let mut bytes = Vec::new();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        drop(w);
        let len = bytes.len();
        let mut r = arrow_ipc::reader::StreamReader::try_new(&bytes[..], None).unwrap();
        (r.next().unwrap().unwrap(), len)
    }

    #[test]
    fn shared_message_buffers_are_counted_once() {
        let (batch, stream_len) = decoded(8, 10_000);
        let counted = memory_size(std::slice::from_ref(&batch));
        assert!(counted >= stream_len / 2, "{counted} < {stream_len}/2");
        assert!(counted <= stream_len * 2, "{counted} > 2 x {stream_len}");
        // What the per-column measure says of the same batch (the overcount this avoids).
        assert!(batch.get_array_memory_size() > 4 * counted);
        // Two batches sharing nothing are counted in full.
        let (other, _) = decoded(8, 10_000);
        assert!(memory_size(&[batch.clone(), other]) > counted * 3 / 2);
        // The same batch twice holds no more memory than once.
        assert_eq!(memory_size(&[batch.clone(), batch]), counted);
    }
}
