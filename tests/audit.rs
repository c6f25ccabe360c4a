//! The audit log: every action of a scripted session once, in order; what each partner's
//! compliance officers see; exports and the stored log verify, and edits, deletions,
//! reordering, truncation and forgery are named; an unwritable log refuses work; kill -9
//! during appends leaves a chain that verifies.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::harness::{BIN, Env, Server, accounts_csv, two_nodes, words};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not json ({e}): {out}"))
}

fn kinds(records: &[serde_json::Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["kind"].as_str().expect("kind"),
                r["outcome"].as_str().expect("o")
            )
        })
        .collect()
}

/// A session touching every kind of action: returns analyst ana's bundle.
fn session(env: &Env, server: &Server) -> std::path::PathBuf {
    let ana = env.add_user("acme", "ana", "analyst");
    env.customers_shared(server);
    env.cli(
        server,
        "globex",
        &["policy", "set", "accounts", "--epsilon", "4"],
    )
    .ok();
    env.cli_as(
        server,
        &ana,
        &[
            "query",
            "SELECT region, COUNT(DISTINCT website) AS n FROM acme.accounts GROUP BY region",
        ],
    )
    .ok();
    env.cli_as(
        server,
        &ana,
        &[
            "query",
            "SELECT COUNT(DISTINCT website) AS n FROM globex.accounts",
        ],
    )
    .fails_with("QUERY_REFUSED");
    env.cli_as(
        server,
        &ana,
        &["overlap", "--with", "globex", "--format", "json"],
    )
    .ok();
    env.cli_as(
        server,
        &ana,
        &words("policy grant accounts --to globex --usage join"),
    )
    .fails_with("forbidden");
    let bad = env.file("bad.csv", b"domain,status\nacme.example,customer\n");
    env.upload(server, "acme", &bad, "broken", &["--key-column", "website"])
        .fails_with("");
    env.cli(server, "acme", &["datasets", "delete", "accounts"])
        .ok();
    ana
}

#[test]
fn every_action_appears_once_in_order_and_partners_see_what_touched_them() {
    let env = Env::new();
    let mut server = env.serve(&[]);
    session(&env, &server);
    let records = env.audit_records();
    // Each node records its startup; the records after them shift by the extra nodes.
    let n = usize::from(two_nodes());
    let mut expected = vec![
        "partner_add ok",
        "user_add ok",
        "partner_add ok",
        "user_add ok",
        "startup ok",
    ];
    expected.extend(std::iter::repeat_n("startup ok", n));
    assert_eq!(
        kinds(&records),
        [
            expected,
            vec![
                "user_add ok",
                "upload ok",
                "upload ok",
                "population_add ok",
                "population_add ok",
                "grant ok",
                "settings ok",
                "query ok",
                "query refused",
                "overlap ok",
                "access refused",
                "upload refused",
                "delete ok",
            ],
        ]
        .concat()
    );
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
    }
    let query = &records[12 + n];
    assert_eq!(query["actor"]["user"], "ana");
    assert_eq!(query["actor"]["role"], "analyst");
    assert_eq!(query["detail"]["datasets"][0], "acme.accounts@v1");
    assert_eq!(query["detail"]["rows"], 3);
    assert_eq!(
        query["detail"]["fingerprint"].as_str().expect("fp").len(),
        64
    );
    let refused = &records[13 + n];
    assert!(refused["code"].as_str().is_some(), "{refused}");
    assert_eq!(refused["parties"], serde_json::json!(["acme", "globex"]));
    let overlap = &records[14 + n];
    assert_eq!(overlap["detail"]["epsilon_spent"], 0.125, "{overlap}");
    assert_eq!(
        overlap["detail"]["datasets"].as_array().expect("a").len(),
        2
    );
    let settings = &records[11 + n];
    assert_eq!(settings["detail"]["before"]["epsilon"], 0.125);
    assert_eq!(settings["detail"]["after"]["epsilon"], 4.0);
    assert_eq!(
        records[16 + n]["code"],
        "unknown_key_column",
        "{}",
        records[16 + n]
    );
    assert_eq!(records[17 + n]["detail"]["versions_destroyed"], 1);

    // globex's compliance officer sees globex's own events and acme's questions about
    // globex's data, nothing of acme's own business.
    let gina = env.add_user("globex", "gina", "compliance");
    let out = env
        .cli_as(&server, &gina, &["audit", "list", "--format", "json"])
        .ok();
    let seen = json(&out.stdout).as_array().expect("a").clone();
    assert_eq!(
        kinds(&seen),
        [
            "partner_add ok",
            "user_add ok",
            "upload ok",
            "population_add ok",
            "grant ok",
            "settings ok",
            "query refused",
            "overlap ok",
            "user_add ok",
            "audit_read ok",
        ]
    );
    let read = seen.last().expect("own read");
    assert_eq!(read["actor"]["user"], "gina", "{read}");
    assert_eq!(read["detail"]["view"], "list", "{read}");
    assert!(
        !out.stdout.contains("GROUP BY region"),
        "acme's own query leaked"
    );
    // --since filters by time.
    let later = env
        .cli_as(
            &server,
            &gina,
            &words("audit list --format json --since 2999-01-01T00:00:00Z"),
        )
        .ok();
    assert_eq!(json(&later.stdout), serde_json::json!([]));
    env.cli_as(&server, &gina, &["audit", "list", "--since", "yesterday"])
        .fails_with("invalid_request");
    let table = env.cli_as(&server, &gina, &["audit", "list"]).ok();
    assert!(table.stdout.contains("overlap"), "{}", table.stdout);

    // A redacted export of globex's view still verifies whole; acme's business is hidden.
    let export = env.tmp.path().join("globex.jsonl");
    env.cli_as(
        &server,
        &gina,
        &["audit", "export", "--output", export.to_str().expect("p")],
    )
    .ok();
    let text = std::fs::read_to_string(&export).expect("export");
    assert!(text.contains("\"redacted\":true"));
    assert!(!text.contains("GROUP BY region"));
    let v = env
        .op(&["audit", "verify", "--file", export.to_str().expect("p")])
        .ok();
    assert!(v.stdout.contains("intact"), "{}", v.stdout);
    assert!(
        text.contains("\"audit_read\""),
        "the export holds its own read"
    );
    // Every read of the log is itself audited (the refused --since one read nothing).
    let reads: Vec<_> = env
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "audit_read")
        .map(|r| (r["detail"]["view"].clone(), r["detail"]["since"].clone()))
        .collect();
    let since = serde_json::json!("2999-01-01T00:00:00Z");
    let (list, export, none) = (json("\"list\""), json("\"export\""), json("null"));
    assert_eq!(
        reads,
        [
            (list.clone(), none.clone()),
            (list.clone(), since),
            (list, none.clone()),
            (export, none)
        ]
    );
    server.terminate();
}

/// Recompute a record line's digest and hash after its content changed (what a forger
/// without the signing key can do).
fn rechain(line: &str, prev: &str) -> (String, String) {
    let mut v = json(line);
    let raw = serde_json::to_string(&v["record"]).expect("raw");
    let mut h = Sha256::new();
    h.update(b"escrow/audit/record/v1\0");
    h.update(raw.as_bytes());
    let digest: [u8; 32] = h.finalize().into();
    let seq = v["seq"].as_u64().expect("seq");
    let mut h = Sha256::new();
    h.update(b"escrow/audit/chain/v1\0");
    h.update(seq.to_be_bytes());
    h.update(hex::decode(prev).expect("hex"));
    h.update(digest);
    let hash = hex::encode(h.finalize());
    v["prev"] = prev.into();
    v["digest"] = hex::encode(digest).into();
    v["hash"] = hash.clone().into();
    (serde_json::to_string(&v).expect("line"), hash)
}

fn verify_file(env: &Env, lines: &[String], extra: &[&str]) -> crate::harness::Run {
    let f = env.file("tampered.jsonl", lines.concat().as_bytes());
    let mut args = vec!["audit", "verify", "--file", f.to_str().expect("p")];
    args.extend_from_slice(extra);
    env.op(&args)
}

#[test]
fn exports_and_the_stored_log_detect_edits_deletions_reordering_truncation_and_forgery() {
    let env = Env::new();
    let mut server = env.serve(&[]);
    session(&env, &server);
    let kept = env
        .cli(&server, "globex", &["audit", "checkpoint"])
        .ok()
        .stdout;
    let kept_json = json(&kept);
    let key = kept_json["public_key"].as_str().expect("key").to_string();
    let kept_file = env.file("kept.json", kept.as_bytes());
    let kept_arg = kept_file.to_str().expect("p").to_string();
    let export = env.tmp.path().join("all.jsonl");
    let d = env.data.to_str().expect("p").to_string();
    env.op(&[
        "audit",
        "export",
        "--data-dir",
        &d,
        "--output",
        export.to_str().expect("p"),
    ])
    .ok();
    let text = std::fs::read_to_string(&export).expect("export");
    let lines: Vec<String> = text.split_inclusive('\n').map(String::from).collect();
    let pinned = [
        "--public-key",
        key.as_str(),
        "--checkpoint",
        kept_arg.as_str(),
    ];
    let ok = verify_file(&env, &lines, &pinned).ok();
    let records = 18 + usize::from(two_nodes());
    assert!(
        ok.stdout.contains(&format!("intact: {records} records")),
        "{}",
        ok.stdout
    );

    // Edit one record's content.
    let at = lines
        .iter()
        .position(|l| l.contains("\"kind\":\"grant\""))
        .expect("grant line");
    let mut edited = lines.clone();
    edited[at] = edited[at].replace("\"usage\":\"overlap\"", "\"usage\":\"join\"");
    assert_ne!(edited[at], lines[at]);
    verify_file(&env, &edited, &[]).fails_with(&format!("line {}", at + 1));
    // ... and recompute its digest and hash: the signature gives it away.
    let prev = json(&lines[at - 1])["hash"]
        .as_str()
        .expect("h")
        .to_string();
    let (forged, _) = rechain(&edited[at], &prev);
    edited[at] = forged + "\n";
    verify_file(&env, &edited, &pinned).fails_with("bad signature");
    // Delete a record.
    let mut deleted = lines.clone();
    deleted.remove(at);
    verify_file(&env, &deleted, &[]).fails_with("NOT intact");
    // Reorder two records.
    let mut reordered = lines.clone();
    reordered.swap(at, at + 1);
    verify_file(&env, &reordered, &[]).fails_with("NOT intact");
    // Truncate: caught by the checkpoint a partner kept.
    verify_file(&env, &lines[..at], &pinned).fails_with("truncated");
    // Truncate and forge a new tail chained correctly (no key to sign it).
    let mut forged = lines[..at].to_vec();
    let mut prev = prev;
    for l in &lines[at..at + 3] {
        let (line, hash) = rechain(&l.replace("globex", "initech"), &prev);
        forged.push(line + "\n");
        prev = hash;
    }
    verify_file(&env, &forged, &pinned).fails_with("bad signature");
    // Unpinned, the forged tail fails too: the checkpoints name the escrow's key.
    verify_file(&env, &forged, &[]).fails_with("NOT intact");

    // The stored log (the file; the catalog's rows on two nodes): stop the server, tamper,
    // verify names the line; restore, intact.
    server.terminate();
    let original = env.stored_audit_lines();
    let verify_dir = || env.op(&["audit", "verify", "--data-dir", &d]);
    verify_dir().ok();
    let mut tampered = original.clone();
    let edited = tampered
        .iter()
        .position(|l| l.contains("\"rows\":60"))
        .expect("the upload's record");
    tampered[edited] = tampered[edited].replacen("\"rows\":60", "\"rows\":61", 1);
    env.store_audit_lines(&tampered);
    // the first upload's record: the 7th, after one more startup with two nodes
    let upload = 7 + usize::from(two_nodes());
    verify_dir().fails_with(&format!(
        "(record {upload}): content does not match its digest"
    ));
    // Truncating the stored log is caught by the catalog's anchor.
    env.store_audit_lines(&original[..original.len() - 3]);
    verify_dir().fails_with("truncated");
    // ... and a server refuses to continue it (fail closed) rather than start over.
    let refused = env.op(&["serve", "--listen", "127.0.0.1:0"]);
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stdout.is_empty(),
        "it must not listen: {}",
        refused.stdout
    );
    assert!(refused.stderr.contains("truncated"), "{}", refused.stderr);
    env.store_audit_lines(&original);
    verify_dir().ok();
}

#[test]
fn an_unwritable_audit_log_refuses_work_and_answers_nothing() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(30, "u"))
        .ok();
    let sql = "SELECT COUNT(DISTINCT website) AS n FROM acme.accounts";
    env.cli(&server, "acme", &["query", sql]).ok();
    env.block_audit_log(true);
    let out = env
        .cli(&server, "acme", &["query", sql, "--format", "json"])
        .fails_with("audit_unavailable");
    assert!(out.stdout.is_empty(), "nothing answered: {}", out.stdout);
    env.upload_csv(&server, "acme", "second", &accounts_csv(5, "v"))
        .fails_with("audit_unavailable");
    env.cli(
        &server,
        "acme",
        &words("policy grant accounts --to globex --usage join"),
    )
    .fails_with("audit_unavailable");
    env.block_audit_log(false);
    // Nothing happened while the log was down: no dataset, no grant.
    assert_eq!(env.dataset_names(&server, "acme"), ["accounts"]);
    let p = env
        .cli(&server, "acme", &["policy", "list", "--format", "json"])
        .ok();
    assert_eq!(json(&p.stdout)["granted"], serde_json::json!([]));
    env.cli(&server, "acme", &["query", sql]).ok();
    let d = env.data.to_str().expect("p").to_string();
    env.op(&["audit", "verify", "--data-dir", &d]).ok();
}

#[test]
fn kill9_during_audit_appends_leaves_a_chain_that_verifies() {
    let env = Env::new();
    let d = env.data.to_str().expect("p").to_string();
    {
        let server = env.serve(&[]);
        env.upload_csv(&server, "acme", "accounts", &accounts_csv(30, "k"))
            .ok();
    }
    for round in 0..3 {
        let mut server = env.serve(&[]);
        let url = server.url.clone();
        let bundle = env.bundle("acme");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (url, bundle, stop) = (url.clone(), bundle.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = std::process::Command::new(BIN)
                            .args([
                                "query",
                                "SELECT COUNT(DISTINCT website) AS n FROM acme.accounts",
                            ])
                            .env("ESCROW_IDENTITY", &bundle)
                            .env("ESCROW_SERVER", &url)
                            .stdout(std::process::Stdio::null())
                            .stderr(std::process::Stdio::null())
                            .status();
                    }
                })
            })
            .collect();
        let log = env.data.join("audit/log.jsonl");
        let start = std::fs::metadata(&log).expect("log").len();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Kill once queries are being appended, at a different moment each round.
        while std::fs::metadata(&log).expect("log").len() < start + 4000 * (round + 1) {
            assert!(Instant::now() < deadline, "no appends");
            std::thread::sleep(Duration::from_millis(3));
        }
        server.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for w in workers {
            let _ = w.join();
        }
        env.op(&["audit", "verify", "--data-dir", &d]).ok();
    }
    // A restarted server continues the chain (cutting off a torn line if there is one).
    let server = env.serve(&[]);
    env.cli(
        &server,
        "acme",
        &[
            "query",
            "SELECT COUNT(DISTINCT website) AS n FROM acme.accounts",
        ],
    )
    .ok();
    let v = env.op(&["audit", "verify", "--data-dir", &d]).ok();
    assert!(v.stdout.contains("intact"), "{}", v.stdout);
    assert!(!v.stdout.contains("incomplete"), "{}", v.stdout);
}
