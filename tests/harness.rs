//! Shared fixtures: a fresh data directory with two partners, a real server process on
//! 127.0.0.1:0, and the CLI run as a partner.
//!
//! With `ESCROW_TEST_NODES=2`, the same tests run on the scaled-out setup: `Env::new` puts
//! the catalog in a PostgreSQL database and the sealed objects in an S3 bucket of the test's
//! own, and every `serve` starts two nodes behind a round-robin TCP balancer (each new
//! connection goes to the other node; TLS passes through it to the nodes), so an upload
//! made on one node is asked about, changed and deleted on the other. The second node runs
//! in a copy of the data directory made when it starts: the nodes share no file.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_escrow");

/// A data directory initialised with partners `acme` and `globex`.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    /// The data directory is a filesystem of its own (unmounted on drop).
    mounted: bool,
    /// The catalog is this PostgreSQL database (every command gets `ESCROW_CATALOG`), not
    /// the data directory's SQLite file. Dropped after the servers of the test.
    pub catalog: Option<escrow::catalog::testdb::TestDatabase>,
    /// The sealed objects are in this bucket of the test S3 server (every command gets
    /// `ESCROW_OBJECTS` and the `AWS_*` settings), not in the data directory.
    pub objects: Option<crate::s3server::Bucket>,
}

/// Whether the suite runs on two nodes (`ESCROW_TEST_NODES=2`).
pub fn two_nodes() -> bool {
    match std::env::var("ESCROW_TEST_NODES").as_deref() {
        Ok("2") => true,
        Ok("1") | Err(_) => false,
        Ok(other) => panic!("ESCROW_TEST_NODES must be 1 or 2, not {other:?}"),
    }
}

impl Env {
    /// The single-node default (SQLite and the data directory), or with
    /// `ESCROW_TEST_NODES=2` PostgreSQL and S3 (served by two nodes).
    pub fn new() -> Env {
        if two_nodes() {
            return Env::on_postgres_and_s3();
        }
        Env::fresh(None, None)
    }

    /// As `new`, with the catalog in a PostgreSQL database of the test's own: the data
    /// directory (keys, sealed files, audit log) is shared by every node started with
    /// `serve`, as several escrow nodes share one catalog and one object store.
    pub fn on_postgres() -> Env {
        Env::fresh(Some(escrow::catalog::testdb::TestDatabase::new()), None)
    }

    /// As `on_postgres`, with the sealed objects in a bucket of the test S3 server: the
    /// data directory holds keys, certificates and the audit log, no dataset.
    pub fn on_postgres_and_s3() -> Env {
        Env::fresh(
            Some(escrow::catalog::testdb::TestDatabase::new()),
            Some(crate::s3server::Bucket::new()),
        )
    }

    fn fresh(
        catalog: Option<escrow::catalog::testdb::TestDatabase>,
        objects: Option<crate::s3server::Bucket>,
    ) -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        Env::init(Env {
            tmp,
            data,
            mounted: false,
            catalog,
            objects,
        })
    }

    /// `ESCROW_CATALOG`, `ESCROW_OBJECTS` and the S3 settings for every command, when the
    /// catalog or the object store is shared.
    pub fn shared_env(&self) -> Vec<(&'static str, String)> {
        let catalog = self
            .catalog
            .iter()
            .map(|db| ("ESCROW_CATALOG", db.url().to_string()));
        catalog
            .chain(self.objects.iter().flat_map(|b| b.env()))
            .collect()
    }

    /// An environment whose data directory is a tmpfs of `bytes` (a small disk), or `None`
    /// (with the reason) where this machine does not let the tests mount one.
    pub fn on_small_disk(bytes: u64) -> Result<Env, String> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&data)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Env::init(Env {
            tmp,
            data,
            mounted: true,
            catalog: None,
            objects: None,
        }))
    }

    fn init(env: Env) -> Env {
        env.op(&["init"]).ok();
        env.op(&["partner", "add", "acme"]).ok();
        env.op(&["partner", "add", "globex"]).ok();
        env
    }

    /// Run an operator command on the data directory.
    pub fn op(&self, args: &[&str]) -> Run {
        self.op_env(args, &[])
    }

    pub fn bundle(&self, partner: &str) -> PathBuf {
        self.data.join("identities").join(partner).join("admin")
    }

    /// Start a server on a free port; extra args go to `escrow serve`. With
    /// `ESCROW_TEST_NODES=2` on a shared catalog, two nodes behind a round-robin balancer.
    pub fn serve(&self, extra: &[&str]) -> Server {
        self.serve_env(&[], extra).unwrap_or_else(|(line, log)| {
            panic!("unexpected first line from server: {line:?}\n{log}")
        })
    }

    /// Start a server with extra environment variables (e.g. `ESCROW_FAULT`). `Err` holds
    /// the server's first stdout line and its log when it did not start listening.
    pub fn serve_env(
        &self,
        envs: &[(&str, &str)],
        extra: &[&str],
    ) -> Result<Server, (String, String)> {
        let mut first = self.serve_node(envs, extra)?;
        if !(two_nodes() && self.catalog.is_some()) {
            return Ok(first);
        }
        // The second node in a data directory of its own: a copy made now (keys,
        // certificates), so nothing it serves can come from files the first one writes.
        let own = self.copy_of_data();
        let own = own.to_str().expect("utf-8 path");
        let mut with_own = envs.to_vec();
        with_own.push(("ESCROW_DATA_DIR", own));
        let second = self.serve_node(&with_own, extra)?;
        let proxy = Proxy::start([first.addr(), second.addr()]);
        first.url = format!("https://{}", proxy.addr);
        first.peer = Some(Box::new(second));
        first.proxy = Some(proxy);
        Ok(first)
    }

    /// A copy of the data directory, for a node of its own.
    fn copy_of_data(&self) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let to = self.tmp.path().join(format!("node-{n}"));
        // The first node writes files while it runs (its revocation list, through a temporary
        // file renamed into place, just after it starts): a copy that met a file as it
        // vanished is made again.
        for _ in 0..5 {
            let copied = Command::new("cp")
                .arg("-a")
                .arg(&self.data)
                .arg(&to)
                .status()
                .expect("cp");
            if copied.success() {
                return to;
            }
            let _ = std::fs::remove_dir_all(&to);
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("copying the data directory failed five times")
    }

    /// Start one node.
    fn serve_node(
        &self,
        envs: &[(&str, &str)],
        extra: &[&str],
    ) -> Result<Server, (String, String)> {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("ESCROW_DATA_DIR", &self.data)
            .env("ESCROW_LOG", "info")
            .envs(self.shared_env())
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start escrow serve");
        // Keep draining stderr so the server never blocks on a full pipe.
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        let drain = std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&l);
                    s.push('\n');
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listen line");
        match line.trim().strip_prefix("escrow listening on ") {
            Some(url) => Ok(Server {
                child,
                url: url.to_string(),
                log,
                peer: None,
                proxy: None,
            }),
            None => {
                let _ = child.wait();
                let _ = drain.join();
                let log = log.lock().map(|s| s.clone()).unwrap_or_default();
                Err((line, log))
            }
        }
    }

    /// Run an operator command with extra environment variables.
    pub fn op_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("ESCROW_DATA_DIR", &self.data)
            .env_remove("ESCROW_IDENTITY")
            .envs(self.shared_env())
            .envs(envs.iter().copied());
        Run::of(cmd)
    }

    /// The CLI as `partner`'s admin against `server`.
    pub fn cli(&self, server: &Server, partner: &str, args: &[&str]) -> Run {
        self.cli_as(server, &self.bundle(partner), args)
    }

    /// The CLI as the identity in `bundle` against `server`.
    pub fn cli_as(&self, server: &Server, bundle: &Path, args: &[&str]) -> Run {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("ESCROW_IDENTITY", bundle)
            .env("ESCROW_SERVER", &server.url)
            .env_remove("ESCROW_DATA_DIR");
        Run::of(cmd)
    }

    /// `escrow policy grant DATASET --to TO ARGS` as `owner`, for each ARGS of `each`
    /// (command-line words, e.g. `"--usage join --column website"`).
    pub fn grants(&self, server: &Server, owner: &str, dataset: &str, to: &str, each: &[&str]) {
        for args in each {
            let mut a = vec!["policy", "grant", dataset, "--to", to];
            a.extend(words(args));
            self.cli(server, owner, &a).ok();
        }
    }

    /// acme and globex each upload `accounts` (the same 60 companies) with a `customers`
    /// population, and globex lets acme see its overlap counts.
    pub fn customers_shared(&self, server: &Server) {
        for p in ["acme", "globex"] {
            self.upload_csv(server, p, "accounts", &accounts_csv(60, "shared"))
                .ok();
        }
        for p in ["acme", "globex"] {
            self.define_customers(server, p);
        }
        self.cli(
            server,
            "globex",
            &words("policy grant accounts --to acme --usage overlap"),
        )
        .ok();
    }

    /// `partner` defines the population `customers` (status = 'customer') of `accounts`.
    pub fn define_customers(&self, server: &Server, partner: &str) {
        self.cli(
            server,
            partner,
            &[
                "population",
                "add",
                "accounts",
                "customers",
                "--filter",
                "status = 'customer'",
            ],
        )
        .ok();
    }

    /// Add a user of `partner` with `role` (operator command); returns its bundle.
    pub fn add_user(&self, partner: &str, user: &str, role: &str) -> PathBuf {
        self.op(&["user", "add", partner, user, "--role", role])
            .ok();
        self.data.join("identities").join(partner).join(user)
    }

    /// `escrow upload FILE --dataset DATASET EXTRA...` as `partner`.
    pub fn upload(
        &self,
        server: &Server,
        partner: &str,
        file: &Path,
        dataset: &str,
        extra: &[&str],
    ) -> Run {
        let mut args = vec![
            "upload",
            file.to_str().expect("utf-8 path"),
            "--dataset",
            dataset,
        ];
        args.extend_from_slice(extra);
        self.cli(server, partner, &args)
    }

    /// Write `csv` to a file and upload it as `partner`'s `dataset`, keyed by `website`.
    pub fn upload_csv(&self, server: &Server, partner: &str, dataset: &str, csv: &str) -> Run {
        let f = self.file(&format!("{partner}-{dataset}.csv"), csv.as_bytes());
        self.upload(server, partner, &f, dataset, &["--key-column", "website"])
    }

    /// A raw POST of `body` to `path` as `partner`'s admin: the status and the exact body,
    /// which the CLI does not show.
    pub fn raw_post(
        &self,
        server: &Server,
        partner: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, String) {
        let url = format!("{}/{path}", server.url);
        let (status, _, text) = raw(&self.bundle(partner), |http| http.post(url).json(body));
        (status, text)
    }

    /// Datasets of `partner` as JSON.
    pub fn datasets(&self, server: &Server, partner: &str) -> serde_json::Value {
        let r = self
            .cli(server, partner, &["datasets", "--format", "json"])
            .ok();
        serde_json::from_str(&r.stdout).expect("datasets json")
    }

    /// Names of `partner`'s listed datasets, sorted.
    pub fn dataset_names(&self, server: &Server, partner: &str) -> Vec<String> {
        self.dataset_rows(server, partner).into_keys().collect()
    }

    /// `partner`'s listed datasets with their row counts.
    pub fn dataset_rows(
        &self,
        server: &Server,
        partner: &str,
    ) -> std::collections::BTreeMap<String, usize> {
        self.datasets(server, partner)["datasets"]
            .as_array()
            .expect("datasets")
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().expect("name").to_string(),
                    d["rows"].as_u64().expect("rows") as usize,
                )
            })
            .collect()
    }

    /// Every audit record, operator view (`escrow audit list --format json`).
    /// The audit log's file (of the single-node default).
    fn audit_file(&self) -> PathBuf {
        self.data.join("audit/log.jsonl")
    }

    /// The stored audit log's lines (without newlines): the data directory's file, or the
    /// catalog's rows where the catalog is PostgreSQL.
    pub fn stored_audit_lines(&self) -> Vec<String> {
        match &self.catalog {
            None => std::fs::read_to_string(self.audit_file())
                .expect("audit log")
                .lines()
                .map(String::from)
                .collect(),
            Some(db) => catalog_of(db)
                .read(|tx| tx.column("SELECT line FROM audit_lines ORDER BY pos", &[]))
                .expect("audit lines"),
        }
    }

    /// Replace the stored audit log's lines with `lines` (tampering, and putting it back).
    pub fn store_audit_lines(&self, lines: &[String]) {
        match &self.catalog {
            None => {
                let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
                std::fs::write(self.audit_file(), text).expect("write log");
            }
            Some(db) => catalog_of(db)
                .write(|tx| {
                    tx.execute("DELETE FROM audit_lines", &[])?;
                    for (i, line) in lines.iter().enumerate() {
                        tx.execute(
                            "INSERT INTO audit_lines (pos, line) VALUES (?1, ?2)",
                            &[(i as i64 + 1).into(), line.into()],
                        )?;
                    }
                    Ok(())
                })
                .expect("write audit lines"),
        }
    }

    /// Make the stored audit log unwritable (`true`), or writable again: the file replaced by
    /// a directory, or the catalog's table renamed.
    pub fn block_audit_log(&self, blocked: bool) {
        match &self.catalog {
            None => {
                let log = self.audit_file();
                let aside = log.with_extension("aside");
                if blocked {
                    std::fs::rename(&log, &aside).expect("move");
                    std::fs::create_dir(&log).expect("block");
                } else {
                    std::fs::remove_dir(&log).expect("unblock");
                    std::fs::rename(&aside, &log).expect("restore");
                }
            }
            Some(db) => {
                let (from, to) = if blocked {
                    ("audit_lines", "audit_lines_aside")
                } else {
                    ("audit_lines_aside", "audit_lines")
                };
                catalog_of(db)
                    .write(|tx| tx.batch(&format!("ALTER TABLE {from} RENAME TO {to}")))
                    .expect("rename");
            }
        }
    }

    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let d = self.data.to_str().expect("utf-8 path").to_string();
        let out = self
            .op(&["audit", "list", "--format", "json", "--data-dir", &d])
            .ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("audit list is not json ({e}): {}", out.stdout));
        v.as_array().expect("records").clone()
    }

    /// Files in the data directory's `tmp/` (uploads in flight or left by a crash).
    /// Start uploading `file` as `partner`'s `dataset` to `server` in the background and
    /// return once the server is writing it (a non-empty temp file): a crash from here on is
    /// mid-upload.
    pub fn upload_in_flight(
        &self,
        server: &Server,
        partner: &str,
        file: &Path,
        dataset: &str,
    ) -> Child {
        let upload = Command::new(BIN)
            .args([
                "upload",
                file.to_str().expect("utf-8 path"),
                "--dataset",
                dataset,
            ])
            .env("ESCROW_IDENTITY", self.bundle(partner))
            .env("ESCROW_SERVER", &server.url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("upload");
        let writing = poll_until((60, 5), || {
            (self.temp_files().iter())
                .any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
                .then_some(())
        });
        assert!(writing.is_some(), "the upload never started writing");
        upload
    }

    pub fn temp_files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data.join("tmp"))
            .expect("tmp")
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    /// The distinct key-encryption key ids the catalog's data keys are wrapped under.
    pub fn kek_ids(&self) -> Vec<String> {
        let c = rusqlite::Connection::open(self.data.join("escrow.db")).expect("catalog");
        let mut st = c
            .prepare("SELECT DISTINCT kek_id FROM dataset_versions")
            .expect("q");
        st.query_map([], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("ids")
    }

    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, contents).expect("write test file");
        p
    }

    /// Every regular file under the data directory.
    pub fn data_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.data, &mut out);
        out
    }

    /// The keys of the sealed versions in the object store (the data directory's, or the
    /// test bucket).
    pub fn sealed_objects(&self) -> Vec<String> {
        let objects: escrow::objects::SharedObjects = match &self.objects {
            Some(bucket) => bucket.open(),
            None => std::sync::Arc::new(
                escrow::objects::local::LocalObjects::new(&self.data).expect("objects"),
            ),
        };
        let listed = objects.list(escrow::objects::DATASETS).expect("list");
        (listed.into_iter().map(|m| m.key))
            .filter(|k| escrow::objects::parse_version_key(k).is_some())
            .collect()
    }

    /// What versions were reduced to, sealed beside them (overlap sides, a version's
    /// companies: `Store::seal_derived`).
    pub fn derived_files(&self) -> Vec<PathBuf> {
        self.data_files()
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "derived"))
            .collect()
    }

    /// Wait (60 s at most) until `n` objects derived from versions are sealed beside them
    /// (they are written in the background, a second after uploads and questions, at the
    /// lowest priority: a loaded machine runs them last).
    pub fn wait_derived(&self, n: usize) -> Vec<PathBuf> {
        let derived = poll_until((60, 20), || {
            Some(self.derived_files()).filter(|d| d.len() >= n)
        });
        derived.unwrap_or_else(|| panic!("{} of {n} derived objects", self.derived_files().len()))
    }

    /// Sealed dataset files.
    pub fn sealed_files(&self) -> Vec<PathBuf> {
        self.data_files()
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "sealed"))
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.data).status();
        }
    }
}

/// A running server process; killed when dropped. With `ESCROW_TEST_NODES=2`, two: `url`
/// is then the balancer's, and `peer` the second node.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    pub peer: Option<Box<Server>>,
    proxy: Option<Proxy>,
}

impl Server {
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
        if let Some(peer) = &mut self.peer {
            peer.kill9();
        }
    }

    /// The node's own address (not the balancer's).
    fn addr(&self) -> std::net::SocketAddr {
        self.url
            .trim_start_matches("https://")
            .parse()
            .expect("listen address")
    }

    /// Wait (up to 60 s) for the server to exit on its own; returns how it ended.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let exited = poll_until((60, 20), || self.child.try_wait().expect("wait"));
        exited.unwrap_or_else(|| panic!("server did not exit:\n{}", self.log()))
    }

    /// SIGTERM and wait; returns the exit status (of the first node, when there are two:
    /// the second must stop cleanly too).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(peer) = &mut self.peer {
            let s = peer.terminate();
            assert!(s.success(), "the second node: {s:?}\n{}", peer.log());
        }
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let stopped = poll_until((20, 50), || self.child.try_wait().expect("wait"));
        stopped.expect("server did not stop on SIGTERM")
    }

    /// Wait (up to 20 s) until the server's log contains `needle`; panics with the log if not.
    pub fn wait_log(&self, needle: &str) {
        let logged = poll_until((20, 20), || self.log().contains(needle).then_some(()));
        assert!(
            logged.is_some(),
            "server never logged {needle:?}:\n{}",
            self.log()
        );
    }

    /// CPU time (user + system) the server process has used so far, from /proc (threads that
    /// have ended included).
    pub fn cpu_secs(&self) -> f64 {
        stat_cpu(&format!("/proc/{}/stat", self.child.id()))
            .expect("/proc/PID/stat")
            .1
    }

    /// CPU seconds used so far by the server's live threads, summed by thread name
    /// (`escrow-query`, `tokio-rt-worker`, ...): for messages, not measurements (a thread
    /// that ends takes its time out of the sum).
    pub fn thread_cpu_secs(&self) -> std::collections::BTreeMap<String, f64> {
        let mut by_name = std::collections::BTreeMap::new();
        let tasks =
            std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("/proc/PID/task");
        for task in tasks.flatten() {
            // a thread may end between the listing and the read
            if let Some((name, secs)) = stat_cpu(&task.path().join("stat").to_string_lossy()) {
                *by_name.entry(name).or_insert(0.0) += secs;
            }
        }
        by_name
    }

    /// What the server logged (both nodes', when there are two).
    pub fn log(&self) -> String {
        let mut log = self.log.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(peer) = &self.peer {
            log.push_str(&peer.log());
        }
        log
    }

    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A round-robin TCP balancer in front of two nodes: each accepted connection is piped to
/// the next node in turn (bytes only; TLS is between the client and the node).
struct Proxy {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn start(nodes: [std::net::SocketAddr; 2]) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("balancer");
        let addr = listener.local_addr().expect("balancer address");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for (i, client) in listener.incoming().enumerate() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let node = nodes[i % 2];
                std::thread::spawn(move || pipe(client, node));
            }
        });
        Proxy { addr, stop }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // wake the accept loop so it sees the stop
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// Copy both ways between a client and a node until both sides are done.
fn pipe(client: std::net::TcpStream, node: std::net::SocketAddr) {
    use std::net::Shutdown;
    let Ok(upstream) = std::net::TcpStream::connect(node) else {
        return; // the node is gone: the client sees the connection close
    };
    let (Ok(mut from_client), Ok(mut to_node)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_node);
        let _ = to_node.shutdown(Shutdown::Write);
    });
    let (mut from_node, mut to_client) = (upstream, client);
    let _ = std::io::copy(&mut from_node, &mut to_client);
    let _ = to_client.shutdown(Shutdown::Write);
    let _ = up.join();
}

/// The outcome of a CLI run.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run a command built by the test (the escrow binary with arguments of its own).
pub fn run(cmd: Command) -> Run {
    Run::of(cmd)
}

impl Run {
    fn of(mut cmd: Command) -> Run {
        let Output {
            status,
            stdout,
            stderr,
        } = cmd.stdin(Stdio::null()).output().expect("run escrow");
        Run {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// Assert success and return self.
    pub fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "command failed: {self:?}");
        self
    }

    /// Assert the command succeeded or was refused cleanly: not killed, and a refusal is one
    /// line that is not an internal error (`what` names the input; the server log is shown).
    pub fn ok_or_clean_refusal(self, what: &str, server: &Server) -> Run {
        assert!(self.code.is_some(), "{what}: CLI killed by a signal");
        if self.code != Some(0) {
            assert_eq!(self.stderr.lines().count(), 1, "{what}: {}", self.stderr);
            assert!(
                !self.stderr.contains("(internal)"),
                "{what}: internal error: {}\n{}",
                self.stderr,
                server.log()
            );
        }
        self
    }

    /// Assert failure with a one-line message that contains `needle`.
    pub fn fails_with(self, needle: &str) -> Run {
        assert_ne!(self.code, Some(0), "command should have failed: {self:?}");
        assert!(self.code.is_some(), "command died from a signal: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "error must be one line: {:?}", self.stderr);
        assert!(
            self.stderr.contains(needle),
            "expected {needle:?} in {:?}",
            self.stderr
        );
        self
    }
}

/// A CSV of `n` accounts with distinctive names and ids.
/// Command-line words, for arguments without spaces: `words("policy grant accounts")`.
/// `ready()` until it gives a value, checked every `every_ms` for `secs` seconds at most;
/// `None` if it never did (the caller fails with what it waited for).
pub fn poll_until<T>(
    (secs, every_ms): (u64, u64),
    mut ready: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = ready() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(every_ms));
    }
}

pub fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// The store of a data directory on its own files, opened in the test process.
pub fn open_store(data: &Path) -> escrow::store::Store {
    let dir = escrow::datadir::DataDir::new(data);
    let objects = escrow::s3::open_objects(&dir).expect("objects");
    escrow::store::Store::open(dir, escrow::store::StoreConfig::default(), objects).expect("store")
}

pub fn accounts_csv(n: usize, tag: &str) -> String {
    let mut s = String::from("account_id,company_name,website,status,region,arr_usd,employees\n");
    for i in 0..n {
        let status = ["customer", "opportunity", "prospect"][i % 3];
        let region = ["NA", "EMEA", "APAC"][i % 3];
        s.push_str(&format!(
            "{tag}-{i:06},Zyqx{tag}Corp{i} Holdings,https://www.zyqx{tag}{i}.example/about,{status},{region},{}.5,{}\n",
            1000 + i,
            10 + i
        ));
    }
    s
}

/// The workspace's sibling `shared/` directory (test vectors, generator).
pub fn shared_dir() -> PathBuf {
    if let Ok(d) = std::env::var("ESCROW_SHARED_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The name and CPU seconds (user + system) in a /proc `stat` file; `None` if it is gone.
fn stat_cpu(path: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    // fields after the parenthesised name; utime and stime are fields 14 and 15
    let f: Vec<&str> = stat[close + 2..].split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let hz = HZ.get_or_init(|| {
        let out = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .expect("getconf");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("CLK_TCK")
    });
    Some((stat[open + 1..close].to_string(), ticks / hz))
}

/// A raw request as the identity `bundle`, made by `build` from a client: the status, the
/// `Retry-After` header and the body, which the CLI does not show.
pub fn raw(
    bundle: &Path,
    build: impl FnOnce(&reqwest::Client) -> reqwest::RequestBuilder,
) -> (u16, Option<String>, String) {
    raw_with(bundle, |c| c, build).expect("send")
}

/// [`raw`] with the client built by `client` (names resolved elsewhere, say); the error
/// when the request cannot be sent (a TLS handshake refused).
pub fn raw_with(
    bundle: &Path,
    client: impl FnOnce(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
    build: impl FnOnce(&reqwest::Client) -> reqwest::RequestBuilder,
) -> Result<(u16, Option<String>, String), String> {
    let config = escrow::server::tls::client_config(bundle).expect("tls config");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let http = client(reqwest::Client::builder().tls_backend_preconfigured(config))
            .build()
            .expect("client");
        let resp = build(&http).send().await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().expect("ascii").to_string());
        Ok((status, retry, resp.text().await.expect("body")))
    })
}

/// A connection to a test's PostgreSQL catalog, to read or tamper with it directly.
fn catalog_of(db: &escrow::catalog::testdb::TestDatabase) -> escrow::catalog::Catalog {
    escrow::catalog::Catalog::connect(db.url()).expect("catalog")
}
