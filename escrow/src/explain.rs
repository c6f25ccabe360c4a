//! Explanations for compliance officers and analysts: why a question would be answered or
//! refused (`explain`), and what another partner can currently ask of my datasets
//! (`preview`). Both use the same checks and the same casbin decisions as answering does
//! (`QueryService::check_sql`, the overlap resolution, `Catalog::spend` in dry-run mode), and
//! neither reads, spends or runs anything. They name nothing of another partner's that its
//! grants to the caller do not name: an overlap explanation lists only the populations
//! shared with the caller (`overlaps::shared_populations`). Engine code: no HTTP.

use escrow_policies::{ColumnUse, Decision, Usage, is_valid_name};
use serde::Serialize;

use crate::queries::{BudgetView, Cost, QueryService, Trace, blocking, decide};
use crate::settings::{self, DatasetSettings};
use crate::{Error, Result};

/// One use a question makes of one column (or population, or whole dataset), decided.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UseExplained {
    /// `owner.dataset`
    pub dataset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population: Option<String>,
    pub usage: String,
    /// owner (the caller's own data), granted, or missing.
    pub decision: String,
    /// The casbin rule that grants it (`p,grantee,owner,dataset,column,usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// For a missing grant: the command its owner would run to grant it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_grant: Option<String>,
}

impl UseExplained {
    pub(crate) fn new(caller: &str, u: &ColumnUse, d: &Decision) -> Self {
        let (column, population) = if u.usage.names_population() {
            (None, Some(u.column.clone()))
        } else if u.usage.is_dataset_wide() {
            (None, None)
        } else {
            (Some(u.column.clone()), None)
        };
        let target = match (&column, &population) {
            (Some(c), _) => format!(" --column {c}"),
            (_, Some(p)) => format!(" --population {p}"),
            _ => String::new(),
        };
        let (decision, rule, missing_grant) = match d {
            Decision::Owner => ("owner", None, None),
            Decision::Granted(_) => ("granted", rule_of(d), None),
            Decision::Missing => (
                "missing",
                None,
                Some(format!(
                    "{} runs: escrow policy grant {} --to {caller} --usage {}{target}",
                    u.owner, u.dataset, u.usage
                )),
            ),
        };
        UseExplained {
            dataset: format!("{}.{}", u.owner, u.dataset),
            column,
            population,
            usage: u.usage.as_str().into(),
            decision: decision.into(),
            rule,
            missing_grant,
        }
    }
}

/// The protection that would apply: the strictest settings of the datasets read.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ProtectionView {
    pub min_entities: u64,
    pub epsilon: f64,
    pub max_groups_per_entity: u32,
    /// The other partners' datasets whose settings apply (and whose budgets are charged).
    pub from: Vec<String>,
}

/// A rule that refuses.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RefusalView {
    pub rule: String,
    pub message: String,
}

/// Why a question would be answered or refused.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Explanation {
    pub allowed: bool,
    /// The first rule that refuses it, as answering would report it.
    pub refusal: Option<RefusalView>,
    /// `owner.dataset@vN` of every dataset it reads.
    pub datasets: Vec<String>,
    /// Every use it makes, with the rule that grants it or the grant that is missing.
    pub uses: Vec<UseExplained>,
    pub protection: Option<ProtectionView>,
    /// What answering it would cost now (ε, whether it is a repeat, budgets afterwards).
    pub cost: Option<Cost>,
}

impl Explanation {
    /// Turn a check's failure into the explanation's refusal; server faults stay errors.
    pub(crate) fn refusal_of(e: Error) -> Result<RefusalView> {
        match e {
            Error::Refused { rule, message } => Ok(RefusalView {
                rule: rule.into(),
                message,
            }),
            Error::BadInput { code, message } => Ok(RefusalView {
                rule: code.into(),
                message,
            }),
            other => Err(other),
        }
    }
}

/// What one partner can currently ask of one of my datasets.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DatasetPreview {
    /// `owner.dataset`
    pub dataset: String,
    pub version: i64,
    /// The partner can name it in a query (it has at least one grant).
    pub visible: bool,
    /// The casbin rule that lets it query the dataset without joining it to its own data.
    pub standalone: Option<String>,
    /// Each column the partner may use, with each usage and its rule.
    pub columns: Vec<ColumnPreview>,
    /// Every population of the dataset, and whether the partner sees its overlap counts.
    pub populations: Vec<PopulationPreview>,
    pub settings: DatasetSettings,
    pub budget: BudgetView,
    /// The largest ε of one more question the partner can ask of this dataset's owner:
    /// `√(budget² - spent²)` (ε of questions add up in squares, see the ledger).
    pub remaining: f64,
    /// What the budget protects, in plain words, with these settings' numbers.
    pub guarantee: String,
    /// Why a granted use would still be refused.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ColumnPreview {
    pub column: String,
    pub usages: Vec<UsagePreview>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UsagePreview {
    pub usage: String,
    pub rule: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PopulationPreview {
    pub name: String,
    pub visible: bool,
    pub rule: Option<String>,
}

/// What `partner` can ask of `owner`'s datasets.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Preview {
    pub owner: String,
    pub partner: String,
    pub datasets: Vec<DatasetPreview>,
}

fn rule_of(d: &Decision) -> Option<String> {
    match d {
        Decision::Granted(g) => Some(format!("p,{}", g.to_casbin().join(","))),
        _ => None,
    }
}

impl QueryService {
    /// Explain `sql` as `caller` would ask it: every column use and its grant (or the grant
    /// missing), the protection and budget that would apply, and the first refusal.
    pub async fn explain_sql(&self, caller: &str, sql: &str) -> Result<Explanation> {
        let mut trace = Trace::default();
        let checked = match self.check_sql(caller, sql, &mut trace).await {
            Ok(c) => c,
            Err(e) => {
                return Ok(Explanation {
                    allowed: false,
                    refusal: Some(Explanation::refusal_of(e)?),
                    datasets: trace.datasets,
                    uses: Vec::new(),
                    protection: None,
                    cost: None,
                });
            }
        };
        let uses = checked
            .decisions
            .iter()
            .map(|(u, d)| UseExplained::new(caller, u, d))
            .collect();
        let protection = match &checked.protection {
            Ok(Some((p, charges))) => Some(ProtectionView {
                min_entities: p.min_entities,
                epsilon: p.epsilon.as_f64(),
                max_groups_per_entity: p.max_groups_per_entity,
                from: charges
                    .iter()
                    .map(|c| format!("{}.{}", c.owner, c.dataset))
                    .collect(),
            }),
            _ => None,
        };
        let fp = checked.fingerprint;
        let outcome = match checked.into_allowed(caller) {
            Err(e) => Err(e),
            Ok((_, _, None)) => Ok(Cost::default()),
            Ok((_, _, Some((p, charges)))) => self
                .charge(caller, charges, p.epsilon.as_f64(), fp, None)
                .await
                .map(|c| c.cost),
        };
        let (refusal, cost) = match outcome {
            Ok(c) => (None, Some(c)),
            Err(e) => (Some(Explanation::refusal_of(e)?), None),
        };
        Ok(Explanation {
            allowed: refusal.is_none(),
            refusal,
            datasets: trace.datasets,
            uses,
            protection,
            cost,
        })
    }

    /// What `partner` can currently ask of `owner`'s datasets (or of one of them): the
    /// columns and usages granted, the standalone grant, the populations it sees, the
    /// settings in force and the budget it has left.
    pub async fn preview(
        &self,
        owner: &str,
        partner: &str,
        dataset: Option<&str>,
    ) -> Result<Preview> {
        if !is_valid_name(partner) {
            return Err(Error::bad(
                "invalid_request",
                format!("partner {partner:?} is not a valid name"),
            ));
        }
        if partner == owner {
            return Err(Error::bad(
                "invalid_request",
                "a preview shows what another partner can ask of your datasets",
            ));
        }
        let set = self.policy_set().await?;
        let (store, owner, partner, dataset) = (
            self.store.clone(),
            owner.to_string(),
            partner.to_string(),
            dataset.map(str::to_string),
        );
        blocking(move || {
            // Unlike overlap questions, a preview may say that a partner does not exist: it
            // is about the caller's own data, and whether a partner exists is what
            // `policy grant --to P` tells the same owner anyway (a grant to no partner is
            // refused). Answering "P sees nothing" for a mistyped P would mislead instead.
            if !store.catalog().partner_is_active(&partner)? {
                return Err(Error::NotFound(format!("no partner named {partner}")));
            }
            let mut datasets = store.list(&owner)?;
            if let Some(d) = &dataset {
                datasets.retain(|i| &i.name == d);
                if datasets.is_empty() {
                    return Err(Error::NotFound(format!("no dataset named {d}")));
                }
            }
            let populations = store.catalog().populations_of(&owner)?;
            let mut out = Vec::new();
            for info in datasets {
                let d = info.name.as_str();
                let visible = set.grants().iter().any(|g| {
                    g.owner == owner && g.dataset == d && (g.grantee == partner || g.grantee == "*")
                });
                let decide_use = |column: &str, usage: Usage| {
                    let u = ColumnUse {
                        owner: owner.clone(),
                        dataset: d.to_string(),
                        column: column.to_string(),
                        usage,
                    };
                    decide(&set, &partner, &u)
                };
                let standalone = rule_of(&decide_use("*", Usage::Standalone)?);
                let s = settings::of(&store, &owner, d)?;
                let mut columns = Vec::new();
                let mut notes = Vec::new();
                for c in &info.columns {
                    let mut usages = Vec::new();
                    for usage in Usage::COLUMN {
                        if let Some(rule) = rule_of(&decide_use(&c.name, usage)?) {
                            if matches!(usage, Usage::Sum | Usage::Avg)
                                && !s.bounds.contains_key(&c.name)
                            {
                                notes.push(format!(
                                    "{usage} of {} is granted but refused until you set its bounds (escrow policy set {d} --bounds {}=LOW:HIGH)",
                                    c.name, c.name
                                ));
                            }
                            usages.push(UsagePreview {
                                usage: usage.as_str().into(),
                                rule,
                            });
                        }
                    }
                    if !usages.is_empty() {
                        columns.push(ColumnPreview {
                            column: c.name.clone(),
                            usages,
                        });
                    }
                }
                if visible && info.key_column.is_none() {
                    notes.push(format!(
                        "{d} has no key column: other partners cannot query it (no privacy unit)"
                    ));
                }
                let mut pops = Vec::new();
                for p in populations.iter().filter(|p| p.dataset == d) {
                    let rule = rule_of(&decide(
                        &set,
                        &partner,
                        &ColumnUse::overlap(&owner, d, &p.name),
                    )?);
                    pops.push(PopulationPreview {
                        name: p.name.clone(),
                        visible: rule.is_some(),
                        rule,
                    });
                }
                let spent = store.catalog().spent(&partner, &owner)?;
                out.push(DatasetPreview {
                    dataset: format!("{owner}.{d}"),
                    version: info.version,
                    visible,
                    standalone,
                    columns,
                    populations: pops,
                    budget: BudgetView {
                        dataset: format!("{owner}.{d}"),
                        spent,
                        budget: s.budget,
                    },
                    remaining: (s.budget * s.budget - spent * spent).max(0.0).sqrt(),
                    guarantee: settings::guarantee(
                        s.budget,
                        s.epsilon,
                        crate::queries::DELTA,
                    ),
                    settings: s,
                    notes,
                });
            }
            Ok(Preview {
                owner,
                partner,
                datasets: out,
            })
        })
        .await
    }
}
