//! Populations: a data owner's named subsets of its datasets ("customers", "open
//! opportunities"), defined by a SQL predicate over the dataset's own columns. Validated at
//! definition (`escrow_query::population::check_filter`: one boolean expression, no key
//! column, no subqueries); sharing them is a grant of usage `overlap` (see overlaps.rs). At
//! most 64 per dataset (one bit each in the overlap engine). Engine code: no HTTP.

use escrow_query::QueryError;
use serde::Deserialize;

use crate::audit::{Actor, Change, Event, Outcome};
use crate::catalog::{self, Population};
use crate::datadir::validate_name;
use crate::model::policy::PolicyVersion;
use crate::store::Store;
use crate::{Error, Result};

/// A population as its owner defines or removes it.
#[derive(Debug, Clone, serde::Serialize, Deserialize, utoipa::ToSchema)]
pub struct PopulationRequest {
    /// The owner's dataset name.
    pub dataset: String,
    pub name: String,
    /// The predicate (for definitions).
    pub filter: Option<String>,
}

fn event(kind: &str, actor: &Actor, req: &PopulationRequest) -> Event {
    Event::new(
        kind,
        actor.clone(),
        Outcome::Ok,
        serde_json::json!({ "dataset": req.dataset, "population": req.name, "filter": req.filter }),
    )
}

/// Define a population of the caller's partner's dataset, audited. Returns it and whether
/// it is new.
pub fn add(store: &Store, actor: &Actor, req: &PopulationRequest) -> Result<(Population, bool)> {
    store
        .change(event("population_add", actor, req))
        .run(|change| add_audited(store, actor, req, change))
}

fn add_audited(
    store: &Store,
    actor: &Actor,
    req: &PopulationRequest,
    change: &Change<'_>,
) -> Result<(Population, bool)> {
    let (owner, by) = (actor.partner_name()?, actor.user.as_str());
    validate_name("dataset", &req.dataset)?;
    validate_name("population", &req.name)?;
    let filter = req
        .filter
        .as_deref()
        .ok_or_else(|| Error::bad("invalid_filter", "a population needs a filter"))?
        .trim()
        .to_string();
    check_filter(store, owner, &req.dataset, &filter)?;
    let defined = store
        .catalog()
        .populations_of(owner)?
        .into_iter()
        .filter(|p| p.dataset == req.dataset)
        .collect::<Vec<_>>();
    if defined.len() >= escrow_query::overlap::MAX_POPULATIONS
        && !defined.iter().any(|p| p.name == req.name)
    {
        return Err(Error::bad(
            "too_many_populations",
            format!(
                "{} has {} populations, the most one dataset can have",
                req.dataset,
                defined.len()
            ),
        ));
    }
    let mut p = Population {
        owner: owner.to_string(),
        dataset: req.dataset.clone(),
        name: req.name.clone(),
        filter,
        position: 0,
    };
    let (position, new) = change.commit(|tx| {
        let (added, v) = catalog::policy::add_population(tx, &p, by)?;
        Ok((added, PolicyVersion::audit_json(v.as_ref())))
    })?;
    p.position = position;
    Ok((p, new))
}

/// Check a population filter against `owner`'s live `dataset`: one boolean expression over
/// its declared columns, not the key column, no subqueries.
pub(crate) fn check_filter(store: &Store, owner: &str, dataset: &str, filter: &str) -> Result<()> {
    let info = store.live_dataset(owner, dataset)?;
    let live = store.live_version(owner, dataset)?;
    let (_, declared) = crate::matching::declared_schema(&store.schema_of(&live)?)
        .map_err(|e| Error::internal(format!("declared schema: {e}")))?;
    escrow_query::population::check_filter(filter, &declared, info.key_column.as_deref()).map_err(
        |e| match e {
            QueryError::Refused { rule, message } => Error::bad(rule, message),
            other => Error::internal(format!("population filter: {other}")),
        },
    )?;
    Ok(())
}

/// Remove a population, audited; `not_found` if there is none.
pub fn remove(store: &Store, actor: &Actor, req: &PopulationRequest) -> Result<()> {
    store
        .change(event("population_remove", actor, req))
        .run(|change| {
            validate_name("dataset", &req.dataset)?;
            validate_name("population", &req.name)?;
            let owner = actor.partner_name()?;
            change.commit(|tx| {
                let (removed, v) = catalog::policy::remove_population(
                    tx,
                    owner,
                    &req.dataset,
                    &req.name,
                    &actor.user,
                )?;
                if !removed {
                    return Err(Error::NotFound(format!(
                        "{} has no population {}",
                        req.dataset, req.name
                    )));
                }
                Ok(((), PolicyVersion::audit_json(v.as_ref())))
            })
        })
}

/// `owner`'s populations.
pub fn list(store: &Store, owner: &str) -> Result<Vec<Population>> {
    store.catalog().populations_of(owner)
}
