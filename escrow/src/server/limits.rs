//! Admission control: how much work may run at once, per partner and in all. Work over a
//! limit is refused at once with 429 and `Retry-After` (`Error::Busy`), never queued without
//! bound: a partner flooding the server slows only itself, and the server's memory stays
//! bounded (each question also has its own memory and time limit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// Kinds of work that are limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Work {
    /// Uploads (network- and disk-bound; long).
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
        }
    }
}

/// Running work by (partner, kind); `None` counts all partners.
type Running = Arc<Mutex<HashMap<(Option<String>, Work), usize>>>;

/// Counts of running work; `admit` hands out permits that give their slot back on drop.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    running: Running,
}

/// A slot of running work; released when dropped (also when the request is cancelled).
#[derive(Debug)]
pub struct Permit {
    running: Running,
    partner: String,
    work: Work,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Admit one piece of `work` for `partner`, or refuse it (`Error::Busy`) if the partner
    /// or the server is at its limit.
    pub fn admit(&self, partner: &str, work: Work) -> Result<Permit> {
        let limit = match work {
            Work::Upload => self.limits.uploads,
            Work::Question => self.limits.questions,
        };
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mine = running
            .get(&(Some(partner.to_string()), work))
            .copied()
            .unwrap_or(0);
        let all = running.get(&(None, work)).copied().unwrap_or(0);
        let (full, scope) = if mine >= limit.per_partner {
            (limit.per_partner, "this partner")
        } else if all >= limit.total {
            (limit.total, "the server")
        } else {
            *running
                .entry((Some(partner.to_string()), work))
                .or_default() += 1;
            *running.entry((None, work)).or_default() += 1;
            return Ok(Permit {
                running: self.running.clone(),
                partner: partner.to_string(),
                work,
            });
        };
        tracing::info!(
            partner,
            work = work.name(),
            scope,
            limit = full,
            "busy: refused"
        );
        Err(Error::Busy {
            what: work.name(),
            limit: full,
            scope,
            retry_after: work.retry_after(),
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for key in [
            (Some(std::mem::take(&mut self.partner)), self.work),
            (None, self.work),
        ] {
            if let Some(n) = running.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    running.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_partner_then_total_and_slots_come_back() {
        let a = Admission::new(Limits {
            uploads: Limit {
                per_partner: 2,
                total: 3,
            },
            questions: Limit {
                per_partner: 1,
                total: 1,
            },
        });
        let p1 = a.admit("acme", Work::Upload).expect("1");
        let _p2 = a.admit("acme", Work::Upload).expect("2");
        let e = a.admit("acme", Work::Upload).expect_err("acme is full");
        assert!(e.to_string().contains("this partner"), "{e}");
        let _g = a.admit("globex", Work::Upload).expect("globex has room");
        let e = a
            .admit("initech", Work::Upload)
            .expect_err("server is full");
        assert!(e.to_string().contains("the server"), "{e}");
        // other work is counted apart
        let _q = a.admit("acme", Work::Question).expect("question");
        drop(p1);
        a.admit("initech", Work::Upload).expect("a slot came back");
    }
}
