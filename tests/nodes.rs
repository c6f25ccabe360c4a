//! Two escrow nodes on one PostgreSQL catalog (a database of the test's own), one S3 object
//! store (a bucket of the test's own on a real S3 server) and one data directory (keys and
//! certificates; tests/two-nodes.sh gives each node a copy of its own): any node answers any
//! request, a change made on one applies on the other at the next request, a budget is spent
//! once under questions racing on both, the audit log (rows of the catalog) stays one chain,
//! and a node killed mid-upload leaves nothing visible while the other keeps serving.

use std::time::{Duration, Instant};

use crate::harness::{BIN, Env, Server, accounts_csv, words};

const OVERLAP: &str = "SELECT COUNT(DISTINCT m.website) AS n FROM globex.mine m JOIN acme.accounts a ON m.website = a.website";

/// Companies `co{i}.example` for `ids`, with an industry.
fn companies(ids: std::ops::Range<usize>) -> String {
    let mut s = String::from("website,industry\n");
    for i in ids {
        s.push_str(&format!("co{i}.example,{}\n", ["retail", "energy"][i % 2]));
    }
    s
}

fn ask(env: &Env, server: &Server, sql: &str) -> serde_json::Value {
    let out = env
        .cli(server, "globex", &["query", sql, "--format", "json"])
        .ok();
    serde_json::from_str(&out.stdout).expect("query json")
}

/// Two nodes; acme's `accounts` (companies 0..200) uploaded on the first and shared with
/// globex for join/count/filter/dimension at `settings`; globex's `mine` (100..300)
/// uploaded on the second.
fn two_nodes(settings: &str) -> (Env, Server, Server) {
    let env = Env::on_postgres_and_s3();
    let a = env.serve(&[]);
    let b = env.serve(&[]);
    env.upload_csv(&a, "acme", "accounts", &companies(0..200))
        .ok();
    env.grants(
        &a,
        "acme",
        "accounts",
        "globex",
        &[
            "--usage join",
            "--usage count",
            "--usage filter",
            "--usage dimension",
        ],
    );
    let mut set = words("policy set accounts");
    set.extend(words(settings));
    env.cli(&a, "acme", &set).ok();
    env.upload_csv(&b, "globex", "mine", &companies(100..300))
        .ok();
    (env, a, b)
}

#[test]
fn any_node_answers_any_request_and_a_change_on_one_applies_on_the_other() {
    let (env, a, b) = two_nodes("--epsilon 1 --budget 100");
    // Sealed into the object store, not the data directory.
    assert!(env.sealed_files().is_empty(), "{:?}", env.sealed_files());
    assert_eq!(env.sealed_objects().len(), 2);
    // Uploaded on one node, listed and queried on the other at once.
    assert_eq!(env.dataset_names(&b, "acme"), vec!["accounts"]);
    assert_eq!(env.dataset_names(&a, "globex"), vec!["mine"]);
    let first = ask(&env, &b, OVERLAP);
    let n = first["rows"][0][0].as_i64().expect("count");
    assert!((n - 100).abs() <= 20, "100 companies in common, noisy: {n}");
    // The same question on the other node: the answer already released, nothing spent.
    let again = ask(&env, &a, OVERLAP);
    assert_eq!(again["rows"], first["rows"]);
    assert_eq!(again["repeated"], true);

    // A grant revoked on one node refuses the next question on the other.
    let retail = format!("{OVERLAP} WHERE a.industry = 'retail'");
    ask(&env, &b, &retail);
    env.cli(
        &a,
        "acme",
        &words("policy revoke accounts --to globex --usage filter"),
    )
    .ok();
    let started = Instant::now();
    env.cli(
        &b,
        "globex",
        &["query", &format!("{OVERLAP} WHERE a.industry = 'energy'")],
    )
    .fails_with("rule usage_not_granted");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A user revoked through one node is refused by the other from its next request.
    let ana = env.add_user("globex", "ana", "analyst");
    env.cli_as(&b, &ana, &["whoami"]).ok();
    env.cli(
        &a,
        "globex",
        &[
            "user",
            "revoke",
            "globex",
            "ana",
            "--identity",
            env.bundle("globex").to_str().expect("utf-8"),
            "--server",
            &a.url,
        ],
    )
    .ok();
    env.cli_as(&b, &ana, &["whoami"])
        .fails_with("cannot talk to escrow");
    env.cli_as(&a, &ana, &["whoami"])
        .fails_with("cannot talk to escrow");

    // Deleted on one node, answered by neither (nor from the other's plaintext cache).
    env.cli(&b, "acme", &["datasets", "delete", "accounts"])
        .ok();
    assert!(env.dataset_names(&a, "acme").is_empty());
    for node in [&a, &b] {
        env.cli(node, "globex", &["query", OVERLAP])
            .fails_with("acme.accounts");
    }
    assert_eq!(
        env.sealed_objects().len(),
        1,
        "the shredded version's object is gone"
    );

    // Both nodes appended to one chain, in the catalog, which verifies whole.
    assert!(!env.data.join("audit/log.jsonl").exists());
    let verify = env
        .op(&[
            "audit",
            "verify",
            "--data-dir",
            env.data.to_str().expect("utf-8"),
        ])
        .ok();
    assert!(verify.stdout.contains("intact"), "{}", verify.stdout);
    let kinds: Vec<String> = env
        .audit_records()
        .iter()
        .map(|r| r["kind"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "startup").count(),
        2,
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "delete"));
}

#[test]
fn a_budget_is_spent_once_under_questions_racing_on_both_nodes() {
    // ε 1 each, budget 2: four distinct questions fit (√4 = 2), whichever node they reach.
    let (env, a, b) = two_nodes("--epsilon 1 --budget 2");
    let urls = [a.url.clone(), b.url.clone()];
    let bundle = env.bundle("globex");
    let outcomes: Vec<std::process::Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let (bundle, url) = (&bundle, &urls[i % 2]);
                s.spawn(move || {
                    let sql = format!("{OVERLAP} WHERE a.industry = 'sector{i}'");
                    loop {
                        let out = std::process::Command::new(BIN)
                            .args(["query", &sql, "--format", "json"])
                            .env("ESCROW_IDENTITY", bundle)
                            .env("ESCROW_SERVER", url)
                            .output()
                            .expect("run");
                        // A node's per-partner limit on questions at once: ask again.
                        if !String::from_utf8_lossy(&out.stderr).contains("too_many_requests") {
                            return out;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let answered = outcomes.iter().filter(|o| o.status.success()).count();
    let exhausted = outcomes
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("rule budget_exhausted"))
        .count();
    assert_eq!((answered, exhausted), (4, 8), "{outcomes:?}");
    // What was spent, as either node reports it: exactly the budget. An answered question
    // asked again is free on either node.
    let paid = (0..12)
        .find(|&i| outcomes[i].status.success())
        .expect("an answered question");
    for node in [&a, &b] {
        let again = ask(
            &env,
            node,
            &format!("{OVERLAP} WHERE a.industry = 'sector{paid}'"),
        );
        assert_eq!(again["repeated"], true, "{again}");
        assert_eq!(again["budgets"][0]["spent"], 2.0, "{again}");
    }
}

#[test]
fn a_node_killed_mid_upload_leaves_nothing_and_the_other_keeps_serving() {
    let env = Env::on_postgres_and_s3();
    let mut a = env.serve(&[]);
    let b = env.serve(&[]);
    let ok = env.file("ok.csv", accounts_csv(100, "ok").as_bytes());
    env.upload(&b, "acme", &ok, "kept", &[]).ok();
    let big = env.file("big.csv", accounts_csv(400_000, "crash").as_bytes());
    let mut upload = env.upload_in_flight(&a, "acme", &big, "partial");
    a.kill9();
    let _ = upload.wait();

    // The other node keeps serving and shows no partial dataset; nothing of it was stored.
    assert_eq!(env.dataset_names(&b, "acme"), vec!["kept"]);
    assert_eq!(env.sealed_objects().len(), 1);
    // The killed node restarts cleanly. Its leftovers look like another node's upload in
    // progress, so a node on a shared catalog leaves them for the grace period; they stay
    // invisible meanwhile.
    let a = env.serve(&[]);
    a.wait_log("partial_uploads_removed=0");
    assert_eq!(env.dataset_names(&a, "acme"), vec!["kept"]);
    env.upload(&a, "acme", &ok, "partial", &[]).ok();
    assert_eq!(env.dataset_names(&b, "acme"), vec!["kept", "partial"]);
}

#[test]
fn a_node_or_command_without_the_shared_catalog_is_refused_and_removes_nothing() {
    let env = Env::on_postgres_and_s3();
    let a = env.serve(&[]);
    env.upload_csv(&a, "acme", "accounts", &companies(0..50))
        .ok();
    let sealed = env.sealed_objects();
    assert_eq!(sealed.len(), 1);
    // The same directory without --catalog: a new, empty catalog, whose startup recovery
    // would take every sealed object for an orphan. Refused before anything is removed.
    let err = refused_node(&env, "ESCROW_CATALOG");
    assert!(err.contains("ESCROW_CATALOG missing or wrong"), "{err}");
    assert_eq!(env.sealed_objects(), sealed);
    // With the catalog but without the object store: a node that would store new versions
    // where no other node looks, and find none of the listed ones. Refused too.
    let err = refused_node(&env, "ESCROW_OBJECTS");
    assert!(
        err.contains("wrong_objects") || err.contains("check --objects"),
        "{err}"
    );
    assert_eq!(env.sealed_objects(), sealed);
    let op = std::process::Command::new(BIN)
        .args(["partner", "add", "initech"])
        .env("ESCROW_DATA_DIR", &env.data)
        .env_remove("ESCROW_CATALOG")
        .output()
        .expect("partner add");
    assert!(!op.status.success());
    // The node on the shared catalog is untouched.
    assert_eq!(env.dataset_names(&a, "acme"), vec!["accounts"]);
    assert_eq!(env.sealed_objects(), sealed);
}

/// Start a node on `env`'s shared storage but without the setting `missing`; it must exit
/// with an error. Its stderr.
fn refused_node(env: &Env, missing: &str) -> String {
    let mut node = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("ESCROW_DATA_DIR", &env.data)
        .envs(env.shared_env().into_iter().filter(|(k, _)| *k != missing))
        .env_remove(missing)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = node.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = node.kill();
            panic!("a node without {missing} started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut node.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(!status.success(), "a node without {missing} must not start");
    err
}

#[test]
fn key_rotation_works_with_both_nodes_running() {
    let (env, a, b) = two_nodes("--epsilon 1 --budget 100");
    let noisy_overlap = |answer: &serde_json::Value, truth: i64| {
        let n = answer["rows"][0][0].as_i64().expect("count");
        assert!(
            (n - truth).abs() <= 20,
            "{truth} companies in common, noisy: {answer}"
        );
    };
    noisy_overlap(&ask(&env, &b, OVERLAP), 100);
    let out = env.op(&["keys", "rotate"]).ok();
    assert!(
        out.stdout.contains("2 data key(s) re-wrapped"),
        "{}",
        out.stdout
    );
    // A version uploaded on one running node after the rotation is wrapped under the new
    // key; the other running node, which loaded the old key at its start, reads it.
    env.upload_csv(&a, "globex", "mine", &companies(100..300))
        .ok();
    noisy_overlap(
        &ask(&env, &b, &format!("{OVERLAP} WHERE a.industry = 'retail'")),
        50,
    );
    // A node started after the rotation reads what was re-wrapped under the new key.
    drop(a);
    let a = env.serve(&[]);
    a.wait_log("startup recovery done");
    noisy_overlap(
        &ask(&env, &a, &format!("{OVERLAP} WHERE a.industry = 'energy'")),
        50,
    );
}

#[test]
fn a_node_starting_while_a_rotation_runs_leaves_its_next_key_alone() {
    let env = Env::on_postgres_and_s3();
    let keys = env.data.join("keys");
    // Another process in the middle of `keys rotate`: it holds the rotation lock and has
    // written the next key, not yet committed.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(keys.join("rotation.lock"))
        .expect("lock file");
    lock.lock().expect("lock");
    let next = keys.join("kek.next");
    std::fs::copy(keys.join("noise"), &next).expect("a next key");
    let node = env.serve(&[]);
    node.wait_log("a key rotation is running in another process");
    assert!(next.exists(), "the running rotation's next key must stay");
    drop(node);
    // The rotation's process died without committing: the next start undoes it.
    drop(lock);
    let node = env.serve(&[]);
    node.wait_log("of a rotation that never committed");
    assert!(!next.exists());
}

#[test]
fn an_object_swapped_in_the_store_fails_the_next_question_on_every_node() {
    let (env, a, b) = two_nodes("--epsilon 1 --budget 100");
    // Node a holds both lists' plaintext in its cache after this.
    ask(&env, &a, OVERLAP);
    let objects = env.objects.as_ref().expect("an S3 store").open();
    let keys = env.sealed_objects();
    assert_eq!(keys.len(), 2);
    // Someone with write access to the bucket puts one list's sealed object in the other's
    // place: authentic bytes, the wrong version.
    let other = objects.get_bytes(&keys[1]).expect("get").expect("object");
    let swapped = env.file("swapped.sealed", &other);
    objects.put_file(&keys[0], &swapped).expect("put");
    for (node, filter) in [(&a, "retail"), (&b, "energy")] {
        let sql = format!("{OVERLAP} WHERE a.industry = '{filter}'");
        env.cli(node, "globex", &["query", &sql])
            .fails_with("internal");
    }
}
