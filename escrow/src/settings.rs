//! Owners' protection settings per dataset: the threshold k, ε per query, the privacy budget
//! per querying partner, contribution bounding, and clamping bounds for SUM/AVG metrics.
//!
//! Defaults (documented in docs/API.md and docs/THREAT_MODEL.md) apply until an owner
//! changes them; a change is validated whole before it is stored.

use crate::audit::{Actor, Change, Event, Outcome};
use crate::catalog;
use crate::model::policy::PolicyVersion;
use crate::store::Store;
use crate::{Error, Result};

pub use crate::model::settings::*;

/// The settings in force for a dataset (defaults if the owner set none).
pub fn of(store: &Store, owner: &str, dataset: &str) -> Result<DatasetSettings> {
    match store.catalog().settings_json(owner, dataset)? {
        None => Ok(DatasetSettings::default()),
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| Error::internal(format!("bad settings in catalog: {e}"))),
    }
}

/// Apply an owner's change to one of its datasets, validated whole.
pub fn change(store: &Store, actor: &Actor, req: &SettingsChange) -> Result<DatasetSettings> {
    let event = Event::new(
        "settings",
        actor.clone(),
        Outcome::Ok,
        serde_json::json!({ "dataset": req.dataset, "change": req }),
    );
    store
        .change(event)
        .run(|change| change_audited(store, actor, req, change))
}

fn change_audited(
    store: &Store,
    actor: &Actor,
    req: &SettingsChange,
    change: &Change<'_>,
) -> Result<DatasetSettings> {
    let (owner, user) = (actor.partner_name()?, actor.user.as_str());
    crate::datadir::validate_name("dataset", &req.dataset)?;
    let numeric = numeric_columns(&store.live_dataset(owner, &req.dataset)?);
    let before = of(store, owner, &req.dataset)?;
    let mut s = before.clone();
    if let Some(k) = req.min_entities {
        s.min_entities = k;
    }
    if let Some(e) = req.epsilon {
        s.epsilon = e;
    }
    if let Some(b) = req.budget {
        s.budget = b;
    }
    if let Some(l) = req.max_groups_per_entity {
        s.max_groups_per_entity = l;
    }
    for (col, b) in &req.bounds {
        match b {
            Some(b) => {
                s.bounds.insert(col.clone(), *b);
            }
            None => {
                s.bounds.remove(col);
            }
        }
    }
    s.validate(&numeric)?;
    let json = serde_json::to_string(&s).map_err(Error::internal)?;
    change.commit(|tx| {
        let v = catalog::policy::put_settings_json(tx, owner, &req.dataset, &json, user)?;
        let mut detail = PolicyVersion::audit_json(v.as_ref());
        detail["before"] = serde_json::json!(before);
        detail["after"] = serde_json::json!(s);
        Ok(((), detail))
    })?;
    Ok(s)
}

/// The numeric columns of a dataset's live version (the ones bounds may clamp).
pub(crate) fn numeric_columns(info: &catalog::DatasetInfo) -> Vec<String> {
    info.columns
        .iter()
        .filter(|c| is_numeric(&c.data_type))
        .map(|c| c.name.clone())
        .collect()
}

fn is_numeric(data_type: &str) -> bool {
    let t = data_type.to_ascii_lowercase();
    ["int", "float", "decimal", "double"]
        .iter()
        .any(|p| t.starts_with(p) || t.starts_with(&format!("u{p}")))
}
