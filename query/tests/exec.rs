//! Protected execution on real DataFusion plans over batch sources that count their reads.

#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::sync::Mutex;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::array::{ArrayRef, StringArray};
use datafusion::arrow::record_batch::RecordBatch;
use escrow_query::source::{entity_schema, with_entity_ids};
use escrow_query::{
    BatchIter, BatchSource, EntityHasher, Epsilon, Holder, Limits, Noise, NoiseKey, Protection,
    QueryTable, SharedMemory, execute, gate, plan_for_execution, plan_sql,
};

/// A dataset in memory that records its reads (the columns of each).
#[derive(Debug)]
struct Counted {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    reads: Mutex<Vec<Vec<usize>>>,
}

impl BatchSource for Counted {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn open(&self, columns: &[usize]) -> Result<BatchIter, String> {
        self.reads.lock().expect("reads").push(columns.to_vec());
        let columns = columns.to_vec();
        Ok(Box::new(self.batches.clone().into_iter().map(move |b| {
            b.project(&columns).map_err(|e| e.to_string())
        })))
    }
}

fn list(companies: std::ops::Range<usize>, hasher: &EntityHasher) -> (SchemaRef, Arc<Counted>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("website", DataType::Utf8, true),
        Field::new("region", DataType::Utf8, true),
    ]));
    let websites: Vec<String> = companies.clone().map(|i| format!("c{i}.com")).collect();
    let regions: Vec<&str> = companies
        .map(|i| if i % 2 == 0 { "EU" } else { "US" })
        .collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(websites)) as ArrayRef,
            Arc::new(StringArray::from(regions)) as ArrayRef,
        ],
    )
    .expect("batch");
    let executes = entity_schema(&schema, "website").expect("key");
    let batches = vec![with_entity_ids(&batch, "website", hasher).expect("ids")];
    let source = Arc::new(Counted {
        schema: executes,
        batches,
        reads: Mutex::default(),
    });
    (schema, source)
}

fn table(owner: &str, (schema, source): &(SchemaRef, Arc<Counted>)) -> QueryTable {
    QueryTable {
        owner: owner.into(),
        dataset: "accounts".into(),
        key_column: Some("website".into()),
        schema: schema.clone(),
        provider: escrow_query::source::table(source.clone()).expect("provider"),
    }
}

/// Runs `sql` as acme, protected; returns how often acme's and globex's lists were read.
async fn reads(sql: &str) -> (usize, usize) {
    let (acme, globex) = columns_read(sql).await;
    (acme.len(), globex.len())
}

/// Runs `sql` as acme, protected; returns the columns of each read of acme's and globex's
/// lists.
async fn columns_read(sql: &str) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let key = NoiseKey::new([9; 32]);
    let hasher = key.entity_hasher();
    let acme = list(0..200, &hasher);
    let globex = list(100..400, &hasher);
    let tables = vec![table("acme", &acme), table("globex", &globex)];
    let gated = plan_sql(sql, &tables).await.expect("plan");
    let report = gate::check(&gated, &gate::keys_of(&tables)).expect("gate");
    let (plan, state) = plan_for_execution(sql, &tables, &Limits::default(), &report)
        .await
        .expect("execution plan");
    let p = Protection {
        min_entities: 5,
        epsilon: Epsilon::at_most(1.0),
        max_groups_per_entity: 1,
        delta: 1e-6,
        entity_table: report
            .tables
            .iter()
            .position(|t| t.owner == "globex")
            .expect("a globex table"),
        bounds: vec![None; report.aggregates.len()],
        tables: (report.tables.iter())
            .map(|t| match t.owner.as_str() {
                "acme" => Holder::Caller,
                _ => Holder::Partner { stored_rows: 300 },
            })
            .collect(),
        shared: SharedMemory::new(64 << 20).share("acme"),
        noise: Noise::new(key.clone(), [1; 32]),
    };
    let answer = execute(&state, plan, &report, Some(&p), &Default::default())
        .await
        .expect("execute");
    assert_eq!(answer.suppressed, vec![false], "{sql}: one released row");
    let reads = |c: &Counted| c.reads.lock().expect("reads").clone();
    (reads(&acme.1), reads(&globex.1))
}

#[tokio::test]
async fn a_question_reads_only_the_columns_it_uses() {
    // (website, region): the join and the count read the key alone.
    let join = "SELECT COUNT(DISTINCT a.website) FROM acme.accounts a \
                JOIN globex.accounts b ON a.website = b.website";
    assert_eq!(columns_read(join).await, (vec![vec![0]], vec![vec![0]]));
    // A filter on globex's region reads that column of globex's list only.
    let filtered = format!("{join} WHERE b.region = 'EU'");
    assert_eq!(
        columns_read(&filtered).await,
        (vec![vec![0]], vec![vec![0, 1]])
    );
}

#[tokio::test]
async fn instances_of_one_shape_are_reduced_once() {
    // Another partner's list joined four times: one reduction of it, not four (each would
    // hold as much as the list, after admission, where no per-query limit applies).
    let self_join = "SELECT COUNT(DISTINCT a.website) FROM acme.accounts a \
                     JOIN globex.accounts b ON a.website = b.website \
                     JOIN globex.accounts c ON a.website = c.website \
                     JOIN globex.accounts d ON a.website = d.website \
                     JOIN acme.accounts e ON a.website = e.website";
    assert_eq!(reads(self_join).await, (1, 1));
    // A filter on one instance makes it another shape: read on its own.
    let filtered = format!("{self_join} WHERE d.region = 'EU'");
    assert_eq!(reads(&filtered).await, (1, 2));
}
