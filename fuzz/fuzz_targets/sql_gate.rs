#![no_main]
// The SQL gate: any text is parsed and planned by DataFusion over the declared schemas of four
// tables (two partners, one without a key column), then checked by the gate and the
// foreign-join rule, then planned again for execution, as the service does. Refusals are the
// expected outcome; a panic, a hang or an allowed plan whose execution plan does not pass
// the gate with the same report is a finding.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema};
use escrow_query::session::{Limits, QueryTable, plan_in, planning_session};
use escrow_query::{gate, plan_for_execution};

fn table(owner: &str, dataset: &str, key: Option<&str>) -> QueryTable {
    let schema = Arc::new(Schema::new(vec![
        Field::new("account_id", DataType::Utf8, false),
        Field::new("website", DataType::Utf8, true),
        Field::new("region", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, true),
        Field::new("arr_usd", DataType::Float64, true),
        Field::new("employees", DataType::Int64, true),
    ]));
    QueryTable::declared(owner, dataset, key, schema).expect("key column")
}

struct World {
    rt: tokio::runtime::Runtime,
    tables: Vec<QueryTable>,
    /// One planning session over `tables` (what `plan_sql` builds for every question: the
    /// same tables and functions, built once here so the fuzzer spends its time on SQL).
    planning: datafusion::execution::SessionState,
}

fn world() -> &'static World {
    static WORLD: std::sync::OnceLock<World> = std::sync::OnceLock::new();
    WORLD.get_or_init(|| {
        let tables = vec![
            table("acme", "accounts", Some("website")),
            table("globex", "accounts", Some("website")),
            table("globex", "pipeline", Some("website")),
            table("initech", "nokey", None),
        ];
        let planning = planning_session(&tables, &Limits::default()).expect("session");
        World {
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            tables,
            planning,
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let w = world();
    w.rt.block_on(async {
        let Ok(plan) = plan_in(&w.planning, sql).await else {
            return;
        };
        let Ok(report) = gate::check(&plan, &gate::keys_of(&w.tables)) else {
            return;
        };
        if gate::check_foreign_joined(&report, "acme", &|_| false).is_err() {
            return;
        }
        // An allowed question must plan for execution with exactly the same report.
        if let Err(e) = plan_for_execution(sql, &w.tables, &Limits::default(), &report).await {
            if !matches!(e, escrow_query::QueryError::Refused { .. }) {
                panic!("allowed query failed to plan for execution: {e}");
            }
        }
    });
});
