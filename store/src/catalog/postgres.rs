//! The shared catalog: PostgreSQL, for several escrow nodes (`--catalog postgres://...`).
//!
//! Connections come from a deadpool pool driven by a small runtime of the catalog's own, so
//! the catalog keeps its blocking interface (callers run it on the blocking pool, as with
//! SQLite) and a call made from inside another runtime cannot deadlock against it. Write
//! transactions take one transaction-scoped advisory lock first: writers queue on every
//! node as SQLite's `BEGIN IMMEDIATE` makes them queue on one, which keeps a budget spent
//! exactly once and the audit chain linear without retry loops. Reads run in a read-only
//! repeatable-read transaction (one consistent view).

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::sql::{Backend, Conn, Mode, Row, Tx, Value, dollar_params};
use crate::blocking::Driver;
use crate::{Error, Result};

/// The advisory lock every write transaction holds ("escrow" in ASCII).
const WRITE_LOCK: i64 = 0x0000_6573_6372_6f77;

/// How long a writer waits for the write lock before its action fails (writes are short:
/// a minute of waiting means something is stuck).
const LOCK_WAIT_SECS: u32 = 60;

/// How long a write transaction may sit idle (its node stalled or gone) before the server
/// ends it and frees the write lock for every other node.
const IDLE_IN_WRITE_SECS: u32 = 30;

pub struct Postgres {
    /// Declared before the runtime: the pool's connections close first.
    pool: Pool,
    runtime: Driver,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

impl Postgres {
    /// Connect to `url` (`postgres://user@host:port/database?...`); fails if the server
    /// cannot be reached.
    pub fn connect(url: &str) -> Result<Self> {
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::bad(
                "bad_catalog_url",
                format!("--catalog: not a PostgreSQL URL: {e}"),
            )
        })?;
        // The server's notices ("relation ... already exists, skipping" when the schema is
        // checked) are not for the operator's terminal: warnings and errors only.
        if config.get_options().is_none() {
            config.options("-c client_min_messages=warning");
        }
        // A peer that vanished is noticed in about a minute, not the kernel's two hours.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            .connect_timeout(Duration::from_secs(10));
        let runtime = Driver::new("escrow-catalog", 1)?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| Error::internal(format!("catalog pool: {e}")))?;
        let pg = Postgres { pool, runtime };
        // Fail now, with the reason, rather than at the first request.
        drop(pg.client()?);
        Ok(pg)
    }

    /// Wait for `f` on this thread, with the catalog's runtime driving its I/O and timers.
    fn wait<F: Future>(&self, f: F) -> Result<F::Output> {
        self.runtime.wait(f)
    }

    /// A pooled connection in a new transaction of `mode` (writers hold the write lock).
    fn begin(&self, mode: Mode) -> Result<Open<'_>> {
        // Isolation named, never the server's default: a writer's statements must see what
        // the writer before it committed, so each takes its snapshot after the lock (READ
        // COMMITTED); under a REPEATABLE READ default the snapshot would predate the lock and
        // a budget could be spent twice. A writer that stalls (a node gone without closing
        // its connection) is cut off rather than holding every node's writes.
        let begin = match mode {
            Mode::Read => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".to_string(),
            Mode::Write | Mode::DryRun => format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE;
                 SET LOCAL lock_timeout = '{LOCK_WAIT_SECS}s';
                 SET LOCAL idle_in_transaction_session_timeout = '{IDLE_IN_WRITE_SECS}s';
                 SELECT pg_advisory_xact_lock({WRITE_LOCK})"
            ),
        };
        // Sent with the first statement, in one round trip: the server runs them in order,
        // so the statement runs inside the transaction, after the write lock; a transaction
        // that runs no statement never begins.
        Ok(Open {
            pg: self,
            client: Some(self.client()?),
            deferred: RefCell::new(Some(begin)),
            at_commit: RefCell::new(Vec::new()),
            finished: false,
        })
    }

    fn client(&self) -> Result<Object> {
        self.wait(self.pool.get())?
            .map_err(|e| Error::internal(format!("catalog: cannot reach PostgreSQL: {e}")))
    }
}

/// One pooled connection inside a transaction; rolled back when dropped unfinished (an
/// error or a panic in the caller's function), so it returns to the pool clean.
struct Open<'a> {
    pg: &'a Postgres,
    /// Taken only when a read ends in the background.
    client: Option<Object>,
    /// The transaction's `BEGIN`, until the first statement takes it along.
    deferred: RefCell<Option<String>>,
    /// Statements sent with the `COMMIT` (`Tx::execute_at_commit`).
    at_commit: RefCell<Vec<(tokio_postgres::Statement, Vec<Value>)>>,
    finished: bool,
}

impl Open<'_> {
    fn client(&self) -> Result<&Object> {
        self.client
            .as_ref()
            .ok_or_else(|| Error::internal("catalog: a transaction's connection is gone"))
    }

    /// Whether the transaction was opened on the server (with its first statement).
    fn begun(&self) -> bool {
        self.deferred.borrow().is_none()
    }

    /// Commit a write: its statements queued for the commit, then `COMMIT`, in one round
    /// trip (with the `BEGIN` too if nothing ran before). A queued statement that fails
    /// fails the commit: the server then ends the transaction with a rollback.
    fn commit(mut self) -> Result<()> {
        self.finished = true;
        let queued = self.at_commit.take();
        if queued.is_empty() && !self.begun() {
            return Ok(());
        }
        let client = self.client()?;
        // A statement that fails at the server aborts the transaction, and the COMMIT behind
        // it then rolls back; one that fails before it is sent (its parameters would not
        // encode) is seen here first, and the transaction is rolled back instead.
        let failed = std::sync::atomic::AtomicBool::new(false);
        let failed = &failed;
        let mut requests: Vec<Request<'_>> = queued
            .iter()
            .map(|(st, params)| -> Request<'_> {
                Box::pin(async move {
                    let done = client.execute(st, &Self::params(params)).await.map(drop);
                    if done.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    done
                })
            })
            .collect();
        requests.push(Box::pin(async move {
            let end = if failed.load(std::sync::atomic::Ordering::Relaxed) {
                "ROLLBACK"
            } else {
                "COMMIT"
            };
            client.batch_execute(end).await
        }));
        let all = async { Ok::<_, tokio_postgres::Error>(in_order(requests).await) };
        for done in self.send(all)? {
            done?;
        }
        Ok(())
    }

    /// End a dry run: `ROLLBACK` (its queued statements never run).
    fn roll_back(mut self) -> Result<()> {
        self.finished = true;
        if !self.begun() {
            return Ok(());
        }
        Ok(self.pg.wait(self.client()?.batch_execute("ROLLBACK"))??)
    }

    /// End a read without waiting: the connection goes back to the pool once its
    /// `ROLLBACK` is done (or is closed if that fails). A read-only transaction has nothing
    /// to make durable, so its caller need not wait for the round trip.
    fn end_read(mut self) -> Result<()> {
        self.finished = true;
        let Some(client) = self.client.take().filter(|_| self.begun()) else {
            return Ok(());
        };
        let ended = self.pg.runtime.spawn(async move {
            if let Err(e) = client.batch_execute("ROLLBACK").await {
                tracing::warn!(error = %e, "catalog: ending a read failed; connection closed");
                drop(Object::take(client));
            }
        });
        ended.map(|_| ())
    }

    /// Wait for `request`; a deferred `BEGIN` goes first, pipelined with it.
    fn send<T>(
        &self,
        request: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        let Some(begin) = self.deferred.borrow_mut().take() else {
            return Ok(self.pg.wait(request)??);
        };
        let client = self.client()?;
        // tokio-postgres queues a request when its future is first polled, and answers in
        // order: `biased` polls the BEGIN first, so it is queued before the statement.
        let (began, out) = self
            .pg
            .wait(async { tokio::join!(biased; client.batch_execute(&begin), request) })?;
        began?;
        Ok(out?)
    }

    fn params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
        params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
    }

    fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement> {
        // Prepared once per connection, outside the pipeline (usually cached: no round trip).
        Ok(self
            .pg
            .wait(self.client()?.prepare_cached(&dollar_params(sql)))??)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if self.finished || !self.begun() {
            return;
        }
        let Some(client) = self.client.take() else {
            return;
        };
        match self.pg.wait(client.batch_execute("ROLLBACK")) {
            Ok(Ok(())) => {}
            failed => {
                // Not back to the pool: it may still be inside the transaction.
                if let Ok(Err(e)) = failed {
                    tracing::warn!(error = %e, "catalog: rollback failed; connection closed");
                }
                drop(Object::take(client));
            }
        }
    }
}

impl Conn for Open<'_> {
    fn execute(&self, sql: &str, params: &[Value]) -> Result<usize> {
        let st = self.statement(sql)?;
        let params = Self::params(params);
        let n = self.send(self.client()?.execute(&st, &params))?;
        Ok(n as usize)
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let st = self.statement(sql)?;
        let params = Self::params(params);
        let rows = self.send(self.client()?.query(&st, &params))?;
        rows.iter().map(row).collect()
    }

    fn batch(&self, sql: &str) -> Result<()> {
        self.send(self.client()?.batch_execute(sql))
    }

    fn execute_at_commit(&self, statements: Vec<(String, Vec<Value>)>) -> Result<()> {
        let mut queued = self.at_commit.borrow_mut();
        for (sql, params) in statements {
            queued.push((self.statement(&sql)?, params));
        }
        Ok(())
    }
}

/// A request to the server, as `in_order` takes them.
type Request<'a> = std::pin::Pin<
    Box<dyn Future<Output = std::result::Result<(), tokio_postgres::Error>> + Send + 'a>,
>;

/// Wait for every one of `requests`, polling them in their order each time: tokio-postgres
/// sends a request when its future is first polled, so they reach the server in this order,
/// together (`join_all` promises no polling order).
async fn in_order<F: Future + Unpin>(mut requests: Vec<F>) -> Vec<F::Output> {
    let mut out: Vec<Option<F::Output>> = requests.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (request, done) in requests.iter_mut().zip(out.iter_mut()) {
            if done.is_none() {
                match std::pin::Pin::new(request).poll(cx) {
                    std::task::Poll::Ready(v) => *done = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

fn row(r: &tokio_postgres::Row) -> Result<Row> {
    let mut out = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let ty = c.type_();
        let v = match *ty {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Real),
            Type::FLOAT4 => r
                .try_get::<_, Option<f32>>(i)?
                .map(|v| Value::Real(v.into())),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                r.try_get::<_, Option<String>>(i)?.map(Value::Text)
            }
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
            _ => {
                return Err(Error::internal(format!(
                    "catalog: column {} has type {ty}, which the catalog does not use",
                    c.name()
                )));
            }
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

/// A value as the parameter type PostgreSQL inferred for its place: the catalog's SQL is
/// shared with SQLite, whose integers and reals are 64-bit, so an integer may meet an
/// `int4` parameter (checked, never truncated) and any value a text one.
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match (self, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(i), &Type::INT8) => i.to_sql(ty, out),
            (Value::Int(i), &Type::INT4) => i32::try_from(*i)?.to_sql(ty, out),
            (Value::Int(i), &Type::INT2) => i16::try_from(*i)?.to_sql(ty, out),
            (Value::Int(i), &Type::FLOAT8) => (*i as f64).to_sql(ty, out),
            (Value::Int(i), &Type::BOOL) => (*i != 0).to_sql(ty, out),
            (Value::Real(f), &Type::FLOAT8) => f.to_sql(ty, out),
            (Value::Int(i), _) => i.to_string().to_sql(ty, out),
            (Value::Real(f), _) => f.to_string().to_sql(ty, out),
            (Value::Text(s), _) => s.as_str().to_sql(ty, out),
            (Value::Blob(b), _) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl Backend for Postgres {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn run(&self, mode: Mode, f: &mut dyn FnMut(&Tx<'_>) -> Result<()>) -> Result<()> {
        let open = self.begin(mode)?;
        f(&Tx(&open))?;
        match mode {
            Mode::Write => open.commit(),
            Mode::DryRun => open.roll_back(),
            Mode::Read => open.end_read(),
        }
    }

    fn purge(&self) -> Result<()> {
        // PostgreSQL keeps a deleted row's bytes until VACUUM reuses its space; the wrapped
        // key in it is useless without the key-encryption key, which stays in the escrow's
        // data directory (docs/OPERATIONS.md).
        Ok(())
    }
}
