//! Data owners' grants: the consent a query's column uses are checked against. Each change is
//! validated whole before it is stored (`escrow_policies::Grant::validate`, plus: the dataset
//! and column exist, the grantee is a partner). Engine code: no HTTP.

use escrow_policies::{Grant, Usage};
use serde::{Deserialize, Serialize};

use crate::audit::{Actor, Change, Event, Outcome};
use crate::catalog;
use crate::datadir::validate_name;
use crate::model::policy::PolicyVersion;
use crate::store::Store;
use crate::{Error, Result};

/// A grant or revoke as a data owner asks for it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GrantRequest {
    /// The owner's dataset name.
    pub dataset: String,
    /// A partner name, or `*` for every partner.
    pub to: String,
    pub usage: String,
    /// One column; absent means every column of the dataset.
    pub column: Option<String>,
    /// For usage `overlap`: one population; absent means every population of the dataset.
    #[serde(default)]
    pub population: Option<String>,
}

/// A grant as shown to partners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema, serde::Deserialize)]
pub struct GrantView {
    /// `owner.dataset`
    pub dataset: String,
    /// A column, or `*` (every column; for `overlap`, no column is used).
    pub column: String,
    /// For `overlap`: a population, or `*` for every population.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population: Option<String>,
    pub to: String,
    pub usage: String,
}

impl From<&Grant> for GrantView {
    fn from(g: &Grant) -> Self {
        let target = g.column.clone().unwrap_or_else(|| "*".into());
        let (column, population) = if g.usage.names_population() {
            ("*".to_string(), Some(target))
        } else {
            (target, None)
        };
        GrantView {
            dataset: format!("{}.{}", g.owner, g.dataset),
            column,
            population,
            to: g.grantee.clone(),
            usage: g.usage.as_str().into(),
        }
    }
}

/// Grants a partner made and received.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, serde::Deserialize)]
pub struct GrantList {
    pub granted: Vec<GrantView>,
    pub received: Vec<GrantView>,
}

fn to_grant(owner: &str, req: &GrantRequest) -> Result<Grant> {
    let usage: Usage = req
        .usage
        .parse()
        .map_err(|e| Error::bad("invalid_rule", e))?;
    let target = if usage.names_population() {
        if req.column.is_some() {
            return Err(Error::bad(
                "invalid_rule",
                format!("usage {usage} names a population (--population), not a column"),
            ));
        }
        &req.population
    } else {
        if req.population.is_some() {
            return Err(Error::bad(
                "invalid_rule",
                format!("usage {usage} names a column, not a population"),
            ));
        }
        &req.column
    };
    let g = Grant {
        owner: owner.to_string(),
        dataset: req.dataset.clone(),
        column: target.clone().filter(|c| c != "*"),
        grantee: req.to.clone(),
        usage,
    };
    g.validate().map_err(|e| Error::bad("invalid_rule", e))?;
    Ok(g)
}

fn event(kind: &str, actor: &Actor, req: &GrantRequest) -> Event {
    Event::new(
        kind,
        actor.clone(),
        Outcome::Ok,
        serde_json::json!({
            "dataset": req.dataset,
            "to": req.to,
            "usage": req.usage,
            "column": req.column,
            "population": req.population,
        }),
    )
    .touching([req.to.as_str()].into_iter().filter(|t| *t != "*"))
}

/// Record the caller's partner's grant, audited. Returns the grant and whether it is new.
pub fn grant(store: &Store, actor: &Actor, req: &GrantRequest) -> Result<(GrantView, bool)> {
    store
        .change(event("grant", actor, req))
        .run(|change| grant_audited(store, actor, req, change))
}

fn grant_audited(
    store: &Store,
    actor: &Actor,
    req: &GrantRequest,
    change: &Change<'_>,
) -> Result<(GrantView, bool)> {
    let (owner, by) = (actor.partner_name()?, actor.user.as_str());
    validate_name("dataset", &req.dataset)?;
    let g = to_grant(owner, req)?;
    let live = store.live_dataset(owner, &g.dataset)?;
    if g.usage.names_population() {
        if let Some(p) = &g.column {
            let defined = store
                .catalog()
                .populations_of(owner)?
                .iter()
                .any(|d| d.dataset == g.dataset && &d.name == p);
            if !defined {
                return Err(Error::bad(
                    "unknown_population",
                    format!(
                        "{} has no population {p} (define it with `escrow population add`)",
                        g.dataset
                    ),
                ));
            }
        }
    } else if let Some(c) = &g.column
        && !live.columns.iter().any(|col| &col.name == c)
    {
        return Err(Error::bad(
            "unknown_column",
            format!("{} has no column {c:?}", g.dataset),
        ));
    }
    if g.grantee != "*" && !store.catalog().partner_is_active(&g.grantee)? {
        return Err(Error::NotFound(format!("no partner named {}", g.grantee)));
    }
    let new = change.commit(|tx| {
        let (new, v) = catalog::policy::add_grant(tx, &g, by)?;
        Ok((new, PolicyVersion::audit_json(v.as_ref())))
    })?;
    crate::faults::hit("policy.committed")?;
    Ok((GrantView::from(&g), new))
}

/// Remove the caller's partner's grant, audited; `not_found` if there is no such grant.
pub fn revoke(store: &Store, actor: &Actor, req: &GrantRequest) -> Result<GrantView> {
    store.change(event("revoke", actor, req)).run(|change| {
        validate_name("dataset", &req.dataset)?;
        let g = to_grant(actor.partner_name()?, req)?;
        change.commit(
            |tx| match catalog::policy::remove_grant(tx, &g, &actor.user)? {
                (true, v) => Ok((GrantView::from(&g), PolicyVersion::audit_json(v.as_ref()))),
                (false, _) => Err(Error::NotFound(format!("no such grant: {g}"))),
            },
        )
    })
}

/// What `partner` granted and received.
pub fn list(store: &Store, partner: &str) -> Result<GrantList> {
    let (made, received) = store.catalog().grants_of(partner)?;
    Ok(GrantList {
        granted: made.iter().map(GrantView::from).collect(),
        received: received.iter().map(GrantView::from).collect(),
    })
}
