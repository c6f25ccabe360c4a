//! Stopping a question at its time limit, and knowing that it stopped.
//!
//! Aborting the query task takes effect at its next yield, and only for that task: the
//! tasks DataFusion spawns for its operators (a `RepartitionExec` reads its input on tasks
//! of its own, so a join below it runs there) are aborted when the query's streams are
//! dropped, and they too stop only at their next yield, which for a join over a shared key
//! can be a great many batches later. Blocking work (reading a sealed dataset, the overlap
//! reductions) cannot be aborted at all. A [`Stop`] reaches all of them: joins are wrapped
//! in a [`StopExec`] that fails at the next batch once a stop is requested, and blocking
//! loops check it between batches.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, SendableRecordBatchStream,
};
use futures_util::{Stream, StreamExt};

/// A request to stop, shared by everything one question runs; and whether the question is
/// past its admission (its inputs sized, what is left bounded by them: see `exec.rs`).
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicU8>);

const REQUESTED: u8 = 1;
const ADMITTED: u8 = 2;

impl Stop {
    /// Stop, whether admitted or not (the client went away, the server shuts down).
    pub fn request(&self) {
        self.0.fetch_or(REQUESTED, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst) & REQUESTED != 0
    }

    /// The question's inputs are sized and what is left is bounded by them: from now on its
    /// time depends on who matches whom, so a time limit must not cut it off (that would
    /// make the outcome depend on it too). False if a stop was requested first: then the
    /// question stops here. Admission and [`Stop::unless_admitted`] exclude each other, so
    /// a time limit reached at the moment of admission decides one way, not both.
    pub fn admit(&self) -> bool {
        self.set_unless(ADMITTED, REQUESTED)
    }

    pub fn admitted(&self) -> bool {
        self.0.load(Ordering::SeqCst) & ADMITTED != 0
    }

    /// Stop unless the question was admitted first (a time limit): whether it stopped.
    pub fn unless_admitted(&self) -> bool {
        self.set_unless(REQUESTED, ADMITTED)
    }

    /// Set flag `set` unless flag `unless` is set, atomically: whether it was set.
    fn set_unless(&self, set: u8, unless: u8) -> bool {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s & unless == 0).then_some(s | set)
            })
            .is_ok()
    }

    /// The error that work stopped by request ends with (discarded by whoever stopped it).
    pub fn error() -> DataFusionError {
        DataFusionError::Execution("stopped on request".into())
    }
}

/// Passes its input's batches through until a stop is requested, then fails.
#[derive(Debug)]
pub struct StopExec {
    input: Arc<dyn ExecutionPlan>,
    stop: Stop,
}

impl StopExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, stop: Stop) -> Self {
        StopExec { input, stop }
    }
}

impl DisplayAs for StopExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StopExec")
    }
}

impl ExecutionPlan for StopExec {
    fn name(&self) -> &str {
        "StopExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal("StopExec takes one child".into()));
        }
        Ok(Arc::new(StopExec::new(
            children.remove(0),
            self.stop.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let schema = input.schema();
        let stream = Stopping {
            input,
            stop: self.stop.clone(),
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

struct Stopping {
    input: SendableRecordBatchStream,
    stop: Stop,
}

impl Stream for Stopping {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // checked before the input is asked for more work
        if self.stop.requested() {
            return Poll::Ready(Some(Err(Stop::error())));
        }
        self.input.poll_next_unpin(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::memory::MemorySourceConfig;

    #[tokio::test]
    async fn batches_pass_until_a_stop_is_requested_then_the_stream_fails() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = |n: i64| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![n]))])
                .expect("batch")
        };
        let source =
            MemorySourceConfig::try_new_exec(&[vec![batch(1), batch(2)]], schema.clone(), None)
                .expect("source");
        let stop = Stop::default();
        let plan = Arc::new(StopExec::new(source, stop.clone()));
        let mut stream = plan
            .execute(0, Arc::new(TaskContext::default()))
            .expect("stream");
        let first = stream.next().await.expect("one").expect("ok");
        assert_eq!(first.num_rows(), 1);
        stop.request();
        let e = stream.next().await.expect("an item").expect_err("stopped");
        assert!(e.to_string().contains("stopped on request"), "{e}");
    }

    #[test]
    fn admission_and_a_time_limit_exclude_each_other() {
        let admitted = Stop::default();
        assert!(admitted.admit());
        assert!(
            !admitted.unless_admitted(),
            "an admitted question is not cut off"
        );
        assert!(!admitted.requested());
        admitted.request();
        assert!(
            admitted.requested(),
            "a request (client gone) stops it all the same"
        );

        let late = Stop::default();
        assert!(late.unless_admitted());
        assert!(late.requested());
        assert!(
            !late.admit(),
            "a question stopped first is not admitted after"
        );
        assert!(!late.admitted());
    }
}
