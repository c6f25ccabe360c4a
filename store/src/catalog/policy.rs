//! Table group `grants`, `dataset_settings`, `populations`, `policy_versions`: each data
//! owner's policy, and every version of it written in the transaction of its change.

use escrow_policies::{Grant, Usage};

use super::sql::{Row, Tx, Value, params};
use super::{Catalog, Population, now_rfc3339};
use crate::model::policy::{self, PolicyDocument, PolicyVersion};
use crate::{Error, Result};

impl Catalog {
    /// `owner`'s populations, by dataset then definition order.
    pub fn populations_of(&self, owner: &str) -> Result<Vec<Population>> {
        self.read(|tx| {
            tx.rows(
                "SELECT owner, dataset, name, filter, position FROM populations
                 WHERE owner = ?1 ORDER BY dataset, position",
                params![owner],
            )?
            .iter()
            .map(|r| {
                Ok(Population {
                    owner: r.get(0)?,
                    dataset: r.get(1)?,
                    name: r.get(2)?,
                    filter: r.get(3)?,
                    position: r.get(4)?,
                })
            })
            .collect()
        })
    }

    /// Grants made by `owner` (`made`) and grants made to `partner` or to everyone
    /// (`received`), each ordered.
    pub fn grants_of(&self, partner: &str) -> Result<(Vec<Grant>, Vec<Grant>)> {
        let grants = self.read(|tx| {
            grants(
                tx,
                "SELECT grantee, owner, dataset, col, usage FROM grants
                 WHERE owner = ?1 OR grantee = ?1 OR grantee = '*'
                 ORDER BY owner, dataset, col, grantee, usage",
                params![partner],
            )
        })?;
        Ok(grants.into_iter().partition(|g| g.owner == partner))
    }

    /// Every grant, for the policy engine.
    pub fn all_grants(&self) -> Result<Vec<Grant>> {
        self.read(|tx| {
            grants(
                tx,
                "SELECT grantee, owner, dataset, col, usage FROM grants",
                params![],
            )
        })
    }

    /// The stored protection settings of a dataset (JSON), if the owner set any.
    pub fn settings_json(&self, owner: &str, dataset: &str) -> Result<Option<String>> {
        self.read(|tx| {
            tx.row(
                "SELECT settings FROM dataset_settings WHERE owner = ?1 AND dataset = ?2",
                params![owner, dataset],
            )?
            .map(|r| r.get(0))
            .transpose()
        })
    }

    /// `owner`'s policy history, oldest first.
    pub fn policy_history(&self, owner: &str) -> Result<Vec<policy::HistoryEntry>> {
        let rows = self.read(|tx| {
            tx.rows(
                "SELECT version, created_at, created_by, change, diff FROM policy_versions
                 WHERE owner = ?1 ORDER BY version",
                params![owner],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(policy::HistoryEntry {
                    version: r.get(0)?,
                    time: r.get(1)?,
                    by: r.get(2)?,
                    change: r.get(3)?,
                    diff: serde_json::from_str(&r.get::<String>(4)?)
                        .map_err(|e| Error::internal(format!("bad policy diff in catalog: {e}")))?,
                })
            })
            .collect()
    }

    /// The canonical text of `owner`'s policy at `version` (0: empty, before any change) with
    /// that number; `None`: the policy in force and the latest version number.
    pub fn policy_text(&self, owner: &str, version: Option<i64>) -> Result<(i64, String)> {
        self.read(|tx| match version {
            None => Ok((
                latest_policy_in(tx, owner)?.0,
                policy_document_in(tx, owner)?.body(),
            )),
            Some(0) => Ok((0, String::new())),
            Some(v) => tx
                .row(
                    "SELECT document FROM policy_versions WHERE owner = ?1 AND version = ?2",
                    params![owner, v],
                )?
                .map(|r| Ok((v, r.get(0)?)))
                .unwrap_or_else(|| {
                    Err(Error::NotFound(format!(
                        "{owner} has no policy version {v}"
                    )))
                }),
        })
    }
}

/// What a policy change did: its result, and the owner's policy version it wrote (`None`
/// when the policy document did not change).
pub type Changed<T> = (T, Option<PolicyVersion>);

/// Define a population in `tx` (`p.position` is ignored). Returns its position and whether
/// it is new: the same definition again changes nothing; a different filter under the same
/// name is a conflict.
pub fn add_population(tx: &Tx<'_>, p: &Population, by: &str) -> Result<Changed<(i64, bool)>> {
    let existing = tx.row(
        "SELECT filter, position FROM populations WHERE owner = ?1 AND dataset = ?2 AND name = ?3",
        params![&p.owner, &p.dataset, &p.name],
    )?;
    if let Some(r) = existing {
        if r.get::<String>(0)? != p.filter {
            return Err(Error::Conflict(format!(
                "{}.{} already has a population {}; remove it first",
                p.owner, p.dataset, p.name
            )));
        }
        return Ok(((r.get(1)?, false), None));
    }
    let position: i64 = tx.value(
        "SELECT COALESCE(MAX(position), 0) + 1 FROM populations WHERE owner = ?1 AND dataset = ?2",
        params![&p.owner, &p.dataset],
    )?;
    insert_population_in(tx, p, position, by)?;
    let v = record_policy_version(tx, &p.owner, by, "population_add")?;
    Ok(((position, true), v))
}

/// Remove a population and the overlap grants that name it in `tx` (a later population of
/// the same name is a new definition and needs its own grants); false if there was none
/// (nothing changes then).
pub fn remove_population(
    tx: &Tx<'_>,
    owner: &str,
    dataset: &str,
    name: &str,
    by: &str,
) -> Result<Changed<bool>> {
    let n = tx.execute(
        "DELETE FROM populations WHERE owner = ?1 AND dataset = ?2 AND name = ?3",
        params![owner, dataset, name],
    )?;
    if n == 0 {
        return Ok((false, None));
    }
    tx.execute(
        "DELETE FROM grants WHERE owner = ?1 AND dataset = ?2 AND col = ?3 AND usage = ?4",
        params![owner, dataset, name, Usage::Overlap.as_str()],
    )?;
    let v = record_policy_version(tx, owner, by, "population_remove")?;
    Ok((true, v))
}

/// Record a grant in `tx`; false if it already existed (nothing changed).
pub fn add_grant(tx: &Tx<'_>, g: &Grant, by: &str) -> Result<Changed<bool>> {
    if insert_grant_in(tx, g, by)? == 0 {
        return Ok((false, None));
    }
    Ok((true, record_policy_version(tx, &g.owner, by, "grant")?))
}

/// Remove a grant in `tx`; false if there was no such grant (nothing changed).
pub fn remove_grant(tx: &Tx<'_>, g: &Grant, by: &str) -> Result<Changed<bool>> {
    let n = tx.execute(
        "DELETE FROM grants WHERE owner = ?1 AND dataset = ?2 AND col = ?3 AND grantee = ?4 AND usage = ?5",
        params![
            g.owner.as_str(),
            g.dataset.as_str(),
            g.column.as_deref().unwrap_or("*"),
            g.grantee.as_str(),
            g.usage.as_str()
        ],
    )?;
    if n == 0 {
        return Ok((false, None));
    }
    Ok((true, record_policy_version(tx, &g.owner, by, "revoke")?))
}

/// Replace a dataset's protection settings in `tx`; the policy version it wrote.
pub fn put_settings_json(
    tx: &Tx<'_>,
    owner: &str,
    dataset: &str,
    json: &str,
    by: &str,
) -> Result<Option<PolicyVersion>> {
    put_settings_in(tx, owner, dataset, json, by)?;
    record_policy_version(tx, owner, by, "settings")
}

/// Replace the owner's whole policy (grants, settings, populations) with `doc`, already
/// validated, in `tx`. Returns the version written (`None`: the document is the policy in
/// force, nothing changed).
pub fn replace_policy(
    tx: &Tx<'_>,
    doc: &PolicyDocument,
    by: &str,
    change: &str,
) -> Result<Option<PolicyVersion>> {
    let owner = doc.owner.as_str();
    // Validation ran before this transaction: a dataset deleted since then fails here
    // rather than leaving rules about a dataset that no longer exists.
    for d in doc.datasets() {
        if !tx.exists(
            "SELECT 1 FROM datasets WHERE owner = ?1 AND name = ?2",
            params![owner, d],
        )? {
            return Err(Error::Conflict(format!(
                "dataset {d} was deleted while the policy was being replaced"
            )));
        }
    }
    for table in ["grants", "dataset_settings", "populations"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE owner = ?1"),
            params![owner],
        )?;
    }
    for g in &doc.grants {
        insert_grant_in(tx, g, by)?;
    }
    for (d, s) in &doc.settings {
        let json = serde_json::to_string(s).map_err(Error::internal)?;
        put_settings_in(tx, owner, d, &json, by)?;
    }
    let mut position = 0;
    let mut last = "";
    for p in &doc.populations {
        if p.dataset != last {
            (position, last) = (0, p.dataset.as_str());
        }
        position += 1;
        let population = Population {
            owner: owner.to_string(),
            dataset: p.dataset.clone(),
            name: p.name.clone(),
            filter: p.filter.clone(),
            position,
        };
        insert_population_in(tx, &population, position, by)?;
    }
    record_policy_version(tx, owner, by, change)
}

/// Grants from a query selecting `grantee, owner, dataset, col, usage` (casbin order).
fn grants(tx: &Tx<'_>, sql: &str, params: &[Value]) -> Result<Vec<Grant>> {
    tx.rows(sql, params)?.iter().map(grant).collect()
}

fn grant(r: &Row) -> Result<Grant> {
    let fields: [String; 5] = [r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?];
    Grant::from_casbin(&fields).map_err(|e| Error::internal(format!("bad grant in catalog: {e}")))
}

/// Insert a grant unless it exists; 1 if inserted, 0 if it was there.
fn insert_grant_in(tx: &Tx<'_>, g: &Grant, by: &str) -> Result<usize> {
    tx.execute(
        "INSERT INTO grants (owner, dataset, col, grantee, usage, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        params![
            g.owner.as_str(),
            g.dataset.as_str(),
            g.column.as_deref().unwrap_or("*"),
            g.grantee.as_str(),
            g.usage.as_str(),
            now_rfc3339(),
            by
        ],
    )
}

/// Set a dataset's protection settings (JSON), replacing any.
fn put_settings_in(tx: &Tx<'_>, owner: &str, dataset: &str, json: &str, by: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO dataset_settings (owner, dataset, settings, updated_at, updated_by)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (owner, dataset) DO UPDATE SET
           settings = excluded.settings, updated_at = excluded.updated_at,
           updated_by = excluded.updated_by",
        params![owner, dataset, json, now_rfc3339(), by],
    )?;
    Ok(())
}

/// Insert a population at `position` of its dataset.
fn insert_population_in(tx: &Tx<'_>, p: &Population, position: i64, by: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO populations (owner, dataset, name, filter, position, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            &p.owner,
            &p.dataset,
            &p.name,
            &p.filter,
            position,
            now_rfc3339(),
            by
        ],
    )?;
    Ok(())
}

/// `owner`'s policy document as the tables hold it.
fn policy_document_in(tx: &Tx<'_>, owner: &str) -> Result<PolicyDocument> {
    let mut grants = grants(
        tx,
        "SELECT grantee, owner, dataset, col, usage FROM grants WHERE owner = ?1",
        params![owner],
    )?;
    grants.sort();
    let mut settings = std::collections::BTreeMap::new();
    for r in tx.rows(
        "SELECT dataset, settings FROM dataset_settings WHERE owner = ?1",
        params![owner],
    )? {
        let s = serde_json::from_str(&r.get::<String>(1)?)
            .map_err(|e| Error::internal(format!("bad settings in catalog: {e}")))?;
        settings.insert(r.get::<String>(0)?, s);
    }
    let populations = tx
        .rows(
            "SELECT dataset, name, filter FROM populations WHERE owner = ?1 ORDER BY dataset, position",
            params![owner],
        )?
        .iter()
        .map(|r| {
            Ok(policy::PopulationDef {
                dataset: r.get(0)?,
                name: r.get(1)?,
                filter: r.get(2)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(PolicyDocument {
        owner: owner.to_string(),
        grants,
        settings,
        populations,
    })
}

/// The latest version of `owner`'s policy and its text (0 and empty before any change).
fn latest_policy_in(tx: &Tx<'_>, owner: &str) -> Result<(i64, String)> {
    match tx.row(
        "SELECT version, document FROM policy_versions WHERE owner = ?1
         ORDER BY version DESC LIMIT 1",
        params![owner],
    )? {
        Some(r) => Ok((r.get(0)?, r.get(1)?)),
        None => Ok((0, String::new())),
    }
}

/// After a change made in `tx` that can alter a policy decision (grants, settings,
/// populations, a dataset deleted): move the policy generation (every node's policy set
/// follows it), and write the next version of `owner`'s policy if the change altered it
/// (`None` if the document is unchanged).
pub(super) fn record_policy_version(
    tx: &Tx<'_>,
    owner: &str,
    by: &str,
    change: &str,
) -> Result<Option<PolicyVersion>> {
    tx.execute(
        "UPDATE generations SET value = value + 1 WHERE name = 'policy'",
        params![],
    )?;
    let text = policy_document_in(tx, owner)?.body();
    let (version, previous) = latest_policy_in(tx, owner)?;
    if text == previous {
        return Ok(None);
    }
    let diff = policy::diff(&previous, &text);
    tx.execute(
        "INSERT INTO policy_versions (owner, version, created_at, created_by, change, document, diff)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            owner,
            version + 1,
            now_rfc3339(),
            by,
            change,
            text,
            serde_json::to_string(&diff).map_err(Error::internal)?
        ],
    )?;
    crate::faults::hit("policy.versioned")?;
    Ok(Some(PolicyVersion {
        version: version + 1,
        diff,
    }))
}
