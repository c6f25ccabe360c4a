//! A node-local copy of a remote store's sealed versions (`DIR/cache/`), so that a node reads
//! a version from the remote store at most once: the uploading node keeps the file it sealed
//! (a hard link, before the put consumes it), another node copies the object on its first
//! read, and the copies survive restarts. What is copied is the sealed format, read through
//! the same authentication as the remote object; a copy is named by the remote object's size
//! and stamp, which every open checks with a HEAD, so a copy is used only while the remote
//! object is the one it was copied from (a replaced object is fetched, and refused, again).
//! Copies of versions the catalog no longer lists are removed at the next policy generation
//! and at startup (`prune`). Everything but version reads goes to the remote store.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::local::LocalObjects;
use super::{ObjectMeta, Objects, SharedObjects, parse_version_key};
use crate::{Result, fsutil};

pub struct CachedObjects {
    remote: SharedObjects,
    local: LocalObjects,
    /// Where copies are written before they are renamed into place.
    staging: PathBuf,
}

impl std::fmt::Debug for CachedObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CachedObjects({}, {:?})",
            self.remote.describe(),
            self.local
        )
    }
}

/// The copy's key: the version's key with the remote object's size and stamp.
fn copy_key(key: &str, meta: &ObjectMeta) -> String {
    format!("{key}.{}-{:x}", meta.size, meta.stamp as u128)
}

impl CachedObjects {
    /// `remote`'s objects, with copies under `dir` (created, private).
    pub fn new(remote: SharedObjects, dir: &Path) -> Result<Self> {
        let staging = dir.join("staging");
        let local = LocalObjects::new(dir.join("objects"))?;
        LocalObjects::new(&staging)?;
        Ok(CachedObjects {
            remote,
            local,
            staging,
        })
    }

    fn staging_file(&self) -> Result<PathBuf> {
        let name = hex::encode(crate::crypto::random_bytes::<8>()?);
        Ok(self.staging.join(name))
    }

    /// Copy the remote object `key` (as `meta` describes it) into the cache.
    /// A version's object through this node's copy of it (fetched first if it has none);
    /// `None` if the store has no such object.
    fn through_copy<T>(
        &self,
        key: &str,
        read: impl Fn(&LocalObjects, &str) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let Some(meta) = self.remote.head(key)? else {
            return Ok(None);
        };
        let copy = copy_key(key, &meta);
        if let Some(found) = read(&self.local, &copy)? {
            return Ok(Some(found));
        }
        if !self.fetch(key, &meta)? {
            return Ok(None);
        }
        read(&self.local, &copy)
    }

    fn fetch(&self, key: &str, meta: &ObjectMeta) -> Result<bool> {
        let Some(mut remote) = self.remote.open(key)? else {
            return Ok(false);
        };
        let tmp = self.staging_file()?;
        let copied = (|| -> Result<()> {
            let mut file = fsutil::create_private(&tmp)?;
            io::copy(&mut remote, &mut file)?;
            file.sync_all()?;
            self.local.put_file(&copy_key(key, meta), &tmp)
        })();
        if copied.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        copied.map(|()| true)
    }
}

impl Objects for CachedObjects {
    fn kind(&self) -> &'static str {
        self.remote.kind()
    }

    fn describe(&self) -> String {
        self.remote.describe()
    }

    fn put_file(&self, key: &str, from: &Path) -> Result<()> {
        // Keep the sealed file this node just wrote: linked before the put consumes it.
        let link = match parse_version_key(key) {
            Some(_) => {
                let link = self.staging_file()?;
                std::fs::hard_link(from, &link).ok().map(|()| link)
            }
            None => None,
        };
        let put = self.remote.put_file(key, from);
        if let Some(link) = link {
            let kept = put.is_ok()
                && match self.remote.head(key) {
                    Ok(Some(meta)) => self.local.put_file(&copy_key(key, &meta), &link).is_ok(),
                    _ => false,
                };
            if !kept {
                let _ = std::fs::remove_file(&link);
            }
        }
        put
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.remote.put_bytes(key, bytes)
    }

    fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.remote.get_bytes(key)
    }

    fn open(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>> {
        if parse_version_key(key).is_none() {
            return self.remote.open(key);
        }
        self.through_copy(key, |local, copy| local.open(copy))
    }

    fn local_file(&self, key: &str) -> Result<Option<std::fs::File>> {
        if parse_version_key(key).is_none() {
            return Ok(None);
        }
        self.through_copy(key, |local, copy| local.local_file(copy))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.remote.head(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.remote.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.remote.delete(key)?;
        if let Some((dataset, _)) = parse_version_key(key) {
            for copy in self.local.list(&super::dataset_prefix(dataset))? {
                if copy.key.starts_with(&format!("{key}.")) {
                    self.local.delete(&copy.key)?;
                }
            }
        }
        Ok(())
    }

    fn prune(&self, keep: &dyn Fn(&str, &str) -> bool) -> Result<usize> {
        let mut removed = 0;
        // Staged files of uploads and fetches a crash interrupted (an hour: none in flight).
        for entry in std::fs::read_dir(&self.staging)? {
            let path = entry?.path();
            let age = std::fs::metadata(&path)?
                .modified()?
                .elapsed()
                .unwrap_or_default();
            if age > std::time::Duration::from_secs(3600) {
                std::fs::remove_file(&path)?;
            }
        }
        for copy in self.local.list(super::DATASETS)? {
            let version = match copy.key.split_once(".sealed.") {
                Some((stem, _)) => format!("{stem}.sealed"),
                None => copy.key.clone(),
            };
            let kept = parse_version_key(&version).is_some_and(|(d, v)| keep(d, v));
            if !kept {
                self.local.delete(&copy.key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
