//! Sealed objects: where the sealed files of dataset versions live, behind one seam with two
//! backends. The default keeps them in the data directory (`local`), as it always has; a
//! deployment of several nodes names an S3-compatible store (`--objects s3://bucket/prefix`;
//! that backend speaks HTTP and so lives in the `escrow` crate, on the `object_store` crate).
//!
//! What is stored is the sealed format of `crypto::seal` byte for byte: every segment is
//! authenticated and bound to its dataset, version and position, so a swapped, truncated or
//! altered object fails its read exactly as a file on disk does. Nothing here decrypts.
//!
//! Keys are relative paths: `datasets/DATASET_ID/VERSION_ID.sealed` for versions, and
//! `objects.id`, which binds the object store to its catalog. Uploads in flight and ingest
//! spools are node-local scratch (`DIR/tmp`) until their version is put here whole.

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
    /// Store a small object whole (markers).
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// A small object whole; `None` if there is none.
    fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// A sequential reader of an object; `None` if there is none. A remote backend reads it
    /// in ranges, ahead of the caller.
    fn open(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>>;
    /// Size and stamp of an object; `None` if there is none.
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// Every object whose key starts with `prefix` (a folder, ending in `/`), by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Remove an object; one that is not there is not an error.
    fn delete(&self, key: &str) -> Result<()>;
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

/// Bind an object store to its catalog, as `DIR/catalog.id` binds a data directory: a node
/// started with another deployment's object store, or without the shared one, is refused
/// instead of serving versions it cannot read, storing new ones where no other node looks,
/// or taking another catalog's objects for orphans that startup recovery removes.
///
/// A store that names no catalog yet is bound to this one if the catalog lists no versions
/// (a new deployment) or if it holds one of the versions the catalog lists (a store from
/// before the binding); otherwise it is the wrong store.
pub fn bind(objects: &dyn Objects, catalog_id: &str, versions: &[(String, String)]) -> Result<()> {
    let wrong = |why: String| {
        Error::bad(
            "wrong_objects",
            format!(
                "{}: {why}: check --objects / ESCROW_OBJECTS",
                objects.describe()
            ),
        )
    };
    if let Some(theirs) = objects.get_bytes(OBJECTS_ID)? {
        let theirs = String::from_utf8_lossy(&theirs).trim().to_string();
        return if theirs == catalog_id {
            Ok(())
        } else {
            Err(wrong(format!(
                "these objects belong to catalog {theirs}, not to catalog {catalog_id}"
            )))
        };
    }
    let mut holds_one = versions.is_empty();
    for (dataset, version) in versions.iter().take(8) {
        if objects.head(&version_key(dataset, version))?.is_some() {
            holds_one = true;
            break;
        }
    }
    if !holds_one {
        return Err(wrong(format!(
            "none of the versions catalog {catalog_id} lists is here"
        )));
    }
    objects.put_bytes(OBJECTS_ID, catalog_id.as_bytes())
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
    fn a_store_binds_to_one_catalog() {
        let dir = tempfile::tempdir().expect("tmp");
        let objects = local::LocalObjects::new(dir.path()).expect("objects");
        let code = |r: Result<()>| r.err().map(|e| e.code());
        let listed = vec![("00aa".to_string(), "00bb".to_string())];
        // Versions listed, none of them here: the wrong store (e.g. --objects missing).
        assert_eq!(code(bind(&objects, "c1", &listed)), Some("wrong_objects"));
        // A new deployment binds; the same catalog again passes; another is refused.
        bind(&objects, "c1", &[]).expect("a new store binds");
        bind(&objects, "c1", &listed).expect("bound to c1");
        assert_eq!(code(bind(&objects, "c2", &[])), Some("wrong_objects"));
        // A store from before the binding that holds a listed version is bound on sight.
        let old = tempfile::tempdir().expect("tmp");
        let objects = local::LocalObjects::new(old.path()).expect("objects");
        objects
            .put_bytes(&version_key("00aa", "00bb"), b"sealed")
            .expect("put");
        bind(&objects, "c3", &listed).expect("a store holding a listed version");
        assert_eq!(code(bind(&objects, "c4", &listed)), Some("wrong_objects"));
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
        for bad in ["s3://", "s3:///p", "gs://b", "file://rel"] {
            let code = Location::parse(Some(bad), root).err().map(|e| e.code());
            assert_eq!(code, Some("bad_objects_url"), "{bad}");
        }
    }
}
