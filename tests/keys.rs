//! Key rotation: `escrow keys rotate --data-dir DIR` re-wraps every data key under a new
//! key-encryption key while the server runs; everything stays readable, the old key is gone,
//! and a rotation a crash interrupted is finished or undone at the next start.

use crate::harness::{Env, Server, accounts_csv, words};

const OWN: &str = "SELECT status, COUNT(DISTINCT website) AS n FROM acme.accounts GROUP BY status ORDER BY status";
const SHARED: &str = "SELECT COUNT(DISTINCT g.website) AS n FROM globex.accounts g JOIN acme.accounts a ON g.website = a.website";

fn answers(env: &Env, server: &Server) -> (String, String) {
    let own = env
        .cli(server, "acme", &["query", OWN, "--format", "csv"])
        .ok();
    let shared = env
        .cli(server, "globex", &["query", SHARED, "--format", "csv"])
        .ok();
    (own.stdout, shared.stdout)
}

fn rotate(env: &Env) -> String {
    let d = env.data.to_str().expect("p").to_string();
    env.op(&["keys", "rotate", "--data-dir", &d]).ok().stdout
}

#[test]
fn rotation_rewraps_every_data_key_and_everything_stays_readable() {
    let env = Env::new();
    let server = env.serve(&[]);
    let csv = accounts_csv(40, "k");
    env.upload_csv(&server, "acme", "accounts", &csv).ok();
    env.upload_csv(&server, "acme", "accounts", &csv).ok(); // version 2
    env.upload_csv(&server, "globex", "accounts", &csv).ok();
    env.cli(
        &server,
        "acme",
        &words("policy grant accounts --to globex --usage join --column website"),
    )
    .ok();
    let before = answers(&env, &server);
    let old_key = std::fs::read(env.data.join("keys/kek")).expect("kek");
    let old_ids = env.kek_ids();
    assert_eq!(old_ids.len(), 1);

    let out = rotate(&env);
    assert!(out.contains("3 data key(s) re-wrapped"), "{out}");
    let new_key = std::fs::read(env.data.join("keys/kek")).expect("kek");
    assert_ne!(new_key, old_key);
    assert!(!env.data.join("keys/kek.next").exists());
    let ids = env.kek_ids();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_ne!(ids, old_ids, "every data key is wrapped under the new key");
    assert!(
        out.contains(&format!("key {} retired", old_ids[0])),
        "{out}"
    );
    // The old key is nowhere in the data directory's keys.
    for f in std::fs::read_dir(env.data.join("keys"))
        .expect("keys")
        .flatten()
    {
        let bytes = std::fs::read(f.path()).unwrap_or_default();
        assert!(
            !bytes.windows(old_key.len()).any(|w| w == &old_key[..]),
            "{}",
            f.path().display()
        );
    }

    // The running server reads under the new key (no restart) and uploads under it.
    assert_eq!(answers(&env, &server), before);
    env.upload_csv(&server, "acme", "accounts", &csv).ok(); // version 3
    assert_eq!(env.kek_ids(), ids);
    assert_eq!(answers(&env, &server).0, before.0);

    // Again, twice; then a restart.
    rotate(&env);
    rotate(&env);
    drop(server);
    let server = env.serve(&[]);
    assert_eq!(answers(&env, &server).0, before.0);

    // Each rotation is audited; the chain verifies.
    let d = env.data.to_str().expect("p").to_string();
    let records = env.audit_records();
    let rotations: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "key_rotate")
        .collect();
    assert_eq!(rotations.len(), 3);
    assert_eq!(rotations[0]["detail"]["rewrapped"], 3);
    assert_eq!(rotations[1]["detail"]["rewrapped"], 4);
    assert_eq!(rotations[0]["detail"]["retired"], old_ids[0].as_str());
    env.op(&["audit", "verify", "--data-dir", &d]).ok();
}

#[test]
fn an_interrupted_rotation_is_finished_or_undone_at_the_next_start() {
    let env = Env::new();
    let mut server = env.serve(&[]);
    let csv = accounts_csv(30, "i");
    env.upload_csv(&server, "acme", "accounts", &csv).ok();
    let before = answers_own(&env, &server);
    server.kill9();
    let keys = env.data.join("keys");

    // Crash before the catalog switched: a next key nothing is wrapped under.
    std::fs::write(keys.join("kek.next"), [7u8; 32]).expect("write");
    let mut server = env.serve(&[]);
    server.wait_log("of a rotation that never committed");
    assert!(!keys.join("kek.next").exists());
    assert_eq!(answers_own(&env, &server), before);
    server.kill9();

    // Crash after the catalog switched, before the new key replaced the old file: the state
    // a rotation leaves between its commit and its rename.
    let old = std::fs::read(keys.join("kek")).expect("kek");
    rotate(&env);
    std::fs::rename(keys.join("kek"), keys.join("kek.next")).expect("mv");
    std::fs::write(keys.join("kek"), &old).expect("write");
    let server = env.serve(&[]);
    server.wait_log("finished the rotation to key");
    assert!(!keys.join("kek.next").exists());
    assert_ne!(std::fs::read(keys.join("kek")).expect("kek"), old);
    assert_eq!(answers_own(&env, &server), before);
    // The next rotation starts from the settled state.
    let out = rotate(&env);
    assert!(out.contains("1 data key(s) re-wrapped"), "{out}");
    assert_eq!(answers_own(&env, &server), before);
}

fn answers_own(env: &Env, server: &Server) -> String {
    env.cli(server, "acme", &["query", OWN, "--format", "csv"])
        .ok()
        .stdout
}

/// The KEK from an environment variable and from a command (a KMS or Vault): a data
/// directory moves its key out of `keys/kek` (file -> environment), then to a key a command
/// prints (environment -> command), by rotation; each time the data reads back the same, a
/// server without the right key refuses to start with a message naming what is missing,
/// and no key is ever echoed or logged. A fresh `init` with an external key writes no key file.
#[test]
fn the_kek_can_come_from_the_environment_or_a_command() {
    let generate = |env: &Env| {
        let k = env.op(&["keys", "generate"]).ok().stdout.trim().to_string();
        assert_eq!(k.len(), 64, "{k}");
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()), "{k}");
        k
    };
    let env = Env::new();
    let (a, b) = (generate(&env), generate(&env));
    assert_ne!(a, b);
    let mut server = env.serve(&[]);
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(30, "x"))
        .ok();
    let before = answers_own(&env, &server);
    server.terminate();
    let d = env.data.to_str().expect("p").to_string();
    let mut said = String::new();

    // file -> environment: the key file is retired (removed) once the catalog commits.
    let out = env
        .op_env(
            &["keys", "rotate", "--data-dir", &d],
            &[("ESCROW_KEK_NEXT", &a)],
        )
        .ok()
        .stdout;
    assert!(out.contains("1 data key(s) re-wrapped"), "{out}");
    assert!(
        out.contains("its file was removed") && out.contains("ESCROW_KEK"),
        "{out}"
    );
    said.push_str(&out);
    assert!(!env.data.join("keys/kek").exists());
    // Without the key the server does not start, and says which key it lacks and where it
    // looked; with it, the same answers.
    let Err((_, log)) = env.serve_env(&[], &[]) else {
        panic!("a server without the key must not start")
    };
    assert!(log.contains("which neither the file"), "{log}");
    said.push_str(&log);
    let mut server = env.serve_env(&[("ESCROW_KEK", &a)], &[]).expect("serve");
    assert_eq!(answers_own(&env, &server), before);
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(30, "x"))
        .ok();
    server.terminate();
    said.push_str(&server.log());

    // environment -> command: both external, so the operator is told what to switch and
    // which key to destroy.
    let kms = env.file("kms-b.hex", format!("{b}\n").as_bytes());
    let cmd = format!("cat {}", kms.display());
    let out = env
        .op_env(
            &["keys", "rotate", "--data-dir", &d],
            &[("ESCROW_KEK", &a), ("ESCROW_KEK_NEXT_COMMAND", &cmd)],
        )
        .ok()
        .stdout;
    assert!(out.contains("2 data key(s) re-wrapped"), "{out}");
    assert!(out.contains("destroy key"), "{out}");
    said.push_str(&out);
    // rotating again before switching is refused with what to do
    let again = env.op_env(
        &["keys", "rotate", "--data-dir", &d],
        &[("ESCROW_KEK", &a), ("ESCROW_KEK_NEXT_COMMAND", &cmd)],
    );
    let again = again.fails_with("already wrapped under the next key");
    said.push_str(&again.stderr);
    let Err((_, log)) = env.serve_env(&[("ESCROW_KEK", &a)], &[]) else {
        panic!("the old key alone must not open the store")
    };
    said.push_str(&log);
    let mut server = env
        .serve_env(&[("ESCROW_KEK_COMMAND", &cmd)], &[])
        .expect("serve");
    assert_eq!(answers_own(&env, &server), before);
    server.terminate();
    said.push_str(&server.log());

    // Broken sources: a failing command, a command printing junk, both variables set.
    for (envs, needle) in [
        (
            vec![("ESCROW_KEK_COMMAND", "exit 3")],
            "the key command failed",
        ),
        (
            vec![("ESCROW_KEK_COMMAND", "echo not-a-key-but-a-secret")],
            "must hold the key as 64 hex digits",
        ),
        (
            vec![("ESCROW_KEK_COMMAND", cmd.as_str()), ("ESCROW_KEK", &a)],
            "not both",
        ),
    ] {
        let r = env
            .op_env(&["keys", "rotate", "--data-dir", &d], &envs)
            .fails_with(needle);
        assert!(!r.stderr.contains("not-a-key-but-a-secret"), "{r:?}");
        said.push_str(&r.stderr);
    }

    // No key material anywhere it could leak: outputs, logs, the audit log.
    said.push_str(&std::fs::read_to_string(env.data.join("audit/log.jsonl")).expect("audit"));
    for key in [&a, &b] {
        assert!(!said.contains(key.as_str()), "a key was echoed or logged");
    }

    // A fresh data directory with an external key: no key file is written.
    let fresh = env.tmp.path().join("fresh");
    let fresh_s = fresh.to_str().expect("p");
    env.op_env(
        &["init"],
        &[("ESCROW_DATA_DIR", fresh_s), ("ESCROW_KEK", &b)],
    )
    .ok();
    assert!(!fresh.join("keys/kek").exists());
    assert!(fresh.join("keys/audit").exists());
}
