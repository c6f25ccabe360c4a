//! Protected execution on real DataFusion plans over batch sources that count their reads.

#![allow(clippy::expect_used)]

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::array::{ArrayRef, StringArray};
use datafusion::arrow::record_batch::RecordBatch;
use escrow_query::source::{entity_schema, with_entity_ids};
use escrow_query::{
    Answer, BatchIter, BatchSource, EntityHasher, Epsilon, Holder, Keeper, Limits, Noise, NoiseKey,
    Protection, QueryTable, SharedMemory, execute, gate, plan_for_execution, plan_sql,
};

/// What a source keeps ([`Keeper`]): each value with the bytes it was counted as.
type Kept = Arc<Mutex<HashMap<String, (Arc<dyn Any + Send + Sync>, usize)>>>;

/// A dataset in memory that records its reads (the columns of each), and keeps what
/// questions compute from it in `kept` where there is one.
#[derive(Debug)]
struct Counted {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    reads: Mutex<Vec<Vec<usize>>>,
    kept: Option<Kept>,
}

struct MapKeeper(Kept);

impl Keeper for MapKeeper {
    fn get(&self, name: &str) -> Option<Arc<dyn Any + Send + Sync>> {
        let kept = self.0.lock().expect("kept");
        kept.get(name).map(|(v, _)| v.clone())
    }
    fn keep(&self, name: &str, value: Arc<dyn Any + Send + Sync>, bytes: usize) {
        let mut kept = self.0.lock().expect("kept");
        kept.insert(name.to_string(), (value, bytes));
    }
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
    fn keeper(&self) -> Option<Box<dyn Keeper>> {
        let kept = self.kept.clone()?;
        Some(Box::new(MapKeeper(kept)))
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
        kept: None,
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
    let hasher = NoiseKey::new([9; 32]).entity_hasher();
    let acme = list(0..200, &hasher);
    let globex = list(100..400, &hasher);
    let answer = run(sql, &acme, &globex).await;
    assert_eq!(answer.suppressed, vec![false], "{sql}: one released row");
    let reads = |c: &Counted| c.reads.lock().expect("reads").clone();
    (reads(&acme.1), reads(&globex.1))
}

/// Runs `sql` as acme over the two lists, protected.
async fn run(
    sql: &str,
    acme: &(SchemaRef, Arc<Counted>),
    globex: &(SchemaRef, Arc<Counted>),
) -> Answer {
    let key = NoiseKey::new([9; 32]);
    let tables = vec![table("acme", acme), table("globex", globex)];
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
    execute(&state, plan, &report, Some(&p), &Default::default())
        .await
        .expect("execute")
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

#[tokio::test]
async fn another_partners_reduced_table_is_kept_by_its_shape() {
    let hasher = NoiseKey::new([9; 32]).entity_hasher();
    let acme = list(0..200, &hasher);
    let mut globex = list(100..400, &hasher);
    let kept = Kept::default();
    Arc::get_mut(&mut globex.1).expect("one owner").kept = Some(kept.clone());
    let join = "SELECT COUNT(DISTINCT a.website) FROM acme.accounts a \
                JOIN globex.accounts b ON a.website = b.website";
    let (acme, globex, hasher) = (&acme, &globex, &hasher);
    let answers = move |sql: String| async move {
        let kept = run(&sql, acme, globex).await;
        // The same question over lists that keep nothing: the answer computed anew.
        let fresh = run(&sql, &list(0..200, hasher), &list(100..400, hasher)).await;
        assert_eq!(kept.batches, fresh.batches, "{sql}");
        assert_eq!(kept.suppressed, fresh.suppressed, "{sql}");
        (
            acme.1.reads.lock().expect("reads").len(),
            globex.1.reads.lock().expect("reads").len(),
        )
    };
    // Questions that differ on acme's side only: globex's list is read and reduced once.
    assert_eq!(
        answers(format!("{join} WHERE a.region = 'EU'")).await,
        (1, 1)
    );
    assert_eq!(
        answers(format!("{join} WHERE a.region = 'US'")).await,
        (2, 1)
    );
    assert_eq!(answers(join.to_string()).await, (3, 1));
    // A filter on globex's list is another shape: read again, and kept beside the first.
    assert_eq!(
        answers(format!("{join} WHERE b.region = 'EU'")).await,
        (4, 2)
    );
    assert_eq!(
        answers(format!("{join} WHERE b.region = 'EU' AND a.region = 'US'")).await,
        (5, 2)
    );
    // What a kept reduction counts as does not depend on how many of globex's rows the
    // caller's filters kept: the most the list could hold (its size class), never its size.
    assert_eq!(
        answers(format!("{join} WHERE b.region = 'nowhere'")).await,
        (6, 3)
    );
    // A value that spells what a name would go on with is still another shape.
    let crafted = format!("{join} WHERE b.region = 'EU;\"), Utf8(\"nowhere'");
    assert_eq!(answers(crafted).await, (7, 4));
    let counted: Vec<usize> = kept
        .lock()
        .expect("kept")
        .values()
        .map(|(_, b)| *b)
        .collect();
    assert_eq!(counted.len(), 4);
    assert!(
        counted.iter().all(|&b| b == counted[0] && b >= 1024 * 64),
        "{counted:?}"
    );
    // A reduction with a text GROUP BY column holds its values, as long as they are: more
    // than its column types bound, so it is not kept.
    let by_region = "SELECT b.region, COUNT(DISTINCT a.website) FROM acme.accounts a \
                     JOIN globex.accounts b ON a.website = b.website GROUP BY b.region";
    assert_eq!(answers(by_region.to_string()).await, (8, 5));
    assert_eq!(answers(by_region.to_string()).await, (9, 6));
    assert_eq!(kept.lock().expect("kept").len(), 4);
}

#[tokio::test]
async fn a_versions_companies_reduced_ahead_answer_as_a_question_reduces_them() {
    let hasher = NoiseKey::new([9; 32]).entity_hasher();
    let acme = list(0..200, &hasher);
    let mut globex = list(100..400, &hasher);
    // What the server makes of a version after its upload: its key column's companies.
    let keys = globex.1.batches.iter().map(|b| b.column(0).clone());
    let (companies, bytes) = escrow_query::exec::reduce_keys(keys, 2).expect("companies");
    let kept = Kept::default();
    let name = escrow_query::exec::KEYS_REDUCTION.to_string();
    kept.lock()
        .expect("kept")
        .insert(name.clone(), (companies.clone(), bytes));
    Arc::get_mut(&mut globex.1).expect("one owner").kept = Some(kept);
    let join = "SELECT a.region, COUNT(DISTINCT a.website) FROM acme.accounts a \
                JOIN globex.accounts b ON a.website = b.website GROUP BY a.region";
    let ahead = run(join, &acme, &globex).await;
    let fresh = run(join, &list(0..200, &hasher), &list(100..400, &hasher)).await;
    assert_eq!(ahead.batches, fresh.batches);
    assert_eq!(ahead.suppressed, vec![false, false]);
    // globex's list was not read: its companies were found kept.
    assert_eq!(globex.1.reads.lock().expect("reads").len(), 0);
    assert_eq!(acme.1.reads.lock().expect("reads").len(), 1);

    // As bytes and back (what the service seals beside the version, and a restarted server
    // reads): the same answer, globex's list still not read.
    let sealed = escrow_query::exec::encode_keys(companies.as_ref()).expect("keys alone");
    let (back, held) = escrow_query::exec::decode_keys(&sealed).expect("read back");
    assert!(held > 0);
    let mut globex = list(100..400, &hasher);
    let kept = Kept::default();
    kept.lock().expect("kept").insert(name, (back, held));
    Arc::get_mut(&mut globex.1).expect("one owner").kept = Some(kept);
    let read_back = run(join, &list(0..200, &hasher), &globex).await;
    assert_eq!(read_back.batches, fresh.batches);
    assert_eq!(globex.1.reads.lock().expect("reads").len(), 0);
    // Cut short or altered in its counts, the bytes are an error, not companies.
    for cut in (0..sealed.len()).step_by(13) {
        assert!(
            escrow_query::exec::decode_keys(&sealed[..cut]).is_err(),
            "{cut}"
        );
    }
    let mut other = sealed.clone();
    other[8] ^= 1;
    assert!(escrow_query::exec::decode_keys(&other).is_err());
}
