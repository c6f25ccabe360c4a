//! Table group `partners`, `identities`, `crl_state`: who may connect, with which role, and
//! the certificate revocation list every node serves from the catalog.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::sql::{Row, Tx, params};
use super::{Catalog, GENERATIONS, Generations, IdentityRow, now_rfc3339};
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
        self.read(|tx| {
            tx.exists(
                "SELECT 1 FROM identities WHERE partner = ?1 AND \"user\" = ?2 AND revoked_at IS NULL",
                params![partner, user],
            )
        })
    }

    /// Every active user's role (the grouping rules of the role policy).
    pub fn role_assignments(&self) -> Result<Vec<IdentityRow>> {
        self.read(|tx| {
            let rows = tx.rows(
                "SELECT i.partner, i.\"user\", i.role FROM identities i JOIN partners p ON p.name = i.partner
                 WHERE i.revoked_at IS NULL AND p.revoked_at IS NULL ORDER BY i.partner, i.\"user\"",
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
    /// active; and the catalog's generations, read with it in one statement (a request
    /// reads who its caller is first: what it then keeps or reuses stands at these).
    pub fn active_identity(&self, serial: &str) -> Result<(Option<IdentityRow>, Generations)> {
        let r = self.read(|tx| {
            tx.row(
                &format!(
                    "SELECT {GENERATIONS}, i.partner, i.\"user\", i.role FROM (SELECT 1 AS one) g
                     LEFT JOIN (SELECT i.partner, i.\"user\", i.role FROM identities i
                                JOIN partners p ON p.name = i.partner
                                WHERE i.serial = ?1 AND i.revoked_at IS NULL
                                  AND p.revoked_at IS NULL) i ON g.one = 1"
                ),
                params![serial],
            )
        })?;
        let r = r.ok_or_else(|| Error::internal("catalog: no generations"))?;
        let id = match r.get::<Option<String>>(6)? {
            None => None,
            Some(_) => Some(identity_at(&r, 6)?),
        };
        Ok((id, Generations::of(&r)?))
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
    if tx.exists(
        "SELECT 1 FROM identities WHERE partner = ?1 AND \"user\" = ?2 AND revoked_at IS NULL",
        params![partner, user],
    )? {
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
    crl_changed(tx)
}

/// Revoke one user's active identity in `tx`; returns the new CRL contents and number.
pub fn revoke_user(tx: &Tx<'_>, partner: &str, user: &str) -> Result<Revocations> {
    let n = tx.execute(
        "UPDATE identities SET revoked_at = ?3
         WHERE partner = ?1 AND \"user\" = ?2 AND revoked_at IS NULL",
        params![partner, user, now_rfc3339()],
    )?;
    if n == 0 {
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
        let at = OffsetDateTime::parse(&r.get::<String>(1)?, &Rfc3339)
            .map_err(|e| Error::internal(format!("bad time in catalog: {e}")))?;
        out.push((r.get(0)?, at));
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
