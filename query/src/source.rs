//! Table providers over sealed datasets. The engine does not know how data is sealed: the
//! service hands it a [`BatchSource`] per table (decrypting and verifying as it reads, or
//! serving verified batches from its cache), and the provider streams those batches into
//! DataFusion from the blocking pool.
//!
//! Key columns execute as entity ids: a query is planned and gated over the declared schema,
//! then runs over batches whose key column holds a keyed 64-bit hash of each key
//! ([`EntityHasher`]). Joins and COUNT(DISTINCT) on keys are all the gate lets a query do
//! with a key, and those mean the same on the ids, at a fraction of the cost of hashing,
//! comparing and copying strings. The hash is keyed with a secret of the escrow, so nobody can
//! construct a value that collides with another partner's key; two different keys share an id
//! with probability 2^-64 per pair (about 5·10^-8 for a 1M × 1M join).

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::array::{Array, ArrayRef, StringArray, UInt64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::Session;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};

/// Verified batches of one dataset version, read on demand.
pub trait BatchSource: Send + Sync + fmt::Debug {
    fn schema(&self) -> SchemaRef;
    /// Start reading `columns` (indices into the schema, ascending) (blocking): batches of
    /// those columns only, so a question decrypts only what it reads. Every batch yielded
    /// has been authenticated; an error ends the read and fails the query.
    fn open(&self, columns: &[usize]) -> Result<BatchIter, String>;
    /// Where values computed from this source's rows may be kept for the next questions of
    /// the same asker (`None`: nowhere), taken before the rows they are computed from are
    /// read (blocking): what is computed from rows read across a change of the data is not
    /// kept.
    fn keeper(&self) -> Option<Box<dyn Keeper>> {
        None
    }
}

/// Values computed from a source's rows, kept by the service between one asker's questions
/// under names that say how they were computed ([`BatchSource::keeper`]).
pub trait Keeper: Send {
    /// The value kept as `name`, if any (blocking: a keeper may read it back from storage).
    fn get(&self, name: &str) -> Option<Arc<dyn Any + Send + Sync>>;
    /// Keep `value`, counted as `bytes` in what the service keeps.
    fn keep(&self, name: &str, value: Arc<dyn Any + Send + Sync>, bytes: usize);
}

/// The batches of one read.
pub type BatchIter = Box<dyn Iterator<Item = Result<RecordBatch, String>> + Send>;

/// A DataFusion table over a [`BatchSource`]: a scan reads the columns its plan uses.
pub fn table(source: Arc<dyn BatchSource>) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    Ok(Arc::new(SourceTable {
        schema: source.schema(),
        source,
    }))
}

#[derive(Debug)]
struct SourceTable {
    schema: SchemaRef,
    source: Arc<dyn BatchSource>,
}

/// The source of a table made by [`table`] (`None` for any other table).
pub(crate) fn source_of(table: &dyn TableProvider) -> Option<Arc<dyn BatchSource>> {
    table
        .downcast_ref::<SourceTable>()
        .map(|t| t.source.clone())
}

#[async_trait::async_trait]
impl TableProvider for SourceTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>, DataFusionError> {
        let columns = projection
            .cloned()
            .unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        // The source yields columns in ascending order; a projection in another order is
        // applied over them.
        let mut read = columns.clone();
        read.sort_unstable();
        read.dedup();
        if read.is_empty() && !self.schema.fields().is_empty() {
            // No column used (COUNT(*)): one is read for the row counts, projected away: a
            // fixed-width one (the key's ids), so its time does not follow its values.
            let fixed = (self.schema.fields().iter())
                .position(|f| f.data_type().is_primitive())
                .unwrap_or(0);
            read.push(fixed);
        }
        let schema = Arc::new(self.schema.project(&read)?);
        let part: Arc<dyn PartitionStream> = Arc::new(SourcePartition {
            schema: schema.clone(),
            source: self.source.clone(),
            columns: read.clone(),
        });
        let order: Vec<usize> = columns
            .iter()
            .map(|c| read.binary_search(c).unwrap_or_default())
            .collect();
        let reorder = (order != (0..read.len()).collect::<Vec<_>>()).then_some(&order);
        Ok(Arc::new(StreamingTableExec::try_new(
            schema,
            vec![part],
            reorder,
            Vec::new(),
            false,
            limit,
        )?))
    }
}

#[derive(Debug)]
struct SourcePartition {
    schema: SchemaRef,
    source: Arc<dyn BatchSource>,
    columns: Vec<usize>,
}

impl PartitionStream for SourcePartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let mut builder = RecordBatchReceiverStream::builder(self.schema.clone(), 2);
        let tx = builder.tx();
        let (source, columns) = (self.source.clone(), self.columns.clone());
        builder.spawn_blocking(move || {
            // Errors carry no data (they come from the sealing layer); the service logs them
            // and clients see a generic failure.
            let batches = source.open(&columns).map_err(external)?;
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

/// Keyed hash of key values into entity ids (SipHash-2-4 under a secret of the escrow).
#[derive(Clone)]
pub struct EntityHasher(siphasher::sip::SipHasher24);

impl fmt::Debug for EntityHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EntityHasher(<secret>)")
    }
}

impl EntityHasher {
    pub fn new(key: [u8; 16]) -> Self {
        let (k0, k1) = key.split_at(8);
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
        EntityHasher(siphasher::sip::SipHasher24::new_with_keys(
            word(k0),
            word(k1),
        ))
    }

    /// Entity id of a key value given as text (integer keys hash their decimal text).
    pub fn id(&self, key: &str) -> u64 {
        self.0.hash(key.as_bytes())
    }

    /// The check value of this hash (the id of a fixed text): ids stored at upload under it
    /// are the ids this hash gives.
    pub fn check(&self) -> u64 {
        self.id("escrow-stored-ids-check-v1")
    }

    /// Entity ids of a key column; nulls stay null (a row without a key is no entity).
    pub fn ids(&self, column: &dyn Array) -> Result<ArrayRef, ArrowError> {
        let text = cast(column, &DataType::Utf8)?;
        let text = text
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| ArrowError::CastError("key column is not text".into()))?;
        let ids: UInt64Array = text.iter().map(|v| v.map(|v| self.id(v))).collect();
        Ok(Arc::new(ids))
    }
}

/// The schema a keyed table executes with: `key` as UInt64 entity ids.
pub fn entity_schema(schema: &Schema, key: &str) -> Result<SchemaRef, ArrowError> {
    let i = schema.index_of(key)?;
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[i] = Field::new(key, DataType::UInt64, fields[i].is_nullable());
    Ok(Arc::new(Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    )))
}

/// `batch` with its key column replaced by entity ids.
pub fn with_entity_ids(
    batch: &RecordBatch,
    key: &str,
    hasher: &EntityHasher,
) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let i = schema.index_of(key)?;
    let mut columns = batch.columns().to_vec();
    columns[i] = hasher.ids(columns[i].as_ref())?;
    RecordBatch::try_new(entity_schema(&schema, key)?, columns)
}

fn external(s: String) -> DataFusionError {
    DataFusionError::External(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;

    #[test]
    fn entity_ids_are_keyed_deterministic_and_keep_nulls() {
        let h = EntityHasher::new([1; 16]);
        let keys = StringArray::from(vec![
            Some("acme.com"),
            None,
            Some("globex.com"),
            Some("acme.com"),
        ]);
        let ids = h.ids(&keys).unwrap();
        let ids = ids.as_any().downcast_ref::<UInt64Array>().unwrap();
        assert_eq!(ids.value(0), ids.value(3));
        assert_ne!(ids.value(0), ids.value(2));
        assert!(ids.is_null(1));
        // Another escrow (another secret) gives other ids.
        assert_ne!(EntityHasher::new([2; 16]).id("acme.com"), ids.value(0));
        // Integer keys hash their decimal text.
        let ints = h.ids(&Int64Array::from(vec![42])).unwrap();
        assert_eq!(
            ints.as_any()
                .downcast_ref::<UInt64Array>()
                .unwrap()
                .value(0),
            h.id("42")
        );
    }

    #[test]
    fn only_the_key_column_changes() {
        let h = EntityHasher::new([3; 16]);
        let batch = RecordBatch::try_from_iter(vec![
            (
                "website",
                Arc::new(StringArray::from(vec!["a.com", "b.com"])) as ArrayRef,
            ),
            (
                "industry",
                Arc::new(StringArray::from(vec!["x", "y"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let out = with_entity_ids(&batch, "website", &h).unwrap();
        assert_eq!(out.schema().field(0).data_type(), &DataType::UInt64);
        assert_eq!(out.column(1), batch.column(1));
        assert_eq!(
            out.schema(),
            entity_schema(&batch.schema(), "website").unwrap()
        );
        assert!(with_entity_ids(&batch, "nope", &h).is_err());
    }
}
