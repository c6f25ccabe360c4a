//! A bounded in-memory cache of verified plaintext batches, per dataset version.
//!
//! Decrypting and authenticating a whole dataset on every query costs about 1 s per GB on
//! one core; repeated questions over the same lists are the common case. Entries are only
//! ever inserted after a complete, authenticated read; eviction is least-recently-used by
//! Arrow memory size. The cache lives in process memory only (never on disk), and deleting a
//! dataset or uploading a new version drops its entries, so crypto-shredding also forgets
//! the plaintext.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

/// Verified batches of one version.
pub type Batches = Arc<Vec<RecordBatch>>;

#[derive(Debug)]
pub struct PlaintextCache {
    max_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// (dataset id, version id) -> entry
    entries: HashMap<(String, String), Entry>,
    schemas: HashMap<(String, String), SchemaRef>,
    bytes: usize,
    tick: u64,
}

#[derive(Debug)]
struct Entry {
    batches: Batches,
    bytes: usize,
    used: u64,
    stamp: Stamp,
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

    /// Largest single entry worth collecting while reading.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, dataset_id: &str, version_id: &str, stamp: Stamp) -> Option<Batches> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let key = (dataset_id.to_string(), version_id.to_string());
        let e = inner.entries.get_mut(&key)?;
        if e.stamp != stamp {
            if let Some(e) = inner.entries.remove(&key) {
                inner.bytes -= e.bytes;
            }
            return None;
        }
        e.used = tick;
        Some(e.batches.clone())
    }

    pub fn insert(
        &self,
        dataset_id: &str,
        version_id: &str,
        stamp: Stamp,
        batches: Vec<RecordBatch>,
    ) {
        let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        if bytes > self.max_bytes {
            return;
        }
        let mut inner = self.lock();
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
        let key = (dataset_id.to_string(), version_id.to_string());
        if let Some(old) = inner.entries.insert(
            key,
            Entry {
                batches: Arc::new(batches),
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
        let mut inner = self.lock();
        let gone: Vec<(String, String)> = inner
            .entries
            .keys()
            .filter(|(d, v)| d == dataset_id && Some(v.as_str()) != keep)
            .cloned()
            .collect();
        for k in gone {
            if let Some(e) = inner.entries.remove(&k) {
                inner.bytes -= e.bytes;
            }
        }
        inner
            .schemas
            .retain(|(d, v), _| d != dataset_id || Some(v.as_str()) == keep);
    }

    /// Bytes held (for logs and tests).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}
