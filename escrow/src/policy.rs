//! A data owner's policy as one document, and its versions.
//!
//! Everything a partner decides about what others may learn from its datasets is one
//! document: its grants (casbin `p` rules of `policies/model.conf`), the protection settings
//! of its datasets, and the populations it defines (which its `overlap` grants share). Every
//! change that alters the document (grant, revoke, settings, population added or removed,
//! dataset deleted, rollback, import) writes the next version of it, with author, time and
//! diff, in the same catalog transaction as the change and its audit record
//! (`catalog::policy`'s `record_policy_version`). Rollback and import replace the whole document after
//! validating it whole, atomically.
//!
//! The text form (export, import, stored versions) is CSV that casbin's file adapter loads
//! with `policies/model.conf`: grant lines are casbin rules, and the `setting`, `bounds` and
//! `population` lines are escrow's, which casbin skips.
//!
//! ```text
//! p,globex,acme,accounts,website,join
//! p,*,acme,accounts,customers,overlap
//! setting,acme,accounts,min_entities,10
//! bounds,acme,accounts,arr,0,1000000
//! population,acme,accounts,customers,status = 'customer'
//! ```
//!
//! Engine code: no HTTP.

use std::collections::{BTreeMap, BTreeSet};

use escrow_policies::{PolicySet, Usage};

use crate::audit::{Actor, Event, Outcome};
use crate::store::Store;
use crate::{Error, Result};

pub use crate::model::policy::*;

/// Check the document against the catalog, whole: every dataset is a live dataset of the
/// owner, every column exists, every grantee is an active partner, every setting is in
/// range (bounds on numeric columns), every population filter fits its dataset (and at
/// most `MAX_POPULATIONS` per dataset), every `overlap` grant names a population of the
/// document; finally the grants load into casbin together with every other owner's.
pub async fn validate(doc: &PolicyDocument, store: &std::sync::Arc<Store>) -> Result<()> {
    let (d, s) = (doc.clone(), store.clone());
    let mut all = crate::queries::blocking(move || {
        validate_against_catalog(&d, &s)?;
        let others = s.catalog().all_grants()?;
        Ok(others
            .into_iter()
            .filter(|g| g.owner != d.owner)
            .collect::<Vec<_>>())
    })
    .await?;
    all.extend(doc.grants.iter().cloned());
    PolicySet::build(all)
        .await
        .map_err(|e| invalid(None, format!("the rules do not load: {e}")))?;
    Ok(())
}

fn validate_against_catalog(doc: &PolicyDocument, store: &Store) -> Result<()> {
    let owner = &doc.owner;
    let mut live = BTreeMap::new();
    for d in doc.datasets() {
        let info = store.live_dataset(owner, d).map_err(|e| match e {
            Error::NotFound(_) => invalid(
                None,
                format!("{owner} has no dataset {d} (rules can only be about live datasets)"),
            ),
            other => other,
        })?;
        live.insert(d.to_string(), info);
    }
    let partners: BTreeSet<String> = store
        .catalog()
        .partners()?
        .into_iter()
        .filter(|(_, active)| *active)
        .map(|(n, _)| n)
        .collect();
    for g in &doc.grants {
        let rule = g.to_casbin().join(",");
        if g.grantee != "*" && !partners.contains(&g.grantee) {
            return Err(invalid(
                None,
                format!("p,{rule}: no active partner named {}", g.grantee),
            ));
        }
        match (&g.column, g.usage) {
            (Some(p), Usage::Overlap) => {
                if !doc
                    .populations
                    .iter()
                    .any(|d| d.dataset == g.dataset && &d.name == p)
                {
                    return Err(invalid(
                        None,
                        format!(
                            "p,{rule}: {} has no population {p} in this policy",
                            g.dataset
                        ),
                    ));
                }
            }
            (Some(c), _) => {
                if !live[&g.dataset].columns.iter().any(|col| &col.name == c) {
                    return Err(invalid(
                        None,
                        format!("p,{rule}: {} has no column {c:?}", g.dataset),
                    ));
                }
            }
            (None, _) => {}
        }
    }
    for (d, s) in &doc.settings {
        s.validate(&crate::settings::numeric_columns(&live[d]))
            .map_err(|e| invalid(None, format!("settings of {d}: {e}")))?;
    }
    let mut per_dataset: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &doc.populations {
        let n = per_dataset.entry(p.dataset.as_str()).or_default();
        *n += 1;
        if *n > escrow_query::overlap::MAX_POPULATIONS {
            return Err(invalid(
                None,
                format!(
                    "{} has more than {} populations",
                    p.dataset,
                    escrow_query::overlap::MAX_POPULATIONS
                ),
            ));
        }
        crate::populations::check_filter(store, owner, &p.dataset, &p.filter)
            .map_err(|e| invalid(None, format!("population {} of {}: {e}", p.name, p.dataset)))?;
    }
    Ok(())
}

/// `owner`'s policy history, oldest first.
pub fn history(store: &Store, owner: &str) -> Result<Vec<HistoryEntry>> {
    store.catalog().policy_history(owner)
}

/// The document of `owner`'s version `version` (0: the empty policy before any change) and
/// its number; `None` for the current one.
pub fn document(store: &Store, owner: &str, version: Option<i64>) -> Result<(i64, PolicyDocument)> {
    let (v, text) = store.catalog().policy_text(owner, version)?;
    Ok((v, PolicyDocument::parse(owner, &text)?))
}

/// What changed from version `from` to version `to` of `owner`'s policy.
pub fn diff_versions(store: &Store, owner: &str, from: i64, to: i64) -> Result<PolicyDiff> {
    let (_, a) = store.catalog().policy_text(owner, Some(from))?;
    let (_, b) = store.catalog().policy_text(owner, Some(to))?;
    Ok(diff(&a, &b))
}

/// Replace `actor`'s partner's whole policy with `doc` (validated first), as one new
/// version, audited (`kind`: policy_import or policy_rollback; `detail` says what was asked).
/// A document that could not be read or parsed is refused and audited like an invalid one.
/// With `dry_run`, nothing changes and nothing is recorded: the diff it would make is
/// returned.
pub async fn replace(
    store: &std::sync::Arc<Store>,
    actor: &Actor,
    doc: Result<PolicyDocument>,
    kind: &'static str,
    detail: serde_json::Value,
    dry_run: bool,
) -> Result<(Option<i64>, PolicyDiff)> {
    let validated = match doc {
        Ok(doc) => validate(&doc, store).await.map(|_| doc),
        Err(e) => Err(e),
    };
    if dry_run {
        let doc = validated?;
        let doc_body = doc.body();
        let s = store.clone();
        let (_, current) =
            crate::queries::blocking(move || s.catalog().policy_text(&doc.owner, None)).await?;
        return Ok((None, diff(&current, &doc_body)));
    }
    let event = Event::new(kind, actor.clone(), Outcome::Ok, detail);
    let (store, actor) = (store.clone(), actor.clone());
    crate::queries::blocking(move || {
        store.change(event).run(|change| {
            let doc = validated?;
            let what = kind.trim_start_matches("policy_");
            let v = change.commit(|tx| {
                let v = crate::catalog::policy::replace_policy(tx, &doc, &actor.user, what)?;
                let detail = PolicyVersion::audit_json(v.as_ref());
                Ok((v, detail))
            })?;
            Ok(match v {
                Some(v) => (Some(v.version), v.diff),
                None => (None, PolicyDiff::default()),
            })
        })
    })
    .await
}
