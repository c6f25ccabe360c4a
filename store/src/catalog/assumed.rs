//! Reads a request took from what its node kept instead of from the catalog, confirmed when
//! its audit record is written.
//!
//! A question asked again (the warm path) needs the caller's identity, the catalog's
//! generations, the ledger (paid already?) and the answer kept for it: on a shared catalog
//! each read is a round trip. A node keeps what it last read of them; a request that uses
//! those copies records here what it assumed, and its audit record, which is written before
//! anything of the answer leaves, is inserted only if every assumption still holds in the
//! catalog at that moment (in the same statement as the record on a shared catalog: one
//! round trip for the whole question). If one does not, nothing is recorded, nothing is
//! released, and the question is asked again on fresh reads. So a revocation, a policy
//! change, a deletion or a charge made on any node applies to every answer recorded after
//! it committed, exactly as if every read had been made.

use super::identities::RENEWAL_GRACE_MS;
use super::sql::{Tx, Value};
use super::{Generations, IdentityRow, now_ms};
use crate::Result;

/// What one request assumed; empty when it read everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assumed(Vec<Assumption>);

#[derive(Debug, Clone, PartialEq)]
enum Assumption {
    /// The certificate `serial` is active and names this identity, with this role.
    Identity { serial: String, id: IdentityRow },
    /// The catalog's generations are these.
    Generations(Generations),
    /// `partner` has paid this many questions on `owner`'s data (the ledger only grows:
    /// the same count is the same rows).
    Ledger {
        partner: String,
        owner: String,
        rows: i64,
    },
    /// What is kept for `partner`'s question `fingerprint` is these bytes.
    Kept {
        partner: String,
        fingerprint: String,
        answer: Vec<u8>,
    },
}

impl Assumed {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The identity of certificate `serial` is still `id` (registered, not revoked, not
    /// replaced longer ago than the renewal grace, its partner not revoked).
    pub fn identity(&mut self, serial: &str, id: &IdentityRow) {
        self.0.push(Assumption::Identity {
            serial: serial.to_string(),
            id: id.clone(),
        });
    }

    /// The catalog's generations are still `at`.
    pub fn generations(&mut self, at: Generations) {
        self.0.push(Assumption::Generations(at));
    }

    /// `partner`'s ledger on `owner`'s data still holds `rows` rows.
    pub fn ledger(&mut self, partner: &str, owner: &str, rows: i64) {
        self.0.push(Assumption::Ledger {
            partner: partner.to_string(),
            owner: owner.to_string(),
            rows,
        });
    }

    /// What is kept for `partner`'s question `fingerprint` is still `answer`.
    pub fn kept(&mut self, partner: &str, fingerprint: &str, answer: &[u8]) {
        self.0.push(Assumption::Kept {
            partner: partner.to_string(),
            fingerprint: fingerprint.to_string(),
            answer: answer.to_vec(),
        });
    }

    /// Take the assumptions about the caller's identity out, leaving the rest.
    pub fn take_caller(&mut self) -> Assumed {
        let (caller, rest) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|a| matches!(a, Assumption::Identity { .. }));
        self.0 = rest;
        Assumed(caller)
    }

    /// Whether every assumption holds in `tx`'s view of the catalog (one statement).
    pub fn hold(&self, tx: &Tx<'_>) -> Result<bool> {
        if self.is_empty() {
            return Ok(true);
        }
        let mut values = Vec::new();
        let condition = self.condition(&mut values);
        tx.value::<i64>(
            &format!("SELECT CASE WHEN {condition} THEN 1 ELSE 0 END"),
            &values,
        )
        .map(|held| held == 1)
    }

    /// Every assumption as one SQL condition, its parameters appended to `values` (numbered
    /// on from those already there).
    pub(crate) fn condition(&self, values: &mut Vec<Value>) -> String {
        let mut param = |v: Value| {
            values.push(v);
            format!("?{}", values.len())
        };
        let mut all = Vec::with_capacity(self.0.len());
        for a in &self.0 {
            all.push(match a {
                Assumption::Identity { serial, id } => {
                    let (s, p, u, r, since) = (
                        param(serial.as_str().into()),
                        param(id.partner.as_str().into()),
                        param(id.user.as_str().into()),
                        param(id.role.as_str().into()),
                        param((now_ms() - RENEWAL_GRACE_MS).into()),
                    );
                    format!(
                        "EXISTS (SELECT 1 FROM identities i JOIN partners p ON p.name = i.partner
                                 WHERE {} AND i.partner = {p} AND i.\"user\" = {u} AND i.role = {r})",
                        super::identities::active_serial(&s, &since)
                    )
                }
                Assumption::Generations(g) => {
                    let at = [
                        g.policy,
                        g.data.0,
                        g.data.1,
                        g.identities.0,
                        g.identities.1,
                        g.identities.2,
                    ];
                    let terms: Vec<String> = super::GENERATION_COLUMNS
                        .iter()
                        .zip(at)
                        .map(|(column, v)| format!("{column} = {}", param(v.into())))
                        .collect();
                    terms.join(" AND ")
                }
                Assumption::Ledger {
                    partner,
                    owner,
                    rows,
                } => {
                    let (p, o, n) = (
                        param(partner.as_str().into()),
                        param(owner.as_str().into()),
                        param((*rows).into()),
                    );
                    format!(
                        "(SELECT COUNT(*) FROM privacy_ledger WHERE partner = {p} AND owner = {o}) = {n}"
                    )
                }
                Assumption::Kept {
                    partner,
                    fingerprint,
                    answer,
                } => {
                    let (p, f, a) = (
                        param(partner.as_str().into()),
                        param(fingerprint.as_str().into()),
                        param(answer.clone().into()),
                    );
                    format!(
                        "(SELECT answer FROM released_answers WHERE partner = {p} AND fingerprint = {f}) = {a}"
                    )
                }
            });
        }
        all.join(" AND ")
    }
}
