//! Storage faults: a full disk (a real small filesystem where the machine lets the tests
//! mount one, otherwise ENOSPC injected into the sealed-file writer) and an I/O error in the
//! middle of an upload. The upload fails cleanly with a stable code: no version, no file
//! left, the failure audited, nothing retried behind the client's back; queries keep
//! working and the server keeps serving.

use crate::harness::{Env, Server, accounts_csv};

const OWN: &str = "SELECT COUNT(DISTINCT website) AS n FROM acme.kept";

/// After a failed upload: only `kept` is listed and reads back whole, nothing is left in
/// `tmp/`, exactly one sealed file exists, the failure is audited, the chain verifies, and a
/// small upload still works.
fn failed_cleanly(env: &Env, server: &Server, what: &str) {
    let names = env.dataset_names(server, "acme");
    assert_eq!(names, vec!["kept"], "{what}: no partial dataset");
    let out = env
        .cli(server, "acme", &["query", OWN, "--format", "csv"])
        .ok();
    assert_eq!(out.stdout, "n\n100\n", "{what}: queries keep working");
    let tmp = env.temp_files();
    assert!(tmp.is_empty(), "{what}: {tmp:?}");
    assert_eq!(env.sealed_files().len(), 1, "{what}");
    let failed = env
        .audit_records()
        .iter()
        .filter(|r| r["kind"] == "upload" && r["outcome"] == "failed")
        .count();
    assert_eq!(failed, 1, "{what}: the failure is audited once");
    let d = env.data.to_str().expect("p").to_string();
    env.op(&["audit", "verify", "--data-dir", &d]).ok();
    env.upload_csv(server, "acme", "small", &accounts_csv(10, "small"))
        .ok();
}

#[test]
fn a_full_disk_fails_the_upload_cleanly_and_queries_keep_working() {
    // 24 MiB: room for the catalog, the audit log and a small dataset; not for the big one.
    let (env, injected) = match Env::on_small_disk(24 << 20) {
        Ok(env) => (env, false),
        Err(why) => {
            eprintln!("storage faults: no tmpfs here ({why}); injecting ENOSPC instead");
            (Env::new(), true)
        }
    };
    let fault = injected.then_some(("ESCROW_FAULT", "upload.write=enospc@3"));
    let server = env.serve_env(fault.as_slice(), &[]).expect("server starts");
    env.upload_csv(&server, "acme", "kept", &accounts_csv(100, "kept"))
        .ok();
    // ~40 MB of CSV: more than the disk holds once sealed
    let big = env.tmp.path().join("big.csv");
    std::fs::write(&big, accounts_csv(300_000, "big")).expect("write");
    let r = env
        .upload(&server, "acme", &big, "big", &["--key-column", "website"])
        .fails_with("storage_full");
    assert!(r.stderr.contains("nothing was stored"), "{r:?}");
    assert!(!r.stderr.contains("No space"), "no server detail: {r:?}");
    server.wait_log("storage full");
    failed_cleanly(&env, &server, "disk full");
    if !injected {
        // The space the failed upload took is back.
        let free = env.upload(&server, "acme", &big, "big", &["--key-column", "website"]);
        assert!(free.code != Some(0));
        failed_cleanly_again(&env);
    }
}

/// A second refusal leaves the same clean state (no leak of space across failures).
fn failed_cleanly_again(env: &Env) {
    let tmp = env.temp_files();
    assert!(tmp.is_empty(), "{tmp:?}");
    assert_eq!(env.sealed_files().len(), 2);
}

#[test]
fn an_io_error_mid_upload_fails_it_cleanly_and_the_server_keeps_serving() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(&server, "acme", "kept", &accounts_csv(100, "kept"))
        .ok();
    drop(server);
    let server = env
        .serve_env(&[("ESCROW_FAULT", "upload.write=eio@2")], &[])
        .expect("server starts");
    let big = env.file("big.csv", accounts_csv(60_000, "big").as_bytes());
    let r = env
        .upload(&server, "acme", &big, "big", &["--key-column", "website"])
        .fails_with("internal error");
    assert!(r.stderr.contains("incident"), "{r:?}");
    assert!(
        !r.stderr.contains("Input/output"),
        "no server detail: {r:?}"
    );
    server.wait_log("Input/output error");
    failed_cleanly(&env, &server, "EIO");
    // the fault fired once; the same upload now lands, whole
    env.upload(&server, "acme", &big, "big", &["--key-column", "website"])
        .ok();
}
