//! Operator commands on a data directory: `init`, `partner add|invite|revoke`,
//! `user add|invite|revoke`; and enrollment, which the server runs for a token's holder
//! (`enroll`) and for an identity renewing its certificate (`renew`).
//! Every change is audited in the same transaction as its catalog write.
//! They work whether or not a server is running on the same directory (SQLite WAL; the
//! server notices a new CRL on the next handshake).

use crate::audit::{self, Actor, AuditLog, Change, Event, Outcome};
use crate::catalog::{Catalog, IdentityRow, identities, rfc3339};
use crate::crypto::keys::{
    ENV_KEK, ENV_KEK_COMMAND, ENV_KEK_NEXT, ENV_KEK_NEXT_COMMAND, Kek, KeyLocation,
    create_secret_if_missing,
};
use crate::datadir::{DataDir, validate_name};
use crate::model::enrollment::Token;
use crate::{Error, Result, pki};
use time::OffsetDateTime;

/// What `init` created (each false means it already existed and was kept).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitReport {
    pub kek: bool,
    pub noise_key: bool,
    pub audit_key: bool,
    pub ca: bool,
    pub crl: bool,
    pub server_cert: bool,
}

impl InitReport {
    pub fn created_anything(&self) -> bool {
        self.kek || self.noise_key || self.audit_key || self.ca || self.crl || self.server_cert
    }
}

/// Create whatever is missing of the data directory. Never overwrites keys but the server
/// certificate's, when `hostnames` (`init --hostname`) are not the names it was issued for
/// (besides localhost, 127.0.0.1 and ::1, which it always names).
pub fn init(dir: &DataDir, hostnames: &[String]) -> Result<InitReport> {
    // A bad name is refused before anything is written.
    pki::server_names_for(hostnames)?;
    dir.create_dirs()?;
    let mut report = InitReport {
        kek: match dir.kek_source()?.current {
            KeyLocation::File(p) => Kek::create_if_missing(&p)?,
            _ => false,
        },
        noise_key: create_secret_if_missing(&dir.noise_key())?,
        audit_key: create_secret_if_missing(&dir.audit_key())?,
        ca: pki::create_ca_if_missing(dir)?,
        ..Default::default()
    };
    let catalog = dir.open_catalog()?;
    crate::store::open_keyring(dir, &catalog)?;
    if report.ca || !dir.crl().exists() {
        let (revoked, number) = catalog.revocations()?;
        pki::write_crl(dir, &revoked, number)?;
        report.crl = true;
    }
    report.server_cert = pki::create_server_cert(dir, hostnames)?;
    Ok(report)
}

/// The catalog and audit log of an initialised data directory, for operator commands.
fn open(dir: &DataDir) -> Result<(Catalog, AuditLog)> {
    ensure_initialised(dir)?;
    let catalog = dir.open_catalog()?;
    let log = AuditLog::open(dir, &catalog)?;
    Ok((catalog, log))
}

/// Register a partner and issue its admin identity, valid for `cert_days`, with a key made
/// here (for trials and tests: the operator then holds the partner's key; `invite_partner`
/// is how a partner gets an identity whose key only it holds). Returns the bundle directory.
pub fn add_partner(dir: &DataDir, name: &str, cert_days: u32) -> Result<std::path::PathBuf> {
    let (catalog, log) = open(dir)?;
    register_partner(&catalog, &log, name)?;
    add_user_in(
        dir,
        &catalog,
        &log,
        &Actor::operator(),
        (name, "admin", "admin"),
        cert_days,
    )
}

/// Register a partner and invite its admin: the token its admin enrolls with.
pub fn invite_partner(dir: &DataDir, name: &str, terms: InviteTerms) -> Result<Invited> {
    let (catalog, log) = open(dir)?;
    register_partner(&catalog, &log, name)?;
    invite_in(
        dir,
        &catalog,
        &log,
        &Actor::operator(),
        (name, "admin", "admin"),
        terms,
    )
}

/// Register partner `name` (audited as `partner_add`).
fn register_partner(catalog: &Catalog, log: &AuditLog, name: &str) -> Result<()> {
    let event = Event::new(
        "partner_add",
        Actor::operator(),
        Outcome::Ok,
        serde_json::json!({ "partner": name }),
    )
    .touching([name]);
    Change::new(catalog, log, event).run(|change| {
        validate_name("partner", name)?;
        change.commit(|tx| Ok((identities::add_partner(tx, name)?, serde_json::json!({}))))
    })
}

/// Issue an identity for `user` of `partner` with `role`, valid for `cert_days`, and write
/// its bundle (with a key made here: for trials and tests) to `DIR/identities/PARTNER/USER/`.
/// `actor` is the operator or the partner's admin.
pub fn add_user(
    dir: &DataDir,
    actor: &Actor,
    (partner, user, role): (&str, &str, &str),
    cert_days: u32,
) -> Result<std::path::PathBuf> {
    let (catalog, log) = open(dir)?;
    add_user_in(dir, &catalog, &log, actor, (partner, user, role), cert_days)
}

/// The audited event of a change to `user` of `partner` with `role`, by `actor`.
fn identity_event(kind: &str, actor: &Actor, (partner, user, role): (&str, &str, &str)) -> Event {
    Event::new(
        kind,
        actor.clone(),
        Outcome::Ok,
        serde_json::json!({ "partner": partner, "user": user, "role": role }),
    )
    .touching([partner])
}

/// The checks of a new identity: names, role, an active partner, no active user by that name.
fn check_new_identity(catalog: &Catalog, partner: &str, user: &str, role: &str) -> Result<()> {
    validate_name("partner", partner)?;
    validate_name("user", user)?;
    escrow_policies::roles::check_role(role).map_err(|e| Error::bad("invalid_role", e))?;
    if !catalog.partner_is_active(partner)? {
        return Err(Error::NotFound(format!(
            "no active partner named {partner}"
        )));
    }
    if catalog.user_is_active(partner, user)? {
        return Err(Error::Conflict(format!(
            "{partner} already has a user {user}; revoke it first"
        )));
    }
    Ok(())
}

fn add_user_in(
    dir: &DataDir,
    catalog: &Catalog,
    log: &AuditLog,
    actor: &Actor,
    (partner, user, role): (&str, &str, &str),
    cert_days: u32,
) -> Result<std::path::PathBuf> {
    let event = identity_event("user_add", actor, (partner, user, role));
    Change::new(catalog, log, event).run(|change| {
        check_new_identity(catalog, partner, user, role)?;
        let issued = pki::issue_identity(dir, partner, user, cert_days)?;
        let bundle = dir.identity_bundle(partner, user);
        // Bundle first: a registered serial without a bundle would be an identity nobody
        // holds; a bundle whose serial never got registered is refused at every request.
        pki::write_bundle(dir, &bundle, &issued)?;
        change.commit(|tx| {
            identities::add_identity(tx, &issued.serial, partner, user, role)?;
            Ok((bundle, serde_json::json!({ "serial": issued.serial })))
        })
    })
}

/// How long an invitation's token may be used, and the lifetime of the certificate it
/// enrolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InviteTerms {
    pub valid_for: std::time::Duration,
    pub cert_days: u32,
}

/// An invitation's token is valid this long unless its issuer says otherwise.
pub const DEFAULT_INVITATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The longest an invitation's token may stay valid.
pub const MAX_INVITATION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// An invitation made: its token (shown once; the catalog keeps only a digest of its
/// secret) and when the token expires.
#[derive(Debug, Clone)]
pub struct Invited {
    pub token: Token,
    pub role: String,
    pub expires_at: OffsetDateTime,
}

/// Invite `user` of `partner` with `role`: the token `escrow enroll` takes on the machine
/// that is to hold the key. `actor` is the operator or the partner's admin. An open
/// invitation for the same identity is withdrawn.
pub fn invite_user(
    dir: &DataDir,
    actor: &Actor,
    who: (&str, &str, &str),
    terms: InviteTerms,
) -> Result<Invited> {
    let (catalog, log) = open(dir)?;
    invite_in(dir, &catalog, &log, actor, who, terms)
}

fn invite_in(
    dir: &DataDir,
    catalog: &Catalog,
    log: &AuditLog,
    actor: &Actor,
    (partner, user, role): (&str, &str, &str),
    terms: InviteTerms,
) -> Result<Invited> {
    let event = identity_event("user_invite", actor, (partner, user, role));
    Change::new(catalog, log, event).run(|change| {
        check_new_identity(catalog, partner, user, role)?;
        pki::check_cert_days(terms.cert_days)?;
        if terms.valid_for < std::time::Duration::from_secs(1) || terms.valid_for > MAX_INVITATION {
            return Err(Error::bad(
                "bad_validity",
                "an invitation is valid for one second to 30 days",
            ));
        }
        let ca = pki::fingerprint(&std::fs::read_to_string(dir.ca_cert())?)?;
        let token = Token::new(partner, user, ca)?;
        let expires_at = OffsetDateTime::now_utc() + terms.valid_for;
        let invitation = identities::Invitation {
            id: crate::crypto::random_id()?,
            partner: partner.to_string(),
            user: user.to_string(),
            role: role.to_string(),
            cert_days: terms.cert_days,
            expires_at,
            closed: None,
            refusals: 0,
        };
        change.commit(|tx| {
            let by = (actor.partner.as_deref(), actor.user.as_str());
            let replaced = identities::invite(tx, &invitation, &token.digest(), by)?;
            Ok((
                Invited {
                    token,
                    role: role.to_string(),
                    expires_at,
                },
                serde_json::json!({
                    "invitation": invitation.id,
                    "expires_at": rfc3339(expires_at),
                    "cert_days": terms.cert_days,
                    "replaced": replaced,
                }),
            ))
        })
    })
}

/// The open invitations of `partner` (or of every partner), for the operator.
pub fn open_invitations(
    dir: &DataDir,
    partner: Option<&str>,
) -> Result<Vec<identities::OpenInvitation>> {
    ensure_initialised(dir)?;
    dir.open_catalog()?.open_invitations(partner)
}

/// A certificate issued over a key its holder made: the identity, the certificate, and the
/// CA certificate to trust the server with.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub who: IdentityRow,
    pub cert: pki::IssuedCert,
    pub ca_pem: String,
}

/// Enroll with `token` (its holder, unauthenticated): sign the certificate signing request
/// `csr_pem` for the identity the token was made for, register it, and close the
/// invitation. Refused (`unauthenticated`) for a token the catalog does not know, one used
/// or withdrawn, or one past its expiry; `bad_csr` for a request that names another
/// identity. The first [`AUDITED_REFUSALS`] refused uses of a known token are audited, like
/// its use; later ones, and unknown tokens, are only logged (neither a guesser nor the
/// holder of a leaked, spent token can fill the audit log).
pub fn enroll(dir: &DataDir, token: &str, csr_pem: &str) -> Result<Enrolled> {
    let token = Token::parse(token)?;
    let (catalog, log) = open(dir)?;
    let invitation = catalog
        .invitation(&token.digest())?
        .filter(|i| (i.partner.as_str(), i.user.as_str()) == (&token.partner, &token.user));
    let Some(invitation) = invitation else {
        tracing::warn!("an enrollment with an unknown token was refused");
        return Err(Error::Unauthenticated(
            "the enrollment token is not valid".into(),
        ));
    };
    let identities::Invitation {
        id, partner, user, ..
    } = &invitation;
    let mut actor = Actor::user(partner, user, &invitation.role);
    actor.via = Some("enrollment".into());
    let event = Event::new(
        "enroll",
        actor,
        Outcome::Ok,
        serde_json::json!({ "invitation": id }),
    );
    let signed = usable(&invitation)
        .and_then(|()| pki::sign_request(dir, csr_pem, partner, user, invitation.cert_days));
    let cert = match signed {
        Ok(cert) => cert,
        Err(e) => {
            let refusals = catalog.write(|tx| identities::count_refusal(tx, id))?;
            if refusals <= AUDITED_REFUSALS {
                audit::record(&catalog, &log, &event.failed(&e))?;
            } else {
                tracing::warn!(invitation = %id, refusals, code = e.code(), "a refused enrollment, past the audited ones");
            }
            return Err(e);
        }
    };
    let ca_pem = std::fs::read_to_string(dir.ca_cert())?;
    Change::new(&catalog, &log, event).apply(|tx| {
        Ok(registered(
            identities::enroll(tx, id, &cert.serial)?,
            cert,
            ca_pem,
        ))
    })
}

/// A certificate registered for `who`, with the audit detail that names it.
fn registered(
    who: IdentityRow,
    cert: pki::IssuedCert,
    ca_pem: String,
) -> (Enrolled, serde_json::Value) {
    let detail = serde_json::json!({
        "serial": cert.serial,
        "not_after": rfc3339(cert.not_after),
    });
    (Enrolled { who, cert, ca_pem }, detail)
}

/// Refused uses of one invitation's token that are audited; later ones are only logged.
pub const AUDITED_REFUSALS: i64 = 3;

/// `unauthenticated` unless `invitation` is open and not past its expiry.
fn usable(invitation: &identities::Invitation) -> Result<()> {
    match invitation.closed.as_deref() {
        None => {}
        Some("enrolled") => {
            return Err(Error::Unauthenticated(
                "this enrollment token was used already; ask for a new one".into(),
            ));
        }
        Some(_) => {
            return Err(Error::Unauthenticated(
                "this enrollment token was withdrawn (by a newer invitation or a revocation); ask for a new one".into(),
            ));
        }
    }
    if invitation.expires_at <= OffsetDateTime::now_utc() {
        return Err(Error::Unauthenticated(format!(
            "this enrollment token expired at {}; ask for a new one",
            rfc3339(invitation.expires_at)
        )));
    }
    Ok(())
}

/// Renew the certificate `serial` of `actor` (over its own mutually authenticated
/// connection): sign `csr_pem`, which must name the same identity, for `cert_days`. The new
/// certificate replaces the old; the old is accepted for a grace day more
/// ([`identities::RENEWAL_GRACE_MS`]) and cannot renew again.
pub fn renew(
    dir: &DataDir,
    actor: &Actor,
    serial: &str,
    csr_pem: &str,
    cert_days: u32,
) -> Result<Enrolled> {
    let (catalog, log) = open(dir)?;
    let partner = actor.partner_name()?.to_string();
    let event = Event::new(
        "renew",
        actor.clone(),
        Outcome::Ok,
        serde_json::json!({ "old_serial": serial }),
    );
    Change::new(&catalog, &log, event).run(|change| {
        let cert = pki::sign_request(dir, csr_pem, &partner, &actor.user, cert_days)?;
        let ca_pem = std::fs::read_to_string(dir.ca_cert())?;
        change.commit(|tx| {
            Ok(registered(
                identities::renew(tx, serial, &cert.serial)?,
                cert,
                ca_pem,
            ))
        })
    })
}

/// Revoke one user's identity: its certificate goes on the CRL and stops working at once.
pub fn revoke_user(dir: &DataDir, actor: &Actor, partner: &str, user: &str) -> Result<()> {
    let (catalog, log) = open(dir)?;
    let event = Event::new(
        "user_revoke",
        actor.clone(),
        Outcome::Ok,
        serde_json::json!({ "partner": partner, "user": user }),
    )
    .touching([partner]);
    let (revoked, number) = Change::new(&catalog, &log, event).run(|change| {
        validate_name("partner", partner)?;
        validate_name("user", user)?;
        change.commit(|tx| {
            Ok((
                identities::revoke_user(tx, partner, user)?,
                serde_json::json!({}),
            ))
        })
    })?;
    pki::write_crl(dir, &revoked, number)
}

/// Revoke a partner: every identity of it goes on the CRL and stops working at once.
pub fn revoke_partner(dir: &DataDir, name: &str) -> Result<usize> {
    let (catalog, log) = open(dir)?;
    let event = Event::new(
        "partner_revoke",
        Actor::operator(),
        Outcome::Ok,
        serde_json::json!({ "partner": name }),
    )
    .touching([name]);
    let (revoked, number) = Change::new(&catalog, &log, event).run(|change| {
        validate_name("partner", name)?;
        change.commit(|tx| Ok((identities::revoke_partner(tx, name)?, serde_json::json!({}))))
    })?;
    pki::write_crl(dir, &revoked, number)?;
    Ok(revoked.len())
}

fn ensure_initialised(dir: &DataDir) -> Result<()> {
    if dir.ca_key().exists()
        && (dir.kek().exists() || dir.kek_source()?.is_external())
        && dir.audit_key().exists()
        && match dir.catalog_location()? {
            crate::catalog::Location::File(path) => path.exists(),
            // Its tables exist once `init` has opened it.
            crate::catalog::Location::Postgres(_) => true,
        }
    {
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

/// What `keys rotate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub from: String,
    pub to: String,
    /// Data keys re-wrapped (one per dataset version).
    pub rewrapped: usize,
    /// What an earlier, interrupted rotation left and how it was settled first.
    pub settled: Option<String>,
    /// How the old key was retired, or what the operator must do to retire it (a key kept
    /// outside the data directory is the operator's to destroy).
    pub retired: String,
}

/// Rotate the key-encryption key: the next key comes from the source's next location (a new
/// random `keys/kek.next` by default; `ESCROW_KEK_NEXT` / `ESCROW_KEK_NEXT_COMMAND` for a key
/// kept outside). One catalog transaction re-wraps every data key under it, makes it current,
/// checks the inventory (no data key left under any other key) and appends the audit record;
/// only then is the old key retired: the new key file replaces the old one, or the old key
/// file is removed when the new key is external, or (both external) the operator is told to
/// switch and destroy. No data is re-encrypted. A crash at any point leaves either the old
/// key in use (an unused next key file is removed at the next start or rotation) or the new
/// one (promoted then). Safe while a server runs: its uploads wrap under the catalog's
/// current key inside their commit transaction, and its reads find the new key by reloading
/// the source.
pub fn rotate_kek(dir: &DataDir) -> Result<Rotation> {
    let (catalog, log) = open(dir)?;
    // One rotation at a time, and no node settles this one while it runs.
    let _rotating = crate::store::RotationLock::acquire(dir)?;
    let keys = crate::store::open_keyring(dir, &catalog)?;
    let settled = crate::store::settle_rotation(&catalog, &keys)?;
    let source = keys.source().clone();
    let old = keys.get(&catalog.current_kek()?)?;
    let new = match &source.next {
        KeyLocation::File(next) if source.is_external() => {
            return Err(Error::bad(
                "invalid_config",
                format!(
                    "the current key is kept outside the data directory: give the new key in {ENV_KEK_NEXT} or {ENV_KEK_NEXT_COMMAND} (escrow keys generate prints one), not in {}",
                    next.display()
                ),
            ));
        }
        KeyLocation::File(next) => {
            create_secret_if_missing(next)?;
            Kek::load(next)?
        }
        external => external
            .load()?
            .ok_or_else(|| Error::internal("the next key's source holds no key"))?,
    };
    if new.id() == old.id() {
        return Err(Error::bad(
            "invalid_config",
            format!(
                "data keys are already wrapped under the next key {}: make it the current key ({ENV_KEK} or {ENV_KEK_COMMAND}) and unset {ENV_KEK_NEXT} / {ENV_KEK_NEXT_COMMAND}",
                new.id()
            ),
        ));
    }
    crate::faults::hit("rotate.next_written")?;
    let event = Event::new(
        "key_rotate",
        Actor::operator(),
        Outcome::Ok,
        serde_json::json!({ "from": old.id(), "to": new.id(), "source": source.next.describe() }),
    );
    let rewrap = |dataset: &str, version: &str, wrapped: &[u8]| {
        old.rewrap(&new, wrapped, &crate::store::binding(dataset, version)?)
    };
    let rewrapped = Change::new(&catalog, &log, event).apply(|tx| {
        let n = crate::catalog::keys::rewrap_all(tx, old.id(), new.id(), rewrap)?;
        Ok((
            n,
            serde_json::json!({ "rewrapped": n, "retired": old.id() }),
        ))
    });
    let rewrapped = match rewrapped {
        Ok(n) => n,
        Err(e) => {
            // Nothing is wrapped under the new key: a new key file goes.
            crate::store::settle_rotation(&catalog, &keys)?;
            return Err(e);
        }
    };
    crate::faults::hit("rotate.committed")?;
    let retired = match (&source.current, &source.next) {
        (KeyLocation::File(current), KeyLocation::File(next)) => {
            std::fs::rename(next, current)?;
            crate::fsutil::sync_parent(current)?;
            format!("key {} retired", old.id())
        }
        (KeyLocation::File(current), next) => {
            std::fs::remove_file(current)?;
            crate::fsutil::sync_parent(current)?;
            format!(
                "key {} retired (its file was removed); now make the {} the current key ({ENV_KEK} or {ENV_KEK_COMMAND}) and unset {ENV_KEK_NEXT} / {ENV_KEK_NEXT_COMMAND}",
                old.id(),
                next.describe()
            )
        }
        (current, next) => format!(
            "now make the {} the current key and unset {ENV_KEK_NEXT} / {ENV_KEK_NEXT_COMMAND}; then destroy key {} (the {}) in your key store",
            next.describe(),
            old.id(),
            current.describe()
        ),
    };
    crate::faults::hit("rotate.renamed")?;
    Ok(Rotation {
        from: old.id().to_string(),
        to: new.id().to_string(),
        rewrapped,
        settled,
        retired,
    })
}

/// The whole audit log (operator view), ending in a fresh signed checkpoint.
pub fn audit_export(dir: &DataDir, out: &mut impl std::io::Write) -> Result<u64> {
    let (catalog, log) = open(dir)?;
    catalog.write(|tx| log.checkpoint(tx))?;
    audit::export(&log, &catalog, &audit::Viewer::Operator, out)
}

/// Every audit record (operator view).
pub fn audit_list(dir: &DataDir, since: Option<OffsetDateTime>) -> Result<Vec<audit::Record>> {
    let (catalog, log) = open(dir)?;
    audit::list(&log, &catalog, &audit::Viewer::Operator, since)
}

/// Verify the stored audit log: the chain, every signature against this escrow's key, and
/// that it reaches the catalog's anchor (so a truncated log fails too) and every checkpoint
/// in `kept` (`(seq, hash hex)`, kept by a partner).
pub fn audit_verify(
    dir: &DataDir,
    kept: Vec<(u64, String)>,
) -> Result<std::result::Result<audit::Verified, audit::VerifyFailure>> {
    let (catalog, log) = open(dir)?;
    let anchor = catalog.read(audit::anchor)?;
    let lines = match log.reader(&catalog)? {
        Some(lines) => lines,
        None if anchor.seq == 0 => return Ok(Ok(audit::Verified::default())),
        None => {
            return Err(Error::Integrity(format!(
                "the audit log is missing but the catalog records {} entries",
                anchor.seq
            )));
        }
    };
    let mut must_contain = kept;
    if anchor.seq > 0 {
        must_contain.push((anchor.seq, hex::encode(anchor.hash)));
    }
    let opts = audit::VerifyOptions {
        public_key: Some(log.public_key().to_string()),
        must_contain,
        whole: false,
    };
    Ok(audit::verify(lines, &opts))
}
