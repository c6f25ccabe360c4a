//! Table providers over sealed datasets. The engine does not know how data is sealed: the
//! service hands it a [`BatchSource`] per table (decrypting and verifying as it reads, or
//! serving verified batches from its cache), and the provider streams those batches into
//! DataFusion from the blocking pool.

use std::fmt;
use std::sync::Arc;

use arrow_schema::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::datasource::TableProvider;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::streaming::PartitionStream;

/// Verified batches of one dataset version, read on demand.
pub trait BatchSource: Send + Sync + fmt::Debug {
    fn schema(&self) -> SchemaRef;
    /// Start reading (blocking). Every batch yielded has been authenticated; an error ends
    /// the read and fails the query.
    fn open(&self) -> Result<BatchIter, String>;
}

/// The batches of one read.
pub type BatchIter = Box<dyn Iterator<Item = Result<RecordBatch, String>> + Send>;

/// A DataFusion table over a [`BatchSource`].
pub fn table(source: Arc<dyn BatchSource>) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    let schema = source.schema();
    let part: Arc<dyn PartitionStream> = Arc::new(SourcePartition { schema, source });
    Ok(Arc::new(StreamingTable::try_new(
        part.schema().clone(),
        vec![part],
    )?))
}

#[derive(Debug)]
struct SourcePartition {
    schema: SchemaRef,
    source: Arc<dyn BatchSource>,
}

impl PartitionStream for SourcePartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let mut builder = RecordBatchReceiverStream::builder(self.schema.clone(), 2);
        let tx = builder.tx();
        let source = self.source.clone();
        builder.spawn_blocking(move || {
            // Errors carry no data (they come from the sealing layer); the service logs them
            // and clients see a generic failure.
            let batches = source.open().map_err(external)?;
            for b in batches {
                let b = b.map_err(external)?;
                if tx.blocking_send(Ok(b)).is_err() {
                    break; // the query was cancelled
                }
            }
            Ok(())
        });
        builder.build()
    }
}

fn external(s: String) -> DataFusionError {
    DataFusionError::External(s.into())
}
