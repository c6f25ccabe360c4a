//! A PostgreSQL database of a test's own: created with a unique name on the server named by
//! `ESCROW_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`) and
//! dropped when the value is dropped. A server that cannot be reached fails the test: the
//! PostgreSQL suites never skip.
#![allow(clippy::expect_used, clippy::panic)] // test support: a failure fails the test

use std::sync::atomic::{AtomicU64, Ordering};

/// The server the PostgreSQL tests use.
pub fn server_url() -> String {
    std::env::var("ESCROW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty database; dropped (with any connection still open to it) on drop.
pub struct TestDatabase {
    name: String,
    url: String,
}

fn admin(sql: &str) -> Result<(), String> {
    let server = server_url();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("PostgreSQL at {server} (ESCROW_TEST_POSTGRES): {e}"))?;
        let driver = tokio::spawn(connection);
        let out = client.batch_execute(sql).await.map_err(|e| e.to_string());
        drop(client);
        let _ = driver.await;
        out
    })
}

impl TestDatabase {
    /// Create it; panics with the reason if the server cannot be reached.
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut random = [0u8; 6];
        getrandom::fill(&mut random).expect("random");
        let name = format!(
            "escrow_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            hex::encode(random)
        );
        // Under the strictest default a server may be given: the catalog names the isolation
        // of its transactions itself (a write under REPEATABLE READ would take its snapshot
        // before the write lock, and the budget race of the conformance suite would fail).
        // (Two statements: CREATE DATABASE runs outside any transaction.)
        admin(&format!("CREATE DATABASE {name}"))
            .and_then(|()| {
                admin(&format!(
                    "ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
                ))
            })
            .unwrap_or_else(|e| panic!("cannot create a test database: {e}"));
        let mut url = url::Url::parse(&server_url()).expect("ESCROW_TEST_POSTGRES is a URL");
        url.set_path(&name);
        TestDatabase {
            name,
            url: url.to_string(),
        }
    }

    /// Its URL, for `--catalog`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Default for TestDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Err(e) = admin(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}
