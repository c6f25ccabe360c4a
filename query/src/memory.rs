//! The memory admitted questions share.
//!
//! Before admission a question runs under its own memory limit, sized by the caller's own
//! rows only (`exec.rs`). After admission no limit may fail it: how much it holds then
//! depends on how many of another partner's rows pass its filters, so a failure would tell
//! what they hold. What bounds that stage instead is this pool, shared by the whole server:
//! an admitted question reserves what it could hold at most (another partner's tables at
//! the size class of their stored rows, a power of two, whatever its filters keep) and
//! waits until that much is free. The wait depends on the question, the caller's own rows,
//! the size classes and the other questions running, never on which of another partner's
//! rows pass the filters, nor on its exact row count. A question waits here; it is never refused here.
//!
//! The pool is shared fairly between the partners who ask:
//! - one partner's questions together hold at most half of it ([`SharedMemory::share_mib`]):
//!   a question of a partner at that share waits for its own earlier questions, and a
//!   question that alone needs more is refused before it is admitted (`exec.rs` `admit`),
//!   so what one partner asks never leaves another partner less than half of the pool;
//! - when memory is given back, the waiting partner who holds least is served first (first
//!   come, first served among its own questions), and no later question overtakes it, so a
//!   large question is not starved by small ones.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

const MIB: f64 = (1u64 << 20) as f64;

/// Memory shared by the admitted questions of one server, in MiB.
#[derive(Debug, Clone)]
pub struct SharedMemory {
    pool: Arc<Pool>,
}

/// The pool as one partner's questions reserve from it.
#[derive(Debug, Clone)]
pub struct MemoryShare {
    pool: Arc<Pool>,
    partner: Arc<str>,
}

#[derive(Debug)]
struct Pool {
    mib: u32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    free: u32,
    /// MiB held per partner (partners holding nothing are absent).
    held: HashMap<Arc<str>, u32>,
    /// Waiting questions, oldest first.
    waiting: VecDeque<Waiter>,
    next_ticket: u64,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    partner: Arc<str>,
    mib: u32,
    granted: oneshot::Sender<()>,
}

impl State {
    fn held(&self, partner: &str) -> u32 {
        self.held.get(partner).copied().unwrap_or(0)
    }

    /// Serve waiters while the one to be served next fits: among the partners with a waiter
    /// that fits their share, the one holding least (the oldest waiter on a tie), its
    /// oldest waiter. A waiter whose partner is at its share waits for that partner's own
    /// questions and blocks nobody else.
    fn serve(&mut self, share: u32) {
        loop {
            let mut next: Option<(u32, usize)> = None;
            let mut seen: Vec<&str> = Vec::new();
            for (i, w) in self.waiting.iter().enumerate() {
                if seen.contains(&&*w.partner) {
                    continue;
                }
                seen.push(&w.partner);
                let held = self.held(&w.partner);
                if held + w.mib > share {
                    continue;
                }
                if next.is_none_or(|(h, _)| held < h) {
                    next = Some((held, i));
                }
            }
            let Some((_, i)) = next else { return };
            if self.waiting[i].mib > self.free {
                return;
            }
            let Some(w) = self.waiting.remove(i) else {
                return;
            };
            // Counted even when its question is gone (its receiver dropped before its
            // `Pending`): that `Pending`'s drop, under this lock, finds it no longer waiting
            // and gives it back, so the books balance either way.
            self.free -= w.mib;
            *self.held.entry(w.partner).or_default() += w.mib;
            let _ = w.granted.send(());
        }
    }

    fn give_back(&mut self, partner: &str, mib: u32) {
        self.free += mib;
        if let Some(h) = self.held.get_mut(partner) {
            *h = h.saturating_sub(mib);
            if *h == 0 {
                self.held.remove(partner);
            }
        }
    }
}

/// Memory reserved by one question, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    share: MemoryShare,
    mib: u32,
}

impl Reservation {
    /// MiB reserved.
    pub fn mib(&self) -> u32 {
        self.mib
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let share_mib = self.share.pool.share_mib();
        let mut state = self.share.pool.lock();
        state.give_back(&self.share.partner, self.mib);
        state.serve(share_mib);
    }
}

/// A question waiting for its memory: if it is given up (the request cancelled), it
/// leaves the queue, or gives back what was granted to it meanwhile.
struct Pending<'a> {
    share: &'a MemoryShare,
    ticket: u64,
    mib: u32,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let pool = &self.share.pool;
        let mut state = pool.lock();
        match state.waiting.iter().position(|w| w.ticket == self.ticket) {
            Some(i) => {
                state.waiting.remove(i);
            }
            None => state.give_back(&self.share.partner, self.mib),
        }
        state.serve(pool.share_mib());
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn share_mib(&self) -> u32 {
        (self.mib / 2).max(1)
    }
}

impl SharedMemory {
    /// A pool of `bytes` (at least 1 MiB).
    pub fn new(bytes: usize) -> Self {
        let mib = u32::try_from((bytes >> 20).max(1)).unwrap_or(u32::MAX);
        SharedMemory {
            pool: Arc::new(Pool {
                mib,
                state: Mutex::new(State {
                    free: mib,
                    ..State::default()
                }),
            }),
        }
    }

    /// The pool as `partner`'s questions reserve from it.
    pub fn share(&self, partner: &str) -> MemoryShare {
        MemoryShare {
            pool: self.pool.clone(),
            partner: Arc::from(partner),
        }
    }

    /// MiB free now.
    pub fn free_mib(&self) -> u32 {
        self.pool.lock().free
    }

    /// The most one partner's questions hold at once, in MiB: half of the pool.
    pub fn share_mib(&self) -> u32 {
        self.pool.share_mib()
    }

    /// What a reservation of `bytes` takes: MiB rounded up to a power of two, or `None` if
    /// that is more than one partner's share ([`SharedMemory::share_mib`]).
    pub fn rounded(&self, bytes: f64) -> Option<u32> {
        let mib = (bytes.max(0.0) / MIB).ceil().max(1.0);
        let share = self.pool.share_mib();
        if mib > f64::from(share) {
            return None;
        }
        Some(
            (mib as u32)
                .checked_next_power_of_two()
                .unwrap_or(share)
                .min(share),
        )
    }
}

impl MemoryShare {
    /// The pool this share is of.
    pub fn pool(&self) -> SharedMemory {
        SharedMemory {
            pool: self.pool.clone(),
        }
    }

    /// Reserve `bytes` ([`SharedMemory::rounded`], at most the partner's share), waiting
    /// until they are free and it is this question's turn.
    pub async fn reserve(&self, bytes: f64) -> Reservation {
        let share_mib = self.pool.share_mib();
        let mib = self.pool().rounded(bytes).unwrap_or(share_mib);
        let (granted, wait) = oneshot::channel();
        let ticket = {
            let mut state = self.pool.lock();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.waiting.push_back(Waiter {
                ticket,
                partner: self.partner.clone(),
                mib,
                granted,
            });
            state.serve(share_mib);
            ticket
        };
        let mut pending = Pending {
            share: self,
            ticket,
            mib,
            armed: true,
        };
        // The sender is dropped only when served (after sending) or by `Pending` itself.
        let _ = wait.await;
        pending.armed = false;
        Reservation {
            share: self.clone(),
            mib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[test]
    fn reservations_round_up_to_powers_of_two_within_a_partners_share() {
        let pool = SharedMemory::new(200 << 20);
        assert_eq!(pool.share_mib(), 100);
        assert_eq!(pool.rounded(0.0), Some(1));
        assert_eq!(pool.rounded(1.0), Some(1));
        assert_eq!(pool.rounded(MIB + 1.0), Some(2));
        assert_eq!(pool.rounded(5.0 * MIB), Some(8));
        assert_eq!(pool.rounded(33.0 * MIB), Some(64));
        // Beyond the last power of two under the share: the share.
        assert_eq!(pool.rounded(65.0 * MIB), Some(100));
        assert_eq!(pool.rounded(100.0 * MIB), Some(100));
        // Beyond the share: not reservable (the question is refused before admission).
        assert_eq!(pool.rounded(100.5 * MIB), None);
        assert_eq!(pool.rounded(f64::INFINITY), None);
        assert_eq!(pool.rounded(f64::NAN), Some(1));
    }

    /// A question reserving in a task of its own, holding what it got until aborted.
    struct Asking {
        task: tokio::task::JoinHandle<()>,
        got: Arc<AtomicU32>,
    }

    impl Asking {
        fn new(share: &MemoryShare, mib: f64) -> Asking {
            let got = Arc::new(AtomicU32::new(0));
            let (share, set) = (share.clone(), got.clone());
            let task = tokio::spawn(async move {
                let r = share.reserve(mib * MIB).await;
                set.store(r.mib(), Ordering::SeqCst);
                std::future::pending::<()>().await;
                drop(r);
            });
            Asking { task, got }
        }

        /// MiB it was granted, after a moment for the pool to serve it (0: still waiting).
        async fn got(&self) -> u32 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.got.load(Ordering::SeqCst)
        }

        async fn end(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    #[tokio::test]
    async fn a_question_waits_until_its_memory_is_free() {
        let pool = SharedMemory::new(16 << 20);
        let (acme, globex) = (pool.share("acme"), pool.share("globex"));
        let first = acme.reserve(6.0 * MIB).await;
        assert_eq!(first.mib(), 8);
        let second = globex.reserve(7.0 * MIB).await;
        assert_eq!(pool.free_mib(), 0);
        let waiting = Asking::new(&pool.share("initech"), 0.5);
        assert_eq!(waiting.got().await, 0, "reserved while the pool was full");
        drop(first);
        assert_eq!(waiting.got().await, 1, "served once memory was given back");
        waiting.end().await;
        drop(second);
        assert_eq!(pool.free_mib(), 16);
    }

    #[tokio::test]
    async fn one_partner_never_holds_more_than_half_of_the_pool() {
        let pool = SharedMemory::new(16 << 20);
        let (mallory, acme) = (pool.share("mallory"), pool.share("acme"));
        // Mallory asks for the whole pool twice: a question gets the share at most, and
        // the second waits for mallory's own first.
        let m1 = Asking::new(&mallory, 16.0);
        assert_eq!(m1.got().await, 8);
        let m2 = Asking::new(&mallory, 16.0);
        assert_eq!(m2.got().await, 0);
        // Acme's question does not wait for mallory at all.
        let a = tokio::time::timeout(Duration::from_secs(1), acme.reserve(8.0 * MIB))
            .await
            .expect("acme served at once");
        assert_eq!((a.mib(), pool.free_mib()), (8, 0));
        m1.end().await;
        assert_eq!(m2.got().await, 8, "mallory's second served after its first");
        m2.end().await;
        drop(a);
        assert_eq!(pool.free_mib(), 16);
    }

    #[tokio::test]
    async fn the_partner_holding_least_is_served_first_and_nobody_overtakes_it() {
        let pool = SharedMemory::new(64 << 20);
        let (a, b, c) = (pool.share("a"), pool.share("b"), pool.share("c"));
        let a1 = a.reserve(32.0 * MIB).await;
        let b1 = b.reserve(16.0 * MIB).await;
        let _c1 = c.reserve(8.0 * MIB).await;
        assert_eq!(pool.free_mib(), 8);
        // a is at its share: its next question waits for a's own and blocks nobody.
        let a2 = Asking::new(&a, 1.0);
        assert_eq!(a2.got().await, 0);
        let b2 = Asking::new(&b, 16.0);
        assert_eq!(b2.got().await, 0);
        let c2 = Asking::new(&c, 16.0);
        assert_eq!(c2.got().await, 0);
        // 8 MiB free would fit b's small question, but c holds least and is next: b's
        // does not overtake it.
        let b3 = Asking::new(&b, 1.0);
        assert_eq!(b3.got().await, 0, "overtook the partner holding least");
        // b gives back 16 (24 free): b now holds least and is served (8 left); c's 16
        // does not fit, and b's small one waits behind it.
        drop(b1);
        assert_eq!(b2.got().await, 16);
        assert_eq!((c2.got().await, b3.got().await), (0, 0));
        // a gives back 32: a (holding nothing now), then c, then b.
        drop(a1);
        assert_eq!((c2.got().await, b3.got().await, a2.got().await), (16, 1, 1));
        for t in [a2, b2, b3, c2] {
            t.end().await;
        }
        assert_eq!(pool.free_mib(), 56);
    }

    #[tokio::test]
    async fn a_waiter_given_up_leaves_the_queue() {
        let pool = SharedMemory::new(16 << 20);
        let (a, b, c) = (pool.share("a"), pool.share("b"), pool.share("c"));
        let a1 = a.reserve(MIB).await;
        let b1 = b.reserve(4.0 * MIB).await;
        let c1 = c.reserve(8.0 * MIB).await;
        // 3 MiB free; a holds least: its question is next and blocks b's until given up.
        let gone = Asking::new(&a, 4.0);
        let next = Asking::new(&b, 2.0);
        assert_eq!((gone.got().await, next.got().await), (0, 0));
        gone.end().await;
        assert_eq!(next.got().await, 2, "the one given up no longer blocks it");
        drop((a1, b1, c1));
        next.end().await;
        assert_eq!(pool.free_mib(), 16);
    }
}
