//! The service's entry point: [`Application::build`] turns a [`Config`] into a bound,
//! recovered, audited server; [`Application::run_until`] serves until a shutdown signal.
//! `escrow serve` is argument parsing around these two calls; tests and embedders use them
//! directly (port 0 binds a free port, [`Application::local_addr`] tells which).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{Actor, Event, Outcome};
use crate::datadir::DataDir;
use crate::server::{self, AppState, limits, sessions};
use crate::store::{Store, StoreConfig};
use crate::{Error, Result};

/// How often the audit log's tail is certified (so a partner's kept checkpoint is recent).
const AUDIT_CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// How often a node compares its revocation list with the catalog's revocations.
const CRL_FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Everything `escrow serve` can be told. `Default` is the documented defaults of its flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: DataDir,
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The certificate the server presents: `None`, the one the escrow CA issued for the
    /// data directory.
    pub server_cert: Option<server::tls::ServerCert>,
    /// Largest upload accepted, in bytes.
    pub max_upload_bytes: u64,
    /// Time in-flight requests get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Memory one query may use before admission (nothing spills to disk).
    pub query_memory_bytes: usize,
    /// Time one query may run.
    pub query_timeout: Duration,
    /// Verified plaintext batches kept in memory across queries.
    pub query_cache_bytes: usize,
    /// Memory admitted questions share for other partners' data; `None`: max_questions x
    /// query_memory_bytes.
    pub admitted_memory_bytes: Option<usize>,
    /// How long a console sign-in link stays valid (clamped to 1 s .. 1 h).
    pub console_link: Duration,
    /// Lifetime of the identity certificates this node issues (renewals, and invitations
    /// an admin makes through the API), in days.
    pub cert_days: u32,
    /// Uploads and questions running at once, per partner and in all, and how long a request
    /// waits for a server-wide slot.
    pub admission: limits::Limits,
}

impl Config {
    /// The defaults, on a data directory.
    pub fn new(data_dir: DataDir) -> Self {
        Config {
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            server_cert: None,
            max_upload_bytes: 2 << 30,
            shutdown_grace: Duration::from_secs(30),
            query_memory_bytes: 1 << 30,
            query_timeout: Duration::from_secs(60),
            query_cache_bytes: 1 << 30,
            admitted_memory_bytes: None,
            console_link: Duration::from_secs(300),
            cert_days: escrow_store::pki::DEFAULT_CERT_DAYS,
            admission: limits::Limits {
                uploads: limits::Limit {
                    per_partner: 2,
                    total: 16,
                },
                questions: limits::Limit {
                    per_partner: 4,
                    total: 8,
                },
                wait: Duration::from_millis(1000),
            },
        }
    }
}

/// A server that is bound, has recovered its data directory and audited its startup, and
/// is ready to serve.
pub struct Application {
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    addr: SocketAddr,
    grace: Duration,
}

impl Application {
    /// Initialise the data directory if empty, open and recover the store, bind the
    /// listener and write the startup record to the audit log. A log that cannot be
    /// continued (truncated, replaced, unwritable) fails here instead of serving unaudited.
    pub async fn build(config: Config) -> Result<Application> {
        if crate::faults::ignored() {
            tracing::warn!(
                "{} is set, but this build has no fault points (feature fault-injection): ignored",
                crate::faults::ENV
            );
        }
        let dir = config.data_dir.clone();
        let report = crate::admin::init(&dir, &[])?;
        if report.created_anything() {
            tracing::info!(data_dir = %dir.root().display(), ?report, "initialised data directory");
        }
        let store = Store::open(
            dir.clone(),
            StoreConfig {
                max_upload_bytes: config.max_upload_bytes,
                cache_bytes: config.query_cache_bytes,
                ..StoreConfig::default()
            },
            crate::s3::open_objects(&dir)?,
        )?;
        let recovery = store.recover()?;
        tracing::info!(
            partial_uploads_removed = recovery.partial_uploads_removed,
            orphan_files_removed = recovery.orphan_files_removed,
            empty_datasets_removed = recovery.empty_datasets_removed,
            key_rotation = recovery.key_rotation.as_deref().unwrap_or("none"),
            "startup recovery done"
        );
        let cert = config
            .server_cert
            .clone()
            .unwrap_or_else(|| server::tls::ServerCert::of(&dir));
        let tls = server::tls::server_config(&dir, cert)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| {
                Error::bad(
                    "cannot_listen",
                    format!("cannot listen on {}: {e}", config.listen),
                )
            })?;
        let addr = listener.local_addr()?;
        store.record(&Event::new(
            "startup",
            Actor::system(),
            Outcome::Ok,
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "listen": addr.to_string(),
                "recovery": {
                    "partial_uploads_removed": recovery.partial_uploads_removed,
                    "orphan_files_removed": recovery.orphan_files_removed,
                    "empty_datasets_removed": recovery.empty_datasets_removed,
                    "key_rotation": recovery.key_rotation,
                },
                "audit_public_key": store.audit_log().public_key(),
            }),
        ))?;
        let store = Arc::new(store);
        let noise_key = crate::crypto::keys::load_secret(&dir.noise_key(), "noise key")?;
        let admitted = config.admitted_memory_bytes.unwrap_or(
            config
                .admission
                .questions
                .total
                .saturating_mul(config.query_memory_bytes),
        );
        let queries = crate::queries::QueryService::new(
            store.clone(),
            escrow_query::NoiseKey::new(*noise_key),
            crate::queries::QueryConfig {
                limits: escrow_query::Limits {
                    memory_bytes: config.query_memory_bytes,
                    ..Default::default()
                },
                timeout: config.query_timeout,
                shared_memory_bytes: admitted,
                ..Default::default()
            },
        )?;
        let state = Arc::new(AppState {
            sessions: sessions::Sessions::new(
                config
                    .console_link
                    .clamp(Duration::from_secs(1), Duration::from_secs(3600)),
            ),
            access: Arc::new(crate::access::Access::new(store.clone())),
            store,
            queries: Arc::new(queries),
            admission: limits::Admission::new(config.admission),
            cert_days: config.cert_days,
        });
        tracing::info!(%addr, data_dir = %dir.root().display(), "escrow serving");
        Ok(Application {
            state,
            listener,
            tls,
            addr,
            grace: config.shutdown_grace,
        })
    }

    /// The address the server is bound to (the chosen port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until `shutdown` resolves, then let in-flight requests finish for up to the
    /// grace period, certify the audit log's tail and record the shutdown.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let store = self.state.store.clone();
        let checkpoints = {
            let store = store.clone();
            tokio::spawn(async move {
                let period = AUDIT_CHECKPOINT_EVERY;
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                loop {
                    tick.tick().await;
                    let s = store.clone();
                    match tokio::task::spawn_blocking(move || s.audit_checkpoint()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "audit checkpoint failed"),
                        Err(e) => tracing::error!(error = %e, "audit checkpoint task failed"),
                    }
                }
            })
        };
        let crl = tokio::spawn(follow_revocations(store.clone()));
        server::serve(self.state, self.listener, self.tls, shutdown, self.grace).await;
        checkpoints.abort();
        crl.abort();
        let stopped = Event::new(
            "shutdown",
            Actor::system(),
            Outcome::Ok,
            serde_json::json!({}),
        );
        if let Err(e) = store
            .record(&stopped)
            .and_then(|()| store.audit_checkpoint())
        {
            tracing::error!(error = %e, "could not record the shutdown in the audit log");
        }
        // Then the seals written for the next process (`Store::later`), within the grace
        // (otherwise it reduces again what they hold): after the audit record, which a
        // service manager's stop timeout must not cut off for an optional seal.
        let (sealing, grace) = (store.clone(), self.grace);
        match tokio::task::spawn_blocking(move || sealing.wait_later(grace)).await {
            Ok(true) => {}
            _ => {
                tracing::warn!("shutting down with seals unwritten: the next process reduces again")
            }
        }
        tracing::info!("escrow stopped");
        Ok(())
    }
}

/// Keep this node's revocation list (`DIR/ca/crl.pem`, which its TLS handshakes check) the
/// catalog's: revocations live in the catalog, so one made on any node or by an operator on
/// any host reaches every node's handshakes within [`CRL_FOLLOW_EVERY`]. (Requests are
/// refused from the moment of the revocation either way: every request's identity is looked
/// up in the catalog.) Written at startup, then whenever the catalog's CRL number moves.
async fn follow_revocations(store: Arc<Store>) {
    let mut written = None;
    let mut tick = tokio::time::interval(CRL_FOLLOW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (s, last) = (store.clone(), written);
        let followed = tokio::task::spawn_blocking(move || -> Result<u64> {
            // The number each second; the list only when it moved.
            let number = s.catalog().crl_number()?;
            if last == Some(number) {
                return Ok(number);
            }
            let (revoked, number) = s.catalog().revocations()?;
            crate::pki::write_crl(s.data_dir(), &revoked, number)?;
            tracing::debug!(number, "revocation list written from the catalog");
            Ok(number)
        })
        .await;
        match followed {
            Ok(Ok(number)) => written = Some(number),
            Ok(Err(e)) => tracing::error!(error = %e, "revocation list not followed"),
            Err(e) => tracing::error!(error = %e, "revocation list task failed"),
        }
    }
}
