//! Uploads in every format through the real CLI and server, listing, versions, deletes,
//! partner isolation, and the canary check on the files at rest.

use std::sync::Arc;

use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};

use crate::harness::{Env, accounts_csv, shared_dir};

fn batch(n: usize, tag: &str) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("account_id", DataType::Utf8, false),
        Field::new("website", DataType::Utf8, true),
        Field::new("arr_usd", DataType::Float64, true),
        Field::new("employees", DataType::Int64, false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("{tag}-{i:06}")),
            )),
            Arc::new(StringArray::from_iter(
                (0..n).map(|i| (i % 10 != 0).then(|| format!("zyqx{tag}{i}.example"))),
            )),
            Arc::new(Float64Array::from_iter(
                (0..n).map(|i| Some(i as f64 * 1.5)),
            )),
            Arc::new(Int64Array::from_iter_values((0..n).map(|i| i as i64))),
        ],
    )
    .expect("batch")
}

/// A listed dataset's columns, as (name, type).
fn column_types(dataset: &serde_json::Value) -> Vec<(String, String)> {
    dataset["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("n").into(),
                c["type"].as_str().expect("t").into(),
            )
        })
        .collect()
}

pub fn arrow_file(batches: &[RecordBatch]) -> Vec<u8> {
    let mut w =
        arrow_ipc::writer::FileWriter::try_new(Vec::new(), &batches[0].schema()).expect("writer");
    for b in batches {
        w.write(b).expect("write");
    }
    w.finish().expect("finish");
    w.into_inner().expect("inner")
}

pub fn arrow_stream(batches: &[RecordBatch]) -> Vec<u8> {
    let mut w =
        arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &batches[0].schema()).expect("writer");
    for b in batches {
        w.write(b).expect("write");
    }
    w.finish().expect("finish");
    w.into_inner().expect("inner")
}

fn parquet_file(batches: &[RecordBatch]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(&mut out, batches[0].schema(), None).expect("writer");
    for b in batches {
        w.write(b).expect("write");
    }
    w.close().expect("close");
    out
}

/// Read the live version back through the verified read path (internal API, not the wire).
fn read_back(env: &Env, owner: &str, name: &str) -> Vec<RecordBatch> {
    let store = crate::harness::open_store(&env.data);
    store
        .read_live(owner, name)
        .expect("open")
        .collect_all()
        .expect("read")
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

#[test]
fn every_format_uploads_lists_and_reads_back() {
    let env = Env::new();
    let server = env.serve(&[]);
    let batches = vec![batch(5000, "a"), batch(3000, "b")];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("accounts.arrow", arrow_file(&batches)),
        ("accounts.arrows", arrow_stream(&batches)),
        ("accounts.parquet", parquet_file(&batches)),
    ];
    for (i, (file, bytes)) in cases.iter().enumerate() {
        let name = format!("set{i}");
        let path = env.file(file, bytes);
        let out = env
            .upload(&server, "acme", &path, &name, &["--key-column", "website"])
            .ok();
        assert!(
            out.stdout.contains(&format!(
                "dataset={name} version=1 rows=8000 bytes={}",
                bytes.len()
            )),
            "{file}: {}",
            out.stdout
        );
        let back = read_back(&env, "acme", &name);
        assert_eq!(rows(&back), 8000, "{file}");
        let all = arrow_select::concat::concat_batches(&back[0].schema(), &back).expect("concat");
        let orig =
            arrow_select::concat::concat_batches(&batches[0].schema(), &batches).expect("concat");
        // Sealed: the uploaded columns exactly, then the hidden company key of each row.
        let uploaded: Vec<usize> = (0..orig.num_columns()).collect();
        assert_eq!(
            all.project(&uploaded).expect("project"),
            orig,
            "{file} must round-trip exactly"
        );
        use arrow_array::Array;
        let company = all
            .column_by_name("__escrow_company")
            .expect("company key column");
        let company = company
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("text");
        let website = orig.column_by_name("website").expect("website");
        let website = arrow_cast::cast(website, &DataType::Utf8).expect("cast");
        let website = website
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("text");
        for i in [0, 1, 7999] {
            assert_eq!(
                company.is_valid(i).then(|| company.value(i).to_string()),
                escrow::matching::company_key(website.is_valid(i).then(|| website.value(i)), None),
                "{file} row {i}"
            );
        }
    }
    // CSV: types are inferred, the key column is kept.
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(1234, "acme"))
        .ok();
    let list = env.datasets(&server, "acme");
    let ds = list["datasets"].as_array().expect("array");
    assert_eq!(ds.len(), 4);
    let acc = ds
        .iter()
        .find(|d| d["name"] == "accounts")
        .expect("accounts listed");
    assert_eq!(acc["rows"], 1234);
    assert_eq!(acc["version"], 1);
    assert_eq!(acc["key_column"], "website");
    assert_eq!(acc["format"], "csv");
    let types = column_types(acc);
    assert!(
        types.contains(&("employees".into(), "Int64".into())),
        "{types:?}"
    );
    assert!(
        types.contains(&("arr_usd".into(), "Float64".into())),
        "{types:?}"
    );
    // metadata only: no value of the upload appears in the listing
    let text = serde_json::to_string(&list).expect("json");
    assert!(
        !text.contains("Zyqx") && !text.contains("acme-000"),
        "listing leaked data: {text}"
    );
    // table output too
    let table = env.cli(&server, "acme", &["datasets"]).ok();
    assert!(table.stdout.contains("accounts") && table.stdout.contains("website"));
}

#[test]
fn reupload_makes_a_new_live_version_and_delete_shreds() {
    let env = Env::new();
    let server = env.serve(&[]);
    let v1 = env.file("v1.csv", accounts_csv(10, "one").as_bytes());
    let v2 = env.file("v2.csv", accounts_csv(25, "two").as_bytes());
    for (f, want) in [(&v1, "version=1 rows=10"), (&v2, "version=2 rows=25")] {
        let out = env
            .upload(&server, "acme", f, "accounts", &["--key-column", "website"])
            .ok();
        assert!(out.stdout.contains(want), "{}", out.stdout);
    }
    let list = env.datasets(&server, "acme");
    assert_eq!(list["datasets"][0]["version"], 2);
    assert_eq!(list["datasets"][0]["rows"], 25);
    assert_eq!(rows(&read_back(&env, "acme", "accounts")), 25);
    assert_eq!(env.sealed_files().len(), 2);

    // Its owner sees every version with how its companies matched (website keys).
    let out = env
        .cli(
            &server,
            "acme",
            &["datasets", "versions", "accounts", "--format", "json"],
        )
        .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("versions json");
    let versions = v["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 2, "{v}");
    for (got, (number, n)) in versions.iter().zip([(1, 10), (2, 25)]) {
        assert_eq!(
            (got["version"].as_i64(), got["rows"].as_i64()),
            (Some(number), Some(n))
        );
        let m = &got["matching"];
        assert_eq!(
            m["by_domain"].as_i64(),
            Some(n),
            "every row has a website: {m}"
        );
        assert_eq!(
            (m["by_name"].as_i64(), m["unmatched"].as_i64()),
            (Some(0), Some(0))
        );
        assert_eq!(got["uploaded_by"], "admin");
    }
    let table = env
        .cli(&server, "acme", &["datasets", "versions", "accounts"])
        .ok();
    assert!(table.stdout.contains("BY DOMAIN"), "{}", table.stdout);
    // Another partner's versions answer exactly as a dataset that does not exist.
    let theirs = env
        .cli(&server, "globex", &["datasets", "versions", "accounts"])
        .fails_with("not_found");
    let none = env
        .cli(&server, "acme", &["datasets", "versions", "no_such"])
        .fails_with("not_found");
    assert_eq!(
        theirs.stderr.replace("accounts", "X"),
        none.stderr.replace("no_such", "X")
    );

    // another partner neither sees nor deletes it
    assert_eq!(
        env.datasets(&server, "globex")["datasets"]
            .as_array()
            .expect("a")
            .len(),
        0
    );
    env.cli(&server, "globex", &["datasets", "delete", "accounts"])
        .fails_with("not_found");
    assert_eq!(env.sealed_files().len(), 2);

    let out = env
        .cli(&server, "acme", &["datasets", "delete", "accounts"])
        .ok();
    assert!(out.stdout.contains("2 version(s)"), "{}", out.stdout);
    assert!(env.sealed_files().is_empty(), "files must be removed");
    assert_eq!(
        env.datasets(&server, "acme")["datasets"]
            .as_array()
            .expect("a")
            .len(),
        0
    );
    let store = crate::harness::open_store(&env.data);
    assert!(
        store.read_live("acme", "accounts").is_err(),
        "gone for every reader"
    );
    assert!(
        store
            .catalog()
            .version_keys("acme", "accounts")
            .expect("keys")
            .is_empty(),
        "keys destroyed"
    );
    env.cli(&server, "acme", &["datasets", "delete", "accounts"])
        .fails_with("not_found");
}

#[test]
fn same_name_in_two_partners_is_two_datasets() {
    let env = Env::new();
    let server = env.serve(&[]);
    let a = env.file("a.csv", accounts_csv(7, "a").as_bytes());
    let g = env.file("g.csv", accounts_csv(9, "g").as_bytes());
    env.upload(&server, "acme", &a, "accounts", &[]).ok();
    env.upload(&server, "globex", &g, "accounts", &[]).ok();
    assert_eq!(env.datasets(&server, "acme")["datasets"][0]["rows"], 7);
    assert_eq!(env.datasets(&server, "globex")["datasets"][0]["rows"], 9);
}

/// After uploads, no file under the data directory contains any company name, website or
/// account id of the uploaded lists (catalog, WAL, sealed files, temp files included).
#[test]
fn canary_nothing_readable_at_rest() {
    let env = Env::new();
    let server = env.serve(&[]);
    let mut canaries: Vec<String> = Vec::new();
    let csv = accounts_csv(500, "canary");
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        canaries.extend([f[0].to_string(), f[1].to_string(), f[2].to_string()]);
    }
    let path = env.file("canary.csv", csv.as_bytes());
    env.upload(
        &server,
        "acme",
        &path,
        "accounts",
        &["--key-column", "website"],
    )
    .ok();
    // And a realistic messy list from the shared generator, as an Arrow file.
    let gen_dir = env.tmp.path().join("gen");
    let generated = std::process::Command::new("python3")
        .arg(shared_dir().join("bench/gen_accounts.py"))
        .args([
            "--out",
            gen_dir.to_str().expect("p"),
            "--rows",
            "2000",
            "--seed",
            "11",
        ])
        .output()
        .expect("python3 runs");
    assert!(
        generated.status.success(),
        "gen_accounts.py failed (pip install pyarrow): {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let gen_csv = std::fs::read_to_string(gen_dir.join("acme.csv")).expect("generated csv");
    for line in gen_csv.lines().skip(1).take(300) {
        let f: Vec<&str> = line.splitn(2, ',').collect();
        canaries.push(f[0].trim_matches('"').to_string());
    }
    let arrow = gen_dir.join("acme.arrow");
    env.upload(&server, "acme", &arrow, "crm", &["--key-column", "website"])
        .ok();
    drop(server);
    let files = env.data_files();
    assert!(files.len() >= 5);
    for f in files {
        if f.starts_with(env.data.join("identities"))
            || f.starts_with(env.data.join("ca"))
            || f.starts_with(env.data.join("tls"))
        {
            continue;
        }
        let bytes = std::fs::read(&f).expect("read");
        for c in &canaries {
            assert!(
                memchr::memmem::find(&bytes, c.as_bytes()).is_none(),
                "{} contains {c:?}",
                f.display()
            );
        }
    }
}

#[test]
fn a_declared_csv_schema_overrides_inference_and_names_a_misfit_by_row_and_column() {
    let env = Env::new();
    let server = env.serve(&[]);
    // A CRM export: whole numbers of employees for the first 10,050 rows (past the rows
    // types are inferred from), then one with a decimal.
    let csv = |last: &str| {
        let mut s = String::from("website,employees,since\n");
        for i in 0..10_050 {
            s.push_str(&format!(
                "acme{i}.example,{},2020-01-{:02}\n",
                i % 500,
                i % 28 + 1
            ));
        }
        s.push_str(&format!("last.example,{last},2021-02-03\n"));
        s
    };
    let file = env.file("export.csv", csv("12.5").as_bytes());
    let upload = |extra: &[&str]| {
        let mut args = vec!["--key-column", "website"];
        args.extend_from_slice(extra);
        env.upload(&server, "acme", &file, "accounts", &args)
    };
    upload(&[]).fails_with("--schema COLUMN=TYPE");
    upload(&["--schema", "employees=float", "--schema", "since=date"]).ok();
    let types = column_types(&env.datasets(&server, "acme")["datasets"][0]);
    assert!(
        types.contains(&("employees".into(), "Float64".into())),
        "{types:?}"
    );
    assert!(
        types.contains(&("since".into(), "Date32".into())),
        "{types:?}"
    );

    // A value that does not fit the declared type: refused with its row and column, not
    // its value, and nothing is stored.
    let out =
        upload(&["--schema", "employees=integer"]).fails_with("data row 10051, column employees");
    assert!(!out.stderr.contains("12.5"), "{}", out.stderr);
    assert_eq!(env.datasets(&server, "acme")["datasets"][0]["version"], 1);
    // Declarations that cannot apply: a column the file lacks, a type escrow does not
    // know, a format that carries its own types.
    upload(&["--schema", "revenue=float"]).fails_with("not a column of the file's header");
    upload(&["--schema", "employees=money"]).fails_with("the type is one of string, integer");
    upload(&["--schema", "employees"]).fails_with("not COLUMN=TYPE");
    let batch = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(
            "website",
            DataType::Utf8,
            false,
        )])),
        vec![Arc::new(StringArray::from(vec!["a.example"]))],
    )
    .expect("batch");
    let arrow = env.file("export.arrow", &arrow_file(&[batch]));
    env.upload(
        &server,
        "acme",
        &arrow,
        "other",
        &["--schema", "website=string"],
    )
    .fails_with("--schema is for CSV uploads");
}
