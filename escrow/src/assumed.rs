//! A request's reads taken from its node's copies, and those copies (`catalog::Assumed`).
//!
//! A question asked again is answered from what was kept for it: its cost on a shared
//! catalog is the round trips of its reads (the caller's identity with the catalog's
//! generations, the ledger with the kept answer) and of its audit record. A node keeps what
//! it last read of the first two; a question (and only a question: the handlers that take
//! `server::api::Asking`) uses those copies and notes what it assumed in its request's
//! scope. What was assumed is confirmed in the catalog before anything is charged or
//! computed (one read), or else by the question's audit record, which is written before
//! anything of the answer leaves and only if every assumption still holds (the same
//! statement: one round trip for a repeated question). When one does not, nothing was
//! recorded or released and the question is asked again on fresh reads
//! ([`crate::Error::Stale`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::catalog::{Assumed, Generations, IdentityRow};

tokio::task_local! {
    /// What one request read with its caller, and what it assumed ([`request_scope`]).
    static SCOPE: std::cell::RefCell<Scope>;
}

#[derive(Default)]
struct Scope {
    /// The generations read (or assumed) with the caller's identity, and when, until a
    /// policy read of the request takes them.
    with_caller: Option<(Instant, Generations)>,
    /// Whether the request may take reads from its node's copies: a question, whose audit
    /// record confirms them; not on its second try.
    may_assume: bool,
    /// What it took from them, not yet confirmed.
    assumed: Assumed,
}

/// How long the generations read with the caller stand in for a read of them: a request
/// that waited longer (for admission, say) reads them again.
const WITH_CALLER_FOR: Duration = Duration::from_millis(100);

/// Run one request's handling in a scope of its own: the generations read with its caller's
/// identity stand in for its first read of them, and what it assumes is noted.
pub async fn request_scope<F: Future>(f: F) -> F::Output {
    SCOPE
        .scope(std::cell::RefCell::new(Scope::default()), f)
        .await
}

fn with_scope<T>(f: impl FnOnce(&mut Scope) -> T) -> Option<T> {
    SCOPE.try_with(|s| f(&mut s.borrow_mut())).ok()
}

/// Note the generations read with the caller's identity from `read` on (when that read
/// began), inside [`request_scope`].
pub fn generations_with_caller(read: Instant, at: Generations) {
    with_scope(|s| s.with_caller = Some((read, at)));
}

/// The generations noted with this request's caller, once, if read recently; none outside
/// a request.
pub(crate) fn read_with_caller() -> Option<Generations> {
    let (read, at) = with_scope(|s| s.with_caller.take()).flatten()?;
    (read.elapsed() < WITH_CALLER_FOR).then_some(at)
}

/// Let this request take reads from the node's copies (`true`: a question), or stop it
/// (`false`: its second try), forgetting what it assumed.
pub fn may_assume(yes: bool) {
    with_scope(|s| {
        s.may_assume = yes;
        s.assumed = Assumed::default();
    });
}

/// Whether this request may take reads from the node's copies (never outside a request's
/// scope: nothing could note what it assumed).
pub(crate) fn assuming() -> bool {
    with_scope(|s| s.may_assume).unwrap_or(false)
}

/// Note what this request assumed (when it may).
pub(crate) fn assume(f: impl FnOnce(&mut Assumed)) {
    with_scope(|s| {
        if s.may_assume {
            f(&mut s.assumed)
        }
    });
}

/// What this request assumed and has not confirmed yet; it is then the taker's to confirm.
pub(crate) fn take_assumed() -> Assumed {
    with_scope(|s| std::mem::take(&mut s.assumed)).unwrap_or_default()
}

/// What this request assumed of its caller (the identity alone), taken out for its taker to
/// confirm (the rest stays): what a refusal given before the question starts must hold.
pub(crate) fn take_assumed_caller() -> Assumed {
    with_scope(|s| s.assumed.take_caller()).unwrap_or_default()
}

/// A repeated question's ledger and kept answer, as its node last read them.
#[derive(Debug, Clone)]
pub(crate) struct Paid {
    /// Per owner: the partner's total spent on it, and its ledger rows then.
    pub owners: Vec<(String, f64, i64)>,
    /// What was kept for the question (an answer, or why it was not answered).
    pub kept: Vec<u8>,
}

/// The node's copies of what questions last read: per certificate serial, its identity and
/// the catalog's generations; per (partner, question fingerprint), the ledger and kept
/// answer. Only ever assumed, never trusted: see the module.
#[derive(Default)]
pub struct Copies {
    callers: Mutex<Callers>,
    paid: Mutex<HashMap<(String, [u8; 32]), Paid>>,
}

#[derive(Default)]
struct Callers {
    /// The generations the most recently begun read found, and when it began: a copy read
    /// at others is known to be behind.
    newest: Option<(Instant, Generations)>,
    by_serial: HashMap<String, (IdentityRow, Generations)>,
}

impl Callers {
    fn saw(&mut self, read: Instant, at: Generations) {
        if self.newest.is_none_or(|(when, _)| when <= read) {
            self.newest = Some((read, at));
        }
    }
}

/// Copies kept at most of each kind; past it they all go.
const COPIES_MAX: usize = 4096;

/// The largest kept answer a node copies (an overlap matrix is well under it; a large SQL
/// answer is read with its ledger each time rather than held and compared in the guard).
pub(crate) const PAID_COPY_MAX_BYTES: usize = 16 << 10;

impl Copies {
    /// The identity of certificate `serial` and the generations, as last read, if nothing
    /// read since on this node found the catalog at other generations.
    pub fn caller(&self, serial: &str) -> Option<(IdentityRow, Generations)> {
        let c = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        let (id, at) = c.by_serial.get(serial)?;
        (c.newest.map(|(_, g)| g) == Some(*at)).then(|| (id.clone(), *at))
    }

    /// Keep what a read of certificate `serial`'s identity begun at `read` found (`None`: not
    /// active).
    pub fn read_caller(
        &self,
        serial: &str,
        id: Option<&IdentityRow>,
        read: Instant,
        at: Generations,
    ) {
        let mut c = self.callers.lock().unwrap_or_else(|p| p.into_inner());
        c.saw(read, at);
        match id {
            Some(id) => {
                if c.by_serial.len() >= COPIES_MAX {
                    c.by_serial.clear();
                }
                c.by_serial.insert(serial.to_string(), (id.clone(), at));
            }
            None => {
                c.by_serial.remove(serial);
            }
        }
    }

    /// A read of the catalog begun at `read` found generations `at` (copies read at others
    /// are behind).
    pub(crate) fn read_generations(&self, read: Instant, at: Generations) {
        (self.callers.lock().unwrap_or_else(|p| p.into_inner())).saw(read, at);
    }

    /// What `partner`'s question `fingerprint` last read of the ledger and its kept answer.
    pub(crate) fn paid(&self, partner: &str, fingerprint: [u8; 32]) -> Option<Paid> {
        let p = self.paid.lock().unwrap_or_else(|p| p.into_inner());
        p.get(&(partner.to_string(), fingerprint)).cloned()
    }

    pub(crate) fn keep_paid(&self, partner: &str, fingerprint: [u8; 32], paid: Paid) {
        if paid.kept.len() > PAID_COPY_MAX_BYTES {
            return;
        }
        let mut p = self.paid.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() >= COPIES_MAX {
            p.clear();
        }
        p.insert((partner.to_string(), fingerprint), paid);
    }

    /// The catalog's policy generation moved (a grant, setting, population or deletion): the
    /// kept answers copied go (those of deleted versions are gone from the catalog too).
    pub(crate) fn policy_moved(&self) {
        self.paid.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// A question of `partner` (certificate `serial`) found its assumptions no longer
    /// holding: its copies go.
    pub fn forget(&self, serial: &str, partner: &str) {
        self.callers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_serial
            .remove(serial);
        self.paid
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(p, _), _| p != partner);
    }
}
