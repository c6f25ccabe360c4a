//! Table group `privacy_ledger`, `released_answers`, `released_overlaps`: what each partner
//! has spent of each owner's privacy budget, and what it has been shown.

use super::sql::{Mode, Tx, params};
use super::{BudgetCharge, Catalog, Spend, now_rfc3339};
use crate::{Error, Result};

impl Catalog {
    /// Spend `epsilon` for the question `fingerprint` once per data owner among `charges`,
    /// all or nothing. Composition is zCDP's, per (asking partner, owner): a question at ε
    /// costs ρ = ε²/2 and the ρ of every distinct question that read any of the owner's
    /// datasets add up; the total is reported as the ε of one equivalent question,
    /// `√(Σ ε²)` (escrow_query::noise). A question already paid for spends nothing. The limit
    /// for an owner is the smallest budget of its datasets the question reads, in the same
    /// unit: `√(Σ ε²) <= budget`. Returns whether anything
    /// was spent and, per charge, the owner's total spent by `partner` afterwards; if a limit
    /// would be exceeded, nothing is spent and that charge and the total are returned. With
    /// `dry_run`, the same answer with nothing spent (the transaction rolls back).
    ///
    /// Writers are serialised on every node, so concurrent questions arriving at several
    /// nodes spend each budget exactly once. `running` (the version ids read, and what to
    /// keep for the question meanwhile) is kept in `released_answers` in the same
    /// transaction as a new charge: the same question asked again at once, on any node,
    /// finds it paid and marked, and does not run a second time.
    pub fn spend(
        &self,
        partner: &str,
        charges: &[BudgetCharge],
        epsilon: f64,
        fingerprint: &str,
        dry_run: bool,
        running: Option<(&[String], &[u8])>,
    ) -> Result<Spend> {
        let owners: std::collections::BTreeSet<&str> =
            charges.iter().map(|c| c.owner.as_str()).collect();
        let totals = |owner_totals: &std::collections::BTreeMap<&str, f64>| -> Vec<f64> {
            charges
                .iter()
                .map(|c| owner_totals.get(c.owner.as_str()).copied().unwrap_or(0.0))
                .collect()
        };
        // A question paid for stays paid (the ledger only grows): asked again, it is told so
        // by a read, without queueing for the write lock, and gets what was kept for it in
        // the same statement as the first owner's ledger.
        if !dry_run {
            let paid = self.read(|tx| {
                let mut owner_totals = std::collections::BTreeMap::new();
                let (mut kept, mut ledger) = (None, Vec::new());
                for (i, &owner) in owners.iter().enumerate() {
                    let read = ledger_with(tx, partner, owner, fingerprint, i == 0)?;
                    if !read.paid {
                        return Ok(None);
                    }
                    owner_totals.insert(owner, read.spent_sq.sqrt());
                    ledger.push((owner.to_string(), read.rows));
                    kept = kept.or(read.answer);
                }
                Ok(Some((owner_totals, kept, ledger)))
            })?;
            if let Some((owner_totals, kept, ledger)) = paid {
                return Ok(Spend::Charged {
                    new: false,
                    totals: totals(&owner_totals),
                    kept: Some(kept),
                    ledger,
                });
            }
        }
        let mode = if dry_run { Mode::DryRun } else { Mode::Write };
        self.run(mode, |tx| {
            let mut owner_totals: std::collections::BTreeMap<&str, f64> = Default::default();
            // Every owner's limit is checked before anything is charged: all or nothing.
            let mut to_charge = Vec::new();
            for &owner in &owners {
                let of_owner: Vec<&BudgetCharge> =
                    charges.iter().filter(|c| c.owner == owner).collect();
                let (spent_sq, paid) = ledger_of(tx, partner, owner, fingerprint)?;
                if paid {
                    owner_totals.insert(owner, spent_sq.sqrt());
                    continue;
                }
                // The strictest budget of the owner's datasets read; a small tolerance so that
                // budget² / epsilon² questions fit exactly.
                let limit = of_owner
                    .iter()
                    .copied()
                    .min_by(|a, b| a.budget.total_cmp(&b.budget))
                    .ok_or_else(|| Error::internal("a charge without datasets"))?;
                let after_sq = spent_sq + epsilon * epsilon;
                if after_sq > limit.budget * limit.budget * (1.0 + 1e-9) + 1e-12 {
                    return Ok(Spend::Exhausted {
                        charge: limit.clone(),
                        spent: spent_sq.sqrt(),
                    });
                }
                let mut names: Vec<&str> = of_owner.iter().map(|c| c.dataset.as_str()).collect();
                names.sort_unstable();
                names.dedup();
                to_charge.push((owner, names.join(",")));
                owner_totals.insert(owner, after_sq.sqrt());
            }
            let new = !to_charge.is_empty();
            for (owner, datasets) in to_charge {
                tx.execute(
                    "INSERT INTO privacy_ledger (partner, owner, dataset, fingerprint, epsilon, spent_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![partner, owner, datasets, fingerprint, epsilon, now_rfc3339()],
                )?;
            }
            if let (true, Some((versions, marker))) = (new, running) {
                keep_answer_in(tx, partner, fingerprint, versions, marker)?;
            }
            Ok(Spend::Charged {
                new,
                totals: totals(&owner_totals),
                kept: None,
                ledger: Vec::new(),
            })
        })
    }

    /// What `partner` has spent on `owner`'s data, every dataset and version of it, as the
    /// ε of one equivalent question: `√(Σ ε²)` ([`Catalog::spend`]).
    pub fn spent(&self, partner: &str, owner: &str) -> Result<f64> {
        let squares: f64 = self.read(|tx| {
            tx.value(
                "SELECT COALESCE(SUM(epsilon * epsilon), 0) FROM privacy_ledger
                 WHERE partner = ?1 AND owner = ?2",
                params![partner, owner],
            )
        })?;
        Ok(squares.sqrt())
    }

    /// The answer kept for `partner`'s question `fingerprint`, if any.
    pub fn released_answer(&self, partner: &str, fingerprint: &str) -> Result<Option<Vec<u8>>> {
        self.read(|tx| {
            tx.row(
                "SELECT answer FROM released_answers WHERE partner = ?1 AND fingerprint = ?2",
                params![partner, fingerprint],
            )?
            .map(|r| r.get(0))
            .transpose()
        })
    }

    /// Keep the answer released to `partner` for `fingerprint`, computed from `versions`.
    pub fn keep_answer(
        &self,
        partner: &str,
        fingerprint: &str,
        versions: &[String],
        answer: &[u8],
    ) -> Result<()> {
        self.write(|tx| keep_answer_in(tx, partner, fingerprint, versions, answer))
    }

    /// Keep an overlap matrix released to `partner` (asked of `with`), computed from
    /// `versions`: `mine` and `theirs` are `owner.dataset@vN`, `cells` the released cells
    /// (JSON). Released again on the same versions, it is kept once.
    #[allow(clippy::too_many_arguments)]
    pub fn keep_overlap(
        &self,
        partner: &str,
        with: &str,
        mine: &str,
        theirs: &str,
        fingerprint: &str,
        versions: &[String],
        cells: &str,
    ) -> Result<()> {
        let versions = format!(" {} ", versions.join(" "));
        // Asked again, the release is usually kept already: a read says so, without
        // queueing for the write lock.
        let kept = self.read(|tx| {
            tx.exists(
                "SELECT 1 FROM released_overlaps
                 WHERE partner = ?1 AND fingerprint = ?2 AND versions = ?3",
                params![partner, fingerprint, versions.as_str()],
            )
        })?;
        if kept {
            return Ok(());
        }
        self.write(|tx| {
            tx.execute(
                "INSERT INTO released_overlaps
                   (partner, with_partner, mine, theirs, fingerprint, versions, cells, released_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                params![
                    partner,
                    with,
                    mine,
                    theirs,
                    fingerprint,
                    versions,
                    cells,
                    now_rfc3339()
                ],
            )?;
            Ok(())
        })
    }

    /// The overlap matrices released to `partner` with `with`, oldest first: (released at,
    /// mine, theirs, cells JSON).
    pub fn released_overlaps(
        &self,
        partner: &str,
        with: &str,
    ) -> Result<Vec<(String, String, String, String)>> {
        self.read(|tx| {
            tx.rows(
                "SELECT released_at, mine, theirs, cells FROM released_overlaps
                 WHERE partner = ?1 AND with_partner = ?2 ORDER BY released_at, versions",
                params![partner, with],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .collect()
        })
    }
}

/// Keep `answer` for `partner`'s question `fingerprint`, computed from `versions`.
fn keep_answer_in(
    tx: &Tx<'_>,
    partner: &str,
    fingerprint: &str,
    versions: &[String],
    answer: &[u8],
) -> Result<()> {
    let versions = format!(" {} ", versions.join(" "));
    tx.execute(
        "INSERT INTO released_answers (partner, fingerprint, versions, answer, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (partner, fingerprint) DO UPDATE SET
           versions = excluded.versions, answer = excluded.answer,
           created_at = excluded.created_at",
        params![partner, fingerprint, versions, answer, now_rfc3339()],
    )?;
    Ok(())
}

/// What `partner` has spent on `owner`'s data (Σ ε²), and whether the question
/// `fingerprint` is among what it paid for.
fn ledger_of(tx: &Tx<'_>, partner: &str, owner: &str, fingerprint: &str) -> Result<(f64, bool)> {
    let read = ledger_with(tx, partner, owner, fingerprint, false)?;
    Ok((read.spent_sq, read.paid))
}

/// One read of `partner`'s ledger on one owner's data.
struct LedgerRead {
    /// Σ ε² spent.
    spent_sq: f64,
    /// Whether the question is among what was paid for.
    paid: bool,
    /// How many rows (questions paid) there are.
    rows: i64,
    /// What is kept for the question, when asked for.
    answer: Option<Vec<u8>>,
}

/// [`ledger_of`], with the ledger's row count, and with `answer` what is kept for
/// `partner`'s question `fingerprint`.
fn ledger_with(
    tx: &Tx<'_>,
    partner: &str,
    owner: &str,
    fingerprint: &str,
    answer: bool,
) -> Result<LedgerRead> {
    let kept = if answer {
        "(SELECT answer FROM released_answers WHERE partner = ?1 AND fingerprint = ?3)"
    } else {
        "NULL"
    };
    let r = tx
        .row(
            &format!(
                "SELECT COALESCE(SUM(epsilon * epsilon), 0),
                        COALESCE(MAX(CASE WHEN fingerprint = ?3 THEN 1 ELSE 0 END), 0),
                        {kept}, COUNT(*)
                 FROM privacy_ledger WHERE partner = ?1 AND owner = ?2"
            ),
            params![partner, owner, fingerprint],
        )?
        .ok_or_else(|| Error::internal("catalog: SUM returned no row"))?;
    Ok(LedgerRead {
        spent_sq: r.get(0)?,
        paid: r.get(1)?,
        answer: r.get(2)?,
        rows: r.get(3)?,
    })
}
