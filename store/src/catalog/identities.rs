//! Table group `partners`, `identities`, `crl_state`: who may connect, with which role, and
//! the certificate revocation list every node serves from the catalog.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::sql::{Row, Tx, Value, params};
use super::{Catalog, Generations, IdentityRow, generations_list, now_ms, now_rfc3339};
use crate::{Error, Result};

/// Revoked serials with their revocation times, and the CRL number.
pub type Revocations = (Vec<(String, OffsetDateTime)>, u64);

impl Catalog {
    pub fn partner_is_active(&self, name: &str) -> Result<bool> {
        self.read(|tx| {
            tx.exists(
                "SELECT 1 FROM partners WHERE name = ?1 AND revoked_at IS NULL",
                params![name],
            )
        })
    }

    pub fn user_is_active(&self, partner: &str, user: &str) -> Result<bool> {
        self.read(|tx| user_active(tx, partner, user))
    }

    /// Every active user's role (the grouping rules of the role policy).
    pub fn role_assignments(&self) -> Result<Vec<IdentityRow>> {
        self.read(|tx| {
            let rows = tx.rows(
                "SELECT i.partner, i.\"user\", i.role FROM identities i JOIN partners p ON p.name = i.partner
                 WHERE i.revoked_at IS NULL AND i.replaced_by IS NULL AND p.revoked_at IS NULL
                 ORDER BY i.partner, i.\"user\"",
                params![],
            )?;
            rows.iter().map(identity).collect()
        })
    }

    /// Every revoked serial with its revocation time, and the current CRL number.
    pub fn revocations(&self) -> Result<Revocations> {
        self.read(revocations_in)
    }

    /// The current CRL number alone (it moves with every revocation).
    pub fn crl_number(&self) -> Result<u64> {
        self.read(crl_number_in)
    }

    /// The identity registered for this certificate serial, if it and its partner are
    /// active (a renewed certificate for [`RENEWAL_GRACE_MS`] after its renewal); and the catalog's generations, read with it in one statement (a request
    /// reads who its caller is first: what it then keeps or reuses stands at these).
    pub fn active_identity(&self, serial: &str) -> Result<(Option<IdentityRow>, Generations)> {
        let r = self.read(|tx| {
            tx.row(
                &format!(
                    "SELECT {}, i.partner, i.\"user\", i.role FROM (SELECT 1 AS one) g
                     LEFT JOIN (SELECT i.partner, i.\"user\", i.role FROM identities i
                                JOIN partners p ON p.name = i.partner
                                WHERE {}) i ON g.one = 1",
                    generations_list(),
                    active_serial("?1", "?2")
                ),
                params![serial, now_ms() - RENEWAL_GRACE_MS],
            )
        })?;
        let r = r.ok_or_else(|| Error::internal("catalog: no generations"))?;
        let id = match r.get::<Option<String>>(6)? {
            None => None,
            Some(_) => Some(identity_at(&r, 6)?),
        };
        Ok((id, Generations::of(&r)?))
    }

    /// The invitation a token's secret digest ([`crate::model::enrollment::Token::digest`])
    /// names, open or closed.
    pub fn invitation(&self, digest: &str) -> Result<Option<Invitation>> {
        self.read(|tx| {
            tx.row(
                "SELECT id, partner, \"user\", role, cert_days, expires_at, closed_how, refusals
                 FROM invitations WHERE secret_hash = ?1",
                params![digest],
            )?
            .map(|r| {
                Ok(Invitation {
                    id: r.get(0)?,
                    partner: r.get(1)?,
                    user: r.get(2)?,
                    role: r.get(3)?,
                    cert_days: u32::try_from(r.get::<i64>(4)?)
                        .map_err(|_| Error::internal("catalog: bad cert_days"))?,
                    expires_at: parse_time(&r.get::<String>(5)?)?,
                    closed: r.get(6)?,
                    refusals: r.get(7)?,
                })
            })
            .transpose()
        })
    }

    /// The open invitations (of `partner`, or of every partner), oldest first: who is
    /// invited with which role, until when, and by whom. Never their token.
    pub fn open_invitations(&self, partner: Option<&str>) -> Result<Vec<OpenInvitation>> {
        let now = OffsetDateTime::now_utc();
        let rows = self.read(|tx| {
            tx.rows(
                "SELECT partner, \"user\", role, expires_at, by_partner, by_user, created_at
                 FROM invitations WHERE closed_at IS NULL ORDER BY created_at, id",
                params![],
            )
        })?;
        let mut out = Vec::new();
        for r in &rows {
            let invitation = OpenInvitation {
                partner: r.get(0)?,
                user: r.get(1)?,
                role: r.get(2)?,
                expires_at: parse_time(&r.get::<String>(3)?)?,
                by_partner: r.get(4)?,
                by_user: r.get(5)?,
            };
            if invitation.expires_at > now && partner.is_none_or(|p| p == invitation.partner) {
                out.push(invitation);
            }
        }
        Ok(out)
    }

    /// Names of all partners and whether they are active.
    pub fn partners(&self) -> Result<Vec<(String, bool)>> {
        self.read(|tx| {
            tx.rows(
                "SELECT name, revoked_at IS NULL FROM partners ORDER BY name",
                params![],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .collect()
        })
    }
}

/// Register a partner in `tx`; fails with `conflict` if it exists.
pub fn add_partner(tx: &Tx<'_>, name: &str) -> Result<()> {
    let exists = tx.row(
        "SELECT revoked_at FROM partners WHERE name = ?1",
        params![name],
    )?;
    match exists.map(|r| r.get::<Option<String>>(0)).transpose()? {
        Some(None) => Err(Error::Conflict(format!("partner {name} already exists"))),
        Some(Some(_)) => Err(Error::Conflict(format!(
            "partner {name} was revoked; partner names are not reused"
        ))),
        None => {
            tx.execute(
                "INSERT INTO partners (name, created_at) VALUES (?1, ?2)",
                params![name, now_rfc3339()],
            )?;
            Ok(())
        }
    }
}

/// Record an issued identity certificate in `tx`.
pub fn add_identity(
    tx: &Tx<'_>,
    serial: &str,
    partner: &str,
    user: &str,
    role: &str,
) -> Result<()> {
    // Checked again under the write lock: two adds of one user racing (on one node
    // or two) both pass the caller's check, and only one may register.
    if user_active(tx, partner, user)? {
        return Err(Error::Conflict(format!(
            "{partner} already has a user {user}; revoke it first"
        )));
    }
    tx.execute(
        "INSERT INTO identities (serial, partner, \"user\", role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![serial, partner, user, role, now_rfc3339()],
    )?;
    Ok(())
}

/// An invitation to enroll one identity (`invitations`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    /// Random id, hex: how the audit log names it (never the token).
    pub id: String,
    pub partner: String,
    pub user: String,
    pub role: String,
    /// Lifetime of the certificate it enrolls.
    pub cert_days: u32,
    pub expires_at: OffsetDateTime,
    /// How it was closed (`enrolled`, `replaced`, `revoked`), if it was.
    pub closed: Option<String>,
    /// Refused uses of its token so far.
    pub refusals: i64,
}

/// An invitation still open and not expired, as its partner's admins and the operator see
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenInvitation {
    pub partner: String,
    pub user: String,
    pub role: String,
    pub expires_at: OffsetDateTime,
    /// Who made it: a user of `by_partner`, or the operator (no partner).
    pub by_partner: Option<String>,
    pub by_user: String,
}

/// The condition on `identities i JOIN partners p` that certificate `serial` (a parameter) is
/// active: registered, not revoked, not replaced before `since` (a parameter: now less the
/// renewal grace), its partner not revoked.
pub(crate) fn active_serial(serial: &str, since: &str) -> String {
    format!(
        "i.serial = {serial} AND i.revoked_at IS NULL
         AND (i.replaced_ms IS NULL OR i.replaced_ms > {since}) AND p.revoked_at IS NULL"
    )
}

/// How long a renewed certificate is still accepted after its renewal: a renewal whose
/// answer never reached the client can be finished with it (`escrow renew` again refuses,
/// the client keeps working until its admin invites it again), and a copied old key stops
/// working a day after its holder renews.
pub const RENEWAL_GRACE_MS: i64 = 24 * 3600 * 1000;
/// An identity renews at most once this often.
pub const RENEWAL_EVERY_MS: i64 = 3600 * 1000;

/// Count a refused use of invitation `id` in `tx`; returns how many there have been.
pub fn count_refusal(tx: &Tx<'_>, id: &str) -> Result<i64> {
    tx.execute(
        "UPDATE invitations SET refusals = refusals + 1 WHERE id = ?1",
        params![id],
    )?;
    tx.value(
        "SELECT refusals FROM invitations WHERE id = ?1",
        params![id],
    )
}

/// Keep `invitation` in `tx`, made by `by` (partner, user; no partner: the operator),
/// known by its token's secret digest. The partner must be active and the user not
/// (`conflict`); an open invitation for the same identity is closed as `replaced`. Returns
/// the ids of those it replaced.
pub fn invite(
    tx: &Tx<'_>,
    invitation: &Invitation,
    digest: &str,
    by: (Option<&str>, &str),
) -> Result<Vec<String>> {
    let Invitation {
        id,
        partner,
        user,
        role,
        cert_days,
        expires_at,
        ..
    } = invitation;
    if !tx.exists(
        "SELECT 1 FROM partners WHERE name = ?1 AND revoked_at IS NULL",
        params![partner.as_str()],
    )? {
        return Err(Error::NotFound(format!(
            "no active partner named {partner}"
        )));
    }
    if user_active(tx, partner, user)? {
        return Err(Error::Conflict(format!(
            "{partner} already has a user {user}; revoke it first"
        )));
    }
    let replaced = close_invitations(
        tx,
        "partner = ?1 AND \"user\" = ?2",
        params![partner.as_str(), user.as_str()],
        "replaced",
    )?;
    let expires = super::rfc3339(*expires_at);
    tx.execute(
        "INSERT INTO invitations (id, secret_hash, partner, \"user\", role, cert_days, created_at, expires_at, by_partner, by_user)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            id.as_str(),
            digest,
            partner.as_str(),
            user.as_str(),
            role.as_str(),
            i64::from(*cert_days),
            now_rfc3339(),
            expires,
            by.0,
            by.1
        ],
    )?;
    Ok(replaced)
}

/// Close invitation `id` in `tx` as used to enroll the certificate `serial`, and register
/// that certificate for its identity. `unauthenticated` if it was closed meanwhile (single
/// use, even with two nodes taking it at once).
pub fn enroll(tx: &Tx<'_>, id: &str, serial: &str) -> Result<IdentityRow> {
    let taken = tx.execute(
        "UPDATE invitations SET closed_at = ?3, closed_how = 'enrolled', serial = ?2
         WHERE id = ?1 AND closed_at IS NULL",
        params![id, serial, now_rfc3339()],
    )?;
    if taken == 0 {
        return Err(Error::Unauthenticated(
            "this enrollment token was used already or withdrawn; ask for a new one".into(),
        ));
    }
    let r = tx
        .row(
            "SELECT partner, \"user\", role FROM invitations WHERE id = ?1",
            params![id],
        )?
        .ok_or_else(|| Error::internal("catalog: an invitation vanished"))?;
    let who = identity(&r)?;
    if !tx.exists(
        "SELECT 1 FROM partners WHERE name = ?1 AND revoked_at IS NULL",
        params![who.partner.as_str()],
    )? {
        return Err(Error::Unauthenticated(format!(
            "partner {} was revoked",
            who.partner
        )));
    }
    add_identity(tx, serial, &who.partner, &who.user, &who.role)?;
    Ok(who)
}

/// Register `new` in `tx` as the renewal of the active certificate `old`: same identity and
/// role. The identity's current certificate (`old`) is marked replaced by it, and is accepted
/// for [`RENEWAL_GRACE_MS`] more. `unauthenticated` if `old` is not active; `conflict` if
/// `old` was renewed already (only the newest certificate renews, so a copied old key cannot
/// keep itself alive) or the identity renewed within [`RENEWAL_EVERY_MS`].
pub fn renew(tx: &Tx<'_>, old: &str, new: &str) -> Result<IdentityRow> {
    let r = tx.row(
        "SELECT i.partner, i.\"user\", i.role, i.replaced_by FROM identities i
         JOIN partners p ON p.name = i.partner
         WHERE i.serial = ?1 AND i.revoked_at IS NULL AND p.revoked_at IS NULL",
        params![old],
    )?;
    let who = match &r {
        Some(r) => identity(r)?,
        None => {
            return Err(Error::Unauthenticated(
                "the identity is not registered or was revoked".into(),
            ));
        }
    };
    if r.map(|r| r.get::<Option<String>>(3))
        .transpose()?
        .flatten()
        .is_some()
    {
        return Err(Error::Conflict(
            "this certificate was renewed already: use the renewed bundle (or ask your admin to invite you again)".into(),
        ));
    }
    let now = now_ms();
    if tx.exists(
        "SELECT 1 FROM identities WHERE partner = ?1 AND \"user\" = ?2 AND replaced_ms > ?3",
        params![
            who.partner.as_str(),
            who.user.as_str(),
            now - RENEWAL_EVERY_MS
        ],
    )? {
        return Err(Error::Conflict(format!(
            "{}/{} renewed less than an hour ago; renew again later",
            who.partner, who.user
        )));
    }
    tx.execute(
        "UPDATE identities SET replaced_by = ?2, replaced_ms = ?3 WHERE serial = ?1",
        params![old, new, now],
    )?;
    tx.execute(
        "INSERT INTO identities (serial, partner, \"user\", role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![new, who.partner.as_str(), who.user.as_str(), who.role.as_str(), now_rfc3339()],
    )?;
    Ok(who)
}

/// Close the open invitations `which` (a condition on `invitations` over `args`) as `how`;
/// returns their ids.
fn close_invitations(tx: &Tx<'_>, which: &str, args: &[Value], how: &str) -> Result<Vec<String>> {
    let open = tx.rows(
        &format!("SELECT id FROM invitations WHERE ({which}) AND closed_at IS NULL ORDER BY id"),
        args,
    )?;
    let ids = open
        .iter()
        .map(|r| r.get::<String>(0))
        .collect::<Result<Vec<_>>>()?;
    let now = now_rfc3339();
    for id in &ids {
        tx.execute(
            "UPDATE invitations SET closed_at = ?2, closed_how = ?3 WHERE id = ?1",
            params![id, now.as_str(), how],
        )?;
    }
    Ok(ids)
}

fn user_active(tx: &Tx<'_>, partner: &str, user: &str) -> Result<bool> {
    tx.exists(
        "SELECT 1 FROM identities WHERE partner = ?1 AND \"user\" = ?2 AND revoked_at IS NULL",
        params![partner, user],
    )
}

fn parse_time(text: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| Error::internal(format!("bad time in catalog: {e}")))
}

/// Revoke a partner and all its identities in `tx`; returns the new CRL contents and number.
pub fn revoke_partner(tx: &Tx<'_>, name: &str) -> Result<Revocations> {
    let now = now_rfc3339();
    let changed = tx.execute(
        "UPDATE partners SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
        params![name, now.as_str()],
    )?;
    if changed == 0 {
        let known = tx.exists("SELECT 1 FROM partners WHERE name = ?1", params![name])?;
        return Err(if known {
            Error::Conflict(format!("partner {name} is already revoked"))
        } else {
            Error::NotFound(format!("no partner named {name}"))
        });
    }
    tx.execute(
        "UPDATE identities SET revoked_at = ?2 WHERE partner = ?1 AND revoked_at IS NULL",
        params![name, now],
    )?;
    // Its invitations, and those its identities made for anyone.
    close_invitations(
        tx,
        "partner = ?1 OR by_partner = ?1",
        params![name],
        "revoked",
    )?;
    crl_changed(tx)
}

/// Revoke one user's active identity (its every certificate, a renewed one's older ones
/// too) and open invitation in `tx`; returns the new CRL contents and number.
pub fn revoke_user(tx: &Tx<'_>, partner: &str, user: &str) -> Result<Revocations> {
    let n = tx.execute(
        "UPDATE identities SET revoked_at = ?3
         WHERE partner = ?1 AND \"user\" = ?2 AND revoked_at IS NULL",
        params![partner, user, now_rfc3339()],
    )?;
    // Its own invitation, and what it invited (a departing admin leaves no token behind).
    let invited = close_invitations(
        tx,
        "(partner = ?1 AND \"user\" = ?2) OR (by_partner = ?1 AND by_user = ?2)",
        params![partner, user],
        "revoked",
    )?;
    if n == 0 && invited.is_empty() {
        return Err(Error::NotFound(format!(
            "{partner} has no active user {user}"
        )));
    }
    crl_changed(tx)
}

fn identity(r: &Row) -> Result<IdentityRow> {
    identity_at(r, 0)
}

/// An identity selected as partner, user and role from column `first` on.
fn identity_at(r: &Row, first: usize) -> Result<IdentityRow> {
    Ok(IdentityRow {
        partner: r.get(first)?,
        user: r.get(first + 1)?,
        role: r.get(first + 2)?,
    })
}

fn crl_number_in(tx: &Tx<'_>) -> Result<u64> {
    let number: i64 = tx.value("SELECT number FROM crl_state WHERE id = 1", params![])?;
    Ok(number as u64)
}

fn revocations_in(tx: &Tx<'_>) -> Result<Revocations> {
    let number = crl_number_in(tx)?;
    let mut out = Vec::new();
    for r in tx.rows(
        "SELECT serial, revoked_at FROM identities WHERE revoked_at IS NOT NULL ORDER BY serial",
        params![],
    )? {
        out.push((r.get(0)?, parse_time(&r.get::<String>(1)?)?));
    }
    Ok((out, number))
}

/// After a revocation in `tx`: the next CRL number; the revocations as they now stand.
fn crl_changed(tx: &Tx<'_>) -> Result<Revocations> {
    tx.execute(
        "UPDATE crl_state SET number = number + 1 WHERE id = 1",
        params![],
    )?;
    revocations_in(tx)
}
