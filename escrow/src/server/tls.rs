//! TLS for the server: rustls asking for a client certificate from the escrow CA, checked
//! against the CRL. A client may connect without one (a browser on the console); it is then
//! unauthenticated until it shows a console session (`api::Caller`). The CRL is re-read when its file changes, checked on every
//! handshake, so `escrow partner revoke` takes effect on the next connection without a
//! restart.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::datadir::DataDir;
use crate::{Error, Result};

/// The crypto provider escrow uses everywhere (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::internal(format!("reading certificates {}: {e}", path.display())))
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::internal(format!("reading private key {}: {e}", path.display())))
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca)? {
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

/// A client verifier that rebuilds itself when the CRL file changes.
#[derive(Debug)]
pub struct ReloadingVerifier {
    roots: Arc<RootCertStore>,
    crl_path: PathBuf,
    provider: Arc<CryptoProvider>,
    hints: Vec<DistinguishedName>,
    current: RwLock<(Option<FileStamp>, Arc<dyn ClientCertVerifier>)>,
}

impl ReloadingVerifier {
    pub fn new(dir: &DataDir) -> Result<Self> {
        let roots = roots(&dir.ca_cert())?;
        let provider = provider();
        let crl_path = dir.crl();
        let st = stamp(&crl_path);
        let inner = build_verifier(&roots, &crl_path, &provider)?;
        Ok(ReloadingVerifier {
            hints: inner.root_hint_subjects().to_vec(),
            roots,
            crl_path,
            provider,
            current: RwLock::new((st, inner)),
        })
    }

    /// The verifier for the CRL as it is on disk now. If the CRL cannot be read or parsed,
    /// the previous verifier stays (a broken CRL write never opens the door wider; it cannot
    /// happen anyway since CRLs are replaced atomically).
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        let st = stamp(&self.crl_path);
        if let Ok(cur) = self.current.read()
            && cur.0 == st
        {
            return cur.1.clone();
        }
        match build_verifier(&self.roots, &self.crl_path, &self.provider) {
            Ok(v) => {
                tracing::info!(crl = %self.crl_path.display(), "revocation list changed; reloaded");
                if let Ok(mut cur) = self.current.write() {
                    *cur = (st, v.clone());
                }
                v
            }
            Err(e) => {
                tracing::error!(error = %e, "revocation list unreadable; keeping the previous one");
                match self.current.read() {
                    Ok(cur) => cur.1.clone(),
                    Err(p) => p.into_inner().1.clone(),
                }
            }
        }
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

/// The server's rustls configuration: TLS 1.2/1.3, client certificates verified when
/// presented, h2 + http/1.1.
pub fn server_config(dir: &DataDir) -> Result<Arc<ServerConfig>> {
    let verifier = Arc::new(ReloadingVerifier::new(dir)?);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs(&dir.server_cert())?,
            load_key(&dir.server_key())?,
        )
        .map_err(|e| Error::internal(format!("server certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls client configuration for an identity bundle (cert.pem, key.pem, ca.pem).
pub fn client_config(bundle: &Path) -> Result<rustls::ClientConfig> {
    let roots = roots(&bundle.join("ca.pem"))?;
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
