//! The S3 backend of the sealed-object seam (`--objects s3://bucket/prefix`), on the
//! `object_store` crate, and `open_objects`, which picks the backend a data directory names.
//!
//! Endpoint, region and credentials come from the usual environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_ALLOW_HTTP` for a plain-HTTP test server, ...). A version larger than one part goes
//! up as a multipart upload, several parts at a time, and becomes visible only when the
//! upload completes; reads are ranged GETs, one range ahead of the reader, each pinned to the
//! object's ETag so an object replaced mid-read fails as tampering. The bytes are the sealed
//! format, so authentication works exactly as for a file.
//!
//! This backend speaks HTTP, so it lives here and not in `escrow-store` (which Cargo keeps
//! free of HTTP clients); the store sees only the `Objects` trait.

use std::fs::File;
use std::future::Future;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use escrow_store::blocking::Driver;
use escrow_store::crypto::seal::IntegrityError;
use escrow_store::datadir::DataDir;
use escrow_store::objects::cached::CachedObjects;
use escrow_store::objects::local::LocalObjects;
use escrow_store::objects::{Location, OBJECTS_ID, ObjectMeta, Objects, SharedObjects, check_key};
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};

use crate::{Error, Result, fsutil};

/// Bytes per part of a multipart upload (S3 wants at least 5 MiB but the last).
const PART: usize = 8 << 20;
/// Parts in flight at once during an upload.
const PARTS_IN_FLIGHT: usize = 4;
/// Bytes per ranged read.
const RANGE: u64 = 8 << 20;

/// The object store a data directory names: its own `datasets/` folder by default.
pub fn open_objects(dir: &DataDir) -> Result<SharedObjects> {
    Ok(match dir.objects_location()? {
        Location::Local(root) => Arc::new(LocalObjects::new(root)?),
        // A node reads each version from the remote store at most once: DIR/cache/.
        Location::S3(url) => Arc::new(CachedObjects::new(
            Arc::new(S3Objects::connect(&url)?),
            &dir.root().join("cache"),
        )?),
    })
}

pub struct S3Objects {
    store: Arc<dyn ObjectStore>,
    driver: Arc<Driver>,
    /// `s3://bucket/prefix`, for logs.
    url: String,
}

impl std::fmt::Debug for S3Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Objects({})", self.url)
    }
}

fn s3_error(e: object_store::Error) -> Error {
    Error::internal(format!("object store: {e}"))
}

impl S3Objects {
    /// The store at `url` (`s3://bucket/prefix`), configured by the `AWS_*` environment;
    /// fails, with the reason, if it cannot be reached or its bucket read.
    pub fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &[])
    }

    /// As `connect`, with `settings` (object_store's keys: `aws_endpoint_url`, `aws_region`,
    /// ...) over the environment's.
    pub fn connect_with(url: &str, settings: &[(String, String)]) -> Result<Self> {
        let bad = |why: String| Error::bad("bad_objects_url", format!("--objects {url}: {why}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("no bucket named".into()))?;
        let prefix = parsed.path().trim_matches('/');
        if !prefix.is_empty() {
            check_key(prefix).map_err(|_| bad("the prefix must be [a-z0-9._-] folders".into()))?;
        }
        let mut builder = AmazonS3Builder::from_env();
        for (key, value) in settings {
            let key = key.parse().map_err(|e| bad(format!("{key}: {e}")))?;
            builder = builder.with_config(key, value);
        }
        let s3 = builder
            .with_bucket_name(bucket)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
            })
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        let objects = S3Objects {
            store,
            driver: Arc::new(Driver::new("escrow-objects", 2)?),
            url: format!("s3://{bucket}/{prefix}"),
        };
        // Fail now, with the reason, rather than at the first upload.
        objects.get_bytes(OBJECTS_ID).map_err(|e| {
            Error::bad(
                "objects_unreachable",
                format!("cannot read {}: {e}", objects.describe()),
            )
        })?;
        Ok(objects)
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        check_key(key)?;
        Ok(ObjectPath::from(key))
    }

    /// Wait for an object-store call on this thread.
    fn wait<T>(&self, f: impl Future<Output = object_store::Result<T>>) -> Result<T> {
        self.driver.wait(f)?.map_err(s3_error)
    }

    /// `Ok(None)` for an object that is not there.
    fn absent_is_none<T>(
        &self,
        f: impl Future<Output = object_store::Result<T>>,
    ) -> Result<Option<T>> {
        match self.driver.wait(f)? {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error(e)),
        }
    }

    fn meta(&self, key: String, m: &object_store::ObjectMeta) -> ObjectMeta {
        let modified: SystemTime = m.last_modified.into();
        // The ETag changes with the content even within the second of Last-Modified.
        let stamp = match &m.e_tag {
            Some(tag) => {
                let digest = <sha2::Sha256 as sha2::Digest>::digest(tag.as_bytes());
                let mut first = [0u8; 16];
                first.copy_from_slice(&digest[..16]);
                i128::from_le_bytes(first)
            }
            None => m.last_modified.timestamp_nanos_opt().map_or(-1, i128::from),
        };
        ObjectMeta {
            key,
            size: m.size,
            stamp,
            age: SystemTime::now()
                .duration_since(modified)
                .unwrap_or_default(),
        }
    }
}

impl Objects for S3Objects {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn describe(&self) -> String {
        format!("objects in {}", self.url)
    }

    fn put_file(&self, key: &str, from: &Path) -> Result<()> {
        let path = self.path(key)?;
        let size = std::fs::metadata(from)?.len();
        if size <= PART as u64 {
            let bytes = std::fs::read(from)?;
            self.wait(self.store.put(&path, PutPayload::from(bytes)))?;
        } else {
            let mut file = File::open(from)?;
            let store = Arc::clone(&self.store);
            self.driver.wait(async move {
                let upload = store.put_multipart(&path).await.map_err(s3_error)?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
                let mut buf = vec![0u8; PART];
                let sent: Result<()> = async {
                    loop {
                        let n = fsutil::read_full(&mut file, &mut buf)?;
                        if n == 0 {
                            return Ok(());
                        }
                        writer
                            .wait_for_capacity(PARTS_IN_FLIGHT)
                            .await
                            .map_err(s3_error)?;
                        writer.write(&buf[..n]);
                    }
                }
                .await;
                // Every part sent before completing, so that a failed part can still abort.
                let sent = match sent {
                    Ok(()) => writer.wait_for_capacity(0).await.map_err(s3_error),
                    Err(e) => Err(e),
                };
                match sent {
                    Ok(()) => writer.finish().await.map(drop).map_err(s3_error),
                    Err(e) => {
                        // Nothing became visible; drop the parts already sent.
                        let _ = writer.abort().await;
                        Err(e)
                    }
                }
            })??;
        }
        std::fs::remove_file(from)?;
        Ok(())
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        self.wait(self.store.put(&path, PutPayload::from(bytes.to_vec())))
            .map(drop)
    }

    fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        let store = &self.store;
        self.absent_is_none(async move { store.get(&path).await?.bytes().await })
            .map(|b| b.map(|b| b.to_vec()))
    }

    fn open(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let path = self.path(key)?;
        let Some(meta) = self.absent_is_none(self.store.head(&path))? else {
            return Ok(None);
        };
        let mut reader = RangedReader {
            store: Arc::clone(&self.store),
            driver: Arc::clone(&self.driver),
            path,
            size: meta.size,
            e_tag: meta.e_tag,
            requested: 0,
            current: Bytes::new(),
            ahead: None,
            failed: false,
        };
        reader.fetch_ahead()?;
        Ok(Some(Box::new(reader)))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        Ok(self
            .absent_is_none(self.store.head(&path))?
            .map(|m| self.meta(key.to_string(), &m)))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let folder = self.path(prefix.trim_end_matches('/'))?;
        let listed: Vec<object_store::Result<object_store::ObjectMeta>> =
            self.driver.wait(self.store.list(Some(&folder)).collect())?;
        let mut out = Vec::with_capacity(listed.len());
        for m in listed {
            let m = m.map_err(s3_error)?;
            out.push(self.meta(m.location.to_string(), &m));
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        self.absent_is_none(self.store.delete(&path)).map(drop)
    }
}

type Pending = tokio::task::JoinHandle<object_store::Result<Bytes>>;

/// An object read front to back in ranges, the next range always on its way.
struct RangedReader {
    store: Arc<dyn ObjectStore>,
    driver: Arc<Driver>,
    path: ObjectPath,
    size: u64,
    /// The version that was opened: a range of any other version is refused.
    e_tag: Option<String>,
    /// Bytes asked for so far (the end of the range in flight).
    requested: u64,
    current: Bytes,
    ahead: Option<(u64, Pending)>,
    /// A read failed: every later read fails too (never a clean end).
    failed: bool,
}

impl Drop for RangedReader {
    fn drop(&mut self) {
        if let Some((_, pending)) = self.ahead.take() {
            pending.abort();
        }
    }
}

impl RangedReader {
    /// Ask for the next range, if any is left.
    fn fetch_ahead(&mut self) -> Result<()> {
        if self.requested >= self.size {
            return Ok(());
        }
        let range = self.requested..(self.requested + RANGE).min(self.size);
        self.requested = range.end;
        let (store, path) = (Arc::clone(&self.store), self.path.clone());
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            if_match: self.e_tag.clone(),
            ..GetOptions::default()
        };
        let pending = self
            .driver
            .spawn(async move { store.get_opts(&path, options).await?.bytes().await })?;
        self.ahead = Some((range.end - range.start, pending));
        Ok(())
    }

    /// The range in flight, checked whole.
    fn take_ahead(&mut self) -> io::Result<Option<Bytes>> {
        let Some((expected, pending)) = self.ahead.take() else {
            return Ok(None);
        };
        let integrity = |why: String| io::Error::other(IntegrityError(why));
        let got = self
            .driver
            .wait(pending)
            .map_err(io::Error::other)?
            .map_err(io::Error::other)?;
        let bytes = match got {
            Ok(b) => b,
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                return Err(integrity("the object changed while it was read".into()));
            }
            Err(e) => return Err(io::Error::other(e)),
        };
        if bytes.len() as u64 != expected {
            return Err(integrity(format!(
                "a range of {expected} bytes came back with {}",
                bytes.len()
            )));
        }
        self.fetch_ahead().map_err(io::Error::other)?;
        Ok(Some(bytes))
    }
}

impl Read for RangedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::other("an earlier read of this object failed"));
        }
        if self.current.is_empty() {
            match self.take_ahead() {
                Ok(Some(next)) => self.current = next,
                Ok(None) => return Ok(0),
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
