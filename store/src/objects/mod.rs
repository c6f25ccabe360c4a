//! Sealed objects: where the sealed files of dataset versions live, behind one seam with two
//! backends. The default keeps them in the data directory (`local`), as it always has; a
//! deployment of several nodes names an S3-compatible store (`--objects s3://bucket/prefix`;
//! that backend speaks HTTP and so lives in the `escrow` crate, on the `object_store` crate).
//!
//! What is stored is the sealed format of `crypto::seal` byte for byte: every segment is
//! authenticated and bound to its dataset, version and position, so a swapped, truncated or
//! altered object fails its read exactly as a file on disk does. Nothing here decrypts.
//!
//! Keys are relative paths: `datasets/DATASET_ID/VERSION_ID.sealed` for versions,
//! `datasets/DATASET_ID/VERSION_ID.HASH.derived` for what a version's plaintext was reduced
//! to and kept sealed beside it (sealed too, under a key derived from the version's), and
//! `objects.id`, which binds the object store to its catalog. Uploads in flight and ingest
//! spools are node-local scratch (`DIR/tmp`) until their version is put here whole.

pub mod cached;
pub mod local;

#[doc(hidden)]
pub mod conformance;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::{Error, Result};

/// What the store knows of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Changes whenever the object is written again (its modification time in nanoseconds);
    /// with the size it stamps cached plaintext, so a replaced object is read again.
    pub stamp: i128,
    /// How long since the object last changed.
    pub age: Duration,
}

/// An object store, as the dataset store uses it. Blocking: the server calls the store on
/// its blocking pool, and a remote backend drives its I/O on a runtime of its own.
pub trait Objects: Send + Sync {
    /// The backend: "local" or "s3".
    fn kind(&self) -> &'static str;
    /// Where the objects are, for logs and errors (never credentials).
    fn describe(&self) -> String;
    /// Store the finished local file `from` as `key`, durably, and remove `from` (a local
    /// backend moves it). Either the whole object is stored or none of it is visible.
    fn put_file(&self, key: &str, from: &Path) -> Result<()>;
    /// Store an object held in memory whole (markers, derived objects): either all of it is
    /// visible or none of it.
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// A small object whole; `None` if there is none.
    fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// A sequential reader of an object; `None` if there is none. A remote backend reads it
    /// in ranges, ahead of the caller.
    fn open(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>>;
    /// An object as a local file, for reads of some of its parts (a question decrypts only
    /// the columns it uses); `None` if there is none, or if the backend keeps no local file
    /// of it (then `open` reads it whole).
    fn local_file(&self, key: &str) -> Result<Option<std::fs::File>> {
        let _ = key;
        Ok(None)
    }
    /// Size and stamp of an object; `None` if there is none.
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// Every object whose key starts with `prefix` (a folder, ending in `/`), by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Remove an object; one that is not there is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Drop what a backend keeps on the side (a node's local copies) of versions for which
    /// `keep(dataset_id, version_id)` is false; how many were dropped.
    fn prune(&self, keep: &dyn Fn(&str, &str) -> bool) -> Result<usize> {
        let _ = keep;
        Ok(0)
    }
}

/// An object store shared by the store and whoever opened it.
pub type SharedObjects = Arc<dyn Objects>;

/// The folder of every dataset's versions.
pub const DATASETS: &str = "datasets/";

/// The object that names the catalog these objects belong to (not `catalog.id`, which binds
/// a data directory: the default store is that directory, but a node started without
/// `--objects` must not find its directory's binding and take it for the store's).
pub const OBJECTS_ID: &str = "objects.id";

/// The key of a version's sealed object.
pub fn version_key(dataset_id: &str, version_id: &str) -> String {
    format!("{DATASETS}{dataset_id}/{version_id}.sealed")
}

/// The key of an object derived from a version's plaintext (`Store::seal_derived`), named
/// `name`: beside the version, under a hash of the name.
pub fn derived_key(dataset_id: &str, version_id: &str, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash = hex::encode(&Sha256::digest(name.as_bytes())[..16]);
    format!("{DATASETS}{dataset_id}/{version_id}.{hash}.derived")
}

/// The dataset and version ids of a derived object's key; `None` for anything else.
pub fn parse_derived_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(DATASETS)?;
    let (dataset, file) = rest.split_once('/')?;
    let (version, hash) = file.strip_suffix(".derived")?.split_once('.')?;
    let id = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    (id(dataset) && id(version) && id(hash)).then_some((dataset, version))
}

/// Whether `key` is what the local backend leaves of a derived object it was writing when
/// its process died (`fsutil::atomic_write`: `VERSION_ID.HASH.tmp-PID-N`).
pub fn is_partial_derived(key: &str) -> bool {
    let Some((_, file)) = key.strip_prefix(DATASETS).and_then(|r| r.split_once('/')) else {
        return false;
    };
    let Some((stem, pid)) = file.rsplit_once(".tmp-") else {
        return false;
    };
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit() || b == b'-')
        && stem.split_once('.').is_some_and(|(v, h)| hex(v) && hex(h))
}

/// The folder of one dataset's versions.
pub fn dataset_prefix(dataset_id: &str) -> String {
    format!("{DATASETS}{dataset_id}/")
}

/// The dataset and version ids of a version's key; `None` for anything else (leftovers).
pub fn parse_version_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(DATASETS)?;
    let (dataset, file) = rest.split_once('/')?;
    let version = file.strip_suffix(".sealed")?;
    let id = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    (id(dataset) && id(version)).then_some((dataset, version))
}

/// Refuse keys that could leave the store's root: only `[a-z0-9._-]` segments, none of them
/// empty, `.` or `..`.
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::internal(format!("object key refused: {key:?}")))
    }
}

/// Where the sealed objects live, from `--objects` / `ESCROW_OBJECTS`.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory: the data directory itself by default (its `datasets/` folder).
    Local(PathBuf),
    /// An S3-compatible store, `s3://bucket/prefix` (endpoint, region and credentials from
    /// the usual `AWS_*` environment variables).
    S3(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "Local({})", p.display()),
            Location::S3(url) => write!(f, "S3({})", crate::catalog::redacted(url)),
        }
    }
}

impl Location {
    /// The location named by `url` (`s3://bucket/prefix`, `file:///path` or a path), or the
    /// data directory `root` when none is named.
    pub fn parse(url: Option<&str>, root: &Path) -> Result<Self> {
        let bad = |why: &str| {
            Error::bad(
                "bad_objects_url",
                format!("--objects: {why} (s3://bucket/prefix, file:///path or a directory)"),
            )
        };
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(Location::Local(root.to_path_buf()));
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let bucket = rest.split('/').next().unwrap_or_default();
            if bucket.is_empty() {
                return Err(bad("no bucket named"));
            }
            if bucket.contains('@') || bucket.contains(':') {
                // Never echo it: it may hold credentials.
                return Err(Error::bad(
                    "bad_objects_url",
                    "--objects: credentials do not go in the URL; give them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                ));
            }
            return Ok(Location::S3(url.to_string()));
        }
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad("a file:// URL needs an absolute path"));
            }
            return Ok(Location::Local(PathBuf::from(path)));
        }
        if url.contains("://") {
            return Err(bad("unknown scheme"));
        }
        Ok(Location::Local(PathBuf::from(url)))
    }
}

/// Bind an object store and its catalog to each other, as `DIR/catalog.id` binds a data
/// directory: the store's `objects.id` names its catalog and its own id, and the catalog
/// records that id. A node started with another deployment's store, or without the shared
/// one (on the data directory's own folder), is refused (`wrong_objects`) instead of serving
/// versions it cannot read, storing new ones where no other node looks, or taking another
/// catalog's objects for orphans that startup recovery removes.
///
/// An unbound pair binds when the catalog lists no versions and the store holds none (a new
/// deployment, or one whose store is being chosen), or when the store holds versions the
/// catalog lists (a data directory from before the binding). Nodes binding at once agree on
/// the first store id recorded in the catalog.
pub fn bind(objects: &dyn Objects, catalog: &crate::catalog::Catalog) -> Result<()> {
    let wrong = |why: String| {
        Error::bad(
            "wrong_objects",
            format!(
                "{}: {why}: check --objects / ESCROW_OBJECTS",
                objects.describe()
            ),
        )
    };
    let catalog_id = catalog
        .id()?
        .ok_or_else(|| Error::internal("binding objects to a catalog without an id"))?;
    let marker = match objects.get_bytes(OBJECTS_ID)? {
        None => None,
        Some(bytes) => {
            let text = String::from_utf8_lossy(&bytes).to_string();
            match text.split_whitespace().collect::<Vec<_>>()[..] {
                [catalog, store] => Some((catalog.to_string(), store.to_string())),
                _ => return Err(wrong(format!("{OBJECTS_ID} is not escrow's"))),
            }
        }
    };
    if let Some((theirs, _)) = &marker
        && *theirs != catalog_id
    {
        return Err(wrong(format!(
            "these objects belong to catalog {theirs}, not to catalog {catalog_id}"
        )));
    }
    let recorded = catalog.objects_id()?;
    let marked = marker.map(|(_, store)| store);
    if marked.is_some() && marked == recorded {
        return Ok(());
    }
    let versions = catalog.all_version_ids()?;
    let fresh = versions.is_empty() && objects.list(DATASETS)?.is_empty();
    let from_before = marked.is_none() && recorded.is_none() && {
        let mut found = false;
        for (dataset, version) in versions.iter().take(8) {
            if objects.head(&version_key(dataset, version))?.is_some() {
                found = true;
                break;
            }
        }
        found
    };
    if !fresh && !from_before {
        return Err(wrong(match (&marked, &recorded) {
            (_, Some(r)) => format!(
                "catalog {catalog_id} keeps its sealed versions in store {r}, and this is {}",
                marked.as_deref().unwrap_or("no store of it")
            ),
            (Some(m), None) => format!("store {m} was never recorded by catalog {catalog_id}"),
            (None, None) if versions.is_empty() => {
                "the store holds sealed objects but no objects.id: another deployment's?"
                    .to_string()
            }
            (None, None) => format!("none of the versions catalog {catalog_id} lists is here"),
        }));
    }
    let store = match marked {
        Some(store) => store,
        None => crate::crypto::random_id()?,
    };
    let store = catalog.swap_objects_id(recorded.as_deref(), &store)?;
    objects.put_bytes(OBJECTS_ID, format!("{catalog_id} {store}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keys_round_trip_and_leftovers_do_not_parse() {
        let key = version_key("00ff", "abcd");
        assert_eq!(key, "datasets/00ff/abcd.sealed");
        assert_eq!(parse_version_key(&key), Some(("00ff", "abcd")));
        for other in [
            "datasets/00ff/abcd.sealed.partial",
            "datasets/00ff/abcd",
            "datasets/abcd.sealed",
            "datasets/xy/abcd.sealed",
            "objects.id",
        ] {
            assert_eq!(parse_version_key(other), None, "{other}");
        }
    }

    #[test]
    fn keys_cannot_leave_the_root() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "datasets/../../x",
            "a//b",
            "A",
            "a/./b",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        check_key(&version_key("00ff", "abcd")).expect("a version key");
        check_key(OBJECTS_ID).expect("the marker");
    }

    #[test]
    fn locations_parse() {
        let root = Path::new("/data");
        assert_eq!(
            Location::parse(None, root).ok(),
            Some(Location::Local(root.into()))
        );
        assert_eq!(
            Location::parse(Some("s3://b/p/q"), root).ok(),
            Some(Location::S3("s3://b/p/q".into()))
        );
        assert_eq!(
            Location::parse(Some("file:///srv/o"), root).ok(),
            Some(Location::Local("/srv/o".into()))
        );
        for bad in [
            "s3://",
            "s3:///p",
            "gs://b",
            "file://rel",
            "s3://key:secret@b/p",
        ] {
            let code = Location::parse(Some(bad), root).err().map(|e| e.code());
            assert_eq!(code, Some("bad_objects_url"), "{bad}");
        }
    }
}
