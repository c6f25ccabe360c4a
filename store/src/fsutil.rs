//! Small durable-file helpers: private files, atomic replacement, directory fsync.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Create a new file readable only by the owner (0600); fails if it exists.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// fsync the directory holding `path`, so a create or rename in it is durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// Replace `path` atomically with `contents`: temp file, fsync, rename, fsync directory.
/// `private` makes the file 0600.
pub fn atomic_write(path: &Path, contents: &[u8], private: bool) -> io::Result<()> {
    // Its own temporary per write: two writers of one path in one process never share one
    // (one could otherwise rename the other's half-written file into place).
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{n}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Write `contents` to a new private file; an existing file is left alone (returns false).
pub fn write_new_private(path: &Path, contents: &[u8]) -> io::Result<bool> {
    let mut f = match create_private(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    };
    f.write_all(contents)?;
    f.sync_all()?;
    sync_parent(path)?;
    Ok(true)
}

/// Read until `buf` is full or EOF; returns the bytes read (fewer only at EOF).
pub fn read_full<R: io::Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
