//! Admission control: how much work may run at once, per partner and in all.
//!
//! A partner over its own limit is refused at once with 429 and `Retry-After`
//! (`Error::Busy`). Work that only finds the server full waits for a slot for at most
//! `Limits::wait` (first come is not guaranteed first served), holding its partner's slot
//! while it waits, so at most `per_partner` requests of a partner run or wait: the queue is
//! bounded by the partners, a partner flooding the server slows only itself, and the
//! server's memory stays bounded (each question also has its own memory and time limit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::{Error, Result};

/// Kinds of work that are limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Work {
    /// Uploads (network-, disk- and key-bound; long). Their company keys use at most one
    /// helper thread per spare core in the whole process (`matching::company_keys_parallel`).
    Upload,
    /// Questions: queries, overlaps, reports, explanations (CPU- and memory-bound).
    Question,
}

impl Work {
    fn name(self) -> &'static str {
        match self {
            Work::Upload => "uploads",
            Work::Question => "questions",
        }
    }

    /// Seconds a refused client should wait: about how long one such job takes.
    fn retry_after(self) -> u64 {
        match self {
            Work::Upload => 5,
            Work::Question => 1,
        }
    }
}

/// Limits for one kind of work.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub per_partner: usize,
    pub total: usize,
}

/// The server's admission limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub uploads: Limit,
    pub questions: Limit,
    /// How long work waits for a server-wide slot before it is refused.
    pub wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            uploads: Limit {
                per_partner: 2,
                total: 16,
            },
            questions: Limit {
                per_partner: 4,
                total: 8,
            },
            wait: Duration::from_secs(1),
        }
    }
}

/// Work by (partner, kind), running or waiting for a server slot; `None` counts the work
/// running on the whole server.
#[derive(Debug, Default)]
struct Counts(HashMap<(Option<String>, Work), usize>);

impl Counts {
    fn get(&self, partner: Option<&str>, work: Work) -> usize {
        self.0
            .get(&(partner.map(str::to_string), work))
            .copied()
            .unwrap_or(0)
    }

    fn add(&mut self, partner: Option<&str>, work: Work) {
        *self
            .0
            .entry((partner.map(str::to_string), work))
            .or_default() += 1;
    }

    fn remove(&mut self, partner: Option<&str>, work: Work) {
        let key = (partner.map(str::to_string), work);
        if let Some(n) = self.0.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.0.remove(&key);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    counts: Mutex<Counts>,
    /// Woken whenever a server slot is given back.
    freed: Notify,
}

impl Shared {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts of running work; `admit` hands out permits that give their slot back on drop.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    shared: Arc<Shared>,
}

/// A partner's slot, held while its work waits for a server slot and while it runs;
/// given back when dropped (also when the request is cancelled while waiting).
#[derive(Debug)]
struct PartnerSlot {
    shared: Arc<Shared>,
    partner: String,
    work: Work,
}

impl Drop for PartnerSlot {
    fn drop(&mut self) {
        self.shared.counts().remove(Some(&self.partner), self.work);
    }
}

/// A slot of running work, the partner's and the server's; released when dropped (also
/// when the request is cancelled).
#[derive(Debug)]
pub struct Permit {
    slot: PartnerSlot,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.slot.shared.counts().remove(None, self.slot.work);
        self.slot.shared.freed.notify_waiters();
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            shared: Arc::default(),
        }
    }

    /// Admit one piece of `work` for `partner`: at once, after a wait of at most
    /// `Limits::wait` for a server slot, or refused (`Error::Busy`) if the partner is at
    /// its limit or no server slot came free in time.
    pub async fn admit(&self, partner: &str, work: Work) -> Result<Permit> {
        let limit = match work {
            Work::Upload => self.limits.uploads,
            Work::Question => self.limits.questions,
        };
        let slot = {
            let mut counts = self.shared.counts();
            if counts.get(Some(partner), work) >= limit.per_partner {
                drop(counts);
                return Err(busy(partner, work, limit.per_partner, "this partner"));
            }
            counts.add(Some(partner), work);
            PartnerSlot {
                shared: self.shared.clone(),
                partner: partner.to_string(),
                work,
            }
        };
        let deadline = tokio::time::Instant::now() + self.limits.wait;
        loop {
            // Registered before the check, so a slot given back in between still wakes us.
            let freed = self.shared.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut counts = self.shared.counts();
                if counts.get(None, work) < limit.total {
                    counts.add(None, work);
                    return Ok(Permit { slot });
                }
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                drop(slot);
                return Err(busy(partner, work, limit.total, "the server"));
            }
        }
    }
}

fn busy(partner: &str, work: Work, limit: usize, scope: &'static str) -> Error {
    tracing::info!(partner, work = work.name(), scope, limit, "busy: refused");
    Error::Busy {
        what: work.name(),
        limit,
        scope,
        retry_after: work.retry_after(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(uploads: (usize, usize), questions: (usize, usize), wait_ms: u64) -> Limits {
        let limit = |(per_partner, total)| Limit { per_partner, total };
        Limits {
            uploads: limit(uploads),
            questions: limit(questions),
            wait: Duration::from_millis(wait_ms),
        }
    }

    #[tokio::test]
    async fn per_partner_then_total_and_slots_come_back() {
        let a = Admission::new(limits((2, 3), (1, 1), 0));
        let p1 = a.admit("acme", Work::Upload).await.expect("1");
        let _p2 = a.admit("acme", Work::Upload).await.expect("2");
        let e = a
            .admit("acme", Work::Upload)
            .await
            .expect_err("acme is full");
        assert!(e.to_string().contains("this partner"), "{e}");
        let _g = a
            .admit("globex", Work::Upload)
            .await
            .expect("globex has room");
        let e = a
            .admit("initech", Work::Upload)
            .await
            .expect_err("server is full");
        assert!(e.to_string().contains("the server"), "{e}");
        // other work is counted apart
        let _q = a.admit("acme", Work::Question).await.expect("question");
        drop(p1);
        a.admit("initech", Work::Upload)
            .await
            .expect("a slot came back");
    }

    #[tokio::test]
    async fn a_full_server_is_waited_for_a_bounded_time_and_waiters_hold_their_partner_slot() {
        let a = Arc::new(Admission::new(limits((1, 1), (1, 1), 1000)));
        let held = a.admit("acme", Work::Question).await.expect("acme runs");

        // globex waits for the server slot and gets it when acme's work ends
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit("globex", Work::Question).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "globex should be waiting");
        // while globex waits it holds its partner slot: a second globex question is
        // refused at once, not queued
        let e = a
            .admit("globex", Work::Question)
            .await
            .expect_err("globex's slot is taken by its waiter");
        assert!(e.to_string().contains("this partner"), "{e}");
        let freed = std::time::Instant::now();
        drop(held);
        let running = waiter.await.expect("join").expect("globex admitted");
        // woken by the slot given back, not by the end of its wait
        assert!(
            freed.elapsed() < Duration::from_millis(500),
            "{:?}",
            freed.elapsed()
        );

        // a wait that outlasts the limit is refused, and gives back the partner slot
        let started = tokio::time::Instant::now();
        let e = a
            .admit("initech", Work::Question)
            .await
            .expect_err("no slot came free");
        assert!(e.to_string().contains("the server"), "{e}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1000) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(a.shared.counts().get(Some("initech"), Work::Question), 0);

        // a waiter that is cancelled (client gone) gives back its partner slot too
        let cancelled = {
            let a = a.clone();
            tokio::spawn(async move { a.admit("initech", Work::Question).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(a.shared.counts().get(Some("initech"), Work::Question), 1);
        cancelled.abort();
        let _ = cancelled.await;
        assert_eq!(a.shared.counts().get(Some("initech"), Work::Question), 0);

        drop(running);
        assert_eq!(a.shared.counts().get(None, Work::Question), 0);
        assert_eq!(a.shared.counts().get(Some("globex"), Work::Question), 0);
    }
}
