//! A small runtime of a backend's own, for blocking callers: the catalog on PostgreSQL and
//! the object store on S3 keep the blocking interface the store has always had, whatever
//! runtime (if any) the caller runs on.

use std::future::Future;

use crate::{Error, Result};

pub struct Driver {
    /// Taken on drop, to shut down without blocking (a backend may be dropped inside another
    /// runtime's task, where a blocking shutdown is refused).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Driver {
    /// A runtime with `workers` threads named `name`, I/O and timers enabled.
    pub fn new(name: &str, workers: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Driver {
            runtime: Some(runtime),
        })
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime> {
        self.runtime
            .as_ref()
            .ok_or_else(|| Error::internal("backend runtime: closed"))
    }

    /// Wait for `f` on this thread, with this runtime driving its I/O and timers.
    /// (Not `Runtime::block_on`, which refuses to run inside another runtime's task.)
    pub fn wait<F: Future>(&self, f: F) -> Result<F::Output> {
        let _context = self.runtime()?.enter();
        Ok(futures_executor::block_on(f))
    }

    /// Run `f` in the background on this runtime (e.g. the read-ahead of the next range).
    pub fn spawn<F>(&self, f: F) -> Result<tokio::task::JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        Ok(self.runtime()?.spawn(f))
    }
}
