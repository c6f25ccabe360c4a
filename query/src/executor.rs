//! A dedicated runtime for query execution.
//!
//! DataFusion's operators are CPU-bound and poll for as long as their input is ready: a join
//! can keep a worker thread for seconds in one poll (a hash join over heavily duplicated
//! keys walks every chain for each probe batch; see also apache/datafusion#19358). On the
//! server's runtime, two such queries would stall every connection, TLS handshake and upload,
//! and the very timer that enforces the query time limit. Queries therefore execute on a
//! runtime of their own (the pattern of DataFusion's `thread_pools` example); the caller's
//! runtime only waits for them. Dropping that wait (client gone, shutdown) aborts the query
//! task, which stops at its next yield; joins are made to yield between batches (see
//! `exec::cooperative_joins`). At the time limit the caller aborts the task and then waits
//! for it to stop, so the question's slot is not given back while its work still runs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::Handle;
use tokio::task::{AbortHandle, JoinHandle};

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

    /// Start `work` on the query runtime. Awaiting the task gives its result (a panic in it
    /// becomes an internal error); dropping it aborts the work.
    pub fn spawn<T, F>(&self, work: F) -> QueryTask<T>
    where
        F: Future<Output = Result<T, QueryError>> + Send + 'static,
        T: Send + 'static,
    {
        QueryTask(self.handle.spawn(work))
    }
}

/// Query work running on the [`Executor`]'s runtime.
///
/// An abort takes effect at the work's next yield: the poll under way runs to its end. So
/// to know the work has really stopped (its thread is free again), abort it through
/// [`QueryTask::stopper`] and await the task: that returns once the work was dropped.
#[derive(Debug)]
pub struct QueryTask<T>(JoinHandle<Result<T, QueryError>>);

impl<T> QueryTask<T> {
    /// A handle that aborts the work, to call while something else awaits the task.
    pub fn stopper(&self) -> AbortHandle {
        self.0.abort_handle()
    }
}

impl<T> Future for QueryTask<T> {
    type Output = Result<T, QueryError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(QueryError::Internal("query execution panicked".into())),
            Err(_) => Err(QueryError::Internal("query execution was aborted".into())),
        })
    }
}

impl<T> Drop for QueryTask<T> {
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
            .spawn(async { Ok(std::thread::current().id()) })
            .await
            .expect("run");
        assert_ne!(ran_on, caller);

        // a task that would set the flag after 200 ms, abandoned after 20 ms
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let wait = ex.spawn(async move {
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

        let panicked = ex.spawn::<(), _>(async { panic!("boom") }).await;
        assert!(
            matches!(panicked, Err(QueryError::Internal(_))),
            "{panicked:?}"
        );
    }

    #[tokio::test]
    async fn a_stopped_task_is_awaited_until_its_poll_under_way_has_ended() {
        let ex = Executor::new(1).expect("executor");
        let (polled, resumed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (p, r) = (polled.clone(), resumed.clone());
        // one poll that keeps its thread for 300 ms, as a join over a shared key does
        let task = ex.spawn(async move {
            std::thread::sleep(Duration::from_millis(300));
            p.store(true, Ordering::SeqCst);
            tokio::task::yield_now().await;
            r.store(true, Ordering::SeqCst);
            Ok(())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        task.stopper().abort();
        let result = task.await;
        assert!(
            polled.load(Ordering::SeqCst),
            "returned before the poll ended"
        );
        assert!(
            !resumed.load(Ordering::SeqCst),
            "the work went on after its yield"
        );
        assert!(matches!(result, Err(QueryError::Internal(_))), "{result:?}");
    }
}
