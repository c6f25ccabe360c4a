#![allow(clippy::expect_used)]
//! Engine-level overlap benchmark: the overlap query over two in-memory datasets,
//! (a) without protection (as over one's own data) and (b) through the protection rewrite, both
//! planned, gated and executed as the service does (key columns as entity ids).
//! No TLS, no decryption: this isolates what the engine adds. bench/query.sh measures the
//! whole service path against DuckDB.
//!
//! Usage: cargo bench -p escrow-query --bench overlap -- DIR   (DIR holds acme.arrow and
//! globex.arrow from ../shared/bench/gen_accounts.py)

use std::sync::Arc;
use std::time::Instant;

use arrow_schema::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use escrow_query::source::{entity_schema, with_entity_ids};
use escrow_query::{
    BatchIter, BatchSource, Holder, Limits, Noise, NoiseKey, Protection, QueryTable, SharedMemory,
    execute, gate, plan_for_execution, plan_sql,
};

#[derive(Debug)]
struct Memory(SchemaRef, Vec<RecordBatch>);

impl BatchSource for Memory {
    fn schema(&self) -> SchemaRef {
        self.0.clone()
    }
    fn open(&self, columns: &[usize]) -> Result<BatchIter, String> {
        let columns = columns.to_vec();
        Ok(Box::new(self.1.clone().into_iter().map(move |b| {
            b.project(&columns).map_err(|e| e.to_string())
        })))
    }
}

/// A list as the service keeps it in its cache: declared schema, and batches with the key
/// column as entity ids.
fn load(path: &std::path::Path, key: &NoiseKey) -> (SchemaRef, Arc<Memory>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = arrow_ipc::reader::FileReader::try_new(file, None).expect("arrow file");
    let schema = reader.schema();
    let hasher = key.entity_hasher();
    let batches: Vec<RecordBatch> = reader
        .map(|b| with_entity_ids(&b.expect("batch"), KEY, &hasher).expect("entity ids"))
        .collect();
    let executes = entity_schema(&schema, KEY).expect("key column");
    (schema, Arc::new(Memory(executes, batches)))
}

fn tables(lists: &[(SchemaRef, Arc<Memory>); 2]) -> Vec<QueryTable> {
    ["acme", "globex"]
        .into_iter()
        .zip(lists)
        .map(|(owner, (schema, m))| QueryTable {
            owner: owner.into(),
            dataset: "accounts".into(),
            key_column: Some(KEY.into()),
            schema: schema.clone(),
            provider: escrow_query::source::table(m.clone()).expect("provider"),
        })
        .collect()
}

const KEY: &str = "website";

const SQL: &str = "SELECT a.industry, COUNT(DISTINCT a.website) FROM acme.accounts a \
                   JOIN globex.accounts b ON a.website = b.website GROUP BY a.industry";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "bench/out/gen-1000000".into());
    let dir = std::path::Path::new(&dir);
    if !dir.join("acme.arrow").exists() {
        eprintln!(
            "overlap bench: no {}/acme.arrow; run bench/query.sh first",
            dir.display()
        );
        return;
    }
    let key = NoiseKey::new([7; 32]);
    let lists = [
        load(&dir.join("acme.arrow"), &key),
        load(&dir.join("globex.arrow"), &key),
    ];
    let limits = Limits {
        memory_bytes: 4 << 30,
        target_partitions: 2,
    };
    let runs = 7;
    for protected in [false, true] {
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = tables(&lists);
            let t0 = Instant::now();
            let gated = plan_sql(SQL, &t).await.expect("plan");
            let report = gate::check(&gated, &gate::keys_of(&t)).expect("gate");
            let (plan, state) = plan_for_execution(SQL, &t, &limits, &report)
                .await
                .expect("execution plan");
            let p = Protection {
                min_entities: 5,
                epsilon: escrow_query::Epsilon::at_most(1.0),
                max_groups_per_entity: 1,
                delta: 1e-6,
                entity_table: 1,
                bounds: vec![None],
                // The caller is the first table's owner; the privacy unit's table is not
                // its own.
                tables: (0..report.tables.len())
                    .map(|t| match t {
                        1 => Holder::Partner {
                            stored_rows: lists[1].1.1.iter().map(|b| b.num_rows() as u64).sum(),
                        },
                        _ => Holder::Caller,
                    })
                    .collect(),
                shared: SharedMemory::new(8 << 30).share("acme"),
                noise: Noise::new(key.clone(), [1; 32]),
            };
            let answer = execute(
                &state,
                plan,
                &report,
                protected.then_some(&p),
                &Default::default(),
            )
            .await
            .expect("execute");
            times.push(t0.elapsed().as_secs_f64());
            assert!(!answer.batches.is_empty());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{:<32} median of {runs}: {:.3} s (min {:.3})",
            if protected {
                "protected (another partner's list)"
            } else {
                "unprotected (own data)"
            },
            times[runs / 2],
            times[0]
        );
    }
}
