//! Named fault points, for crash and storage-fault tests of the real binary.
//!
//! `ESCROW_FAULT=POINT[=ACTION][@N]` arms one point for the life of the process:
//! - `kill` (default): the process sends itself SIGKILL, exactly what `kill -9` does (no
//!   destructor, no flush, no signal handler runs);
//! - `eio` / `enospc`: the point returns an I/O error (`EIO`, or "no space left on device").
//!
//! `@N` fires on the N-th hit (default 1). For points that report a position (`at`, e.g. the
//! bytes of an upload received so far) it fires the first time the position reaches N.
//! The points exist only in builds with the `fault-injection` feature, which `cargo test`
//! turns on and `cargo build` does not: a production binary ignores `ESCROW_FAULT` (and
//! says so at startup, see [`ignored`]), and there each point is a constant `Ok(())`. In a
//! test build with the variable unset a point costs one load of an initialised `OnceLock`.
//! The points are listed in docs/OPERATIONS.md; tests/crash.rs and tests/faults.rs use them.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms a fault point.
pub const ENV: &str = "ESCROW_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    Eio,
    Enospc,
}

#[derive(Debug)]
struct Armed {
    point: String,
    action: Action,
    n: u64,
    hits: AtomicU64,
    fired: AtomicU64,
}

/// Whether `ESCROW_FAULT` is set in a build without fault points, where it does nothing.
pub fn ignored() -> bool {
    !cfg!(feature = "fault-injection") && std::env::var_os(ENV).is_some()
}

fn armed() -> Option<&'static Armed> {
    if !cfg!(feature = "fault-injection") {
        return None;
    }
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().and_then(|s| parse(&s)))
        .as_ref()
}

fn parse(spec: &str) -> Option<Armed> {
    let (rest, n) = match spec.rsplit_once('@') {
        Some((r, n)) => (r, n.parse().ok()?),
        None => (spec, 1),
    };
    let (point, action) = match rest.split_once('=') {
        Some((p, "kill")) => (p, Action::Kill),
        Some((p, "eio")) => (p, Action::Eio),
        Some((p, "enospc")) => (p, Action::Enospc),
        Some(_) => return None,
        None => (rest, Action::Kill),
    };
    Some(Armed {
        point: point.to_string(),
        action,
        n,
        hits: AtomicU64::new(0),
        fired: AtomicU64::new(0),
    })
}

/// Whether fault point `name` is the armed one (for points that change how they write, such
/// as a torn audit append).
pub fn is_armed(name: &str) -> bool {
    armed().is_some_and(|a| a.point == name)
}

/// Pass fault point `name`: counts a hit and fires on the N-th.
pub fn hit(name: &str) -> io::Result<()> {
    match armed() {
        Some(a) if a.point == name => {
            let hits = a.hits.fetch_add(1, Ordering::SeqCst) + 1;
            if hits == a.n { fire(a) } else { Ok(()) }
        }
        _ => Ok(()),
    }
}

/// Pass fault point `name` at `position`: fires once, when `position` first reaches N.
pub fn at(name: &str, position: u64) -> io::Result<()> {
    match armed() {
        Some(a) if a.point == name && position >= a.n => {
            if a.fired.swap(1, Ordering::SeqCst) == 0 {
                fire(a)
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

fn fire(a: &Armed) -> io::Result<()> {
    match a.action {
        Action::Kill => {
            eprintln!("fault point {} reached: SIGKILL", a.point);
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            // SIGKILL cannot be caught; this is never reached.
            std::process::abort()
        }
        Action::Eio => Err(io::Error::from_raw_os_error(
            rustix::io::Errno::IO.raw_os_error(),
        )),
        Action::Enospc => Err(io::Error::from_raw_os_error(
            rustix::io::Errno::NOSPC.raw_os_error(),
        )),
    }
}

/// A writer whose every write passes fault point `point` first: `eio`/`enospc` there fail
/// the write as the device would.
#[derive(Debug)]
pub struct Writer<W> {
    inner: W,
    point: &'static str,
}

impl<W> Writer<W> {
    pub fn new(inner: W, point: &'static str) -> Self {
        Writer { inner, point }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: io::Write> io::Write for Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        hit(self.point)?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let a = parse("upload.renamed").expect("plain");
        assert_eq!(
            (a.point.as_str(), a.action, a.n),
            ("upload.renamed", Action::Kill, 1)
        );
        let a = parse("upload.write=enospc@3").expect("full");
        assert_eq!(
            (a.point.as_str(), a.action, a.n),
            ("upload.write", Action::Enospc, 3)
        );
        assert!(parse("x=explode").is_none());
        assert!(parse("x@many").is_none());
    }
}
