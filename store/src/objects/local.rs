//! Sealed objects in a local directory: the data directory by default (`DIR/datasets/...`,
//! the layout escrow has always had), or another directory named by `--objects`. A put is a
//! rename of the finished, fsynced upload file (a copy first when the directory is on another
//! file system), made durable by an fsync of the folder.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{ObjectMeta, Objects, check_key};
use crate::{Result, fsutil};

pub struct LocalObjects {
    root: PathBuf,
}

impl std::fmt::Debug for LocalObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalObjects({})", self.root.display())
    }
}

/// `Ok(None)` for a file that is not there.
fn absent_is_none<T>(r: io::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl LocalObjects {
    /// Objects under `root` (created, private, if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        if !root.exists() {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)?;
        }
        Ok(LocalObjects { root })
    }

    /// The file of `key`.
    pub fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Create the folder of `path` if missing (private), durably.
    fn make_parent(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.exists()) {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
            fsutil::sync_parent(parent)?;
        }
        Ok(())
    }

    fn meta(&self, key: String, m: &fs::Metadata) -> ObjectMeta {
        let modified = m.modified().unwrap_or(UNIX_EPOCH);
        ObjectMeta {
            key,
            size: m.len(),
            stamp: modified
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(-1),
            age: SystemTime::now()
                .duration_since(modified)
                .unwrap_or_default(),
        }
    }

    fn walk(&self, dir: &Path, key: &str, out: &mut Vec<ObjectMeta>) -> Result<()> {
        let Some(entries) = absent_is_none(fs::read_dir(dir))? else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let child = format!("{key}{name}");
            let Some(m) = absent_is_none(fs::symlink_metadata(entry.path()))? else {
                continue;
            };
            if m.is_dir() {
                self.walk(&entry.path(), &format!("{child}/"), out)?;
            } else if m.is_file() {
                out.push(self.meta(child, &m));
            }
        }
        Ok(())
    }
}

impl Objects for LocalObjects {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn describe(&self) -> String {
        format!("objects in {}", self.root.display())
    }

    fn put_file(&self, key: &str, from: &Path) -> Result<()> {
        let to = self.path(key)?;
        self.make_parent(&to)?;
        let mut moved = fs::rename(from, &to);
        if matches!(&moved, Err(e) if e.kind() == io::ErrorKind::NotFound) && from.exists() {
            // The dataset's folder went with its last object meanwhile (a delete, or a failed
            // upload's clean-up): make it again.
            self.make_parent(&to)?;
            moved = fs::rename(from, &to);
        }
        match moved {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
                // Another file system: copy beside the target, make it durable, then rename.
                let partial = to.with_extension("sealed.partial");
                let mut src = File::open(from)?;
                let mut dst = fsutil::create_private(&partial)?;
                let copied = io::copy(&mut src, &mut dst).and_then(|_| dst.sync_all());
                if let Err(e) = copied.and_then(|()| fs::rename(&partial, &to)) {
                    let _ = fs::remove_file(&partial);
                    return Err(e.into());
                }
                fs::remove_file(from)?;
            }
            Err(e) => return Err(e.into()),
        }
        fsutil::sync_parent(&to)?;
        Ok(())
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let to = self.path(key)?;
        self.make_parent(&to)?;
        Ok(fsutil::atomic_write(&to, bytes, false)?)
    }

    fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        absent_is_none(fs::read(self.path(key)?))
    }

    fn open(&self, key: &str) -> Result<Option<Box<dyn io::Read + Send>>> {
        Ok(absent_is_none(File::open(self.path(key)?))?
            .map(|f| Box::new(BufReader::with_capacity(1 << 20, f)) as Box<dyn io::Read + Send>))
    }

    fn local_file(&self, key: &str) -> Result<Option<File>> {
        absent_is_none(File::open(self.path(key)?))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        Ok(absent_is_none(fs::metadata(self.path(key)?))?.map(|m| self.meta(key.to_string(), &m)))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let dir = self.path(prefix.trim_end_matches('/'))?;
        let mut out = Vec::new();
        self.walk(&dir, prefix, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        if absent_is_none(fs::remove_file(&path))?.is_none() {
            return Ok(());
        }
        fsutil::sync_parent(&path)?;
        // A dataset's folder goes with its last version.
        if let Some(parent) = path.parent().filter(|p| *p != self.root) {
            match fs::remove_dir(parent) {
                Ok(()) => fsutil::sync_parent(parent)?,
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod conformance {
    crate::objects_conformance!(|| {
        let dir = tempfile::tempdir().expect("tmp");
        let objects = super::LocalObjects::new(dir.path().join("objects")).expect("objects");
        (
            std::sync::Arc::new(objects) as crate::objects::SharedObjects,
            dir,
        )
    });
}
