//! A dedicated runtime for query execution.
//!
//! DataFusion's operators are CPU-bound and poll for as long as their input is ready: a join
//! can keep a worker thread for seconds in one poll (a hash join over heavily duplicated
//! keys walks every chain for each probe batch; see also apache/datafusion#19358). On the
//! server's runtime, two such queries would stall every connection, TLS handshake and upload,
//! and the very timer that enforces the query time limit. Queries therefore execute on a
//! runtime of their own (the pattern of DataFusion's `thread_pools` example); the caller's
//! runtime only waits for them. Dropping that wait (time limit, client gone, shutdown)
//! aborts the query task, which stops at its next yield; joins are made to yield between
//! batches (see `exec::cooperative_joins`).

use std::future::Future;

use tokio::runtime::Handle;
use tokio::task::AbortHandle;

use crate::QueryError;

/// Runs query futures on a runtime of their own.
#[derive(Debug)]
pub struct Executor {
    handle: Handle,
    /// Dropping this ends the thread that owns the runtime, which then shuts it down (a
    /// runtime cannot be dropped from async code).
    _shutdown: std::sync::mpsc::Sender<()>,
}

impl Executor {
    /// A runtime of `threads` worker threads named `escrow-query`.
    pub fn new(threads: usize) -> std::io::Result<Executor> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("escrow-query")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (shutdown, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("escrow-query-owner".into())
            .spawn(move || {
                // returns when the Executor (the only sender) is dropped
                let _ = stopped.recv();
                runtime.shutdown_background();
            })?;
        Ok(Executor {
            handle,
            _shutdown: shutdown,
        })
    }

    /// Run `work` on the query runtime and wait for it. Dropping the returned future aborts
    /// the work; a panic in it becomes an internal error.
    pub async fn run<T, F>(&self, work: F) -> Result<T, QueryError>
    where
        F: Future<Output = Result<T, QueryError>> + Send + 'static,
        T: Send + 'static,
    {
        let task = self.handle.spawn(work);
        let _abort = AbortOnDrop(task.abort_handle());
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(QueryError::Internal("query execution panicked".into())),
            Err(_) => Err(QueryError::Internal("query execution was aborted".into())),
        }
    }
}

struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn work_runs_elsewhere_and_dropping_the_wait_aborts_it() {
        let ex = Executor::new(1).expect("executor");
        let caller = std::thread::current().id();
        let ran_on = ex
            .run(async { Ok(std::thread::current().id()) })
            .await
            .expect("run");
        assert_ne!(ran_on, caller);

        // a task that would set the flag after 200 ms, abandoned after 20 ms
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let wait = ex.run(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            flag.store(true, Ordering::SeqCst);
            Ok(())
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(20), wait)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!done.load(Ordering::SeqCst), "the abandoned work went on");

        let panicked = ex.run::<(), _>(async { panic!("boom") }).await;
        assert!(
            matches!(panicked, Err(QueryError::Internal(_))),
            "{panicked:?}"
        );
    }
}
