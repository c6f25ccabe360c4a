// Shared by the ingest targets: one upload through the real parser, checks and matching, into
// a sink. The first byte picks the key spec (none / website + name column / id), so the
// fuzzer reaches the company-key code too. Decoder panics are caught by `ingest` itself and
// become refusals, as in the server; any other panic aborts (libFuzzer reports it).

use escrow_store::ingest::{Format, IngestLimits, KeySpec, KeyType, ingest};

pub fn run(format: Format, data: &[u8]) {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let key = match pick % 3 {
        0 => KeySpec::default(),
        1 => KeySpec {
            column: Some("website".into()),
            name_column: Some("company_name".into()),
            name_context: vec!["region".into()],
            key_type: KeyType::Website,
            ..KeySpec::default()
        },
        _ => KeySpec {
            column: Some("account_id".into()),
            key_type: KeyType::Id,
            ..KeySpec::default()
        },
    };
    let limits = IngestLimits {
        max_ipc_body: 1 << 20,
        max_ipc_metadata: 64 << 10,
        batch_rows: 1024,
        csv_infer_bytes: 64 << 10,
        csv_infer_records: 1000,
        spool_dir: Some(std::env::temp_dir()),
        parquet_page_budget: 16 << 20,
        max_parquet_page: 4 << 20,
    };
    let _ = ingest(Some(format), body, &key, std::io::sink(), &limits);
}
