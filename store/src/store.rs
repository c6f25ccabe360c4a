//! Sealed dataset storage: the upload pipeline (ingest -> seal -> atomic commit), listing,
//! crypto-shredding deletes, startup recovery, and the verified read path used by the query
//! engine. Blocking code; the server calls it on the blocking pool. No HTTP here.

use std::collections::HashSet;
use std::fs;
use std::io::{BufWriter, Read};
use std::path::PathBuf;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;

use crate::cache::{MemoryMeter, PlaintextCache, Stamp};

/// Turns a verified batch into the form the cache keeps and queries read.
/// How one stored column becomes a column of a version's query form (key text into entity
/// ids, say).
pub use crate::matching::ColumnFn as Transform;

/// A version's query form: the columns questions read, each one stored column as it is or
/// transformed. One form per version ([`Store::batches`] caches its columns).
#[derive(Clone)]
pub struct Form {
    pub schema: SchemaRef,
    /// Per column of `schema`: the stored column it comes from, and how.
    pub columns: Vec<(usize, Option<Transform>)>,
}

impl Form {
    fn source(&self, column: usize) -> Result<usize> {
        self.columns
            .get(column)
            .map(|(s, _)| *s)
            .ok_or_else(|| Error::internal("a column past the query form"))
    }
}
use crate::audit::{self, Actor, AuditLog, Event, Outcome};
use crate::catalog::{Catalog, ColumnInfo, DatasetInfo, NewVersion, VersionKey, datasets};
use crate::crypto::keys::{self, Kek, KeyLocation, Keyring};
use crate::crypto::random_id;
use crate::crypto::seal::{self, Binding, OpenReader, SealWriter};
use crate::datadir::{DataDir, validate_name};
use crate::ingest::{self, Format, IngestLimits, InputFault, TrackedInput};
use crate::objects::{self, SharedObjects};
use crate::projected::{arrow_to_integrity, io_to_integrity};
use crate::{Error, Result, faults, fsutil};

/// Settings of the store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Largest upload accepted, in bytes of the uploaded file.
    pub max_upload_bytes: u64,
    /// Plaintext bytes per sealed segment.
    pub segment_size: u32,
    /// Parser bounds.
    pub ingest: IngestLimits,
    /// Bytes of verified plaintext batches kept in memory for queries.
    pub cache_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_upload_bytes: 2 << 30,
            segment_size: seal::DEFAULT_SEGMENT_SIZE,
            ingest: IngestLimits::default(),
            cache_bytes: 1 << 30,
        }
    }
}

/// How long work given to [`Store::later`] waits before it runs: of a burst of population
/// changes, the side of the last alone is sealed (a job for one that changed again is
/// stale by then, and skips itself).
const LATER_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a read of a version began ([`Store::read_mark`]).
#[derive(Debug, Clone, Copy)]
pub struct ReadMark {
    stamp: Stamp,
    since: u64,
}

/// The dataset store of one data directory.
pub struct Store {
    dir: DataDir,
    catalog: Catalog,
    audit: AuditLog,
    keys: Keyring,
    /// Where the sealed versions live (the data directory by default, or an S3 store).
    objects: SharedObjects,
    config: StoreConfig,
    cache: PlaintextCache,
    /// Seals of derived objects, written off every question's path ([`Self::later`]).
    background: crate::background::Background,
}

/// An upload as the store sees it: who, into which dataset, how to parse.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    pub owner: String,
    /// Who uploads, as the audit log names it.
    pub actor: Actor,
    pub dataset: String,
    pub format: Option<Format>,
    pub key: ingest::KeySpec,
}

/// What a committed upload produced.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UploadOutcome {
    pub dataset: String,
    pub version: i64,
    pub rows: u64,
    /// Bytes received from the client.
    pub bytes: u64,
    /// Bytes of the sealed object.
    pub sealed_bytes: u64,
    pub format: String,
    pub key_column: Option<String>,
    pub key_type: Option<ingest::KeyType>,
    pub name_column: Option<String>,
    /// Columns that must agree too for a match by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub name_context: Vec<String>,
    /// Columns giving each company's place, compared when a name links two companies
    /// (detected from the headers unless given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub places: Vec<String>,
    /// Website keys: rows matched by domain, by name, and unmatched.
    pub matching: Option<crate::matching::MatchStats>,
    pub columns: Vec<ColumnInfo>,
}

/// What startup recovery cleaned up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub partial_uploads_removed: usize,
    pub orphan_files_removed: usize,
    pub empty_datasets_removed: usize,
    /// An interrupted key rotation: finished (the catalog had switched) or undone.
    pub key_rotation: Option<String>,
}

/// The AAD binding of a version's data key and sealed file, from its catalog ids.
pub fn binding(dataset_id: &str, version_id: &str) -> Result<Binding> {
    let parse = |s: &str| -> Result<[u8; 16]> {
        let v = hex::decode(s).map_err(|_| Error::internal(format!("bad id in catalog: {s}")))?;
        v.try_into()
            .map_err(|_| Error::internal(format!("bad id length in catalog: {s}")))
    };
    Ok(Binding {
        dataset: parse(dataset_id)?,
        version: parse(version_id)?,
    })
}

/// Removes an uncommitted file when dropped (upload failed or the thread unwound).
struct FileGuard(Option<PathBuf>);

impl FileGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Removes an uncommitted version's object when dropped (the upload failed before its
/// catalog row committed). A commit can fail without its outcome being known (a connection
/// lost during COMMIT): the object goes only if the catalog does not list the version;
/// whatever cannot be settled here is left to startup recovery.
struct ObjectGuard<'a> {
    store: &'a Store,
    version: Option<(String, String)>,
}

impl ObjectGuard<'_> {
    fn disarm(&mut self) {
        self.version = None;
    }
}

impl Drop for ObjectGuard<'_> {
    fn drop(&mut self) {
        let Some((dataset_id, version_id)) = self.version.take() else {
            return;
        };
        let key = objects::version_key(&dataset_id, &version_id);
        let removed = match self.store.catalog.version_exists(&dataset_id, &version_id) {
            Ok(false) => self.store.objects.delete(&key),
            Ok(true) => return,
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            tracing::warn!(key, error = %e, "an uncommitted object stays until startup recovery");
        }
    }
}

impl Store {
    /// Open the store of an initialised data directory, its sealed versions in `objects`
    /// (which must belong to the directory's catalog: `objects::bind`).
    pub fn open(dir: DataDir, config: StoreConfig, objects: SharedObjects) -> Result<Self> {
        let catalog = dir.open_catalog()?;
        let keys = open_keyring(&dir, &catalog)?;
        objects::bind(&*objects, &catalog)?;
        let audit = AuditLog::open(&dir, &catalog)?;
        let mut config = config;
        config.ingest.spool_dir.get_or_insert_with(|| dir.tmp());
        Ok(Store {
            dir,
            catalog,
            audit,
            keys,
            objects,
            cache: PlaintextCache::new(config.cache_bytes),
            config,
            background: crate::background::Background::new(LATER_DELAY),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn audit_log(&self) -> &AuditLog {
        &self.audit
    }

    /// Record an event on its own (questions, refusals, startup); fails closed.
    pub fn record(&self, event: &Event) -> Result<()> {
        audit::record(&self.catalog, &self.audit, event).map(|_| ())
    }

    /// Record `event` if what its request `assumed` still holds
    /// ([`audit::record_assuming`]); `false`: it no longer does, and nothing was recorded.
    pub fn record_assuming(
        &self,
        event: &Event,
        assumed: &crate::catalog::Assumed,
    ) -> Result<bool> {
        audit::record_assuming(&self.catalog, &self.audit, event, assumed).map(|h| h.is_some())
    }

    /// A change recorded as `event`: it commits with its audit record, or its failure is
    /// recorded ([`audit::Change`]).
    pub fn change(&self, event: Event) -> audit::Change<'_> {
        audit::Change::new(&self.catalog, &self.audit, event)
    }

    /// Write a signed checkpoint of the audit log unless it already ends with one.
    pub fn audit_checkpoint(&self) -> Result<Option<audit::Checkpoint>> {
        self.catalog.write(|tx| self.audit.checkpoint(tx))
    }

    pub fn data_dir(&self) -> &DataDir {
        &self.dir
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Where the sealed versions live.
    pub fn objects(&self) -> &dyn objects::Objects {
        &*self.objects
    }

    /// How long a leftover must have been still before a node on a shared catalog removes it
    /// (longer than any upload is idle: uploads time out well before).
    pub const SHARED_RECOVERY_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

    /// Remove what a crash can leave behind: partial uploads, sealed files without a catalog
    /// row (crash between rename and commit, or during a delete), datasets without versions.
    ///
    /// On a shared (PostgreSQL) catalog other nodes may be in the middle of an upload right
    /// now, and their work looks exactly like a crash's leftovers: only what has not moved
    /// for [`Self::SHARED_RECOVERY_GRACE`] is removed (leftovers are invisible meanwhile: a
    /// version counts only once its catalog row commits).
    pub fn recover(&self) -> Result<Recovery> {
        let key_rotation = match RotationLock::try_acquire(&self.dir)? {
            Some(_held) => settle_rotation(&self.catalog, &self.keys)?,
            None => Some("a key rotation is running in another process: left to it".into()),
        };
        let mut r = Recovery {
            key_rotation,
            ..Recovery::default()
        };
        let shared = self.catalog.backend() == "postgres";
        let settled = |age: std::time::Duration| !shared || age >= Self::SHARED_RECOVERY_GRACE;
        for entry in fs::read_dir(self.dir.tmp())? {
            let path = entry?.path();
            if !path.is_file() {
                continue;
            }
            let age = fs::metadata(&path)?
                .modified()?
                .elapsed()
                .unwrap_or_default();
            if settled(age) {
                fs::remove_file(&path)?;
                r.partial_uploads_removed += 1;
                faults::hit("recovery.partial_removed")?;
            }
        }
        // Listed before the catalog is read: a version committed in between is known.
        let stored = self.objects.list(objects::DATASETS)?;
        let known: HashSet<(String, String)> =
            self.catalog.all_version_ids()?.into_iter().collect();
        for meta in stored {
            // A derived object goes with its version.
            let version = objects::parse_version_key(&meta.key)
                .or_else(|| objects::parse_derived_key(&meta.key));
            let listed =
                version.is_some_and(|(d, v)| known.contains(&(d.to_string(), v.to_string())));
            // Only what escrow writes there is removed: versions and the local backend's
            // partial copies. Anything else is someone's file, left alone.
            let ours = version.is_some()
                || meta.key.ends_with(".sealed.partial")
                || objects::is_partial_derived(&meta.key);
            if !ours {
                tracing::warn!(key = meta.key, "not an escrow object: left alone");
                continue;
            }
            if listed || !settled(meta.age) {
                continue;
            }
            // Asked again right before removing: another node may have committed it since.
            if let Some((d, v)) = version
                && self.catalog.version_exists(d, v)?
            {
                continue;
            }
            match self.objects.delete(&meta.key) {
                Ok(()) => r.orphan_files_removed += 1,
                Err(e) => {
                    tracing::warn!(key = meta.key, error = %e, "an orphan stays until the next start")
                }
            }
        }
        let keep = |d: &str, v: &str| known.contains(&(d.to_string(), v.to_string()));
        if let Err(e) = self.objects.prune(&keep) {
            tracing::warn!(error = %e, "local copies of removed versions stay until the next start");
        }
        let cutoff = shared.then(|| {
            (time::OffsetDateTime::now_utc() - Self::SHARED_RECOVERY_GRACE)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        });
        r.empty_datasets_removed = self.catalog.remove_empty_datasets(cutoff.as_deref())?;
        Ok(r)
    }

    /// Drop cached plaintext of versions the catalog no longer lists (deleted, or replaced,
    /// on another node sharing the catalog: its own cache was emptied by the delete).
    pub fn forget_unlisted(&self) -> Result<()> {
        let listed: HashSet<(String, String)> =
            self.catalog.all_version_ids()?.into_iter().collect();
        let keep = move |d: &str, v: &str| listed.contains(&(d.to_string(), v.to_string()));
        let pruned = self.objects.prune(&keep);
        self.cache.retain(keep);
        pruned?;
        Ok(())
    }

    /// Receive, check, seal and commit one upload. Blocking; reads `input` to the end.
    /// Either a complete new version is committed (with its audit record) or nothing is
    /// left behind (and the refusal is audited).
    pub fn upload<R: Read>(&self, req: &UploadRequest, input: R) -> Result<UploadOutcome> {
        let event = Event::new(
            "upload",
            req.actor.clone(),
            Outcome::Ok,
            serde_json::json!({ "dataset": req.dataset }),
        );
        self.change(event)
            .run(|change| self.upload_audited(req, input, change))
    }

    fn upload_audited<R: Read>(
        &self,
        req: &UploadRequest,
        input: R,
        change: &audit::Change<'_>,
    ) -> Result<UploadOutcome> {
        validate_name("dataset", &req.dataset)?;
        let dataset_id =
            self.catalog
                .dataset_id_for_upload(&req.owner, &req.dataset, &random_id()?)?;
        let version_id = random_id()?;
        let bind = binding(&dataset_id, &version_id)?;
        let dek = Kek::new_dek()?;

        let tmp_path = self.dir.tmp().join(format!("{version_id}.partial"));
        let file = fsutil::create_private(&tmp_path)?;
        let mut tmp_guard = FileGuard(Some(tmp_path.clone()));
        let sealer = SealWriter::new(
            BufWriter::with_capacity(1 << 20, faults::Writer::new(file, "upload.write")),
            &dek[..],
            bind,
            self.config.segment_size,
        )?;
        let (tracked, status) = TrackedInput::new(input, self.config.max_upload_bytes);
        let ingested = ingest::ingest(req.format, tracked, &req.key, sealer, &self.config.ingest);
        let (ingested, sealer) = match (ingested, status.fault()) {
            (Ok(v), None) => v,
            (_, Some(InputFault::TooLarge(limit))) => return Err(Error::TooLarge { limit }),
            (_, Some(InputFault::Interrupted)) => return Err(Error::Interrupted),
            (Err(e), None) => return Err(e),
        };
        let (buffered, _plain, sealed_bytes) = sealer.finish()?;
        let file = buffered
            .into_inner()
            .map_err(|e| Error::from(e.into_error()))?
            .into_inner();
        file.sync_all()?;
        drop(file);
        faults::hit("upload.sealed")?;

        let key = objects::version_key(&dataset_id, &version_id);
        self.objects.put_file(&key, &tmp_path)?;
        tmp_guard.disarm();
        let mut final_guard = ObjectGuard {
            store: self,
            version: Some((dataset_id.clone(), version_id.clone())),
        };
        faults::hit("upload.renamed")?;

        let new = NewVersion {
            dataset_id: dataset_id.clone(),
            version_id: version_id.clone(),
            rows: ingested.rows as i64,
            source_bytes: status.bytes() as i64,
            sealed_bytes: sealed_bytes as i64,
            format: ingested.format.as_str().to_string(),
            columns: ingested.columns.clone(),
            key_column: ingested.key_column.clone(),
            uploaded_by: req.actor.user.clone(),
            matching: ingested.matching,
        };
        let wrap = |kek_id: &str| self.keys.get(kek_id)?.wrap(&dek, &bind);
        let version = change.commit(|tx| {
            let version = datasets::commit_version(tx, &new, wrap)?;
            let detail = serde_json::json!({
                "version": version,
                "version_id": version_id,
                "rows": new.rows,
                "bytes": new.source_bytes,
                "format": new.format,
                "key_column": new.key_column,
                "columns": new.columns.len(),
            });
            Ok((version, detail))
        })?;
        final_guard.disarm();
        faults::hit("upload.committed")?;
        self.cache.forget_dataset(&dataset_id, Some(&version_id));
        Ok(UploadOutcome {
            dataset: req.dataset.clone(),
            version,
            rows: ingested.rows,
            bytes: status.bytes(),
            sealed_bytes,
            format: ingested.format.as_str().to_string(),
            key_column: ingested.key_column,
            key_type: ingested.key_type,
            name_column: ingested.name_column,
            name_context: ingested.name_context,
            places: ingested.places,
            matching: ingested.matching,
            columns: ingested.columns,
        })
    }

    /// Metadata of the live version of `owner`'s dataset `name`; `not_found` if it has none.
    pub fn live_dataset(&self, owner: &str, name: &str) -> Result<DatasetInfo> {
        self.list(owner)?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::NotFound(format!("no dataset named {name}")))
    }

    /// The live version of `owner`'s dataset `name`; `not_found` if it has none.
    pub fn live_version(&self, owner: &str, name: &str) -> Result<VersionKey> {
        self.catalog
            .version_keys(owner, name)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::NotFound(format!("no dataset named {name}")))
    }

    /// Metadata of the live version of each of `owner`'s datasets.
    pub fn list(&self, owner: &str) -> Result<Vec<DatasetInfo>> {
        self.catalog.list_datasets(owner)
    }

    /// Every version of `owner`'s dataset `name`, oldest first.
    pub fn versions(&self, owner: &str, name: &str) -> Result<Vec<crate::catalog::VersionInfo>> {
        let versions = self.catalog.dataset_versions(owner, name)?;
        if versions.is_empty() {
            return Err(Error::NotFound(format!("no dataset named {name}")));
        }
        Ok(versions)
    }

    /// Crypto-shred a dataset: its wrapped keys are deleted from the catalog (secure_delete),
    /// then its objects are removed. Returns the number of versions destroyed.
    pub fn delete(&self, actor: &Actor, name: &str) -> Result<usize> {
        let owner = actor.partner.as_deref().unwrap_or_default();
        let event = Event::new(
            "delete",
            actor.clone(),
            Outcome::Ok,
            serde_json::json!({ "dataset": name }),
        );
        let deleted = self.change(event).run(|change| {
            validate_name("dataset", name)?;
            change.commit(|tx| {
                let d = datasets::delete_dataset(tx, owner, name, &actor.user)?;
                let mut detail = crate::model::policy::PolicyVersion::audit_json(d.policy.as_ref());
                detail["versions_destroyed"] = d.versions.into();
                Ok((d, detail))
            })
        })?;
        let (dataset_id, versions) = (deleted.dataset_id, deleted.versions);
        // Out of the write-ahead log too (the rows held wrapped keys). A failure is returned
        // once the rest of the removal is done.
        let purged = self.catalog.purge();
        self.cache.forget_dataset(&dataset_id, None);
        faults::hit("delete.committed")?;
        // The keys are gone: the objects are unreadable from here on. Removing them is
        // hygiene; a crash before this point leaves orphans that startup recovery removes.
        // A failure here does not undo the shredding: it is logged, and startup recovery
        // removes what is left.
        let removed = self
            .objects
            .list(&objects::dataset_prefix(&dataset_id))
            .and_then(|stored| stored.iter().try_for_each(|m| self.objects.delete(&m.key)));
        if let Err(e) = removed {
            tracing::warn!(dataset_id, error = %e, "a shredded dataset's objects stay until startup recovery");
        }
        purged?;
        Ok(versions)
    }

    /// Open the live version of a dataset for reading. Every batch comes from segments that
    /// authenticated; any failure ends the read with `Error::Integrity`. Internal API for the
    /// query engine and tests: no endpoint returns these rows.
    pub fn read_live(&self, owner: &str, name: &str) -> Result<SealedBatches> {
        self.read_version(&self.live_version(owner, name)?)
    }

    /// The schema of a version (read from its sealed file once, then remembered).
    pub fn schema_of(&self, v: &VersionKey) -> Result<SchemaRef> {
        if let Some(s) = self.cache.schema(&v.dataset_id, &v.version_id) {
            return Ok(s);
        }
        let schema = self.read_version(v)?.schema();
        self.cache
            .insert_schema(&v.dataset_id, &v.version_id, schema.clone());
        Ok(schema)
    }

    /// The verified batches of a version in query form, with only the form's `columns` (in
    /// that order): from the plaintext cache, or read (decrypting and authenticating only the
    /// stored columns they come from, where the object is a local file), transformed, and
    /// cached column by column once the whole version read cleanly. A version has one form:
    /// the cache holds its columns by their place in it. `mark` is where the read began
    /// ([`Self::read_mark`], taken by the caller, who may also look up or keep a value derived
    /// from the same read with it).
    pub fn batches(
        self: &std::sync::Arc<Self>,
        v: &VersionKey,
        ReadMark { stamp, since }: ReadMark,
        form: &Form,
        columns: &[usize],
    ) -> Result<Box<dyn Iterator<Item = Result<RecordBatch>> + Send>> {
        if columns.is_empty() {
            return Err(Error::internal("a read of no columns"));
        }
        let schema = std::sync::Arc::new(
            form.schema
                .project(columns)
                .map_err(|e| Error::internal(format!("query form: {e}")))?,
        );
        let cached = self
            .cache
            .columns(&v.dataset_id, &v.version_id, stamp, columns);
        if let Some(chunks) = cached.iter().cloned().collect::<Option<Vec<_>>>() {
            let n = chunks.first().map_or(0, |c| c.len());
            if chunks.iter().all(|c| c.len() == n) {
                return Ok(Box::new((0..n).map(move |i| {
                    let columns = chunks.iter().map(|c| c[i].clone()).collect();
                    RecordBatch::try_new(schema.clone(), columns)
                        .map_err(|e| Error::internal(format!("cached columns: {e}")))
                })));
            }
        }
        // Read what is not cached: the stored columns behind it, once each.
        let missing: Vec<usize> = (0..columns.len())
            .filter(|&i| cached[i].is_none())
            .collect();
        let mut stored: Vec<usize> = missing
            .iter()
            .map(|&i| form.source(columns[i]))
            .collect::<Result<_>>()?;
        stored.sort_unstable();
        stored.dedup();
        let mut reader = self.read_columns(v, &stored)?;
        let fresh: Vec<(usize, usize, Option<Transform>)> = missing
            .iter()
            .map(|&i| {
                let (source, transform) = form.columns[columns[i]].clone();
                let at = stored.binary_search(&source).unwrap_or_default();
                (i, at, transform)
            })
            .collect();
        let max = self.cache.max_bytes();
        let mut kept: Option<Vec<(Vec<ArrayRef>, MemoryMeter)>> =
            Some(missing.iter().map(|_| Default::default()).collect());
        let (mut reading, mut preparing) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let (dataset_id, version_id) = (v.dataset_id.clone(), v.version_id.clone());
        let store = std::sync::Arc::clone(self);
        let mut chunk = 0usize;
        let ids: Vec<usize> = columns.to_vec();
        let iter = std::iter::from_fn(move || {
            let started = std::time::Instant::now();
            let read = reader.next();
            let decoded = std::time::Instant::now();
            reading += decoded - started;
            let next = read.map(|b| -> Result<RecordBatch> {
                let b = b?;
                let mut out: Vec<Option<ArrayRef>> = cached
                    .iter()
                    .map(|c| c.as_ref().and_then(|c| c.get(chunk).cloned()))
                    .collect();
                for (k, (i, at, transform)) in fresh.iter().enumerate() {
                    let column = b.column(*at);
                    let column = match transform {
                        Some(t) => t(column.as_ref())?,
                        None => column.clone(),
                    };
                    if let Some(kept) = kept.as_mut() {
                        kept[k].1.add_array(column.as_ref());
                        kept[k].0.push(column.clone());
                    }
                    out[*i] = Some(column);
                }
                let columns = out
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| Error::internal("a cached column is cut otherwise"))?;
                RecordBatch::try_new(schema.clone(), columns)
                    .map_err(|e| Error::internal(format!("query form: {e}")))
            });
            preparing += decoded.elapsed();
            chunk += 1;
            match next {
                Some(Ok(b)) => {
                    if kept
                        .as_ref()
                        .is_some_and(|k| k.iter().map(|(_, m)| m.bytes()).sum::<usize>() > max)
                    {
                        kept = None;
                    }
                    Some(Ok(b))
                }
                Some(Err(e)) => {
                    kept = None;
                    Some(Err(e))
                }
                None => {
                    // Every cached column was cut as this read was, or nothing is answered.
                    if cached.iter().flatten().any(|c| c.len() != chunk - 1) {
                        return Some(Err(Error::internal("a cached column is cut otherwise")));
                    }
                    if let Some(kept) = kept.take() {
                        tracing::debug!(
                            version = %version_id,
                            read_ms = reading.as_millis() as u64,
                            prepare_ms = preparing.as_millis() as u64,
                            columns = kept.len(),
                            bytes = kept.iter().map(|(_, m)| m.bytes()).sum::<usize>(),
                            "columns read from their sealed object"
                        );
                        for ((chunks, meter), (i, _, _)) in kept.into_iter().zip(&fresh) {
                            store.cache.insert(
                                (&dataset_id, &version_id, ids[*i]),
                                (stamp, since),
                                std::sync::Arc::new(chunks),
                                meter.bytes(),
                            );
                        }
                    }
                    None
                }
            }
        });
        Ok(Box::new(iter))
    }

    /// Taken when a read of version `v` begins: the size and modification time of its sealed
    /// object (what its cached plaintext, and what was computed from it, is kept under), and
    /// where the cache stands (what the read computes is not kept if a dataset is forgotten
    /// meanwhile: see [`PlaintextCache::mark`]).
    pub fn read_mark(&self, v: &VersionKey) -> Result<ReadMark> {
        let since = self.cache.mark();
        let meta = self
            .objects
            .head(&objects::version_key(&v.dataset_id, &v.version_id))?
            .ok_or_else(missing)?;
        Ok(ReadMark {
            stamp: (meta.size, meta.stamp),
            since,
        })
    }

    /// A value computed from a version's plaintext and kept as `name` ([`Self::keep_derived`]),
    /// while the version's object is as it was (`mark`, from [`Self::read_mark`] now).
    pub fn derived<T: std::any::Any + Send + Sync>(
        &self,
        v: &VersionKey,
        mark: ReadMark,
        name: &str,
    ) -> Option<std::sync::Arc<T>> {
        let value = self
            .cache
            .derived(&v.dataset_id, &v.version_id, mark.stamp, name)?;
        value.downcast::<T>().ok()
    }

    /// Keep `value`, computed from the plaintext of version `v` read since `mark`, as `name`,
    /// beside the version's cached columns: it is plaintext too, counted in the same budget
    /// (as `bytes`) and forgotten with them (a new upload, a delete).
    pub fn keep_derived<T: std::any::Any + Send + Sync>(
        &self,
        v: &VersionKey,
        mark: ReadMark,
        name: &str,
        value: std::sync::Arc<T>,
        bytes: usize,
    ) {
        self.cache.insert_derived(
            (&v.dataset_id, &v.version_id, name),
            (mark.stamp, mark.since),
            value,
            bytes,
        );
    }

    /// Seal `plaintext`, a value derived from version `v`'s plaintext, as object `name` beside
    /// the version, so that another process (a restarted server, another node) reads it back
    /// ([`Self::open_derived`]) instead of deriving it again. Sealed as versions are, under a
    /// key derived from the version's data key with a fresh salt (`keys::derived_key`): it
    /// is removed with its dataset, shredded with its data key, unaffected by a rotation, and
    /// an object of another name or version does not open in its place. Written whole or not
    /// at all; writing it again replaces it.
    pub fn seal_derived(&self, v: &VersionKey, name: &str, plaintext: &[u8]) -> Result<()> {
        let (bind, dek) = self.data_key(v)?;
        let salt: [u8; keys::SALT_LEN] = crate::crypto::random_bytes()?;
        let key = keys::derived_key(&dek, &salt, name)?;
        // Sealed in memory and stored whole: nothing in `DIR/tmp`, which holds uploads in
        // flight (a derived object is at most about as large as the version's columns it
        // was derived from, already in memory).
        let segments = plaintext.len() / self.config.segment_size as usize + 1;
        let mut sealed =
            Vec::with_capacity(keys::SALT_LEN + seal::HEADER_LEN + plaintext.len() + segments * 16);
        sealed.extend_from_slice(&salt);
        let mut sealer = SealWriter::new(sealed, &key[..], bind, self.config.segment_size)?;
        std::io::Write::write_all(&mut sealer, plaintext)?;
        let (sealed, _, _) = sealer.finish()?;
        let key = objects::derived_key(&v.dataset_id, &v.version_id, name);
        self.objects.put_bytes(&key, &sealed)?;
        // A delete that listed the dataset's objects before this one was stored would leave it
        // behind (unreadable: the data key it comes from is gone): removed now rather than
        // by the next startup's recovery. A delete that lists them after this check finds it.
        if !self.catalog.version_exists(&v.dataset_id, &v.version_id)? {
            self.objects.delete(&key)?;
        }
        Ok(())
    }

    /// Run `job` (typically encoding a derived object and [`Self::seal_derived`]) later, on
    /// the store's background thread at the lowest priority (`background`), so that it
    /// competes with no question for the cores, a second ([`LATER_DELAY`]) after it comes.
    /// Of several jobs of `name` beside `v` given within that time, the last one runs (`name`
    /// identifies the job: the object it seals, or that and what it seals it from). Work
    /// for a later process only: nothing waits for it (a shutdown runs what waits, within its
    /// grace), and a job lost to a crash is done again by the next process. A job should
    /// check, when it runs, that what it seals is still current.
    pub fn later(&self, v: &VersionKey, name: &str, job: impl FnOnce() + Send + 'static) {
        let key = objects::derived_key(&v.dataset_id, &v.version_id, name);
        self.background.submit(key, job);
    }

    /// Wait until every job given to [`Self::later`] has run, for at most `within`; whether
    /// they have.
    pub fn wait_later(&self, within: std::time::Duration) -> bool {
        self.background.wait_idle(within)
    }

    /// The plaintext sealed as `name` beside version `v` ([`Self::seal_derived`]), verified;
    /// `None` if there is none. One that does not authenticate is `Error::Integrity`.
    pub fn open_derived(&self, v: &VersionKey, name: &str) -> Result<Option<Vec<u8>>> {
        let key = objects::derived_key(&v.dataset_id, &v.version_id, name);
        let Some(mut object) = self.objects.open(&key)? else {
            return Ok(None);
        };
        let (bind, dek) = self.data_key(v)?;
        let mut salt = [0u8; keys::SALT_LEN];
        if fsutil::read_full(&mut object, &mut salt)? != keys::SALT_LEN {
            return Err(Error::Integrity(format!("derived object {key}: truncated")));
        }
        let key = keys::derived_key(&dek, &salt, name)?;
        let mut opened = OpenReader::new(object, &key[..], bind).map_err(io_to_integrity)?;
        let mut plaintext = Vec::new();
        opened
            .read_to_end(&mut plaintext)
            .map_err(io_to_integrity)?;
        Ok(Some(plaintext))
    }

    /// The verified batches of a version with only its stored `columns` (ascending): only
    /// their segments decrypted where the object is a local file, else read whole.
    fn read_columns(
        &self,
        v: &VersionKey,
        columns: &[usize],
    ) -> Result<Box<dyn Iterator<Item = Result<RecordBatch>> + Send>> {
        let key = objects::version_key(&v.dataset_id, &v.version_id);
        let Some(file) = self.objects.local_file(&key)? else {
            let columns = columns.to_vec();
            return Ok(Box::new(self.read_version(v)?.map(move |b| {
                b?.project(&columns)
                    .map_err(|e| Error::internal(format!("projecting a version: {e}")))
            })));
        };
        let (bind, dek) = self.data_key(v)?;
        let source =
            seal::SealedRandomAccess::open(file, &dek[..], bind).map_err(io_to_integrity)?;
        Ok(Box::new(crate::projected::ProjectedBatches::new(
            source,
            columns.to_vec(),
        )?))
    }

    /// A version's binding and its data key, unwrapped.
    fn data_key(&self, v: &VersionKey) -> Result<(Binding, keys::SecretKey)> {
        let bind = binding(&v.dataset_id, &v.version_id)?;
        let dek = self.keys.get(&v.kek_id)?.unwrap(&v.wrapped_dek, &bind)?;
        Ok((bind, dek))
    }

    fn read_version(&self, v: &VersionKey) -> Result<SealedBatches> {
        let (bind, dek) = self.data_key(v)?;
        let object = self
            .objects
            .open(&objects::version_key(&v.dataset_id, &v.version_id))?
            .ok_or_else(missing)?;
        let opened = OpenReader::new(object, &dek[..], bind).map_err(io_to_integrity)?;
        let reader =
            arrow_ipc::reader::StreamReader::try_new(opened, None).map_err(arrow_to_integrity)?;
        Ok(SealedBatches {
            reader,
            failed: false,
        })
    }
}

/// The data directory's keyring, checked against the catalog: the catalog records the
/// source's current key if it records none yet, and every key a data key is wrapped under (and
/// the catalog's current one) must be held by the source, or the store does not open: better
/// a clear refusal at startup than unreadable datasets later.
pub fn open_keyring(dir: &DataDir, catalog: &Catalog) -> Result<Keyring> {
    let keys = Keyring::load(dir.kek_source()?)?;
    let current = match keys.current_id() {
        Some(id) => catalog.ensure_current_kek(&id)?,
        None => catalog.current_kek()?,
    };
    let mut needed = catalog.kek_ids_in_use()?;
    needed.push(current);
    for id in needed {
        keys.get(&id)?;
    }
    Ok(keys)
}

/// The lock `keys rotate` holds for its whole run (`DataDir::rotation_lock`, an advisory
/// file lock, released when the process ends however it ends). A rotation's next key file
/// exists before its catalog commit: a node starting meanwhile (another host on the shared
/// directory, or a restart) must not take it for a crash's leftover and remove it, or the
/// commit would wrap every data key under a key that no longer exists.
pub struct RotationLock {
    _held: fs::File,
}

impl RotationLock {
    fn file(dir: &DataDir) -> Result<fs::File> {
        Ok(fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.rotation_lock())?)
    }

    /// Wait for the lock (a rotation).
    pub fn acquire(dir: &DataDir) -> Result<Self> {
        let file = Self::file(dir)?;
        file.lock()?;
        Ok(RotationLock { _held: file })
    }

    /// The lock if no rotation holds it (recovery).
    pub fn try_acquire(dir: &DataDir) -> Result<Option<Self>> {
        let file = Self::file(dir)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(RotationLock { _held: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e.into()),
        }
    }
}

/// Finish or undo a key rotation a crash interrupted (see `keys::settle_rotation`); what was
/// done, for the recovery log.
pub fn settle_rotation(catalog: &Catalog, keys: &Keyring) -> Result<Option<String>> {
    let current = catalog.current_kek()?;
    let source = keys.source();
    Ok(match (&source.current, &source.next) {
        (KeyLocation::File(cur), KeyLocation::File(next)) => {
            match keys::settle_rotation(cur, next, &current)? {
                keys::Settled::Nothing => None,
                keys::Settled::Promoted(id) => Some(format!("finished the rotation to key {id}")),
                keys::Settled::Discarded(id) => Some(format!(
                    "removed key {id} of a rotation that never committed"
                )),
            }
        }
        // Moving the key out of the data directory: once the catalog is on the external next
        // key, the key file is retired.
        (KeyLocation::File(cur), next) => {
            if cur.exists() && keys.next_id().as_deref() == Some(current.as_str()) {
                fs::remove_file(cur)?;
                fsutil::sync_parent(cur)?;
                Some(format!(
                    "finished the rotation to key {current} ({}): removed the retired key file; make it the current key ({})",
                    next.describe(),
                    keys::ENV_KEK
                ))
            } else {
                None
            }
        }
        (_, next) => {
            (keys.current_id().as_deref() != Some(current.as_str())).then(|| {
                format!(
                    "the catalog is on key {current} from the {}: make it the current key and retire the old one",
                    next.describe()
                )
            })
        }
    })
}

/// A version the catalog lists whose sealed object is gone (removed behind escrow's back).
fn missing() -> Error {
    Error::Integrity("the sealed object of a listed version is missing".into())
}

/// Record batches of one sealed version, verified segment by segment.
pub struct SealedBatches {
    reader: arrow_ipc::reader::StreamReader<OpenReader<Box<dyn Read + Send>>>,
    failed: bool,
}

impl SealedBatches {
    pub fn schema(&self) -> SchemaRef {
        self.reader.schema()
    }

    /// Read everything, failing as a whole on any integrity error.
    pub fn collect_all(self) -> Result<Vec<RecordBatch>> {
        self.collect()
    }
}

impl Iterator for SealedBatches {
    type Item = Result<RecordBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.reader.next() {
            Some(Ok(b)) => Some(Ok(b)),
            Some(Err(e)) => {
                self.failed = true;
                Some(Err(arrow_to_integrity(e)))
            }
            None => {
                // The IPC end-of-stream marker was read; the sealed file must end right there
                // too. Draining verifies any remaining (possibly empty) last segment, so a
                // file cut after the marker's segment is still caught.
                self.failed = true;
                let mut rest = Vec::new();
                match self.reader.get_mut().read_to_end(&mut rest) {
                    Ok(_) if rest.is_empty() => None,
                    Ok(_) => Some(Err(Error::Integrity(
                        "data after the end of the stream".into(),
                    ))),
                    Err(e) => Some(Err(io_to_integrity(e))),
                }
            }
        }
    }
}
