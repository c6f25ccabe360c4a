//! The client side of the CLI: mutually authenticated HTTPS to an escrow server with an
//! identity bundle (cert.pem, key.pem, ca.pem).

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use futures_util::TryStreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::io::ReaderStream;

use crate::model::enrollment::Token;
use crate::server::tls;
use crate::{pki, wire};

/// The key options of an upload (see `escrow upload --help`).
#[derive(Debug, Default, Clone, Copy)]
pub struct UploadKey<'a> {
    pub column: Option<&'a str>,
    pub name_column: Option<&'a str>,
    /// Comma-separated columns that must agree too when companies are matched by name.
    pub name_context: Option<&'a str>,
    /// Place columns, comma-separated, or `none` (detected when absent).
    pub places: Option<&'a str>,
    /// `website` (default) or `id`.
    pub key_type: Option<&'a str>,
    /// Declared CSV column types, `COL=TYPE,...` (`ingest::DeclaredSchema::to_param`).
    pub schema: Option<&'a str>,
}

/// A connection to an escrow server as one identity.
pub struct Client {
    http: reqwest::Client,
    base: String,
}

/// Guess the upload format from a file name; `None` lets the server sniff the content.
pub fn format_from_path(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "csv" => Some("csv"),
        "arrow" | "feather" | "ipc" => Some("arrow"),
        "arrows" => Some("arrow-stream"),
        "parquet" | "pq" => Some("parquet"),
        _ => None,
    }
}

impl Client {
    pub fn new(server: &str, identity: &Path) -> anyhow::Result<Self> {
        Self::trusting(server, identity, None)
    }

    /// [`Client::new`], trusting the server's certificate to chain to `server_ca` (the
    /// operator's CA, for a server started with `--tls-cert`) instead of the bundle's CA.
    pub fn trusting(
        server: &str,
        identity: &Path,
        server_ca: Option<&Path>,
    ) -> anyhow::Result<Self> {
        if !identity.join("cert.pem").exists() {
            bail!(
                "no identity bundle at {} (expected cert.pem, key.pem, ca.pem; set --identity or ESCROW_IDENTITY)",
                identity.display()
            );
        }
        finish_renewal(identity)?;
        let ca = server_ca.map_or_else(|| identity.join("ca.pem"), Path::to_path_buf);
        let config = tls::client_config_trusting(identity, &ca).map_err(|e| anyhow!("{e}"))?;
        Self::with_config(server, config)
    }

    /// A client without an identity (`escrow enroll`), trusting the server certificate to
    /// chain to the CA certificates of `ca_pem`.
    pub fn without_identity(server: &str, ca_pem: &[u8]) -> anyhow::Result<Self> {
        let config = tls::client_config_without_identity(ca_pem).map_err(|e| anyhow!("{e}"))?;
        Self::with_config(server, config)
    }

    fn with_config(server: &str, config: rustls::ClientConfig) -> anyhow::Result<Self> {
        // Never in clear text, never elsewhere: a token, a key's request or a partner's list
        // goes to the server named, over TLS, or nowhere.
        if !server.starts_with("https://") {
            bail!("the server URL must start with https:// (got {server:?})");
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the HTTPS client")?;
        Ok(Client {
            http,
            base: server.trim_end_matches('/').to_string(),
        })
    }

    /// Renew this client's certificate: a new key made here, its signing request sent over
    /// this connection, and the bundle at `bundle` replaced by the new key and certificate.
    pub async fn renew(&self, bundle: &Path) -> anyhow::Result<wire::Certificate> {
        // One renewal of a bundle at a time, and no command finishing one meanwhile.
        let _lock = lock_bundle(bundle)?;
        let me = self.whoami().await?;
        let (csr_pem, key_pem) =
            pki::new_request(&me.partner, &me.user).map_err(|e| anyhow!("{e}"))?;
        let cert: wire::Certificate = self
            .post("v1/renewals", &wire::RenewRequest { csr_pem }, "renewing")
            .await?;
        // Both new files first, then each over its old one: a renewal cut short between the
        // two is finished by the next command that loads the bundle ([`finish_renewal`]).
        let write = |file: &str, text: &str, private: bool| {
            let path = bundle.join(file);
            crate::fsutil::atomic_write(&path, text.as_bytes(), private)
                .map_err(|e| anyhow!("writing {}: {e}", path.display()))
        };
        write("key.pem.new", &key_pem, true)?;
        write("cert.pem.new", &cert.cert_pem, false)?;
        finish_renewal_locked(bundle)?;
        Ok(cert)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<T> {
        let bytes = self.send_raw(req, what).await?;
        serde_json::from_slice(&bytes).with_context(|| format!("{what}: unexpected response"))
    }

    /// Send a request; the body of a success, or the one-line error of a refusal.
    async fn send_raw(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<bytes::Bytes> {
        let resp = req
            .send()
            .await
            .map_err(|e| transport_error(e, &self.base))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transport_error(e, &self.base))?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(refusal(what, status, &bytes))
    }

    /// Stream a file to the server; shows a progress bar on a terminal.
    ///
    /// `key` names the column identifying companies (and how to read it).
    pub async fn upload(
        &self,
        file: &Path,
        dataset: &str,
        key: &UploadKey<'_>,
        format: Option<&str>,
    ) -> anyhow::Result<wire::UploadOutcome> {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open {}", file.display()))?;
        let meta = f.metadata().await?;
        // A pipe or FIFO (`/dev/stdin`) has no length: it is sent chunked.
        let declared = meta.is_file().then_some(meta.len());
        let len = meta.len();
        let bar = if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(len);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(format!("uploading {}", file.display()));
            Some(bar)
        } else {
            None
        };
        let progress = bar.clone();
        let stream = ReaderStream::with_capacity(f, 256 << 10).inspect_ok(move |chunk| {
            if let Some(b) = &progress {
                b.inc(chunk.len() as u64);
            }
        });
        let mut query: Vec<(&str, &str)> = Vec::new();
        for (param, value) in [
            ("key_column", key.column),
            ("name_column", key.name_column),
            ("name_context", key.name_context),
            ("places", key.places),
            ("key_type", key.key_type),
            ("schema", key.schema),
        ] {
            if let Some(v) = value {
                query.push((param, v));
            }
        }
        if let Some(fmt) = format.or_else(|| format_from_path(file)) {
            query.push(("format", fmt));
        }
        let mut req = self
            .http
            .put(format!("{}/v1/datasets/{dataset}", self.base))
            .query(&query);
        if let Some(len) = declared {
            req = req.header(reqwest::header::CONTENT_LENGTH, len);
        }
        let req = req.body(reqwest::Body::wrap_stream(stream));
        let out = self.send(req, "upload").await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        out
    }

    pub async fn datasets(&self) -> anyhow::Result<wire::DatasetList> {
        self.get("v1/datasets", &[], "listing datasets").await
    }

    pub async fn versions(&self, dataset: &str) -> anyhow::Result<wire::DatasetVersions> {
        self.get(
            &format!("v1/datasets/{dataset}/versions"),
            &[],
            "listing versions",
        )
        .await
    }

    pub async fn delete(&self, dataset: &str) -> anyhow::Result<wire::DatasetDeleted> {
        self.send(
            self.http
                .delete(format!("{}/v1/datasets/{dataset}", self.base)),
            "delete",
        )
        .await
    }

    /// GET `path` (under the server's base) with query parameters; the typed JSON answer.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        what: &str,
    ) -> anyhow::Result<T> {
        self.send(
            self.http.get(format!("{}/{path}", self.base)).query(query),
            what,
        )
        .await
    }

    /// POST a JSON body to `path`; the typed JSON answer.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &str,
    ) -> anyhow::Result<T> {
        self.send(
            self.http.post(format!("{}/{path}", self.base)).json(body),
            what,
        )
        .await
    }

    /// POST a JSON body to `path`; the raw answer as text (CSV answers).
    pub async fn post_text<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
        what: &str,
    ) -> anyhow::Result<String> {
        let bytes = self
            .send_raw(
                self.http.post(format!("{}/{path}", self.base)).json(body),
                what,
            )
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// GET an endpoint's body as text.
    pub async fn get_text(&self, path: &str, what: &str) -> anyhow::Result<String> {
        let bytes = self
            .send_raw(self.http.get(format!("{}/{path}", self.base)), what)
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Replace the policy with a casbin CSV document (`dry_run`: only say what would change).
    pub async fn import_policy(
        &self,
        document: Vec<u8>,
        dry_run: bool,
    ) -> anyhow::Result<wire::PolicyReplaced> {
        let query: &[(&str, &str)] = if dry_run { &[("dry_run", "true")] } else { &[] };
        self.send(
            self.http
                .post(format!("{}/v1/policies/import", self.base))
                .query(query)
                .header(reqwest::header::CONTENT_TYPE, "text/csv")
                .body(document),
            "import",
        )
        .await
    }

    pub async fn grant(&self, req: &wire::GrantRequest) -> anyhow::Result<wire::GrantChanged> {
        self.post("v1/policies/grants", req, "grant").await
    }

    pub async fn revoke(&self, req: &wire::GrantRequest) -> anyhow::Result<wire::GrantRevoked> {
        self.post("v1/policies/revocations", req, "revoke").await
    }

    pub async fn policies(&self) -> anyhow::Result<wire::GrantList> {
        self.get("v1/policies", &[], "listing policies").await
    }

    pub async fn populations(&self) -> anyhow::Result<wire::PopulationList> {
        self.get("v1/populations", &[], "listing populations").await
    }

    pub async fn define_population(
        &self,
        req: &wire::PopulationRequest,
    ) -> anyhow::Result<wire::PopulationChanged> {
        self.post("v1/populations", req, "defining the population")
            .await
    }

    pub async fn remove_population(
        &self,
        req: &wire::PopulationRequest,
    ) -> anyhow::Result<wire::PopulationRemoved> {
        self.post("v1/populations/removals", req, "removing the population")
            .await
    }

    pub async fn settings(&self, req: &wire::SettingsChange) -> anyhow::Result<wire::SettingsNow> {
        self.post("v1/policies/settings", req, "setting").await
    }

    /// The settings in force of each of the caller's datasets.
    pub async fn settings_list(&self) -> anyhow::Result<wire::SettingsList> {
        self.get("v1/policies/settings", &[], "reading settings")
            .await
    }

    /// The overlaps released to the caller with partner `with`, oldest first.
    pub async fn overlap_history(&self, with: &str) -> anyhow::Result<wire::OverlapHistory> {
        self.get("v1/overlaps/history", &[("with", with)], "overlap history")
            .await
    }

    /// Run a query; the JSON answer.
    pub async fn query(&self, sql: &str) -> anyhow::Result<wire::QueryAnswer> {
        self.post("v1/queries", &query_request(sql, "json"), "query")
            .await
    }

    /// Run a query; the CSV answer.
    pub async fn query_csv(&self, sql: &str) -> anyhow::Result<String> {
        self.post_text("v1/queries", &query_request(sql, "csv"), "query")
            .await
    }

    /// A single-use sign-in link to the web console for this identity (full URL).
    pub async fn console_link(&self) -> anyhow::Result<(String, wire::ConsoleLink)> {
        let link: wire::ConsoleLink = self
            .send(
                self.http.post(format!("{}/v1/console/links", self.base)),
                "console sign-in link",
            )
            .await?;
        Ok((format!("{}{}", self.base, link.path), link))
    }

    pub async fn whoami(&self) -> anyhow::Result<wire::Caller> {
        self.get("v1/whoami", &[], "whoami").await
    }
}

/// The exclusive lock of the bundle at `bundle` (`.lock` in it), held until dropped.
fn lock_bundle(bundle: &Path) -> anyhow::Result<std::fs::File> {
    let path = bundle.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// Finish a renewal of the bundle at `bundle` that was cut short (under its lock).
fn finish_renewal(bundle: &Path) -> anyhow::Result<()> {
    if !bundle.join("key.pem.new").exists() && !bundle.join("cert.pem.new").exists() {
        return Ok(());
    }
    let _lock = lock_bundle(bundle)?;
    finish_renewal_locked(bundle)
}

/// Put a renewal's new key and certificate (`key.pem.new`, then `cert.pem.new`: both
/// written before either is moved) in place, the key first, each only over what it matches;
/// a new key alone (the answer never came) is dropped. The caller holds the bundle's lock.
fn finish_renewal_locked(bundle: &Path) -> anyhow::Result<()> {
    let (key, cert) = (bundle.join("key.pem.new"), bundle.join("cert.pem.new"));
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let rename = |from: &Path, to: &str| {
        std::fs::rename(from, bundle.join(to))
            .with_context(|| format!("finishing the renewal of {}", bundle.display()))
    };
    let cert_text = if cert.exists() {
        Some(read(&cert)?)
    } else {
        None
    };
    match (key.exists(), cert_text) {
        (true, Some(c)) if pki::cert_matches_key(&c, &read(&key)?) => {
            rename(&key, "key.pem")?;
            rename(&cert, "cert.pem")
        }
        (false, Some(c)) if pki::cert_matches_key(&c, &read(&bundle.join("key.pem"))?) => {
            rename(&cert, "cert.pem")
        }
        (true, None) => {
            std::fs::remove_file(&key).with_context(|| format!("dropping {}", key.display()))
        }
        (false, None) => Ok(()),
        _ => bail!(
            "{}: cert.pem.new does not match its key; the bundle was left as it is (move the .new files away to use the previous certificate)",
            bundle.display()
        ),
    }
}

/// Enroll with `token` at `server` and write the identity bundle to `out`: the escrow CA's
/// certificate is fetched and checked against the fingerprint the token carries (so nothing
/// secret goes to a server before it is known to be the escrow that invited), a key is made
/// here, and its signing request is sent with the token over a connection that trusts that
/// CA (or `server_ca`, for a server with the operator's own certificate). The key never
/// leaves this machine.
pub async fn enroll(
    server: &str,
    token: &str,
    server_ca: Option<&Path>,
    out: &Path,
) -> anyhow::Result<wire::Certificate> {
    let token = Token::parse(token).map_err(|e| anyhow!("{e}"))?;
    let server_ca = server_ca
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let fetch = match &server_ca {
        Some(pem) => Client::without_identity(server, pem)?,
        None => Client::with_config(
            server,
            tls::client_config_unverified().map_err(|e| anyhow!("{e}"))?,
        )?,
    };
    let ca: wire::CaCertificate = fetch
        .get("v1/ca", &[], "fetching the escrow's CA certificate")
        .await?;
    // From here on only the certificate the fingerprint covers is trusted (as its own DER,
    // encoded again: nothing else the server sent).
    let pinned = pinned_ca(&ca.ca_pem, &token)?;
    let trusted = server_ca.unwrap_or_else(|| pinned.pem.clone().into_bytes());
    let client = Client::without_identity(server, &trusted)?;
    let (csr_pem, key_pem) =
        pki::new_request(&token.partner, &token.user).map_err(|e| anyhow!("{e}"))?;
    // The key first, where it is to stay: an --out that cannot take it fails before the
    // token is spent.
    create_bundle_dir(out)?;
    write_new(out, "key.pem", &key_pem)?;
    let req = wire::EnrollRequest {
        token: token.to_string(),
        csr_pem,
    };
    let cert: wire::Certificate = match client.post("v1/enrollments", &req, "enrolling").await {
        Ok(cert) => cert,
        Err(e) => {
            let _ = std::fs::remove_file(out.join("key.pem"));
            return Err(e);
        }
    };
    pinned_ca(&cert.ca_pem, &token)?;
    if !pki::cert_matches_key(&cert.cert_pem, &key_pem) {
        bail!("the server's certificate is not for the key made here");
    }
    write_new(out, "cert.pem", &cert.cert_pem)?;
    write_new(out, "ca.pem", &pinned.pem)?;
    Ok(cert)
}

/// The one CA certificate of `ca_pem`, if it is the one `token`'s fingerprint names.
fn pinned_ca(ca_pem: &str, token: &Token) -> anyhow::Result<pki::SingleCertificate> {
    match pki::single_certificate(ca_pem) {
        Ok(ca) if ca.fingerprint == token.ca => Ok(ca),
        _ => bail!(
            "the server's CA certificate is not the one the token names: this is not the escrow that invited you (or the token was copied wrongly)"
        ),
    }
}

fn create_bundle_dir(out: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("creating {}", out.display()))
}

/// Write `file` of a bundle (0600), never over an existing one.
fn write_new(out: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    let path = out.join(file);
    if !crate::fsutil::write_new_private(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?
    {
        bail!("{} exists; choose another --out", path.display());
    }
    Ok(())
}

/// Write an identity bundle (key 0600, never overwriting).
pub fn write_bundle(out: &Path, bundle: &wire::Bundle) -> anyhow::Result<()> {
    create_bundle_dir(out)?;
    write_new(out, "key.pem", &bundle.key_pem)?;
    write_new(out, "cert.pem", &bundle.cert_pem)?;
    write_new(out, "ca.pem", &bundle.ca_pem)
}

fn query_request(sql: &str, format: &str) -> wire::QueryRequest {
    wire::QueryRequest {
        sql: sql.to_string(),
        format: Some(format.to_string()),
    }
}

/// A request of an answer that can also come as CSV: its own fields and `format`.
#[derive(Serialize)]
pub struct WithFormat<'a, T> {
    #[serde(flatten)]
    pub request: &'a T,
    pub format: &'a str,
}

/// The one-line error for a non-success response.
fn refusal(what: &str, status: reqwest::StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<wire::ErrorBody>(body) {
        Ok(b) => match b.error.rule {
            Some(rule) => anyhow!(
                "{what} refused ({}, rule {rule}): {}",
                b.error.code,
                b.error.message
            ),
            None => anyhow!("{what} refused ({}): {}", b.error.code, b.error.message),
        },
        Err(_) => anyhow!("{what} failed: HTTP {status}"),
    }
}

/// One line that says what failed on the wire, without the error-chain noise.
fn transport_error(e: reqwest::Error, base: &str) -> anyhow::Error {
    let mut msg = e.to_string();
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    anyhow!("cannot talk to escrow at {base}: {msg}")
}
