//! kill -9 of the real server (and of `escrow keys rotate`) at every step of an upload, a
//! policy change, a delete, a charged question, an audit append, a key rotation and startup
//! recovery itself; then restart: nothing partial is visible, acknowledged work is all there
//! and readable, recovery is logged and audited, the audit chain verifies.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use escrow::faults;

use crate::harness::{BIN, Env, Server, accounts_csv};

#[test]
fn kill9_mid_upload_leaves_nothing() {
    let env = Env::new();
    let mut server = env.serve(&[]);
    let ok = env.file("ok.csv", accounts_csv(100, "ok").as_bytes());
    env.upload(&server, "acme", &ok, "kept", &[]).ok();

    // a large upload in the background, killed while the server writes it
    let big = env.file("big.csv", accounts_csv(400_000, "crash").as_bytes());
    let mut upload = env.upload_in_flight(&server, "acme", &big, "partial");
    server.kill9();
    let _ = upload.wait();
    assert!(
        !env.temp_files().is_empty(),
        "the crash should leave a partial file"
    );

    let server = env.serve(&[]);
    server.wait_log("partial_uploads_removed=1");
    let names = env.dataset_names(&server, "acme");
    assert_eq!(names, vec!["kept"], "no partial dataset may be listed");
    assert!(env.temp_files().is_empty(), "orphans must be gone");
    assert_eq!(env.sealed_files().len(), 1);
    // an orphan sealed file (crash between rename and catalog commit) is removed too
    let kept_dir = env.sealed_files()[0].parent().expect("dir").to_path_buf();
    std::fs::write(
        kept_dir.join("00000000000000000000000000000000.sealed"),
        b"orphan",
    )
    .expect("orphan");
    drop(server);
    let server = env.serve(&[]);
    server.wait_log("orphan_files_removed=1");
    assert_eq!(env.sealed_files().len(), 1);
    env.upload(&server, "acme", &big, "partial", &[]).ok();
}

// ---- kill -9 at named points -----------------------------------------------------------------
//
// `ESCROW_FAULT=POINT[@N]` makes the real binary SIGKILL itself at a named point
// (store/src/faults.rs; the points are listed in docs/OPERATIONS.md). Each case below arms
// one point, does the work that reaches it, checks that the process really died of SIGKILL,
// restarts without the fault and checks the data directory as a whole.

/// What the data directory must hold after a crash and a restart.
struct Expect<'a> {
    /// acme's datasets that must be listed, with their row counts (and no other).
    datasets: &'a [(&'a str, usize)],
    /// Sealed files in the whole data directory.
    sealed: usize,
}

const OWN_COUNT: &str = "SELECT COUNT(DISTINCT website) AS n FROM acme.";

/// Restart after a crash and check everything a crash must not break: startup recovery is
/// logged and audited; only complete datasets are listed and each one answers queries with
/// all its rows; no temp file or orphan remains; the audit chain verifies to the catalog.
fn restart_and_check(env: &Env, expect: &Expect<'_>, what: &str) -> Server {
    let server = env.serve(&[]);
    server.wait_log("startup recovery done");
    let listed = env.dataset_rows(&server, "acme");
    let want: BTreeMap<String, usize> = expect
        .datasets
        .iter()
        .map(|(n, r)| (n.to_string(), *r))
        .collect();
    assert_eq!(listed, want, "{what}: datasets after restart");
    reads_back_whole(env, &server, &listed, what);
    let tmp = env.temp_files();
    assert!(tmp.is_empty(), "{what}: temp files left: {tmp:?}");
    assert_eq!(
        env.sealed_files().len(),
        expect.sealed,
        "{what}: sealed files"
    );
    assert!(
        !env.data.join("keys/kek.next").exists(),
        "{what}: an unsettled next key"
    );
    let d = env.data.to_str().expect("p").to_string();
    env.op(&["audit", "verify", "--data-dir", &d]).ok();
    let records = env.audit_records();
    let last_startup = records
        .iter()
        .rev()
        .find(|r| r["kind"] == "startup")
        .expect("a startup record");
    assert!(
        last_startup["detail"]["recovery"].is_object(),
        "{what}: recovery is audited: {last_startup}"
    );
    server
}

/// Start a server armed with `fault`, run `work` against it, and check the server died of
/// SIGKILL (not of an error or a panic).
fn crash_server(env: &Env, fault: &str, work: impl FnOnce(&Server)) {
    let mut server = env
        .serve_env(&[(faults::ENV, fault)], &[])
        .unwrap_or_else(|(l, log)| panic!("{fault}: server did not start: {l}\n{log}"));
    work(&server);
    let status = server.wait_exit();
    assert_eq!(
        status.signal(),
        Some(9),
        "{fault}: the server must die of SIGKILL, not {status:?}:\n{}",
        server.log()
    );
    // (the log is read by another thread: wait for it to reach the end of the pipe)
    server.wait_log(&format!("fault point {}", point_of(fault)));
}

fn point_of(fault: &str) -> &str {
    fault.split(['=', '@']).next().unwrap_or(fault)
}

fn audit_kinds(env: &Env) -> Vec<String> {
    env.audit_records()
        .iter()
        .map(|r| r["kind"].as_str().expect("kind").to_string())
        .collect()
}

/// Each of `datasets` (acme's, with row counts) answers its owner's count with all its rows.
fn reads_back_whole(env: &Env, server: &Server, datasets: &BTreeMap<String, usize>, what: &str) {
    for (name, rows) in datasets {
        let out = env
            .cli(
                server,
                "acme",
                &["query", &format!("{OWN_COUNT}{name}"), "--format", "csv"],
            )
            .ok();
        assert_eq!(
            out.stdout,
            format!("n\n{rows}\n"),
            "{what}: {name} reads back whole"
        );
    }
}

/// A small deterministic generator (SplitMix64) for reproducible "random" offsets; the seed
/// comes from ESCROW_CRASH_SEED or the clock and is printed so a failure can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn from_env() -> Rng {
        let seed = std::env::var("ESCROW_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(7)
            });
        eprintln!("crash tests: ESCROW_CRASH_SEED={seed}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// A data directory where acme has `kept` (100 rows) acknowledged; returns its upload file
/// for `incoming` (3,000 rows, a little over 300 KB).
fn upload_world() -> (Env, PathBuf) {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(&server, "acme", "kept", &accounts_csv(100, "kept"))
        .ok();
    drop(server);
    let incoming = env.file("incoming.csv", accounts_csv(3000, "in").as_bytes());
    (env, incoming)
}

fn upload_incoming(env: &Env, server: &Server, file: &Path) {
    let r = env.upload(
        server,
        "acme",
        file,
        "incoming",
        &["--key-column", "website"],
    );
    assert_ne!(
        r.code,
        Some(0),
        "the upload cannot have been acknowledged: {r:?}"
    );
}

/// kill -9 at every step of an upload: five random byte offsets of the body while it is
/// received and sealed, after the sealed file is durable, after its rename, inside the commit
/// transaction after the audit append, after the commit; and in the middle of the upload's
/// audit append (a torn line) and after it (written, never committed).
#[test]
fn kill9_at_every_step_of_an_upload() {
    let mut rng = Rng::from_env();
    let size = accounts_csv(3000, "in").len() as u64;
    let mut cases: Vec<(String, bool)> = (0..5)
        .map(|_| (format!("upload.received@{}", rng.range(1, size)), false))
        .collect();
    for (point, committed) in [
        ("upload.sealed", false),
        ("upload.renamed", false),
        ("upload.committing", false),
        ("upload.committed", true),
        // the startup record is the server's first append; the upload's is the second
        ("audit.torn@2", false),
        ("audit.written@2", false),
    ] {
        cases.push((point.to_string(), committed));
    }
    for (fault, committed) in cases {
        let (env, incoming) = upload_world();
        crash_server(&env, &fault, |server| {
            upload_incoming(&env, server, &incoming)
        });
        let expect = if committed {
            Expect {
                datasets: &[("kept", 100), ("incoming", 3000)],
                sealed: 2,
            }
        } else {
            Expect {
                datasets: &[("kept", 100)],
                sealed: 1,
            }
        };
        let server = restart_and_check(&env, &expect, &fault);
        let kinds = audit_kinds(&env);
        match point_of(&fault) {
            "audit.torn" => assert!(kinds.contains(&"audit_repair".into()), "{kinds:?}"),
            "audit.written" | "upload.committing" => {
                assert!(
                    kinds.contains(&"audit_uncommitted".into()),
                    "{fault}: {kinds:?}"
                )
            }
            _ => {}
        }
        // the same upload, retried, lands whole
        env.upload(
            &server,
            "acme",
            &incoming,
            "incoming",
            &["--key-column", "website"],
        )
        .ok();
        assert_eq!(env.dataset_names(&server, "acme").len(), 2, "{fault}");
    }
}

/// A world where acme and globex each have `accounts` (60 shared companies).
fn shared_world() -> Env {
    let env = Env::new();
    let server = env.serve(&[]);
    for p in ["acme", "globex"] {
        env.upload_csv(&server, p, "accounts", &accounts_csv(60, "shared"))
            .ok();
    }
    env
}

const GRANT: &[&str] = &[
    "policy", "grant", "accounts", "--to", "globex", "--usage", "join", "--column", "website",
];
const JOINED: &str = "SELECT COUNT(DISTINCT g.website) AS n FROM globex.accounts g JOIN acme.accounts a ON g.website = a.website";

fn policy_versions(env: &Env, server: &Server) -> usize {
    let out = env
        .cli(server, "acme", &["policy", "history", "--format", "json"])
        .ok()
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["versions"].as_array().map_or(0, Vec::len)
}

/// kill -9 during policy changes, deletes and a charged question: a change is all there
/// (grant, policy version, audit record) or not at all; a delete whose keys are gone stays
/// deleted and its files are removed; a charged question stays charged and marked as
/// running, so asking it again is refused (`not_run_again`), not run a second time.
#[test]
fn kill9_during_policy_changes_deletes_and_questions() {
    let both = Expect {
        datasets: &[("accounts", 60)],
        sealed: 2,
    };
    for (fault, granted) in [
        ("policy.versioned", false),
        ("audit.torn@2", false),
        ("audit.written@2", false),
        ("policy.committed", true),
    ] {
        let env = shared_world();
        crash_server(&env, fault, |server| {
            let r = env.cli(server, "acme", GRANT);
            assert_ne!(r.code, Some(0), "{fault}: {r:?}");
        });
        let server = restart_and_check(&env, &both, fault);
        assert_eq!(
            policy_versions(&env, &server),
            usize::from(granted),
            "{fault}"
        );
        let q = env.cli(&server, "globex", &["query", JOINED, "--format", "json"]);
        assert_eq!(q.code == Some(0), granted, "{fault}: {q:?}");
        // the change can be made again, once
        env.cli(&server, "acme", GRANT).ok();
        assert_eq!(policy_versions(&env, &server), 1, "{fault}");
    }

    let env = shared_world();
    crash_server(&env, "delete.committed", |server| {
        let r = env.cli(server, "acme", &["datasets", "delete", "accounts"]);
        assert_ne!(r.code, Some(0), "{r:?}");
    });
    let server = restart_and_check(
        &env,
        &Expect {
            datasets: &[],
            sealed: 1,
        },
        "delete.committed",
    );
    // The deleted list's sealed version is an orphan, removed at startup; so is what it was
    // reduced to and sealed beside it (its companies), if that was written before the crash.
    server.wait_log("startup recovery done");
    let log = server.log();
    let removed: usize = (log.split("orphan_files_removed=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("recovery logged");
    assert!((1..=2).contains(&removed), "{log}");
    let left: std::collections::BTreeSet<_> = (env.sealed_files().into_iter())
        .chain(env.derived_files())
        .filter_map(|p| p.parent().map(|d| d.to_path_buf()))
        .collect();
    assert_eq!(
        left.len(),
        1,
        "only the other list's objects are left: {left:?}"
    );
    drop(server);

    let env = shared_world();
    {
        let server = env.serve(&[]);
        env.cli(&server, "acme", GRANT).ok();
    }
    crash_server(&env, "query.charged", |server| {
        let r = env.cli(server, "globex", &["query", JOINED, "--format", "json"]);
        assert_ne!(r.code, Some(0), "{r:?}");
    });
    let server = restart_and_check(&env, &both, "query.charged");
    // The charge survived the crash, and with it the mark that the question was running
    // (one transaction): a charged question runs at most once, a crash included.
    env.cli(&server, "globex", &["query", JOINED, "--format", "json"])
        .fails_with("rule not_run_again");
}

/// kill -9 of `escrow keys rotate` at each step, and during its audit append: the next start
/// finishes or undoes the rotation, every data key is under the key in `keys/kek`, and the
/// data reads back the same.
#[test]
fn kill9_during_key_rotation() {
    let both = Expect {
        datasets: &[("accounts", 60)],
        sealed: 2,
    };
    for (fault, rotated) in [
        ("rotate.next_written", false),
        ("audit.torn@1", false),
        ("key_rotate.committing", false),
        ("rotate.committed", true),
        ("rotate.renamed", true),
    ] {
        let env = shared_world();
        let before = std::fs::read(env.data.join("keys/kek")).expect("kek");
        let d = env.data.to_str().expect("p").to_string();
        let r = env.op_env(
            &["keys", "rotate", "--data-dir", &d],
            &[(faults::ENV, fault)],
        );
        assert_eq!(r.code, None, "{fault}: rotate must die of SIGKILL: {r:?}");
        let server = restart_and_check(&env, &both, fault);
        let after = std::fs::read(env.data.join("keys/kek")).expect("kek");
        assert_eq!(before != after, rotated, "{fault}: rotated?");
        let ids = env.kek_ids();
        assert_eq!(ids.len(), 1, "{fault}: one key wraps everything: {ids:?}");
        if rotated && fault != "rotate.renamed" {
            server.wait_log("key_rotation=");
        }
        // and rotating again works
        drop(server);
        env.op(&["keys", "rotate", "--data-dir", &d]).ok();
        restart_and_check(&env, &both, fault);
    }
}

/// kill -9 during startup recovery itself: the next start finishes it.
#[test]
fn kill9_during_startup_recovery() {
    let env = shared_world();
    for i in 0..3 {
        std::fs::write(
            env.data.join(format!("tmp/{i:032x}.partial")),
            b"sealed bytes",
        )
        .expect("partial");
    }
    let r = env.serve_env(&[(faults::ENV, "recovery.partial_removed")], &[]);
    let Err((_, log)) = r else {
        panic!("the server must die during recovery")
    };
    assert!(
        log.contains("fault point recovery.partial_removed"),
        "{log}"
    );
    let server = restart_and_check(
        &env,
        &Expect {
            datasets: &[("accounts", 60)],
            sealed: 2,
        },
        "recovery.partial_removed",
    );
    server.wait_log("partial_uploads_removed=2");
}

/// The soak (bench/crash_soak.sh runs it; ignored by `cargo test`): hundreds of crashes in
/// one data directory, each at a random named point or at a random moment (an external
/// SIGKILL while an upload is in flight), with re-uploads and deletes. After every restart
/// the listed datasets must be exactly the acknowledged ones (the one in flight may have
/// landed or not, never partly), each must read back all its rows, and the directory must
/// hold nothing else and verify.
#[test]
#[ignore = "long: run by bench/crash_soak.sh"]
fn soak() {
    let iterations: usize = std::env::var("ESCROW_SOAK_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut rng = Rng::from_env();
    let env = Env::new();
    let mut acked: BTreeMap<String, usize> = BTreeMap::new();
    let points = [
        "upload.received",
        "upload.sealed",
        "upload.renamed",
        "upload.committing",
        "upload.committed",
        "audit.torn@2",
        "audit.written@2",
        "delete.committed",
        "external",
        "external",
    ];
    let started = Instant::now();
    let mut by_point: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..iterations {
        let name = format!("d{}", rng.range(0, 6));
        let rows = rng.range(20, 4000) as usize;
        let tag = format!("s{i}");
        let csv = accounts_csv(rows, &tag);
        let file = env.file(&format!("{tag}.csv"), csv.as_bytes());
        let point = points[rng.range(0, points.len() as u64) as usize];
        *by_point.entry(point).or_default() += 1;
        let fault = match point {
            "upload.received" => format!("upload.received@{}", rng.range(1, csv.len() as u64)),
            p => p.to_string(),
        };
        // What may be listed afterwards for `name`: its acknowledged state, or the new one.
        let pending: Option<usize> = if point == "delete.committed" {
            None
        } else {
            Some(rows)
        };
        let args = [
            "upload",
            file.to_str().expect("p"),
            "--dataset",
            &name,
            "--key-column",
            "website",
        ];
        let mut server = if point == "external" {
            env.serve(&[])
        } else {
            env.serve_env(&[(faults::ENV, &fault)], &[])
                .unwrap_or_else(|(l, log)| panic!("{fault}: no start: {l}\n{log}"))
        };
        let acknowledged = if point == "external" {
            let mut child = std::process::Command::new(BIN)
                .args(args)
                .env("ESCROW_IDENTITY", env.bundle("acme"))
                .env("ESCROW_SERVER", &server.url)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("upload");
            std::thread::sleep(Duration::from_millis(rng.range(0, 600)));
            server.kill9();
            child.wait().expect("wait").success()
        } else if point == "delete.committed" {
            env.cli(&server, "acme", &["datasets", "delete", &name])
                .code
                == Some(0)
        } else {
            env.cli(&server, "acme", &args).code == Some(0)
        };
        server.kill9();
        drop(server);

        let server = env.serve(&[]);
        server.wait_log("startup recovery done");
        let listed = env.dataset_rows(&server, "acme");
        let what = format!("iteration {i} ({fault} on {name}, acknowledged={acknowledged})");
        let now = listed.get(&name).copied();
        if acknowledged {
            assert_eq!(now, pending, "{what}: acknowledged work must survive");
        } else {
            assert!(
                now == acked.get(&name).copied() || now == pending,
                "{what}: {name} is {now:?}, was {:?}",
                acked.get(&name)
            );
        }
        for (n, r) in &acked {
            if *n != name {
                assert_eq!(listed.get(n), Some(r), "{what}: {n} changed");
            }
        }
        assert_eq!(
            listed.len(),
            acked.len() - usize::from(acked.contains_key(&name)) + usize::from(now.is_some()),
            "{what}: {listed:?}"
        );
        reads_back_whole(&env, &server, &listed, &what);
        assert_eq!(
            env.temp_files(),
            Vec::<PathBuf>::new(),
            "{what}: temp files"
        );
        let c = rusqlite::Connection::open(env.data.join("escrow.db")).expect("catalog");
        let versions: i64 = c
            .query_row("SELECT COUNT(*) FROM dataset_versions", [], |r| r.get(0))
            .expect("count");
        assert_eq!(
            env.sealed_files().len() as i64,
            versions,
            "{what}: one sealed file per version"
        );
        let d = env.data.to_str().expect("p").to_string();
        env.op(&["audit", "verify", "--data-dir", &d]).ok();
        acked = listed;
    }
    eprintln!(
        "soak: {iterations} crashes in {:.0} s, all recovered; by point: {by_point:?}; {} datasets at the end",
        started.elapsed().as_secs_f64(),
        acked.len()
    );
}
