//! The memory admitted questions share.
//!
//! Before admission a question runs under its own memory limit, sized by the caller's own
//! rows only (`exec.rs`). After admission no limit may fail it: how much it holds then
//! depends on how many of another partner's rows pass its filters, so a failure would tell
//! what they hold. What bounds that stage instead is this pool, shared by the whole server:
//! an admitted question reserves what it could hold at most (another partner's tables at
//! their stored rows, whatever its filters keep) and waits until that much is free. The
//! reservation is rounded up to a power of two of MiB and capped at the whole pool (a
//! question larger than the pool runs alone), so the wait depends on the question, the
//! stored sizes (to a factor of two) and the other questions running, never on which of
//! another partner's rows pass the filters. A question waits; it is never refused here.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const MIB: f64 = (1u64 << 20) as f64;

/// Memory shared by the admitted questions of one server, in MiB.
#[derive(Debug, Clone)]
pub struct SharedMemory {
    mib: u32,
    free: Arc<Semaphore>,
}

/// Memory reserved by one question, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
    mib: u32,
}

impl Reservation {
    /// MiB reserved.
    pub fn mib(&self) -> u32 {
        self.mib
    }
}

impl SharedMemory {
    /// A pool of `bytes` (at least 1 MiB).
    pub fn new(bytes: usize) -> Self {
        let mib = u32::try_from((bytes >> 20).max(1)).unwrap_or(u32::MAX);
        SharedMemory {
            mib,
            free: Arc::new(Semaphore::new(mib as usize)),
        }
    }

    /// What a reservation of `bytes` takes: MiB rounded up to a power of two, at most the
    /// whole pool.
    pub fn rounded(&self, bytes: f64) -> u32 {
        let mib = (bytes.max(0.0) / MIB).ceil().max(1.0);
        if mib >= f64::from(self.mib) {
            return self.mib;
        }
        (mib as u32).next_power_of_two().min(self.mib)
    }

    /// Reserve `bytes` ([`SharedMemory::rounded`]), waiting until they are free. Waiters are
    /// served first come, first served.
    pub async fn reserve(&self, bytes: f64) -> Reservation {
        let mib = self.rounded(bytes);
        // The semaphore is never closed.
        let permit = self.free.clone().acquire_many_owned(mib).await.ok();
        Reservation {
            _permit: permit,
            mib,
        }
    }

    /// MiB free now.
    pub fn free_mib(&self) -> usize {
        self.free.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reservations_round_up_to_powers_of_two_within_the_pool() {
        let pool = SharedMemory::new(100 << 20);
        assert_eq!(pool.rounded(0.0), 1);
        assert_eq!(pool.rounded(1.0), 1);
        assert_eq!(pool.rounded(MIB + 1.0), 2);
        assert_eq!(pool.rounded(5.0 * MIB), 8);
        assert_eq!(pool.rounded(33.0 * MIB), 64);
        // Beyond the pool: all of it, so the question runs alone.
        assert_eq!(pool.rounded(65.0 * MIB), 100);
        assert_eq!(pool.rounded(f64::INFINITY), 100);
    }

    #[tokio::test]
    async fn a_question_waits_until_its_memory_is_free() {
        let pool = SharedMemory::new(8 << 20);
        let first = pool.reserve(6.0 * MIB).await;
        assert_eq!(first.mib(), 8);
        assert_eq!(pool.free_mib(), 0);
        let waiting = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.reserve(MIB).await.mib() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "reserved while the pool was full");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("served once the memory was given back")
            .expect("task");
        assert_eq!(second, 1);
        assert_eq!(pool.free_mib(), 8);
    }
}
