//! The escrow's own certificate authority: dev CA, server certificate, partner identity
//! certificates and the revocation list. Generated with rcgen, read with x509-parser.
//!
//! A client certificate names its holder in the subject: O = partner, CN = user.
//! The catalog records each issued serial; the server trusts a certificate only if it
//! chains to the CA, is not on the CRL, and its serial is registered to that partner/user.

use std::fs;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::crypto::random_bytes;
use crate::datadir::DataDir;
use crate::fsutil;
use crate::{Error, Result};

/// Identity certificates are valid this long unless the operator says otherwise
/// (`--cert-days`); `escrow renew` replaces one before it ends.
pub const DEFAULT_CERT_DAYS: u32 = 90;
/// The longest lifetime an identity certificate may be given (the CA/Browser Forum's old
/// ceiling for TLS certificates).
pub const MAX_CERT_DAYS: u32 = 825;
/// The CA and server certificate are valid this long.
const CA_DAYS: i64 = 3650;

fn pki_err(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::internal(format!("{what}: {e}"))
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// A random positive 128-bit serial, returned with its lowercase hex form (the catalog key).
fn new_serial() -> Result<(SerialNumber, String)> {
    let mut bytes: [u8; 16] = random_bytes()?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero byte: the DER form and the hex form stay canonical
    Ok((SerialNumber::from_slice(&bytes), hex::encode(bytes)))
}

/// Create the CA (key + self-signed cert) if missing. Returns true if created.
pub fn create_ca_if_missing(dir: &DataDir) -> Result<bool> {
    if dir.ca_key().exists() {
        return Ok(false);
    }
    let key = KeyPair::generate().map_err(pki_err("CA key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "escrow certificate authority");
    dn.push(DnType::OrganizationName, "escrow");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now() - Duration::hours(1);
    params.not_after = now() + Duration::days(CA_DAYS);
    params.serial_number = Some(new_serial()?.0);
    params.key_identifier_method = KeyIdMethod::Sha256;
    let cert = params
        .self_signed(&key)
        .map_err(pki_err("CA certificate"))?;
    // Key first: a CA cert without its key would be useless, a key without cert is recreated.
    if !fsutil::write_new_private(&dir.ca_key(), key.serialize_pem().as_bytes())? {
        return Ok(false);
    }
    fsutil::atomic_write(&dir.ca_cert(), cert.pem().as_bytes(), false)?;
    Ok(true)
}

/// The CA as an rcgen issuer (reads key and cert from the data dir).
fn load_issuer(dir: &DataDir) -> Result<Issuer<'static, KeyPair>> {
    let key_pem = fs::read_to_string(dir.ca_key())?;
    let key = KeyPair::from_pem(&key_pem).map_err(pki_err("CA key"))?;
    let cert_pem = fs::read_to_string(dir.ca_cert())?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(pki_err("CA certificate"))
}

/// The names every server certificate carries, for a client on the escrow's own host.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// One name of the server certificate: an IP address, or a DNS name (checked as rustls
/// checks the name a client asks for).
fn server_name(name: &str) -> Result<SanType> {
    // A fully qualified name's final dot is not written in a certificate (a client never
    // matches a name that has it).
    let name = name.strip_suffix('.').unwrap_or(name);
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = || {
        Error::bad(
            "bad_hostname",
            format!("--hostname {name:?}: neither a DNS name nor an IP address"),
        )
    };
    rustls_pki_types::DnsName::try_from(name).map_err(|_| bad())?;
    Ok(SanType::DnsName(
        name.to_ascii_lowercase().try_into().map_err(|_| bad())?,
    ))
}

/// A name as the certificate's list is compared: DNS names lowercased, addresses as text.
fn san_text(san: &SanType) -> Option<String> {
    match san {
        SanType::DnsName(n) => Some(n.as_str().to_ascii_lowercase()),
        SanType::IpAddress(ip) => Some(ip.to_string()),
        _ => None,
    }
}

/// The DNS names and addresses the server certificate at `path` is issued for.
fn names_in(path: &Path) -> Result<std::collections::BTreeSet<String>> {
    Ok(read_server_cert(path)?.0)
}

/// The server certificate at `path`: its names (as [`names_in`]) and its public key (the
/// DER of its SubjectPublicKeyInfo).
fn read_server_cert(path: &Path) -> Result<(std::collections::BTreeSet<String>, Vec<u8>)> {
    use x509_parser::extensions::GeneralName;
    let pem = fs::read(path)?;
    let bad = || Error::internal(format!("{} is not a certificate", path.display()));
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|_| bad())?;
    let cert = pem.parse_x509().map_err(|_| bad())?;
    let spki = cert.public_key().raw.to_vec();
    let mut names = std::collections::BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => {
                    names.insert(d.to_ascii_lowercase());
                }
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).map(std::net::IpAddr::from).ok(),
                        16 => <[u8; 16]>::try_from(*b).map(std::net::IpAddr::from).ok(),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok((names, spki))
}

/// The names a server certificate for `hostnames` carries (`bad_hostname` if one is not a
/// name or an address).
pub fn server_names_for(hostnames: &[String]) -> Result<Vec<SanType>> {
    let mut wanted = Vec::new();
    for name in LOCAL_NAMES
        .iter()
        .copied()
        .chain(hostnames.iter().map(String::as_str))
    {
        let san = server_name(name)?;
        if !wanted.iter().any(|w| san_text(w) == san_text(&san)) {
            wanted.push(san);
        }
    }
    Ok(wanted)
}

/// Create the server certificate if missing, for localhost, 127.0.0.1, ::1 and `hostnames`
/// (`init --hostname`: DNS names and IP addresses); with `hostnames`, issue it again (a new
/// key too) if it names anything else. Returns whether it was written.
pub fn create_server_cert(dir: &DataDir, hostnames: &[String]) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let mut wanted = server_names_for(hostnames)?;
    // Who owned the key (an operator running `init` as root keeps the service's owner).
    let owner = fs::metadata(dir.server_key())
        .ok()
        .map(|m| (m.uid(), m.gid()));
    if dir.server_key().exists() && dir.server_cert().exists() {
        // The key the certificate was issued for (the two are replaced one after the other:
        // a replacement cut short leaves a pair that does not match, issued again here).
        let key_spki = fs::read_to_string(dir.server_key())
            .ok()
            .and_then(|pem| KeyPair::from_pem(&pem).ok())
            .map(|k| k.subject_public_key_info());
        match read_server_cert(&dir.server_cert()) {
            Ok((names, spki)) if key_spki.as_ref() == Some(&spki) => {
                let want: std::collections::BTreeSet<String> =
                    wanted.iter().filter_map(san_text).collect();
                if hostnames.is_empty() || names == want {
                    return Ok(false);
                }
            }
            other => {
                tracing::warn!(cert = %dir.server_cert().display(), "the server certificate does not match its key or cannot be read: issuing it again");
                if let (true, Ok((names, _))) = (hostnames.is_empty(), other) {
                    wanted = server_names_for(&names.into_iter().collect::<Vec<_>>())?;
                }
            }
        }
    }
    let issuer = load_issuer(dir)?;
    let key = KeyPair::generate().map_err(pki_err("server key"))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = wanted;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "escrow server");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now() - Duration::hours(1);
    params.not_after = now() + Duration::days(CA_DAYS);
    params.serial_number = Some(new_serial()?.0);
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(pki_err("server certificate"))?;
    fsutil::atomic_write(&dir.server_key(), key.serialize_pem().as_bytes(), true)?;
    fsutil::atomic_write(&dir.server_cert(), cert.pem().as_bytes(), false)?;
    if let Some((uid, gid)) = owner {
        for f in [dir.server_key(), dir.server_cert()] {
            let now = fs::metadata(&f).map(|m| (m.uid(), m.gid())).ok();
            if now != Some((uid, gid))
                && let Err(e) = std::os::unix::fs::chown(&f, Some(uid), Some(gid))
            {
                tracing::warn!(file = %f.display(), error = %e, "could not give the new server certificate its previous owner");
            }
        }
    }
    Ok(true)
}

/// The names of the server certificate in `dir`, for the operator.
pub fn server_names(dir: &DataDir) -> Result<Vec<String>> {
    Ok(names_in(&dir.server_cert())?.into_iter().collect())
}

/// A freshly issued identity: PEM cert and key, and the serial in hex.
pub struct IssuedIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: String,
}

/// `bad_cert_days` unless `days` is a lifetime an identity certificate may have.
pub fn check_cert_days(days: u32) -> Result<()> {
    if (1..=MAX_CERT_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(Error::bad(
            "bad_cert_days",
            format!("a certificate lifetime is 1 to {MAX_CERT_DAYS} days, not {days}"),
        ))
    }
}

/// The subject of an identity: O = partner, CN = user.
fn identity_name(partner: &str, user: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, partner);
    dn.push(DnType::CommonName, user);
    dn
}

/// Sign a client certificate for `user` of `partner`, valid for `days`, over `key`.
fn sign_identity(
    dir: &DataDir,
    key: &impl PublicKeyData,
    partner: &str,
    user: &str,
    days: u32,
) -> Result<IssuedCert> {
    check_cert_days(days)?;
    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = identity_name(partner, user);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = now() - Duration::hours(1);
    params.not_after = now() + Duration::days(i64::from(days));
    let (serial, serial_hex) = new_serial()?;
    params.serial_number = Some(serial);
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(key, &issuer)
        .map_err(pki_err("identity certificate"))?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        serial: serial_hex,
        not_after: params.not_after,
    })
}

/// A certificate the CA signed: PEM, its serial in hex, and when it ends.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// Issue a client certificate for `user` of `partner`, valid for `days`, with a key made
/// here (`partner add`, `user add`: a bundle the operator hands over, for trials and tests).
pub fn issue_identity(
    dir: &DataDir,
    partner: &str,
    user: &str,
    days: u32,
) -> Result<IssuedIdentity> {
    let key = KeyPair::generate().map_err(pki_err("identity key"))?;
    let cert = sign_identity(dir, &key, partner, user, days)?;
    Ok(IssuedIdentity {
        cert_pem: cert.cert_pem,
        key_pem: key.serialize_pem(),
        serial: cert.serial,
    })
}

/// A new key pair and a certificate signing request for `user` of `partner`, made where the
/// key is to stay (`escrow enroll`, `escrow renew`): (CSR PEM, private key PEM).
pub fn new_request(partner: &str, user: &str) -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(pki_err("identity key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = identity_name(partner, user);
    let csr = params
        .serialize_request(&key)
        .map_err(pki_err("certificate signing request"))?;
    let pem = csr.pem().map_err(pki_err("certificate signing request"))?;
    Ok((pem, key.serialize_pem()))
}

/// Sign the certificate signing request `csr_pem` for `user` of `partner`, valid for `days`:
/// `bad_csr` unless its signature holds (its sender has the key) and its subject names that
/// identity and nothing else. Only its public key is taken: the certificate's names, usages
/// and lifetime are the CA's.
pub fn sign_request(
    dir: &DataDir,
    csr_pem: &str,
    partner: &str,
    user: &str,
    days: u32,
) -> Result<IssuedCert> {
    let bad = |why: String| Error::bad("bad_csr", why);
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| bad(format!("not a valid certificate signing request: {e}")))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|_| bad("not a PEM certificate signing request".into()))?;
    use x509_parser::prelude::FromDer;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|_| bad("not a valid certificate signing request".into()))?;
    let subject = &req.certification_request_info.subject;
    let named = subject_names(subject);
    if named.as_ref() != Some(&(partner.to_string(), user.to_string()))
        || subject.iter_attributes().count() != 2
    {
        // The requester's text, cut short: it is logged and audited.
        let names: String = subject.to_string().chars().take(200).collect();
        return Err(bad(format!(
            "the request must name {partner}/{user} (O={partner}, CN={user}) and nothing else: \
             it names {names}"
        )));
    }
    sign_identity(dir, &csr.public_key, partner, user, days)
}

/// When the PEM certificate `pem` ends.
pub fn not_after(pem: &str) -> Result<OffsetDateTime> {
    let bad = || Error::bad("bad_identity", "not a PEM certificate");
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| bad())?;
    let cert = pem.parse_x509().map_err(|_| bad())?;
    Ok(cert.validity().not_after.to_datetime())
}

/// The CA certificate's fingerprint: SHA-256 of its DER (an enrollment token carries it, so
/// the enrolling machine knows the CA before it trusts anything the server says).
pub fn fingerprint(ca_pem: &str) -> Result<[u8; 32]> {
    Ok(single_certificate(ca_pem)?.fingerprint)
}

/// One certificate, as [`single_certificate`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleCertificate {
    /// SHA-256 of its DER.
    pub fingerprint: [u8; 32],
    /// The certificate alone, PEM-encoded again from its DER (nothing of the text it came in
    /// survives: no second block, no text around it).
    pub pem: String,
}

/// The certificate of `pem`, which must hold exactly one PEM block, a certificate: a CA
/// whose fingerprint was checked is trusted as this and nothing more (a second block would
/// be a second root the fingerprint never covered).
pub fn single_certificate(pem: &str) -> Result<SingleCertificate> {
    use sha2::Digest;
    let bad = || {
        Error::bad(
            "bad_ca",
            "not exactly one PEM certificate (one CERTIFICATE block and nothing else)",
        )
    };
    let blocks = ::pem::parse_many(pem.as_bytes()).map_err(|_| bad())?;
    let [block] = &blocks[..] else {
        return Err(bad());
    };
    if block.tag() != "CERTIFICATE" {
        return Err(bad());
    }
    let der = block.contents();
    x509_parser::parse_x509_certificate(der).map_err(|_| bad())?;
    Ok(SingleCertificate {
        fingerprint: sha2::Sha256::digest(der).into(),
        pem: ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec())),
    })
}

/// Whether the PEM certificate `cert_pem` is issued for the PEM private key `key_pem`.
pub fn cert_matches_key(cert_pem: &str, key_pem: &str) -> bool {
    let spki = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .ok()
        .and_then(|(_, pem)| pem.parse_x509().ok().map(|c| c.public_key().raw.to_vec()));
    let key = KeyPair::from_pem(key_pem)
        .ok()
        .map(|k| k.subject_public_key_info());
    spki.is_some() && spki == key
}

/// Write an identity bundle directory: cert.pem, key.pem (0600), ca.pem.
pub fn write_bundle(dir: &DataDir, bundle: &Path, id: &IssuedIdentity) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(bundle)?;
    fsutil::atomic_write(&bundle.join("key.pem"), id.key_pem.as_bytes(), true)?;
    fsutil::atomic_write(&bundle.join("cert.pem"), id.cert_pem.as_bytes(), false)?;
    fs::copy(dir.ca_cert(), bundle.join("ca.pem"))?;
    Ok(())
}

/// (Re)write the CRL with the given revoked serials (hex) and CRL number.
pub fn write_crl(dir: &DataDir, revoked: &[(String, OffsetDateTime)], number: u64) -> Result<()> {
    let issuer = load_issuer(dir)?;
    let revoked_certs = revoked
        .iter()
        .map(|(serial, at)| {
            let bytes = hex::decode(serial)
                .map_err(|_| Error::internal(format!("bad serial in catalog: {serial}")))?;
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: *at,
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = CertificateRevocationListParams {
        this_update: now() - Duration::minutes(5),
        next_update: now() + Duration::days(CA_DAYS),
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).map_err(pki_err("CRL"))?;
    let pem = crl.pem().map_err(pki_err("CRL"))?;
    fsutil::atomic_write(&dir.crl(), pem.as_bytes(), false)?;
    Ok(())
}

/// Who a verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSubject {
    pub partner: String,
    pub user: String,
    pub serial: String,
}

/// Read partner (O), user (CN) and serial from a DER certificate.
pub fn cert_subject(der: &[u8]) -> Option<CertSubject> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let (partner, user) = subject_names(cert.subject())?;
    let serial = hex::encode(cert.raw_serial());
    Some(CertSubject {
        partner,
        user,
        serial,
    })
}

/// The partner (O) and user (CN) a subject names.
fn subject_names(subject: &x509_parser::x509::X509Name<'_>) -> Option<(String, String)> {
    let partner = subject.iter_organization().next()?.as_str().ok()?;
    let user = subject.iter_common_name().next()?.as_str().ok()?;
    Some((partner.to_string(), user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_pem(name: &str) -> String {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = identity_name(name, name);
        params.self_signed(&key).expect("cert").pem()
    }

    #[test]
    fn a_pinned_ca_is_one_certificate_and_nothing_else() {
        let (ca, other) = (cert_pem("ca"), cert_pem("other"));
        let one = single_certificate(&format!("some text\n{ca}more text\n")).expect("one");
        assert_eq!(one, single_certificate(&ca).expect("same"));
        assert_eq!(one.pem.matches("BEGIN").count(), 1);
        assert!(!one.pem.contains("text"));
        // A second root behind the pinned one is refused, whatever its order.
        for two in [format!("{ca}{other}"), format!("{other}{ca}")] {
            assert_eq!(single_certificate(&two).expect_err("two").code(), "bad_ca");
        }
        let key = KeyPair::generate().expect("key").serialize_pem();
        assert_eq!(single_certificate(&key).expect_err("key").code(), "bad_ca");
        assert_eq!(single_certificate("").expect_err("none").code(), "bad_ca");
    }

    #[test]
    fn a_request_is_signed_only_for_its_identity() {
        let (csr, key) = new_request("acme", "ana").expect("csr");
        let dir = tempfile::tempdir().expect("tmp");
        let data = DataDir::new(dir.path().join("data"));
        data.create_dirs().expect("dirs");
        create_ca_if_missing(&data).expect("ca");
        let cert = sign_request(&data, &csr, "acme", "ana", 90).expect("signed");
        assert!(cert_matches_key(&cert.cert_pem, &key));
        let other = KeyPair::generate().expect("key").serialize_pem();
        assert!(!cert_matches_key(&cert.cert_pem, &other));
        let subject = cert_subject(
            &x509_parser::pem::parse_x509_pem(cert.cert_pem.as_bytes())
                .expect("pem")
                .1
                .contents,
        )
        .expect("subject");
        assert_eq!(
            (subject.partner.as_str(), subject.user.as_str()),
            ("acme", "ana")
        );
        assert_eq!(subject.serial, cert.serial);
        for (partner, user) in [("acme", "bob"), ("globex", "ana")] {
            let e = sign_request(&data, &csr, partner, user, 90).expect_err("other identity");
            assert_eq!(e.code(), "bad_csr");
        }
        let e = sign_request(&data, "not a request", "acme", "ana", 90).expect_err("junk");
        assert_eq!(e.code(), "bad_csr");
        let e = sign_request(&data, &csr, "acme", "ana", 0).expect_err("no days");
        assert_eq!(e.code(), "bad_cert_days");
    }
}
