//! Account mapping: the overlap matrix of two partners' populations and the co-selling report
//! built from it. The engine part (reducing each side to its entities, counting, releasing)
//! is `escrow_query::overlap`; this module decides which datasets and populations take part,
//! checks the grants, applies both owners' protection settings and charges the budget. No
//! HTTP here.
//!
//! ```text
//! request -> my dataset (--mine, or the one with populations)
//!         -> their dataset (--theirs, or the one whose populations they let me see:
//!            usage `overlap`, per population or all; none -> usage_not_granted)
//!         -> breakdown column: in both datasets, not a key, `dimension` granted on theirs
//!         -> protection: the strictest settings of BOTH datasets (so both partners get the
//!            same numbers), noise keyed by the question in a canonical side order
//!         -> budget: ε once per matrix, on their dataset
//!         -> both sides reduced in parallel -> counted -> released -> my orientation
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_schema::SchemaRef;
use escrow_policies::{ColumnUse, PolicySet, Usage, is_valid_name};
use escrow_query::overlap::{self, CellCount, Membership, OverlapProtection, ReleasedCell, Side};
use escrow_query::{Applied, Noise, QueryError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{Actor, Event, Outcome};
use crate::catalog::{BudgetCharge, Population, VersionKey};
use crate::explain::{Explanation, ProtectionView, UseExplained};
use crate::flights::Flights;
use crate::queries::{
    AbandonedQuestion, Cost, DELTA, QueryService, check_grants, decide, query_form, strictest,
};
use crate::settings;
use crate::{Error, Result};

/// An overlap question, as a partner asks it.
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OverlapRequest {
    /// The other partner.
    pub with: String,
    /// My dataset (default: my only dataset with populations).
    #[serde(default)]
    pub mine: Option<String>,
    /// Their dataset (default: their only dataset whose populations I may see).
    #[serde(default)]
    pub theirs: Option<String>,
    /// A column of both datasets to break the cells down by.
    #[serde(default)]
    pub by: Option<String>,
}

/// One released (or suppressed) cell, in the caller's orientation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlapRow {
    /// My population.
    pub mine: String,
    /// Their population.
    pub theirs: String,
    /// The breakdown value both sides agree on (`None`: no shared value), with `by`.
    pub value: Option<String>,
    /// Noisy count of companies in both populations; `None` when suppressed.
    pub count: Option<u64>,
    pub suppressed: bool,
}

/// An overlap matrix (without a breakdown) released to a partner before: what it was shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleasedOverlap {
    /// When it was first released (RFC 3339).
    pub released_at: String,
    /// `owner.dataset@vN` of each side: the versions it was computed from.
    pub mine: String,
    pub theirs: String,
    /// The cells as released: noisy company counts, `null` where suppressed.
    pub cells: Vec<ReleasedCount>,
}

/// One cell of a [`ReleasedOverlap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleasedCount {
    pub mine: String,
    pub theirs: String,
    pub count: Option<u64>,
}

/// An answered overlap question.
#[derive(Debug, Clone)]
pub struct OverlapOutcome {
    /// My dataset.
    pub mine: String,
    /// Their dataset, `owner.dataset`.
    pub theirs: String,
    pub by: Option<String>,
    /// My populations and the ones of theirs I may see: the matrix's axes.
    pub mine_populations: Vec<String>,
    pub their_populations: Vec<String>,
    pub rows: Vec<OverlapRow>,
    pub protection: Applied,
    /// How many cell counts one company can change in all (L1: `max_groups_per_entity`,
    /// times `overlap::NAME_SENSITIVITY` when names link); the noise is in
    /// `protection.count_sd`.
    pub sensitivity: u32,
    pub cost: Cost,
    /// The question's fingerprint (hex) and `owner.dataset@vN` of both sides, for the audit.
    pub fingerprint: String,
    pub datasets: Vec<String>,
    /// The ids of the versions it was computed from (kept with its history).
    pub version_ids: Vec<String>,
}

/// The co-selling report: my customers x their opportunities (where I can introduce them)
/// and my opportunities x their customers (where they can introduce me), optionally by a
/// shared dimension. One overlap question underneath: same numbers, same single charge.
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CoSellingRequest {
    pub with: String,
    #[serde(default)]
    pub mine: Option<String>,
    #[serde(default)]
    pub theirs: Option<String>,
    #[serde(default)]
    pub by: Option<String>,
    /// Population names, when they differ from the conventional ones (`customers` /
    /// `customer`, `opportunities` / `opportunity` / `open_opportunities`).
    #[serde(default)]
    pub my_customers: Option<String>,
    #[serde(default)]
    pub my_opportunities: Option<String>,
    #[serde(default)]
    pub their_customers: Option<String>,
    #[serde(default)]
    pub their_opportunities: Option<String>,
}

/// One pair of populations of the report, with its cells.
#[derive(Debug, Clone, Serialize)]
pub struct CoSellingSection {
    pub mine: String,
    pub theirs: String,
    pub rows: Vec<OverlapRow>,
}

/// The answered report: its sections and the overlap question it was cut from.
#[derive(Debug, Clone)]
pub struct CoSellingOutcome {
    pub sections: Vec<CoSellingSection>,
    pub overlap: OverlapOutcome,
}

const CUSTOMERS: [&str; 2] = ["customers", "customer"];
const OPPORTUNITIES: [&str; 4] = [
    "opportunities",
    "opportunity",
    "open_opportunities",
    "open_opportunity",
];

/// The population playing a role in the report: the one named, or the first conventional
/// name present.
fn role(
    named: &Option<String>,
    names: &[String],
    conventional: &[&str],
    flag: &str,
    whose: &str,
) -> Result<String> {
    match named {
        Some(n) if names.contains(n) => Ok(n.clone()),
        Some(n) => Err(Error::bad(
            "unknown_population",
            format!("{whose} have no population {n} that you may see"),
        )),
        None => conventional
            .iter()
            .find(|c| names.iter().any(|n| n == *c))
            .map(|c| c.to_string())
            .ok_or_else(|| {
                Error::bad(
                    "unknown_population",
                    format!(
                        "{whose} have no population named {} that you may see: name it with --{flag}",
                        conventional.join(" or ")
                    ),
                )
            }),
    }
}

/// A checked question: both sides and which of their populations the caller sees.
#[derive(Clone)]
struct Matrix {
    mine: SideData,
    theirs: SideData,
    /// Indexes into `theirs.populations`.
    visible: Vec<usize>,
    /// Its protection, fingerprint and charge, from the same reads of the catalog.
    plan: OverlapPlan,
}

impl Matrix {
    /// The matrix's axes: my populations, and the ones of theirs I may see.
    fn axes(&self) -> (Vec<String>, Vec<String>) {
        let mine = self
            .mine
            .populations
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let theirs = self
            .visible
            .iter()
            .map(|i| self.theirs.populations[*i].name.clone())
            .collect();
        (mine, theirs)
    }
}

/// How a checked matrix is protected and charged.
#[derive(Clone)]
struct OverlapPlan {
    /// My side comes first in the canonical order.
    mine_first: bool,
    /// (k, ε, L): the strictest of both datasets' settings.
    protection: (u64, f64, u32),
    fingerprint: [u8; 32],
    charge: BudgetCharge,
}

/// One side of the matrix: a dataset version and all its populations.
#[derive(Clone)]
struct SideData {
    /// The side of the partner asking (whose names its messages may use).
    caller_side: bool,
    owner: String,
    dataset: String,
    key_column: String,
    version: VersionKey,
    populations: Vec<Population>,
}

impl SideData {
    fn label(&self) -> String {
        label(&self.owner, &self.dataset, &self.version)
    }
}

/// `owner.dataset@vN`, as audit records, explanations and logs name a dataset read.
fn label(owner: &str, dataset: &str, version: &VersionKey) -> String {
    format!("{owner}.{dataset}@v{}", version.version)
}

/// The audit event of an overlap-shaped question (before its outcome is known).
fn question_event(
    kind: &str,
    actor: &Actor,
    req: &OverlapRequest,
    extra: serde_json::Value,
) -> Event {
    Event::new(
        kind,
        actor.clone(),
        Outcome::Ok,
        serde_json::json!({
            "with": req.with,
            "mine": req.mine,
            "theirs": req.theirs,
            "by": req.by,
        }),
    )
    .with(extra)
    .touching([req.with.as_str()].into_iter().filter(|w| is_valid_name(w)))
}

/// What the audit record says about an answered overlap (never its counts).
fn overlap_facts(o: &OverlapOutcome) -> serde_json::Value {
    serde_json::json!({
        "fingerprint": o.fingerprint,
        "datasets": o.datasets,
        "cells": o.rows.len(),
        "suppressed": o.rows.iter().filter(|r| r.suppressed).count(),
        "epsilon_spent": o.cost.epsilon_spent,
        "repeated": o.cost.repeated,
    })
}

/// Point a refused overlap question at its explanation.
fn explain_hint(e: Error, req: &OverlapRequest) -> Error {
    let names = [
        Some(&req.with),
        req.mine.as_ref(),
        req.theirs.as_ref(),
        req.by.as_ref(),
    ];
    if !names.into_iter().flatten().all(|n| is_valid_name(n)) {
        return e;
    }
    let mut command = format!("escrow policy explain --with {}", req.with);
    for (flag, v) in [
        ("mine", &req.mine),
        ("theirs", &req.theirs),
        ("by", &req.by),
    ] {
        if let Some(v) = v {
            command.push_str(&format!(" --{flag} {v}"));
        }
    }
    crate::queries::point_to_explain(e, &command)
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(Error::bad(
            "invalid_request",
            format!("{kind} {name:?} is not a valid name"),
        ))
    }
}

fn group(populations: Vec<Population>) -> BTreeMap<String, Vec<Population>> {
    let mut by_dataset: BTreeMap<String, Vec<Population>> = BTreeMap::new();
    for p in populations {
        by_dataset.entry(p.dataset.clone()).or_default().push(p);
    }
    by_dataset
}

/// `owner`'s populations of `dataset`, in definition order; `None` if it has none.
fn populations_of(
    store: &crate::store::Store,
    owner: &str,
    dataset: &str,
) -> Result<Option<Vec<Population>>> {
    Ok(group(store.catalog().populations_of(owner)?).remove(dataset))
}

impl QueryService {
    /// The overlap matrices (without a breakdown) released to `caller` with partner `with`,
    /// oldest first: the account mapping over dataset versions. Only what `caller` was
    /// shown; a partner never asked (or unknown) has none.
    pub async fn overlap_history(&self, caller: &str, with: &str) -> Result<Vec<ReleasedOverlap>> {
        check_name("partner", with)?;
        let (store, caller, with) = (self.store.clone(), caller.to_string(), with.to_string());
        let rows =
            crate::queries::blocking(move || store.catalog().released_overlaps(&caller, &with))
                .await?;
        rows.into_iter()
            .map(|(released_at, mine, theirs, cells)| {
                Ok(ReleasedOverlap {
                    released_at,
                    mine,
                    theirs,
                    cells: serde_json::from_str(&cells)
                        .map_err(|e| Error::internal(format!("released overlap: {e}")))?,
                })
            })
            .collect()
    }

    /// Keep what an overlap without a breakdown released to `caller`, for
    /// [`QueryService::overlap_history`], once its release is audited (a question whose
    /// record could not be written released nothing, so its cells are kept nowhere). A
    /// failure is logged: the release stands. Asked again, the release is kept once (and
    /// kept now if the first time it was not: its record failed, or the client left).
    async fn keep_released_overlap(&self, caller: &str, with: &str, o: &OverlapOutcome) {
        if o.by.is_some() {
            return;
        }
        let versions = o.version_ids.clone();
        let cells: Vec<ReleasedCount> = (o.rows.iter())
            .map(|r| ReleasedCount {
                mine: r.mine.clone(),
                theirs: r.theirs.clone(),
                count: r.count,
            })
            .collect();
        let (Ok(cells), [mine, theirs]) = (serde_json::to_string(&cells), &o.datasets[..]) else {
            tracing::error!("released overlap not kept: cells or datasets");
            return;
        };
        let (store, fp) = (self.store.clone(), o.fingerprint.clone());
        let (caller, with, mine, theirs) = (
            caller.to_string(),
            with.to_string(),
            mine.clone(),
            theirs.clone(),
        );
        let keep = async move {
            let kept = crate::queries::blocking(move || {
                store
                    .catalog()
                    .keep_overlap(&caller, &with, &mine, &theirs, &fp, &versions, &cells)
            })
            .await;
            if let Err(e) = kept {
                tracing::error!(error = %e, "released overlap not kept for the history");
            }
        };
        // Asked again, it is there already (unless its first keeping failed): off the
        // answer's path.
        if o.cost.repeated {
            tokio::spawn(keep);
        } else {
            keep.await;
        }
    }

    /// The overlap matrix of `caller`'s populations and the populations `req.with` lets it
    /// see, or a refusal.
    pub async fn overlap(&self, actor: &Actor, req: &OverlapRequest) -> Result<OverlapOutcome> {
        let event = question_event("overlap", actor, req, serde_json::json!({}));
        let mut abandoned = AbandonedQuestion::new(self.store.clone());
        let on_charge = || abandoned.charged(event.clone());
        let result = async {
            let caller = actor.partner_name()?;
            let m = self.matrix(caller, req).await?;
            self.answer(caller, req, m, &on_charge).await
        }
        .await
        .map_err(|e| explain_hint(e, req));
        abandoned.disarm();
        let out = self.release(event, result, overlap_facts).await?;
        self.keep_released_overlap(actor.partner_name()?, &req.with, &out)
            .await;
        Ok(out)
    }

    /// The co-selling report for `caller`, or a refusal.
    pub async fn co_selling(
        &self,
        actor: &Actor,
        req: &CoSellingRequest,
    ) -> Result<CoSellingOutcome> {
        let question = OverlapRequest {
            with: req.with.clone(),
            mine: req.mine.clone(),
            theirs: req.theirs.clone(),
            by: req.by.clone(),
        };
        let roles = serde_json::json!({
            "my_customers": req.my_customers,
            "my_opportunities": req.my_opportunities,
            "their_customers": req.their_customers,
            "their_opportunities": req.their_opportunities,
        });
        let event = question_event("co_selling_report", actor, &question, roles);
        let mut abandoned = AbandonedQuestion::new(self.store.clone());
        let on_charge = || abandoned.charged(event.clone());
        let result = async {
            let caller = actor.partner_name()?;
            self.co_selling_report(caller, req, &on_charge).await
        }
        .await
        .map_err(|e| explain_hint(e, &question));
        abandoned.disarm();
        let out = self
            .release(event, result, |r| overlap_facts(&r.overlap))
            .await?;
        self.keep_released_overlap(actor.partner_name()?, &req.with, &out.overlap)
            .await;
        Ok(out)
    }

    async fn co_selling_report(
        &self,
        caller: &str,
        req: &CoSellingRequest,
        on_charge: &(dyn Fn() + Sync),
    ) -> Result<CoSellingOutcome> {
        let question = OverlapRequest {
            with: req.with.clone(),
            mine: req.mine.clone(),
            theirs: req.theirs.clone(),
            by: req.by.clone(),
        };
        let m = self.matrix(caller, &question).await?;
        let (mine, theirs) = m.axes();
        let pairs = [
            (
                role(&req.my_customers, &mine, &CUSTOMERS, "my-customers", "you")?,
                role(
                    &req.their_opportunities,
                    &theirs,
                    &OPPORTUNITIES,
                    "their-opportunities",
                    "they",
                )?,
            ),
            (
                role(
                    &req.my_opportunities,
                    &mine,
                    &OPPORTUNITIES,
                    "my-opportunities",
                    "you",
                )?,
                role(
                    &req.their_customers,
                    &theirs,
                    &CUSTOMERS,
                    "their-customers",
                    "they",
                )?,
            ),
        ];
        let overlap = self.answer(caller, &question, m, on_charge).await?;
        let sections = pairs
            .into_iter()
            .map(|(mine, theirs)| CoSellingSection {
                rows: overlap
                    .rows
                    .iter()
                    .filter(|r| r.mine == mine && r.theirs == theirs)
                    .cloned()
                    .collect(),
                mine,
                theirs,
            })
            .collect();
        Ok(CoSellingOutcome { sections, overlap })
    }

    /// Which datasets and populations a question involves, with every grant checked.
    async fn matrix(&self, caller: &str, req: &OverlapRequest) -> Result<Matrix> {
        check_name("partner", &req.with)?;
        for (kind, n) in [
            ("dataset", &req.mine),
            ("dataset", &req.theirs),
            ("column", &req.by),
        ] {
            if let Some(n) = n {
                check_name(kind, n)?;
            }
        }
        if req.with == caller {
            return Err(Error::bad(
                "invalid_request",
                "an overlap is between you and another partner",
            ));
        }
        let (set, at) = self.policy_set_at().await?;
        // Asked again while nothing it read has changed: resolved as before, without
        // reading the catalog again.
        let key = format!(
            "matrix\0{caller}\0{}",
            serde_json::to_string(req).map_err(Error::internal)?
        );
        if let Some(m) = self.resolved::<Matrix>(at, &key) {
            return Ok(m);
        }
        let (who, asked) = (caller.to_string(), req.clone());
        let store = self.store.clone();
        let m = crate::queries::blocking(move || resolve(&store, &set, &who, &asked)).await?;
        // Kept only if nothing moved while it was resolved: then every read above saw the
        // catalog as it stood at `at` (each change they could see moves a generation).
        let store = self.store.clone();
        let read = std::time::Instant::now();
        let now = crate::queries::blocking(move || store.catalog().generations()).await?;
        self.copies.read_generations(read, now);
        if now == at {
            self.keep_resolved(at, key, m.clone());
        }
        Ok(m)
    }

    /// Count, protect and release a checked matrix; ε is charged here.
    async fn answer(
        &self,
        caller: &str,
        req: &OverlapRequest,
        m: Matrix,
        on_charge: &(dyn Fn() + Sync),
    ) -> Result<OverlapOutcome> {
        let (mine_populations, their_populations) = m.axes();
        let Matrix {
            mine,
            theirs,
            visible,
            plan,
        } = m;
        let (min_entities, epsilon, max_groups) = plan.protection;
        let (mine_first, fp) = (plan.mine_first, plan.fingerprint);
        let (first, second) = if mine_first {
            (&mine, &theirs)
        } else {
            (&theirs, &mine)
        };
        let versions: Vec<String> = [first, second]
            .iter()
            .map(|s| s.version.version_id.clone())
            .collect();
        let mut charged = self
            .charge(
                caller,
                vec![plan.charge],
                epsilon,
                fp,
                Some(versions.clone()),
            )
            .await?;
        on_charge();
        // Asked again on the same data: the cells released the first time, without running.
        let before = self.released_before(caller, fp, &mut charged).await?;
        let cost = charged.cost;
        let (released, applied, sensitivity) = match before {
            Some(bytes) => kept_matrix::decode(&bytes)?,
            None => {
                let fresh = self
                    .release_matrix(
                        first,
                        second,
                        (caller, req),
                        max_groups,
                        (min_entities, epsilon),
                        fp,
                    )
                    .await;
                self.keep_outcome(caller, fp, versions.clone(), &fresh, |m| {
                    Ok(kept_matrix::encode(m))
                })
                .await;
                fresh?
            }
        };
        // Every cell is released (one ε-release of the whole matrix); the caller sees the
        // ones of populations shared with it.
        let released: Vec<ReleasedCell> = released
            .into_iter()
            .filter(|c| visible.contains(if mine_first { &c.b } else { &c.a }))
            .collect();
        // A kept matrix names its populations by position: one that does not fit these sides
        // was kept for other populations, and fails rather than be read under their names.
        let name = |side: &SideData, i: usize| -> Result<String> {
            side.populations
                .get(i)
                .map(|p| p.name.clone())
                .ok_or_else(|| Error::internal("a kept overlap matrix does not fit its question"))
        };
        let mut rows: Vec<(usize, usize, OverlapRow)> = released
            .into_iter()
            .map(|c| {
                let (m, t) = if mine_first { (c.a, c.b) } else { (c.b, c.a) };
                Ok((
                    m,
                    t,
                    OverlapRow {
                        mine: name(&mine, m)?,
                        theirs: name(&theirs, t)?,
                        value: c.value,
                        suppressed: c.count.is_none(),
                        count: c.count,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        rows.sort_by(|x, y| (x.0, x.1, &x.2.value).cmp(&(y.0, y.1, &y.2.value)));
        let outcome = OverlapOutcome {
            mine_populations,
            their_populations,
            mine: mine.dataset.clone(),
            theirs: format!("{}.{}", theirs.owner, theirs.dataset),
            by: req.by.clone(),
            rows: rows.into_iter().map(|r| r.2).collect(),
            protection: applied,
            sensitivity,
            cost,
            fingerprint: hex::encode(fp),
            datasets: [&mine, &theirs].iter().map(|s| s.label()).collect(),
            version_ids: versions,
        };
        Ok(outcome)
    }

    /// Count both sides and release every cell of the matrix (all populations of both
    /// sides), with the matrix's sensitivity.
    async fn release_matrix(
        &self,
        first: &SideData,
        second: &SideData,
        (caller, req): (&str, &OverlapRequest),
        max_groups: u32,
        (min_entities, epsilon): (u64, f64),
        fp: [u8; 32],
    ) -> Result<(Vec<ReleasedCell>, Applied, u32)> {
        let limit = self.side_limit();
        let stop = escrow_query::Stop::default();
        let run = async {
            // Both sides to their end (a dropped side's blocking task would run on), and a
            // side that fails stops the other.
            let (by, stop) = (req.by.as_deref(), &stop);
            let side = |s| async move {
                let r = self.reduce(caller, s, by, limit, stop).await;
                if r.is_err() {
                    stop.request();
                }
                r
            };
            let (a, b) = match tokio::join!(side(first), side(second)) {
                (Ok(a), Ok(b)) => (a, b),
                // the side that failed first, not the one it stopped (an internal error)
                (Err(e), Err(stopped)) if e.code() == "internal" => return Err(stopped),
                (Err(e), _) | (_, Err(e)) => return Err(e),
            };
            // Both lists are reduced (their sizes, and so far the time, depend on each
            // list alone); the count that follows depends on who matches whom.
            if !stop.admit() {
                return Err(Error::from(QueryError::from(escrow_query::Stop::error())));
            }
            let by = req.by.is_some();
            crate::queries::blocking(move || {
                let sensitivity = overlap::sensitivity(&a, &b, max_groups);
                Ok((overlap::count(&a, &b, max_groups, by), sensitivity))
            })
            .await
        };
        let (cells, sensitivity): (Vec<CellCount>, escrow_query::Sensitivity) =
            self.within_time_limit("overlap", run, &stop, || {}).await?;

        let names = |s: &SideData| -> Vec<String> {
            s.populations.iter().map(|p| p.name.clone()).collect()
        };
        let (names_a, names_b) = (names(first), names(second));
        let protection = OverlapProtection {
            min_entities,
            epsilon: escrow_query::Epsilon::at_most(epsilon),
            max_groups_per_entity: max_groups,
            sensitivity,
            delta: DELTA,
            noise: Noise::new(self.noise_key.clone(), fp),
        };
        let (released, applied) = overlap::release(
            &cells,
            &names_a,
            &names_b,
            |_, _| true,
            req.by.is_some(),
            &protection,
        );
        let l1 = u32::try_from(sensitivity.l1).unwrap_or(u32::MAX);
        Ok((released, applied, l1))
    }

    /// Explain an overlap question as `caller` would ask it: the other partner's populations
    /// it may see (with the rules that grant them), the breakdown column's grant or the one
    /// missing, the protection and budget that would apply, and the first refusal. Only
    /// what `shared_populations` lets it see is named: populations, datasets and columns that
    /// were not shared stay out of the explanation as they stay out of the answer.
    pub async fn explain_overlap(&self, caller: &str, req: &OverlapRequest) -> Result<Explanation> {
        let set = self.policy_set().await?;
        let mut uses = Vec::new();
        if is_valid_name(&req.with) && req.with != caller {
            let (store, policies, who, asked) = (
                self.store.clone(),
                set.clone(),
                caller.to_string(),
                req.clone(),
            );
            let shared = crate::queries::blocking(move || {
                shared_populations(
                    &store,
                    &policies,
                    &who,
                    &asked.with,
                    asked.theirs.as_deref(),
                )
            })
            .await?;
            let populations = shared.iter().flat_map(|s| {
                s.visible
                    .iter()
                    .map(|i| ColumnUse::overlap(&req.with, &s.dataset, &s.populations[*i].name))
            });
            let breakdowns = shared.iter().filter_map(|s| {
                req.by
                    .as_ref()
                    .map(|by| dimension(&req.with, &s.dataset, by))
            });
            for u in populations.chain(breakdowns) {
                uses.push(UseExplained::new(caller, &u, &decide(&set, caller, &u)?));
            }
        }
        let m = match self.matrix(caller, req).await {
            Ok(m) => m,
            Err(e) => {
                return Ok(Explanation {
                    allowed: false,
                    refusal: Some(Explanation::refusal_of(e)?),
                    datasets: Vec::new(),
                    uses,
                    protection: None,
                    cost: None,
                });
            }
        };
        let plan = &m.plan;
        let (min_entities, epsilon, max_groups_per_entity) = plan.protection;
        let sides = [&m.mine, &m.theirs];
        let (refusal, cost) = match self
            .charge(
                caller,
                vec![plan.charge.clone()],
                epsilon,
                plan.fingerprint,
                None,
            )
            .await
        {
            Ok(c) => (None, Some(c.cost)),
            Err(e) => (Some(Explanation::refusal_of(e)?), None),
        };
        Ok(Explanation {
            allowed: refusal.is_none(),
            refusal,
            datasets: sides.iter().map(|s| s.label()).collect(),
            uses,
            protection: Some(ProtectionView {
                min_entities,
                epsilon,
                max_groups_per_entity,
                from: sides
                    .iter()
                    .map(|s| format!("{}.{}", s.owner, s.dataset))
                    .collect(),
            }),
            cost,
        })
    }

    /// One side reduced to its entities ([`kept_side`], on the blocking pool).
    async fn reduce(
        &self,
        caller: &str,
        side: &SideData,
        by: Option<&str>,
        limit: usize,
        stop: &escrow_query::Stop,
    ) -> Result<Arc<Membership>> {
        let spec = SideSpec {
            owner: side.owner.clone(),
            dataset: side.dataset.clone(),
            key: side.key_column.clone(),
            version: side.version.clone(),
            by: by.map(str::to_string),
            filters: filters(&side.populations),
            own: side.caller_side,
        };
        let (store, hasher, flights) = (
            self.store.clone(),
            self.entity_hasher.clone(),
            self.flights.clone(),
        );
        let (caller, stop) = (caller.to_string(), stop.clone());
        let started = std::time::Instant::now();
        let (reduced, found, spec) = crate::queries::blocking(move || {
            kept_side(&store, &hasher, &flights, &caller, &spec, limit, &stop)
                .map(|(reduced, found)| (reduced, found, spec))
        })
        .await?;
        tracing::debug!(
            side = %side.label(),
            ms = started.elapsed().as_millis() as u64,
            ?found,
            "overlap side ready"
        );
        if matches!(found, Found::Reduced | Found::Derived) {
            seal_side_later(
                &self.store,
                self.entity_hasher.check(),
                spec,
                reduced.clone(),
            );
        }
        Ok(reduced)
    }

    /// Reduces the side of `owner`'s `dataset` without a breakdown (its live version with
    /// every population of the dataset, as any matrix over it without one reads it) ahead
    /// of questions, kept for every asker ([`side_kept_as`]). The server calls it in the
    /// background after an upload and after a population change, so that the first matrix
    /// over the dataset finds its side reduced. Nothing for a dataset without a key column
    /// or populations. Returns how many populations the side has, if it was reduced (rather
    /// than found kept).
    pub(crate) async fn reduce_side_ahead(
        &self,
        owner: &str,
        dataset: &str,
    ) -> Result<Option<usize>> {
        let (store, hasher, flights) = (
            self.store.clone(),
            self.entity_hasher.clone(),
            self.flights.clone(),
        );
        let limit = self.side_limit();
        let (owner, dataset) = (owner.to_string(), dataset.to_string());
        // One at a time per dataset, each with its populations as they are when it starts,
        // and at most one more waiting: of several changes in a row, the one waiting reads
        // them after the last (the others have nothing left to do).
        let ahead = serde_json::json!(["ahead", owner, dataset]).to_string();
        if !flights.queue(&ahead) {
            return Ok(None);
        }
        crate::queries::blocking(move || {
            flights.one_at_a_time(&ahead, || {
                flights.unqueue(&ahead);
                let Some(populations) = populations_of(&store, &owner, &dataset)? else {
                    return Ok(None);
                };
                let Some(key) = store.live_dataset(&owner, &dataset)?.key_column else {
                    return Ok(None);
                };
                let spec = SideSpec {
                    version: store.live_version(&owner, &dataset)?,
                    owner: owner.clone(),
                    dataset,
                    key,
                    by: None,
                    filters: filters(&populations),
                    own: true,
                };
                let stop = escrow_query::Stop::default();
                let (side, found) =
                    kept_side(&store, &hasher, &flights, &owner, &spec, limit, &stop)?;
                let populations = spec.filters.len();
                if matches!(found, Found::Reduced | Found::Derived) {
                    seal_side_later(&store, hasher.check(), spec, side);
                }
                Ok((found != Found::Memory).then_some(populations))
            })
        })
        .await
    }

    /// [`Self::reduce_side_ahead`], its outcome logged (a failure too: the first matrix over
    /// the dataset then reduces the side itself, and fails as it would have).
    pub(crate) async fn side_ahead(&self, owner: &str, dataset: &str) {
        let started = std::time::Instant::now();
        match self.reduce_side_ahead(owner, dataset).await {
            Ok(Some(populations)) => tracing::debug!(
                partner = %owner,
                dataset = %dataset,
                populations,
                ms = started.elapsed().as_millis() as u64,
                "overlap side made ahead of questions"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(partner = %owner, dataset = %dataset, error = %e, "overlap side not reduced ahead")
            }
        }
    }

    /// What one side of a matrix may hold while it is reduced.
    fn side_limit(&self) -> usize {
        self.config.limits.memory_bytes / 2
    }
}

/// What one side of a matrix reduces: a version of `owner`'s `dataset`, its key column, the
/// breakdown column and every population of the dataset (name, filter) in definition order.
struct SideSpec {
    owner: String,
    dataset: String,
    key: String,
    version: VersionKey,
    by: Option<String>,
    filters: Vec<(String, String)>,
    /// The asking partner's own dataset (whose names its messages may use).
    own: bool,
}

fn filters(populations: &[Population]) -> Vec<(String, String)> {
    populations
        .iter()
        .map(|p| (p.name.clone(), p.filter.clone()))
        .collect()
}

/// The name a reduced side is kept under beside its version's plaintext
/// (`Store::keep_derived`). A side without a breakdown depends on the version and its
/// owner's populations alone, never on who asks: it is reduced ahead after uploads and
/// population changes, and kept once for every asker (`null` in place of one), as the
/// columns it comes from are. A side with a breakdown is kept per asker: another partner's
/// question never finds it, so how fast a breakdown comes tells its asker about its own
/// earlier questions only (docs/THREAT_MODEL.md).
fn side_kept_as(caller: &str, key: &str, by: Option<&str>, filters: &[(String, String)]) -> String {
    let asker = by.map(|_| caller);
    serde_json::json!(["overlap side", asker, key, by, filters]).to_string()
}

/// The populations' filters of the side without a breakdown kept as `name` by
/// [`side_kept_as`] over key column `key`; `None` for another name.
fn filters_kept_as(name: &str, key: &str) -> Option<Filters> {
    type Named = (String, Option<String>, String, Option<String>, Filters);
    match serde_json::from_str::<Named>(name) {
        Ok((_, None, k, None, filters)) if k == key => Some(filters),
        _ => None,
    }
}

/// Where a side came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Kept in memory.
    Memory,
    /// Sealed beside its version ([`seal_side`]), read and kept in memory.
    Sealed,
    /// Reduced from its version's rows, kept in memory.
    Reduced,
    /// Derived from the side of other populations ([`read_side`]), kept in memory.
    Derived,
}

/// Where a side without a breakdown is sealed beside its version: one object per version
/// (the side of its populations as they were when it was last reduced), named by the format
/// of its bytes and the key its entity ids are hashed under (`EntityHasher::check`: ids of
/// another key are never read as this one's); and the side's own name ([`side_kept_as`]),
/// sealed in it and checked on reading (a side of other populations is not this one). One
/// name per version keeps one seal per version whatever the population changes, and the
/// object's key (a hash of its name) says nothing of the populations' filters. `None` for a
/// side with a breakdown: it is its asker's alone.
fn side_sealed_as(spec: &SideSpec, ids: u64) -> Option<(String, String)> {
    let format = overlap::KEPT_FORMAT;
    spec.by.is_none().then(|| {
        (
            format!("overlap side v{format} ids {ids:016x}"),
            side_kept_as("", &spec.key, None, &spec.filters),
        )
    })
}

/// Seal a side without a breakdown beside its version, so that the first matrix of another
/// process reads its entities instead of reducing its rows: later, off every question's path
/// (`Store::later`). A side with a breakdown is not: it is its asker's alone. A failure is
/// logged: the next process reduces the side.
fn seal_side_later(
    store: &Arc<crate::store::Store>,
    ids: u64,
    spec: SideSpec,
    side: Arc<Membership>,
) {
    let Some((name, populations)) = side_sealed_as(&spec, ids) else {
        return;
    };
    // Keyed by the populations too: a job for other populations (a question's reduction
    // that finished after the change) does not replace this one, and each checks itself.
    let (sealer, version) = (store.clone(), spec.version.clone());
    store.later(&version, &format!("{name}\0{populations}"), move || {
        seal_side(&sealer, (&name, &populations), &spec, &side)
    });
}

/// [`seal_side_later`]'s job: `side` sealed as `name` (of `populations`, see
/// [`side_sealed_as`]).
fn seal_side(
    store: &crate::store::Store,
    (name, populations): (&str, &str),
    spec: &SideSpec,
    side: &Membership,
) {
    // Populations changed since it was reduced (a burst of changes, each reduced ahead):
    // the side of the last change is sealed by its own job, this one is stale.
    let current =
        populations_of(store, &spec.owner, &spec.dataset).map(|p| p.as_deref().map(filters));
    if !matches!(&current, Ok(Some(now)) if *now == spec.filters) {
        tracing::debug!(
            side = %label(&spec.owner, &spec.dataset, &spec.version),
            "overlap side not sealed: its populations changed since it was reduced"
        );
        return;
    }
    let started = std::time::Instant::now();
    let bytes = side.encode(populations);
    match store.seal_derived(&spec.version, name, &bytes) {
        Ok(()) => tracing::debug!(
            side = %label(&spec.owner, &spec.dataset, &spec.version),
            populations = spec.filters.len(),
            bytes = bytes.len(),
            ms = started.elapsed().as_millis() as u64,
            "overlap side sealed beside its version"
        ),
        Err(e) => tracing::warn!(
            side = %label(&spec.owner, &spec.dataset, &spec.version),
            error = %e,
            "overlap side not sealed: the next process reduces it again"
        ),
    }
}

/// The side sealed beside its version ([`seal_side`]), if there is one that reads back, with
/// the populations' filters it was reduced over: this side's, or others (changed since) that
/// it is derived from ([`read_side`]). One that does not read back (altered, or of another
/// format or key column) is logged and not used; one whose reduction needed more than
/// `limit` fails as reducing it would.
fn sealed_side(
    store: &crate::store::Store,
    ids: u64,
    spec: &SideSpec,
    limit: usize,
) -> Result<Option<(Filters, Membership)>> {
    let Some((name, _)) = side_sealed_as(spec, ids) else {
        return Ok(None);
    };
    let warn = |error: &dyn std::fmt::Display| {
        tracing::warn!(
            side = %label(&spec.owner, &spec.dataset, &spec.version),
            %error,
            "a sealed overlap side does not read back: reduced again"
        )
    };
    let bytes = match store.open_derived(&spec.version, &name) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(e) => {
            warn(&e);
            return Ok(None);
        }
    };
    let (sealed_for, side) = match Membership::decode(&bytes, limit) {
        Ok(read) => read,
        Err(e @ QueryError::ResourcesExhausted(_)) => return Err(e.into()),
        Err(e) => {
            warn(&e);
            return Ok(None);
        }
    };
    match filters_kept_as(&sealed_for, &spec.key) {
        Some(filters) => Ok(Some((filters, side))),
        None => {
            warn(&"sealed for another side");
            Ok(None)
        }
    }
}

/// The populations of a side: each one's name and filter, in definition order.
type Filters = Vec<(String, String)>;

/// The sides without a breakdown of one version kept in memory, with their populations'
/// filters: what a side of other populations is derived from ([`read_side`]) instead of
/// reducing the rows again. Kept beside the version's columns (forgotten with them), as
/// weak references: a side the cache let go is no longer one.
#[derive(Default)]
struct SideBases(std::sync::Mutex<Vec<(Filters, std::sync::Weak<Membership>)>>);

impl SideBases {
    /// The most it remembers (the last kept).
    const MOST: usize = 8;

    /// The bases of the sides of version `v` keyed by `key` (kept as a name no side has).
    fn of(
        store: &crate::store::Store,
        v: &VersionKey,
        mark: crate::store::ReadMark,
        key: &str,
    ) -> Arc<SideBases> {
        let name = serde_json::json!(["overlap side bases", key]).to_string();
        if let Some(bases) = store.derived::<SideBases>(v, mark, &name) {
            return bases;
        }
        let bases = Arc::new(SideBases::default());
        store.keep_derived(v, mark, &name, bases.clone(), 64 * Self::MOST);
        bases
    }

    fn add(&self, filters: &[(String, String)], side: &Arc<Membership>) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|(f, s)| s.strong_count() > 0 && f != filters);
        if all.len() >= Self::MOST {
            all.remove(0);
        }
        all.push((filters.to_vec(), Arc::downgrade(side)));
    }

    /// The side still held that shares the most filters with `filters`.
    fn closest(&self, filters: &[(String, String)]) -> Option<(Filters, Arc<Membership>)> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let shared = |f: &[(String, String)]| {
            (filters.iter())
                .filter(|(_, x)| f.iter().any(|(_, y)| x == y))
                .count()
        };
        // The last of the most shared: the newest.
        (all.iter())
            .filter_map(|(f, s)| Some((f.clone(), s.upgrade()?)))
            .max_by_key(|(f, _)| shared(f))
    }
}

/// Side `spec`, as kept ([`side_kept_as`]) or sealed ([`sealed_side`]); else derived from a
/// side of other populations of its version ([`read_side`]: one kept, else the sealed
/// one); else reduced from its rows. Kept in memory, with where it came from. One at a time
/// per name ([`Flights`]): a question that comes while its side is reduced ahead waits for
/// that rather than reducing it too (blocking).
fn kept_side(
    store: &Arc<crate::store::Store>,
    hasher: &escrow_query::EntityHasher,
    flights: &Flights,
    caller: &str,
    spec: &SideSpec,
    limit: usize,
    stop: &escrow_query::Stop,
) -> Result<(Arc<Membership>, Found)> {
    let name = side_kept_as(caller, &spec.key, spec.by.as_deref(), &spec.filters);
    // The cache keeps it per version; one flight per version and name too (another list's
    // side of the same name is no reason to wait: its time is its rows').
    let (dataset_id, version_id) = (&spec.version.dataset_id, &spec.version.version_id);
    let flight = serde_json::json!(["side", dataset_id, version_id, name]).to_string();
    flights.one_at_a_time(&flight, || {
        let mark = store.read_mark(&spec.version)?;
        if let Some(kept) = store.derived::<Membership>(&spec.version, mark, &name) {
            return Ok((kept, Found::Memory));
        }
        let started = std::time::Instant::now();
        let side_label = label(&spec.owner, &spec.dataset, &spec.version);
        // Sides with a breakdown are their asker's alone: neither sealed nor derived.
        let bases =
            (spec.by.is_none()).then(|| SideBases::of(store, &spec.version, mark, &spec.key));
        // Kept under its name, and as a base for sides of other populations.
        let keep = |filters: &[(String, String)], side: Arc<Membership>| {
            let name = side_kept_as(caller, &spec.key, spec.by.as_deref(), filters);
            let bytes = side.memory_bytes();
            store.keep_derived(&spec.version, mark, &name, side.clone(), bytes);
            if let Some(bases) = &bases {
                bases.add(filters, &side);
            }
            side
        };
        let mut base = bases.as_ref().and_then(|b| b.closest(&spec.filters));
        if base.is_none()
            && let Some((filters, sealed)) = sealed_side(store, hasher.check(), spec, limit)?
        {
            tracing::debug!(
                side = %side_label,
                ms = started.elapsed().as_millis() as u64,
                "overlap side read from its seal"
            );
            // Of other populations: kept as that side too (a population removed again
            // finds it), and this one derived from it.
            let sealed = keep(&filters, Arc::new(sealed));
            if filters == spec.filters {
                return Ok((sealed, Found::Sealed));
            }
            base = Some((filters, sealed));
        }
        if let Some((filters, base)) = base {
            let at = (mark, limit, stop);
            let side = read_side(store, hasher, spec, at, Some((&filters, &base)))?;
            tracing::debug!(
                side = %side_label,
                ms = started.elapsed().as_millis() as u64,
                "overlap side derived from the side of other populations"
            );
            return Ok((keep(&spec.filters, Arc::new(side)), Found::Derived));
        }
        let reduced = read_side(store, hasher, spec, (mark, limit, stop), None)?;
        tracing::debug!(
            side = %side_label,
            by = ?spec.by,
            ms = started.elapsed().as_millis() as u64,
            "overlap side read and reduced"
        );
        Ok((keep(&spec.filters, Arc::new(reduced)), Found::Reduced))
    })
}

/// How one side's rows are read with the populations `filters` (all of the side's, or the
/// new ones of a side derived from another): the side, the stored columns read (ascending)
/// and the form they are read in. Only the columns it uses are read (and decrypted, on a
/// first read): the key, what the filters use and, with `whole`, the breakdown and the
/// name and place ids.
fn side_reader(
    store: &crate::store::Store,
    hasher: &escrow_query::EntityHasher,
    spec: &SideSpec,
    filters: &[(String, String)],
    whole_side: bool,
) -> Result<(Side, Vec<usize>, crate::store::Form)> {
    let SideSpec {
        owner,
        dataset,
        key,
        version,
        by,
        own,
        ..
    } = spec;
    let sealed = store.schema_of(version)?;
    let (declared, whole, form) = query_form(&sealed, Some(key), hasher)?;
    let populations = |executes: &SchemaRef| -> Result<Vec<_>> {
        filters
            .iter()
            .map(|(name, filter)| {
                compile(filter, &declared, executes, key, owner, dataset, name).map_err(|e| {
                    match e {
                        // Not the caller's: its name and filter are the owner's business,
                        // even when the caller may see its counts.
                        Error::BadInput { code, .. } if !own => Error::bad(
                            code,
                            format!(
                                "a population of {owner}.{dataset} no longer fits the dataset's live version; its owner must define it again"
                            ),
                        ),
                        other => other,
                    }
                })
            })
            .collect::<Result<Vec<_>>>()
    };
    let index = |c: &str, s: &SchemaRef| {
        s.index_of(c)
            .map_err(|e| Error::internal(format!("overlap column: {e}")))
    };
    let mut wanted = std::collections::BTreeSet::new();
    for p in populations(&whole)? {
        for c in escrow_query::population::columns(&p) {
            wanted.insert(index(&c, &whole)?);
        }
    }
    wanted.insert(index(key, &whole)?);
    let more = [
        by.as_deref(),
        Some(crate::matching::NAME_KEY),
        Some(crate::matching::PLACE_KEY),
    ];
    for c in more.into_iter().flatten().filter(|_| whole_side) {
        if let Ok(i) = whole.index_of(c) {
            wanted.insert(i);
        }
    }
    let wanted: Vec<usize> = wanted.into_iter().collect();
    let executes: SchemaRef = Arc::new(
        whole
            .project(&wanted)
            .map_err(|e| Error::internal(format!("overlap columns: {e}")))?,
    );
    let side = Side {
        populations: populations(&executes)?,
        key_index: index(key, &executes)?,
        dimension: by.as_deref().map(|c| index(c, &executes)).transpose()?,
        names: executes.index_of(crate::matching::NAME_KEY).ok(),
        places: executes
            .index_of(crate::matching::PLACE_KEY)
            .ok()
            .map(|index| overlap::Places {
                index,
                kinds: executes
                    .field(index)
                    .metadata()
                    .get(crate::matching::PLACE_KINDS)
                    .cloned()
                    .unwrap_or_default(),
            }),
    };
    Ok((side, wanted, form))
}

/// A side's verified batches of `columns` (as its version stood at `mark`), ending at a stop
/// request.
fn side_batches(
    store: &Arc<crate::store::Store>,
    spec: &SideSpec,
    mark: crate::store::ReadMark,
    form: &crate::store::Form,
    columns: &[usize],
    stop: &escrow_query::Stop,
) -> Result<
    impl Iterator<Item = std::result::Result<arrow_array::RecordBatch, String>> + Send + use<>,
> {
    let stop = stop.clone();
    Ok(store
        .batches(&spec.version, mark, form, columns)?
        .map(move |b| {
            if stop.requested() {
                return Err(escrow_query::Stop::error().to_string());
            }
            b.map_err(|e| e.to_string())
        }))
}

/// Side `spec` from its version's verified batches (as it stood at `mark`): reduced from its
/// rows; or, given `base`, the side of the same version over the populations `filters`,
/// derived from it ([`Membership::repopulated`]): its populations of the same filter moved
/// to their places, the others' rows read (their columns and the key only).
fn read_side(
    store: &Arc<crate::store::Store>,
    hasher: &escrow_query::EntityHasher,
    spec: &SideSpec,
    (mark, limit, stop): (crate::store::ReadMark, usize, &escrow_query::Stop),
    base: Option<(&[(String, String)], &Membership)>,
) -> Result<Membership> {
    let Some((filters, base)) = base else {
        let (side, wanted, form) = side_reader(store, hasher, spec, &spec.filters, true)?;
        let batches = side_batches(store, spec, mark, &form, &wanted, stop)?;
        return Ok(overlap::memberships(&side, batches, limit)?);
    };
    let kept: Vec<Option<usize>> = (spec.filters.iter())
        .map(|(_, f)| filters.iter().position(|(_, g)| g == f))
        .collect();
    let added: Filters = (spec.filters.iter().zip(&kept))
        .filter(|(_, k)| k.is_none())
        .map(|(p, _)| p.clone())
        .collect();
    // Without the name and place ids (not read): what folds and links is the base's.
    let (side, wanted, form) = side_reader(store, hasher, spec, &added, false)?;
    let derived = match added.is_empty() {
        true => base.repopulated(&kept, &side, std::iter::empty(), limit),
        false => {
            let batches = side_batches(store, spec, mark, &form, &wanted, stop)?;
            base.repopulated(&kept, &side, batches, limit)
        }
    };
    Ok(derived?)
}

fn compile(
    filter: &str,
    declared: &SchemaRef,
    executes: &SchemaRef,
    key: &str,
    owner: &str,
    dataset: &str,
    name: &str,
) -> Result<Arc<dyn overlap::PhysicalExpr>> {
    escrow_query::population::compile(filter, declared, executes, Some(key)).map_err(|e| match e {
        QueryError::Refused { message, .. } => Error::bad(
            "population_invalid",
            format!(
                "population {name} of {owner}.{dataset} no longer fits the dataset's live version ({message}); its owner must define it again"
            ),
        ),
        other => Error::from(other),
    })
}

/// Which datasets take part: mine (with its populations) and theirs (with all its
/// populations, and the ones the caller's grants let it see).
fn resolve(
    store: &crate::store::Store,
    set: &PolicySet,
    caller: &str,
    req: &OverlapRequest,
) -> Result<Matrix> {
    // Mine.
    let mut my_pops = group(store.catalog().populations_of(caller)?);
    let mine = match &req.mine {
        Some(d) => {
            store.live_dataset(caller, d)?;
            d.clone()
        }
        None => match my_pops.keys().collect::<Vec<_>>().as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(Error::bad(
                    "no_populations",
                    "you have no populations: define them with `escrow population add DATASET NAME --filter P`",
                ));
            }
            many => {
                return Err(Error::bad(
                    "ambiguous_dataset",
                    format!(
                        "you have populations on several datasets ({}): choose one with --mine",
                        many.iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        },
    };
    let my_populations = my_pops.remove(&mine).ok_or_else(|| {
        Error::bad(
            "no_populations",
            format!("{mine} has no populations: define them with `escrow population add {mine} NAME --filter P`"),
        )
    })?;

    // Theirs: the one dataset with populations the caller may see. Whether the partner or
    // the dataset named exists, shares nothing or shares other uses, the refusal is the same.
    let mut candidates = shared_populations(store, set, caller, &req.with, req.theirs.as_deref())?;
    let Shared {
        dataset: theirs,
        populations: their_populations,
        visible,
    } = match candidates.len() {
        1 => candidates.remove(0),
        0 => {
            let on = req
                .theirs
                .as_deref()
                .map(|t| format!("population of {}.{t}", req.with))
                .unwrap_or_else(|| format!("population of {}", req.with));
            return Err(Error::refused(
                "usage_not_granted",
                format!(
                    "not granted to {caller}: overlap counts of any {on} (its owner can grant them with `escrow policy grant DATASET --to {caller} --usage overlap`)"
                ),
            ));
        }
        _ => {
            return Err(Error::bad(
                "ambiguous_dataset",
                format!(
                    "{} lets you see populations of several datasets ({}): choose one with --theirs",
                    req.with,
                    candidates
                        .iter()
                        .map(|s| s.dataset.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };

    let side = |owner: &str, dataset: &str, populations: Vec<Population>| -> Result<SideData> {
        let info = store.live_dataset(owner, dataset)?;
        let key_column = info.key_column.ok_or_else(|| {
            Error::refused(
                "no_privacy_unit",
                format!("{owner}.{dataset} has no key column, so its companies cannot be matched"),
            )
        })?;
        if let Some(by) = &req.by {
            if !info.columns.iter().any(|c| &c.name == by) {
                return Err(Error::bad(
                    "unknown_column",
                    format!(
                        "{owner}.{dataset} has no column {by:?}: a breakdown needs a column of both datasets"
                    ),
                ));
            }
            if by == &key_column {
                return Err(Error::refused(
                    "group_by_key",
                    format!("{by} identifies companies: cells cannot be broken down by it"),
                ));
            }
        }
        Ok(SideData {
            caller_side: owner == caller,
            owner: owner.to_string(),
            dataset: dataset.to_string(),
            key_column,
            version: store.live_version(owner, dataset)?,
            populations,
        })
    };
    let mine = side(caller, &mine, my_populations)?;
    // Their breakdown column's grant before anything about the column itself: whether a
    // column that was not shared exists is not the caller's to learn.
    if let Some(by) = &req.by {
        check_grants(set, caller, [&dimension(&req.with, &theirs, by)])?;
    }
    let theirs = side(&req.with, &theirs, their_populations)?;
    let plan = overlap_plan(store, &mine, &theirs, req.by.as_deref())?;
    Ok(Matrix {
        mine,
        theirs,
        visible,
        plan,
    })
}

/// The protection of a checked matrix (the strictest settings of both datasets, so that both
/// partners asking the same question get the same answer), its fingerprint (sides in
/// canonical order) and its budget charge (on their dataset).
fn overlap_plan(
    store: &crate::store::Store,
    mine: &SideData,
    theirs: &SideData,
    by: Option<&str>,
) -> Result<OverlapPlan> {
    let s_mine = settings::of(store, &mine.owner, &mine.dataset)?;
    let s_theirs = settings::of(store, &theirs.owner, &theirs.dataset)?;
    let protection = strictest([&s_mine, &s_theirs]);
    // Canonical order: the sides sorted by (owner, dataset).
    let mine_first = (&mine.owner, &mine.dataset) < (&theirs.owner, &theirs.dataset);
    let (first, second) = if mine_first {
        (mine, theirs)
    } else {
        (theirs, mine)
    };
    Ok(OverlapPlan {
        mine_first,
        protection,
        fingerprint: fingerprint(first, second, by, protection),
        charge: BudgetCharge {
            owner: theirs.owner.clone(),
            dataset: theirs.dataset.clone(),
            budget: s_theirs.budget,
        },
    })
}

/// One of the other partner's datasets with populations the caller may see.
struct Shared {
    dataset: String,
    /// All its populations, in definition order (all of them take part in a matrix).
    populations: Vec<Population>,
    /// Indexes into `populations` of the ones the caller may see (never empty).
    visible: Vec<usize>,
}

/// `with`'s datasets (or only `theirs`) with populations whose overlap counts `caller` may
/// see (usage `overlap`, per population or for the whole dataset; each decided once). This
/// is all of `with`'s that overlap questions and their explanations may name: an unknown or
/// revoked partner, a dataset that does not exist or shares no population, and a population
/// not granted all look alike (absent).
fn shared_populations(
    store: &crate::store::Store,
    set: &PolicySet,
    caller: &str,
    with: &str,
    theirs: Option<&str>,
) -> Result<Vec<Shared>> {
    if !store.catalog().partner_is_active(with)? {
        return Ok(Vec::new());
    }
    let mut shared = Vec::new();
    for (dataset, populations) in group(store.catalog().populations_of(with)?) {
        if theirs.is_some_and(|t| t != dataset) {
            continue;
        }
        let mut visible = Vec::new();
        for (i, p) in populations.iter().enumerate() {
            if decide(set, caller, &ColumnUse::overlap(with, &dataset, &p.name))?.allowed() {
                visible.push(i);
            }
        }
        if !visible.is_empty() {
            shared.push(Shared {
                dataset,
                populations,
                visible,
            });
        }
    }
    Ok(shared)
}

/// The use of `owner.dataset.column` as a breakdown.
fn dimension(owner: &str, dataset: &str, column: &str) -> ColumnUse {
    ColumnUse {
        owner: owner.to_string(),
        dataset: dataset.to_string(),
        column: column.to_string(),
        usage: Usage::Dimension,
    }
}

/// The question, independent of who asks: both sides in canonical order (dataset, data
/// version, key, every population's definition), the breakdown and the protection.
fn fingerprint(
    first: &SideData,
    second: &SideData,
    by: Option<&str>,
    (k, epsilon, l): (u64, f64, u32),
) -> [u8; 32] {
    let mut h = Sha256::new();
    // v2: discrete Gaussian noise (a matrix kept from v1 had Laplace noise).
    h.update(b"escrow-overlap-v2\0");
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    for s in [first, second] {
        field(&s.owner);
        field(&s.dataset);
        field(&s.version.version_id);
        field(&s.key_column);
        for p in &s.populations {
            field(&p.name);
            field(&p.filter);
        }
        field("\0end");
    }
    field(by.unwrap_or("\0none"));
    field(&format!("k={k} eps={epsilon} L={l} delta={DELTA}"));
    h.finalize().into()
}

/// Output encodings of overlap answers and reports (the JSON shapes are `wire::OverlapAnswer`
/// and `wire::CoSellingAnswer`).
pub mod output {
    use super::OverlapRow;
    use crate::{Error, Result};

    /// CSV with a header line: mine, theirs, (by,) count, suppressed.
    pub fn rows_csv<'a>(
        rows: impl IntoIterator<Item = &'a OverlapRow>,
        by: Option<&str>,
    ) -> Result<Vec<u8>> {
        let err = |e: csv::Error| Error::internal(format!("csv: {e}"));
        let mut w = csv::Writer::from_writer(Vec::new());
        let mut header = vec!["mine", "theirs"];
        header.extend(by);
        header.extend(["count", "suppressed"]);
        w.write_record(&header).map_err(err)?;
        for r in rows {
            let mut rec = vec![r.mine.clone(), r.theirs.clone()];
            if by.is_some() {
                rec.push(r.value.clone().unwrap_or_default());
            }
            rec.push(r.count.map(|c| c.to_string()).unwrap_or_default());
            rec.push(r.suppressed.to_string());
            w.write_record(&rec).map_err(err)?;
        }
        w.into_inner()
            .map_err(|e| Error::internal(format!("csv: {e}")))
    }
}

/// Matrices kept for repeated overlap questions (catalog `released_answers`): every released
/// cell of the whole matrix, the protection applied and the sensitivity, as JSON.
mod kept_matrix {
    use escrow_query::Applied;
    use escrow_query::overlap::ReleasedCell;
    use serde_json::{Value, json};

    use crate::queries::kept::{applied_json, applied_of};
    use crate::{Error, Result};

    type Matrix = (Vec<ReleasedCell>, Applied, u32);

    pub(super) fn encode((cells, p, sensitivity): &Matrix) -> Vec<u8> {
        let cells: Vec<Value> = cells
            .iter()
            .map(|c| json!([c.a, c.b, c.value, c.count]))
            .collect();
        json!({
            "cells": cells,
            "protection": applied_json(p),
            "sensitivity": sensitivity,
        })
        .to_string()
        .into_bytes()
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Matrix> {
        let bad = |what: &str| Error::internal(format!("kept matrix: {what}"));
        let v: Value = serde_json::from_slice(bytes).map_err(|_| bad("json"))?;
        let cells = v["cells"]
            .as_array()
            .ok_or_else(|| bad("cells"))?
            .iter()
            .map(|c| {
                let (a, b, value, count): (usize, usize, Option<String>, Option<u64>) =
                    serde_json::from_value(c.clone()).map_err(|_| bad("cell"))?;
                Ok(ReleasedCell { a, b, value, count })
            })
            .collect::<Result<Vec<_>>>()?;
        let sensitivity = v["sensitivity"]
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| bad("sensitivity"))?;
        Ok((cells, applied_of(&v["protection"])?, sensitivity))
    }
}
