//! TLS for the server: rustls asking for a client certificate from the escrow CA, checked
//! against the CRL; the server's own certificate (the escrow CA's, or the operator's with
//! `serve --tls-cert/--tls-key`) re-read when its files change. A client may connect
//! without one (a browser on the console); it is then unauthenticated until it shows a
//! console session (`api::Caller`). The CRL is re-read when its file changes, checked on
//! every handshake, so `escrow partner revoke` takes effect on the next connection without
//! a restart.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{Error as PemError, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::datadir::DataDir;
use crate::{Error, Result};

/// The crypto provider escrow uses everywhere (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificates of a PEM file, in order.
fn read_certs(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, PemError> {
    CertificateDer::pem_file_iter(path).and_then(|it| it.collect())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    read_certs(path)
        .map_err(|e| Error::internal(format!("reading certificates {}: {e}", path.display())))
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::internal(format!("reading private key {}: {e}", path.display())))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    roots_of(load_certs(ca)?)
}

fn roots_of(certs: Vec<CertificateDer<'static>>) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for c in certs {
        store
            .add(c)
            .map_err(|e| Error::internal(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// Identity of a CRL file on disk; a change means it must be re-read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = fs::metadata(path).ok()?;
    Some(FileStamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// A value built from files, built again when one of them changes (on the next use). A
/// build that fails keeps the previous value in use, logged: a file caught half-written
/// never opens the door wider or stops the server.
#[derive(Debug)]
struct Reloaded<T> {
    files: Vec<PathBuf>,
    /// What is logged when it is built again (`"X changed; reloaded"`).
    what: &'static str,
    current: RwLock<(Vec<Option<FileStamp>>, T)>,
}

impl<T: Clone> Reloaded<T> {
    /// Built now from `files`; an error if it cannot be.
    fn new(
        files: Vec<PathBuf>,
        what: &'static str,
        build: impl FnOnce() -> Result<T>,
    ) -> Result<Self> {
        let stamps = files.iter().map(|f| stamp(f)).collect();
        Ok(Reloaded {
            current: RwLock::new((stamps, build()?)),
            files,
            what,
        })
    }

    /// The value in use, without looking at the files.
    fn held(&self) -> T {
        match self.current.read() {
            Ok(cur) => cur.1.clone(),
            Err(p) => p.into_inner().1.clone(),
        }
    }

    /// The value for the files as they are now.
    fn get(&self, build: impl FnOnce() -> Result<T>) -> T {
        let stamps: Vec<Option<FileStamp>> = self.files.iter().map(|f| stamp(f)).collect();
        if let Ok(cur) = self.current.read()
            && cur.0 == stamps
        {
            return cur.1.clone();
        }
        match build() {
            Ok(v) => {
                tracing::info!(file = %self.files[0].display(), "{} changed; reloaded", self.what);
                if let Ok(mut cur) = self.current.write() {
                    *cur = (stamps, v.clone());
                }
                v
            }
            Err(e) => {
                tracing::error!(error = %e, "{} unreadable; keeping the previous one", self.what);
                self.held()
            }
        }
    }
}

/// A client verifier that rebuilds itself when the CRL file changes.
#[derive(Debug)]
pub struct ReloadingVerifier {
    roots: Arc<RootCertStore>,
    crl_path: PathBuf,
    provider: Arc<CryptoProvider>,
    hints: Vec<DistinguishedName>,
    current: Reloaded<Arc<dyn ClientCertVerifier>>,
}

impl ReloadingVerifier {
    pub fn new(dir: &DataDir) -> Result<Self> {
        let roots = roots(&dir.ca_cert())?;
        let provider = provider();
        let crl_path = dir.crl();
        let current = Reloaded::new(vec![crl_path.clone()], "revocation list", || {
            build_verifier(&roots, &crl_path, &provider)
        })?;
        Ok(ReloadingVerifier {
            hints: current.held().root_hint_subjects().to_vec(),
            roots,
            crl_path,
            provider,
            current,
        })
    }

    /// The verifier for the CRL as it is on disk now. If the CRL cannot be read or parsed,
    /// the previous verifier stays (a broken CRL write never opens the door wider; it cannot
    /// happen anyway since CRLs are replaced atomically).
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.current
            .get(|| build_verifier(&self.roots, &self.crl_path, &self.provider))
    }
}

fn build_verifier(
    roots: &Arc<RootCertStore>,
    crl_path: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>> {
    let crls = CertificateRevocationListDer::pem_file_iter(crl_path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::internal(format!("reading CRL {}: {e}", crl_path.display())))?;
    if crls.is_empty() {
        return Err(Error::internal(format!("no CRL in {}", crl_path.display())));
    }
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| Error::internal(format!("client verifier: {e}")))
}

impl ClientCertVerifier for ReloadingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    /// A browser on the console has no certificate: it connects without one and gets no
    /// API data without a session (`api::Caller`). A certificate it does present must
    /// verify, or the handshake fails as before.
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The certificate the server presents and its key: the escrow CA's server certificate in
/// the data directory, or the operator's own (`serve --tls-cert FILE --tls-key FILE`, from
/// their CA or an ACME client). Client certificates are checked against the escrow CA
/// either way.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerCert {
    /// The data directory's own.
    pub fn of(dir: &DataDir) -> Self {
        ServerCert {
            cert: dir.server_cert(),
            key: dir.server_key(),
        }
    }

    /// Both files as they are now, checked: a chain of certificates (the server's first)
    /// and the private key that matches it.
    fn load(&self, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>> {
        let bad = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
            Error::bad(
                "bad_tls_certificate",
                format!("{what} {}: {e}", path.display()),
            )
        };
        let certs =
            read_certs(&self.cert).map_err(|e| bad("server certificate", &self.cert, &e))?;
        if certs.is_empty() {
            return Err(bad(
                "server certificate",
                &self.cert,
                &"no certificate in it",
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| bad("server private key", &self.key, &e))?;
        let key = CertifiedKey::from_der(certs, key, provider)
            .map_err(|e| bad("server certificate", &self.cert, &e))?;
        Ok(Arc::new(key))
    }
}

/// The server certificate, read again when its file or its key's changes (a renewal, or
/// `init --hostname`): served from the next handshake, without a restart. A pair that cannot
/// be read or does not match (the key written before the certificate, say) leaves the
/// previous one in use, logged, until both are right.
#[derive(Debug)]
pub struct ReloadingCert {
    files: ServerCert,
    provider: Arc<CryptoProvider>,
    current: Reloaded<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn new(files: ServerCert) -> Result<Self> {
        let provider = provider();
        let current = Reloaded::new(
            vec![files.cert.clone(), files.key.clone()],
            "server certificate",
            || files.load(&provider),
        )?;
        Ok(ReloadingCert {
            files,
            provider,
            current,
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current.get(|| self.files.load(&self.provider))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The server's rustls configuration: TLS 1.2/1.3, client certificates verified when
/// presented, the server certificate `cert` (reloaded when it changes), h2 + http/1.1.
pub fn server_config(dir: &DataDir, cert: ServerCert) -> Result<Arc<ServerConfig>> {
    let verifier = Arc::new(ReloadingVerifier::new(dir)?);
    let provider = provider();
    // aws-lc seeds its random generator on its first draw, from CPU jitter (about 40 ms of
    // one core): drawn here, while the server starts, not in its first client's handshake.
    (provider.secure_random)
        .fill(&mut [0u8; 32])
        .map_err(|_| Error::internal("the random generator could not be seeded"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ReloadingCert::new(cert)?));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls client configuration for an identity bundle (cert.pem, key.pem, ca.pem).
pub fn client_config(bundle: &Path) -> Result<rustls::ClientConfig> {
    client_config_trusting(bundle, &bundle.join("ca.pem"))
}

/// A rustls client configuration without an identity (`escrow enroll`, which has none yet),
/// trusting the server certificate to chain to the CA certificates of `ca_pem` (PEM text).
pub fn client_config_without_identity(ca_pem: &[u8]) -> Result<rustls::ClientConfig> {
    let certs = CertificateDer::pem_slice_iter(ca_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::bad("bad_ca", format!("CA certificates: {e}")))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
        .with_root_certificates(roots_of(certs)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A rustls client configuration that takes any server certificate: only for fetching
/// what is checked afterwards against a fingerprint the client already holds (`escrow
/// enroll` fetching the escrow CA's certificate, `GET /v1/ca`). Nothing secret may be sent
/// over it.
pub fn client_config_unverified() -> Result<rustls::ClientConfig> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Takes any server certificate (its handshake signature is still checked).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// [`client_config`], trusting the server certificate to chain to the CA certificates in
/// `server_ca` (a server with the operator's own certificate: `serve --tls-cert`).
pub fn client_config_trusting(bundle: &Path, server_ca: &Path) -> Result<rustls::ClientConfig> {
    let roots = roots(server_ca)?;
    let certs = load_certs(&bundle.join("cert.pem"))?;
    let key = load_key(&bundle.join("key.pem"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| Error::bad("bad_identity", format!("identity bundle: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
