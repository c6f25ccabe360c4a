//! Work done for a later process, off every question's path: sealing a version's reduced
//! forms beside it (`Store::seal_derived`), so that a restarted server or another node reads
//! them instead of reducing the version again.
//!
//! One thread, started with the first job, runs the jobs one after another at the lowest
//! scheduling priority (nice 19), so that on a machine whose cores a question keeps busy it
//! takes only what the question leaves: a job competes with no question for the cores (it
//! did, when seals ran on the blocking pool beside the count that had just reduced them).
//! A job waits its lane's delay before it runs, and jobs are keyed: of several jobs of one
//! key submitted within the delay, the last one runs, once, a delay after it came (a side
//! reduced for populations that changed again a moment later is not sealed for each of
//! them; the job itself can tell it is stale, see `Store::later`). A shutdown runs what is
//! waiting at once ([`Background::wait_idle`]). A job that panics is that job's loss
//! alone; the thread goes on with the next.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    /// Key, job, when it may run.
    jobs: VecDeque<(String, Job, Instant)>,
    /// Run what waits now, without its delay (a shutdown waits for it).
    hurry: bool,
    /// A job is running (taken from `jobs`).
    running: bool,
    /// The thread has been started.
    started: bool,
    /// The owner is gone: the thread ends once `jobs` is empty.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is added, the queue closes or a job ends.
    changed: Condvar,
}

/// A background lane of keyed jobs (see the module docs).
pub struct Background {
    shared: Arc<Shared>,
    /// How long a job waits before it runs.
    delay: Duration,
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background").finish_non_exhaustive()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let mut q = self.lock();
        q.closed = true;
        self.shared.changed.notify_all();
    }
}

impl Background {
    /// A lane whose jobs wait `delay` before they run.
    pub fn new(delay: Duration) -> Self {
        Background {
            shared: Default::default(),
            delay,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A job runs outside the lock: a poisoned lock only means a panic between two
        // statements of this module, and the queue is still whole.
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Run `job` on the background thread once the lane's delay has passed, unless another
    /// job of `key` is submitted before it starts (that one runs instead, its delay after).
    pub fn submit(&self, key: String, job: impl FnOnce() + Send + 'static) {
        let mut q = self.lock();
        let (job, at): (Job, Instant) = (Box::new(job), Instant::now() + self.delay);
        // What is replaced or dropped may hold the last reference to a large value: freed
        // once the lock is released, not while the worker waits for it.
        let mut dropped: Vec<Job> = Vec::new();
        if let Some(i) = q.jobs.iter().position(|(k, _, _)| *k == key) {
            // Behind the others again: they came first, and none waits longer than its delay.
            dropped.extend(q.jobs.remove(i).map(|(_, job, _)| job));
        }
        q.jobs.push_back((key, job, at));
        if !q.started {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("escrow-background".into())
                .spawn(move || work(&shared));
            match spawned {
                Ok(_) => q.started = true,
                Err(e) => {
                    // Nothing runs it: dropped (what it would have written is written by
                    // the next process, which reduces again). Tried again with the next job.
                    tracing::warn!(error = %e, "background thread not started: jobs dropped");
                    dropped.extend(q.jobs.drain(..).map(|(_, job, _)| job));
                }
            }
        }
        self.shared.changed.notify_all();
        drop(q);
        drop(dropped);
    }

    /// Run what is waiting now, without its delay, and wait until no job is waiting or
    /// running, for at most `within` (a clean shutdown: what is sealed now need not be
    /// reduced again by the next process). Whether none is.
    pub fn wait_idle(&self, within: Duration) -> bool {
        let end = Instant::now() + within;
        let mut q = self.lock();
        q.hurry = true;
        self.shared.changed.notify_all();
        let idle = loop {
            if !q.running && q.jobs.is_empty() {
                break true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            q = (self.shared.changed.wait_timeout(q, left))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        q.hurry = false;
        idle
    }
}

fn work(shared: &Shared) {
    // Linux keeps a nice value per thread: this one alone runs at the lowest priority
    // (elsewhere the call would lower the whole process: not made).
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(None, 19) {
        tracing::debug!(error = %e, "background thread: priority not lowered");
    }
    let lock = || shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let mut q = lock();
    loop {
        let Some(&(_, _, at)) = q.jobs.front() else {
            if q.closed {
                return;
            }
            q = (shared.changed.wait(q)).unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        let left = at.saturating_duration_since(Instant::now());
        if !left.is_zero() && !q.hurry && !q.closed {
            q = (shared.changed.wait_timeout(q, left))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        }
        let Some((_, job, _)) = q.jobs.pop_front() else {
            continue;
        };
        q.running = true;
        drop(q);
        // The panic was reported by the hook; the next job still runs.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        q = lock();
        q.running = false;
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn jobs_run_in_order_and_the_last_of_a_key_replaces_the_waiting_one() {
        let background = Background::new(Duration::ZERO);
        let ran = Arc::new(Mutex::new(Vec::new()));
        // Holds the thread in a first job while the others queue.
        let (release, hold) = mpsc::channel::<()>();
        let (started, wait_started) = mpsc::channel::<()>();
        background.submit("hold".into(), move || {
            started.send(()).unwrap();
            hold.recv().unwrap();
        });
        wait_started.recv().unwrap();
        for (key, label) in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")] {
            let ran = ran.clone();
            background.submit(key.into(), move || ran.lock().unwrap().push(label));
        }
        release.send(()).unwrap();
        assert!(background.wait_idle(Duration::from_secs(60)));
        assert_eq!(*ran.lock().unwrap(), ["b1", "a2", "c1"]);
    }

    #[test]
    fn a_job_waits_its_delay_unless_a_shutdown_hurries_it() {
        let background = Background::new(Duration::from_secs(3600));
        let ran = Arc::new(AtomicUsize::new(0));
        let counted = ran.clone();
        background.submit("x".into(), move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ran.load(Ordering::SeqCst), 0, "ran before its delay");
        assert!(background.wait_idle(Duration::from_secs(60)));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_job_that_panics_does_not_stop_the_next() {
        let background = Background::new(Duration::ZERO);
        let ran = Arc::new(AtomicUsize::new(0));
        background.submit("x".into(), || panic!("a job's bug"));
        let counted = ran.clone();
        background.submit("y".into(), move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        assert!(background.wait_idle(Duration::from_secs(60)));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn the_thread_runs_at_the_lowest_priority() {
        let background = Background::new(Duration::ZERO);
        let (tx, rx) = mpsc::channel();
        background.submit("nice".into(), move || {
            tx.send(rustix::process::getpriority_process(None).unwrap())
                .unwrap()
        });
        assert_eq!(rx.recv().unwrap(), 19);
    }
}
