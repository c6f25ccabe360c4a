//! Bad input: each gets a clear error with a stable code, nothing is stored, and the server
//! keeps serving.

use std::sync::Arc;

use crate::harness::{Env, Server, accounts_csv, shared_dir};

/// Upload `bytes` as `file_name`; expect failure with `code`; then check nothing was stored
/// and the server still answers.
fn refused(env: &Env, server: &Server, file_name: &str, bytes: &[u8], extra: &[&str], code: &str) {
    let path = env.file(file_name, bytes);
    env.upload(server, "acme", &path, "bad", extra)
        .fails_with(code);
    nothing_stored(env, server);
}

fn nothing_stored(env: &Env, server: &Server) {
    let list = env.datasets(server, "acme");
    assert!(
        list["datasets"]
            .as_array()
            .expect("a")
            .iter()
            .all(|d| d["name"] != "bad"),
        "a refused upload was listed: {list}"
    );
    assert!(
        env.sealed_files()
            .iter()
            .all(|f| !f.starts_with(env.data.join("tmp")))
    );
    let tmp = env.temp_files();
    assert!(tmp.is_empty(), "partial upload left behind: {tmp:?}");
}

#[test]
fn malformed_uploads_are_refused_with_stable_codes() {
    let env = Env::new();
    let server = env.serve(&["--max-upload-bytes", "200000"]);
    refused(&env, &server, "empty.csv", b"", &[], "empty_file");
    refused(
        &env,
        &server,
        "blob.bin",
        &[0u8, 159, 146, 150, 1, 2, 3, 0, 255],
        &[],
        "unknown_format",
    );
    refused(&env, &server, "header_only.csv", b"a,b,c\n", &[], "no_rows");
    refused(
        &env,
        &server,
        "ragged.csv",
        b"a,b,c\n1,2,3\n4,5\n",
        &[],
        "malformed_csv",
    );
    let mut bad_utf8 = b"name,website\nacme,acme.com\n".to_vec();
    bad_utf8.extend_from_slice(&[0xc3, 0x28, b',', b'x', b'\n']);
    refused(
        &env,
        &server,
        "latin1.csv",
        &bad_utf8,
        &["--input-format", "csv"],
        "malformed_csv",
    );
    refused(
        &env,
        &server,
        "dup.csv",
        b"a,b,a\n1,2,3\n",
        &[],
        "duplicate_column",
    );
    let good = accounts_csv(20, "k");
    refused(
        &env,
        &server,
        "nokey.csv",
        good.as_bytes(),
        &["--key-column", "domain"],
        "unknown_key_column",
    );
    refused(
        &env,
        &server,
        "floatkey.csv",
        good.as_bytes(),
        &["--key-column", "arr_usd"],
        "unsupported_key_type",
    );
    refused(
        &env,
        &server,
        "bad_name.csv",
        good.as_bytes(),
        &["--input-format", "xlsx"],
        "unknown_format",
    );

    let batch = {
        use arrow_array::{Int64Array, RecordBatch};
        use arrow_schema::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(0..5000))],
        )
        .expect("batch")
    };
    let file = crate::upload::arrow_file(&[batch.clone(), batch.clone()]);
    for cut in [7, 100, file.len() / 2, file.len() - 3] {
        refused(
            &env,
            &server,
            "cut.arrow",
            &file[..cut],
            &[],
            "malformed_arrow",
        );
    }
    let stream = crate::upload::arrow_stream(&[batch]);
    refused(
        &env,
        &server,
        "cut.arrows",
        &stream[..stream.len() / 2],
        &[],
        "malformed_arrow",
    );
    // CSV declared as Arrow, Arrow declared as CSV
    refused(
        &env,
        &server,
        "x.arrow",
        good.as_bytes(),
        &[],
        "malformed_arrow",
    );
    refused(&env, &server, "x.csv", &file, &[], "malformed_csv");

    // over the size limit (200 kB here): refused up front from Content-Length
    let big = accounts_csv(5000, "big");
    assert!(big.len() > 200_000);
    refused(&env, &server, "big.csv", big.as_bytes(), &[], "too_large");

    // names
    let ok = env.file("ok.csv", good.as_bytes());
    env.upload(&server, "acme", &ok, "Bad-Name", &[])
        .fails_with("invalid_name");
    env.cli(
        &server,
        "acme",
        &["upload", "/nonexistent/file.csv", "--dataset", "x"],
    )
    .fails_with("cannot open");
    // and a good upload still works after all that
    env.upload(&server, "acme", &ok, "good", &[]).ok();
}

/// The client stops sending in the middle of the body (raw HTTP/1.1 over real TLS, so
/// the cut is exactly where the test puts it): nothing is stored, the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_upload() {
    use tokio::io::AsyncWriteExt;
    let env = Env::new();
    let server = env.serve(&[]);
    let mut config = escrow::server::tls::client_config(&env.bundle("acme")).expect("client tls");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let csv = accounts_csv(50_000, "dc");
    let head = format!(
        "PUT /v1/datasets/bad?format=csv HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n",
        csv.len()
    );
    tls.write_all(head.as_bytes()).await.expect("head");
    tls.write_all(&csv.as_bytes()[..csv.len() / 2])
        .await
        .expect("half the body");
    tls.flush().await.expect("flush");
    // let the server start sealing, then vanish
    tokio::task::block_in_place(|| server.wait_log("upload started"));
    drop(tls);
    tokio::task::block_in_place(|| server.wait_log("code=upload_interrupted"));
    let (env_ref, server_ref) = (&env, &server);
    tokio::task::block_in_place(|| nothing_stored(env_ref, server_ref));
}

/// An upload refused before its body is read (a bad name, a bad parameter, a caller who
/// may not upload) still reads what the client sends, within bounds: the client gets the
/// refusal, not a connection reset halfway through sending.
#[test]
fn an_upload_refused_before_its_body_is_read_answers_the_whole_body() {
    let env = Env::new();
    let server = env.serve(&[]);
    let body = vec![b'x'; 24 << 20];
    for (path, code) in [
        ("/v1/datasets/Bad-Name", "invalid_name"),
        ("/v1/datasets/fine?key_type=nonsense", "invalid_key_type"),
    ] {
        let url = format!("{}{path}", server.url);
        let (status, _, text) =
            crate::harness::raw(&env.bundle("acme"), |c| c.put(url).body(body.clone()));
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(code), "{text}");
    }
    nothing_stored(&env, &server);
}

/// Apache Arrow's fuzz corpus of malformed IPC files and streams: each is refused cleanly
/// (or, for the few valid ones, uploaded), never a crash or an internal error.
#[test]
fn arrow_fuzz_corpus_is_refused_cleanly() {
    let env = Env::new();
    let server = env.serve(&[]);
    let corpus = shared_dir().join("vectors/arrow-ipc-malformed");
    let mut seen = 0;
    for (sub, format) in [("file", "arrow"), ("stream", "arrow-stream")] {
        let mut entries: Vec<_> = std::fs::read_dir(corpus.join(sub))
            .unwrap_or_else(|e| panic!("corpus at {}: {e}", corpus.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n != "README.md"))
            .collect();
        entries.sort();
        for path in entries {
            seen += 1;
            let r = env
                .upload(&server, "acme", &path, "fuzz", &["--input-format", format])
                .ok_or_clean_refusal(&path.display().to_string(), &server);
            if r.code != Some(0) {
                assert!(
                    r.stderr.contains("refused ("),
                    "{path:?}: not a clean refusal: {}",
                    r.stderr
                );
            }
        }
    }
    assert!(seen > 100, "corpus too small: {seen}");
    env.cli(&server, "acme", &["whoami"]).ok();
    assert!(env.temp_files().is_empty());
}

/// Every input in tests/corpus/fuzz/ (crashes fuzz runs found, and seeds) through the real
/// server: each is a clean refusal or a success, never a crash or an internal error.
#[test]
fn fuzz_regressions_are_refused_cleanly() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(20, "a"))
        .ok();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/fuzz");
    let mut seen = 0;
    for target in ["ingest_csv", "ingest_arrow", "ingest_parquet", "sql_gate"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(target))
            .expect("corpus dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for path in files {
            seen += 1;
            let data = std::fs::read(&path).expect("read");
            let started = std::time::Instant::now();
            let r = if target == "sql_gate" {
                let sql = String::from_utf8_lossy(&data).into_owned();
                env.cli(&server, "acme", &["query", &sql])
            } else {
                let (format, skip) = match target {
                    "ingest_csv" => ("csv", 1),
                    "ingest_parquet" => ("parquet", 1),
                    _ if data.get(1).is_some_and(|b| b & 1 == 1) => ("arrow-stream", 2),
                    _ => ("arrow", 2),
                };
                let key: &[&str] = match data.first().map(|b| b % 3) {
                    Some(1) => &[
                        "--key-column",
                        "website",
                        "--name-column",
                        "company_name",
                        "--name-context",
                        "region",
                    ],
                    Some(2) => &["--key-column", "account_id", "--key-type", "id"],
                    _ => &[],
                };
                let body = env.file("fuzz-input", data.get(skip..).unwrap_or_default());
                let mut args = vec!["--input-format", format];
                args.extend_from_slice(key);
                env.upload(&server, "acme", &body, "fuzzed", &args)
            };
            r.ok_or_clean_refusal(&path.display().to_string(), &server);
            // bounded time too: each of these is a few KB (one spun for 52 s before its fix)
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{}: {:?}",
                path.display(),
                started.elapsed()
            );
        }
    }
    assert!(seen >= 5, "corpus: {seen}");
    env.cli(&server, "acme", &["whoami"]).ok();
}

/// Hostile questions: a 10^5-element IN list, deeply nested expressions, a 1.5 MB literal,
/// a body over the request limit. Each is answered or refused cleanly, quickly, and the
/// server keeps serving.
#[test]
fn hostile_questions_are_refused_or_answered_with_bounded_time() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(50, "h"))
        .ok();
    let in_list: Vec<String> = (0..100_000).map(|i| format!("'r{i}'")).collect();
    let cases = [
        (
            "IN list of 100,000",
            format!(
                "SELECT COUNT(DISTINCT website) AS n FROM acme.accounts WHERE region IN ({})",
                in_list.join(",")
            ),
        ),
        (
            "nested parentheses",
            format!(
                "SELECT COUNT(DISTINCT website) AS n FROM acme.accounts WHERE region = {}'NA'{}",
                "(".repeat(5000),
                ")".repeat(5000)
            ),
        ),
        (
            "nested AND chain",
            format!(
                "SELECT COUNT(DISTINCT website) AS n FROM acme.accounts WHERE {}",
                vec!["region = 'NA'"; 20_000].join(" AND ")
            ),
        ),
        (
            "1.5 MB literal",
            format!(
                "SELECT COUNT(DISTINCT website) AS n FROM acme.accounts WHERE region = '{}'",
                "x".repeat(1_500_000)
            ),
        ),
        (
            "10 MB body",
            format!(
                "SELECT COUNT(DISTINCT website) AS n FROM acme.accounts WHERE region = '{}'",
                "x".repeat(10 << 20)
            ),
        ),
    ];
    for (what, sql) in cases {
        let f = env.file("q.sql", sql.as_bytes());
        let started = std::time::Instant::now();
        let r = env.cli(
            &server,
            "acme",
            &["query", "--file", f.to_str().expect("p")],
        );
        let took = started.elapsed();
        let r = r.ok_or_clean_refusal(what, &server);
        assert!(
            took < std::time::Duration::from_secs(60),
            "{what}: {took:?}"
        );
        if what == "10 MB body" {
            assert!(
                r.stderr.contains("too_large"),
                "a JSON error code: {}",
                r.stderr
            );
        }
        eprintln!("{what}: {:?} in {took:?}: {}", r.code, r.stderr.trim());
    }
    env.cli(&server, "acme", &["whoami"]).ok();
}
