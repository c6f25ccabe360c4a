//! Operator commands on a data directory: `init`, `partner add`, `partner revoke`.
//! They work whether or not a server is running on the same directory (SQLite WAL; the
//! server notices a new CRL on the next handshake).

use crate::catalog::Catalog;
use crate::crypto::keys::Kek;
use crate::datadir::{DataDir, validate_name};
use crate::{Error, Result, pki};

/// What `init` created (each false means it already existed and was kept).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitReport {
    pub kek: bool,
    pub noise_key: bool,
    pub ca: bool,
    pub crl: bool,
    pub server_cert: bool,
}

impl InitReport {
    pub fn created_anything(&self) -> bool {
        self.kek || self.noise_key || self.ca || self.crl || self.server_cert
    }
}

/// Create whatever is missing of the data directory. Never overwrites keys.
pub fn init(dir: &DataDir) -> Result<InitReport> {
    dir.create_dirs()?;
    let mut report = InitReport {
        kek: Kek::create_if_missing(&dir.kek())?,
        noise_key: crate::crypto::keys::create_secret_if_missing(&dir.noise_key())?,
        ca: pki::create_ca_if_missing(dir)?,
        ..Default::default()
    };
    let catalog = Catalog::open(&dir.catalog())?;
    if report.ca || !dir.crl().exists() {
        let (revoked, number) = catalog.revocations()?;
        pki::write_crl(dir, &revoked, number)?;
        report.crl = true;
    }
    report.server_cert = pki::create_server_cert_if_missing(dir)?;
    Ok(report)
}

/// Register a partner and issue its admin identity. Returns the bundle directory.
pub fn add_partner(dir: &DataDir, name: &str) -> Result<std::path::PathBuf> {
    validate_name("partner", name)?;
    ensure_initialised(dir)?;
    let catalog = Catalog::open(&dir.catalog())?;
    catalog.add_partner(name)?;
    add_identity(dir, &catalog, name, "admin", "admin")
}

/// Issue an identity certificate for `user` of `partner` and write its bundle.
pub fn add_identity(
    dir: &DataDir,
    catalog: &Catalog,
    partner: &str,
    user: &str,
    role: &str,
) -> Result<std::path::PathBuf> {
    validate_name("user", user)?;
    let issued = pki::issue_identity(dir, partner, user)?;
    let bundle = dir.identity_bundle(partner, user);
    // Bundle first: a registered serial without a bundle would be an identity nobody holds.
    pki::write_bundle(dir, &bundle, &issued)?;
    catalog.add_identity(&issued.serial, partner, user, role)?;
    Ok(bundle)
}

/// Revoke a partner: every identity of it goes on the CRL and stops working at once.
pub fn revoke_partner(dir: &DataDir, name: &str) -> Result<usize> {
    validate_name("partner", name)?;
    ensure_initialised(dir)?;
    let catalog = Catalog::open(&dir.catalog())?;
    let (revoked, number) = catalog.revoke_partner(name)?;
    pki::write_crl(dir, &revoked, number)?;
    Ok(revoked.len())
}

fn ensure_initialised(dir: &DataDir) -> Result<()> {
    if dir.ca_key().exists() && dir.kek().exists() && dir.catalog().exists() {
        Ok(())
    } else {
        Err(Error::bad(
            "not_initialised",
            format!(
                "{} is not an escrow data directory; run `escrow init` first",
                dir.root().display()
            ),
        ))
    }
}
