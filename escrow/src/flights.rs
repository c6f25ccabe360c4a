//! Work under way by name, so that what many callers need at once is computed once: the
//! overlap's sides made ahead and asked for by questions (`overlaps::kept_side`). Its own
//! module, so that the query service that holds it and the overlaps that use it do not
//! import each other.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

/// Work under way by name: while one caller computes a name's value, another caller of the
/// same name waits for it and then finds it kept, instead of computing it at the same time.
#[derive(Default)]
pub(crate) struct Flights(
    Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Names with a caller queued for them ([`Self::queue`]).
    Mutex<HashSet<String>>,
);

impl Flights {
    /// Marks a caller of `name` as queued: false if one already is (it will do what this one
    /// would, once it gets its turn).
    pub(crate) fn queue(&self, name: &str) -> bool {
        (self.1.lock().unwrap_or_else(PoisonError::into_inner)).insert(name.to_string())
    }

    /// The queued caller of `name` got its turn: the next one queues again.
    pub(crate) fn unqueue(&self, name: &str) {
        (self.1.lock().unwrap_or_else(PoisonError::into_inner)).remove(name);
    }

    /// Runs `f` holding `name`: until it returns, another caller of `name` waits (blocking).
    pub(crate) fn one_at_a_time<T>(&self, name: &str, f: impl FnOnce() -> T) -> T {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone();
        let out = {
            let _held = slot.lock().unwrap_or_else(PoisonError::into_inner);
            f()
        };
        // The last caller of the name out takes it away (the map's and this one's are left).
        let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if names.get(name).is_some_and(|s| Arc::ptr_eq(s, &slot)) && Arc::strong_count(&slot) == 2 {
            names.remove(name);
        }
        out
    }
}
