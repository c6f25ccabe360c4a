//! Limits: per-partner concurrency (429 with Retry-After, other partners unaffected, the slot
//! comes back), per-question time and memory limits (refused, the work stops, the slot comes
//! back) and graceful shutdown with an upload in flight (finished if it completes
//! within the grace period, cleanly discarded if not).

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{BIN, Env, Server, accounts_csv, words};

/// An upload whose body comes from a FIFO the test writes: it stays in flight until the
/// test closes the writer.
struct SlowUpload {
    cli: Child,
    writer: Option<std::fs::File>,
}

impl SlowUpload {
    fn start(env: &Env, server: &Server, partner: &str, dataset: &str) -> SlowUpload {
        let fifo = env.tmp.path().join(format!("{partner}-{dataset}.csv"));
        let ok = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(ok.success());
        let cli = Command::new(BIN)
            .args(["upload", fifo.to_str().expect("p"), "--dataset", dataset])
            .args(["--key-column", "website", "--input-format", "csv"])
            .env("ESCROW_IDENTITY", env.bundle(partner))
            .env("ESCROW_SERVER", &server.url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("upload");
        // opening for write waits for the CLI to open the reading end
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open fifo");
        let csv = accounts_csv(2000, dataset);
        let (head, _) = csv.split_at(csv.len() / 2);
        writer.write_all(head.as_bytes()).expect("write");
        writer.flush().expect("flush");
        // in flight: the server is sealing it into tmp/
        wait_for(
            || !env.temp_files().is_empty(),
            "the upload to reach the server",
        );
        SlowUpload {
            cli,
            writer: Some(writer),
        }
    }

    /// Send the rest and wait for the CLI.
    fn finish(mut self, dataset: &str) -> std::process::Output {
        let csv = accounts_csv(2000, dataset);
        let (_, tail) = csv.split_at(csv.len() / 2);
        let mut w = self.writer.take().expect("writer");
        // (the CLI may be gone already: the server cut the upload)
        let _ = w.write_all(tail.as_bytes());
        drop(w);
        self.cli.wait_with_output().expect("cli")
    }
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A raw PUT as `bundle`, for the status and headers the CLI does not show.
fn raw_put(
    server: &Server,
    bundle: &Path,
    dataset: &str,
    body: Vec<u8>,
) -> (u16, Option<String>, String) {
    let url = format!("{}/v1/datasets/{dataset}?key_column=website", server.url);
    crate::harness::raw(bundle, |http| http.put(url).body(body))
}

#[test]
fn a_partner_over_its_upload_limit_gets_429_with_retry_after_and_others_do_not() {
    let env = Env::new();
    let server = env.serve(&["--max-uploads-per-partner", "1"]);
    let slow = SlowUpload::start(&env, &server, "acme", "slow");

    let small = accounts_csv(10, "small").into_bytes();
    let (status, retry, body) = raw_put(&server, &env.bundle("acme"), "other", small.clone());
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry.as_deref(), Some("5"));
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["error"]["code"], "too_many_requests", "{body}");
    let f = env.file("small.csv", &small);
    env.upload(&server, "acme", &f, "other", &["--key-column", "website"])
        .fails_with("too_many_requests");
    // another partner is not held up by acme's upload
    env.upload(&server, "globex", &f, "other", &["--key-column", "website"])
        .ok();
    // reading is not limited by uploads
    env.cli(&server, "acme", &["datasets"]).ok();

    let out = slow.finish("slow");
    assert!(out.status.success(), "{out:?}");
    // the slot came back
    let (status, _, body) = raw_put(&server, &env.bundle("acme"), "other", small);
    assert_eq!(status, 201, "{body}");
    let d = env.data.to_str().expect("p").to_string();
    env.op(&["audit", "verify", "--data-dir", &d]).ok();
}

#[test]
fn graceful_shutdown_finishes_or_discards_uploads_in_flight() {
    let env = Env::new();
    let sealed_before = |env: &Env| env.sealed_files().len();

    // Finishes within the grace period: acknowledged and kept.
    let mut server = env.serve(&["--shutdown-grace-secs", "20"]);
    let slow = SlowUpload::start(&env, &server, "acme", "finished");
    send_term(&server);
    server.wait_log("shutting down");
    let out = slow.finish("finished");
    assert!(out.status.success(), "{out:?}");
    assert!(server.wait_exit().success());
    assert_eq!(sealed_before(&env), 1);

    // Does not finish: cut at the end of the grace period, discarded whole.
    let mut server = env.serve(&["--shutdown-grace-secs", "1"]);
    let slow = SlowUpload::start(&env, &server, "acme", "discarded");
    send_term(&server);
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(
        server.log().contains("grace period over"),
        "{}",
        server.log()
    );
    let out = slow.finish("discarded");
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(
        env.temp_files().len(),
        0,
        "the discarded upload left a file"
    );
    assert_eq!(sealed_before(&env), 1);

    let server = env.serve(&[]);
    server.wait_log("partial_uploads_removed=0");
    assert_eq!(env.dataset_names(&server, "acme"), vec!["finished"]);
}

fn send_term(server: &Server) {
    let ok = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// `n` accounts that all share one website: a self-join on the key has n² pairs.
fn one_key_csv(n: usize) -> String {
    let mut s = String::from("account_id,company_name,website,status,region\n");
    for i in 0..n {
        let region = ["NA", "EMEA", "APAC"][i % 3];
        s.push_str(&format!(
            "d-{i:06},Dup{i} Holdings,https://www.same.example/,customer,{region}\n"
        ));
    }
    s
}

#[test]
fn questions_over_the_time_or_memory_limit_are_refused_and_stop_running() {
    let env = Env::new();
    // 10^10 joined rows (every row shares the key): minutes of work in any build
    let slow = "SELECT a.region, b.region AS theirs, COUNT(DISTINCT a.website) AS n \
                FROM acme.dup a JOIN acme.dup b ON a.website = b.website GROUP BY a.region, b.region";
    // 100,000 groups, each with its own distinct-set: far more than 1 MiB
    let big =
        "SELECT company_name, COUNT(DISTINCT website) AS n FROM acme.dup GROUP BY company_name";
    let small = "SELECT region, COUNT(DISTINCT website) AS n FROM acme.accounts GROUP BY region";
    let theirs = "SELECT region, COUNT(DISTINCT website) AS n FROM globex.accounts GROUP BY region";

    // One question at a time on the whole server; others wait up to 20 s for the slot.
    let server = env.serve(&words("--query-timeout-secs 3 --max-questions-per-partner 1 --max-questions 1 --busy-wait-ms 20000"));
    env.upload_csv(&server, "acme", "dup", &one_key_csv(100_000))
        .ok();
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(60, "a"))
        .ok();
    env.upload_csv(&server, "globex", "accounts", &accounts_csv(60, "g"))
        .ok();
    let t = Instant::now();
    let (refused, waited) = std::thread::scope(|s| {
        let asking = s.spawn(|| env.cli(&server, "acme", &["query", slow]));
        // While it runs (on the query runtime), the server answers others at once.
        std::thread::sleep(Duration::from_secs(1));
        let w = Instant::now();
        env.cli(&server, "globex", &["whoami"]).ok();
        assert!(
            w.elapsed() < Duration::from_secs(5),
            "whoami took {:?} beside a heavy query",
            w.elapsed()
        );
        // globex's question waits for the server's only question slot, and is answered
        // once acme's is refused
        let waiting = s.spawn(|| env.cli(&server, "globex", &["query", theirs]));
        (
            asking.join().expect("query thread"),
            waiting.join().expect("waiting thread"),
        )
    });
    refused.fails_with("query_timeout");
    let waited = waited.ok();
    assert!(waited.stdout.contains("(3 rows)"), "{}", waited.stdout);
    assert!(!server.log().contains("busy: refused"), "{}", server.log());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The join stopped with the refusal: a join left running would keep a core busy. (A
    // reader of the sealed data finishes the batch it is preparing, then sees the query
    // gone: up to half a CPU second in a debug build, longer in wall time on a loaded
    // machine, so the window starts later.)
    std::thread::sleep(Duration::from_millis(1500));
    let (before, threads_before) = (server.cpu_secs(), server.thread_cpu_secs());
    std::thread::sleep(Duration::from_secs(2));
    let spent = server.cpu_secs() - before;
    let after = server.thread_cpu_secs();
    assert!(
        spent < 0.5,
        "the server used {spent:.2} s of CPU after the timeout: threads before {threads_before:?}, after {after:?}\n{}",
        server.log()
    );
    // the partner's only question slot came back: an ordinary question is answered
    let r = env.cli(&server, "acme", &["query", small]).ok();
    assert!(r.stdout.contains("(3 rows)"), "{}", r.stdout);
    drop(server);

    let server = env.serve(&["--query-memory-mb", "1", "--max-questions-per-partner", "1"]);
    env.cli(&server, "acme", &["query", big])
        .fails_with("query_memory_limit");
    let r = env.cli(&server, "acme", &["query", small]).ok();
    assert!(r.stdout.contains("(3 rows)"), "{}", r.stdout);
    let log = server.log();
    assert!(log.contains("code=\"query_memory_limit\""), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}
