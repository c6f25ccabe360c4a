//! A data owner's policy as one document, and its versions: the value types (`crate::policy`
//! holds what reads and changes them through the store).
//!
//! Everything a partner decides about what others may learn from its datasets is one
//! document: its grants (casbin `p` rules of `policies/model.conf`), the protection settings
//! of its datasets, and the populations it defines (which its `overlap` grants share).
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

use std::collections::{BTreeMap, BTreeSet};

use escrow_policies::Grant;
use serde::Serialize;

use crate::model::settings::DatasetSettings;
use crate::{Error, Result};

/// Largest policy document accepted for import.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// A population as the policy document holds it (definition order within its dataset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopulationDef {
    pub dataset: String,
    pub name: String,
    pub filter: String,
}

/// Everything one owner decided about its datasets.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyDocument {
    pub owner: String,
    /// Sorted, without duplicates.
    pub grants: Vec<Grant>,
    /// Settings the owner set, per dataset (datasets without an entry use the defaults).
    pub settings: BTreeMap<String, DatasetSettings>,
    /// By dataset, then definition order.
    pub populations: Vec<PopulationDef>,
}

/// What one version changed: its number and the document lines removed and added.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PolicyDiff {
    pub removed: Vec<String>,
    pub added: Vec<String>,
}

/// A version as written: its number and its diff against the one before.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyVersion {
    pub version: i64,
    #[serde(flatten)]
    pub diff: PolicyDiff,
}

impl PolicyVersion {
    /// What an audit record says about the policy version a change wrote (if any).
    pub fn audit_json(v: Option<&PolicyVersion>) -> serde_json::Value {
        match v {
            Some(v) => serde_json::json!({ "policy_version": v.version, "diff": v.diff }),
            None => serde_json::json!({ "policy_version": null }),
        }
    }
}

/// One entry of a partner's policy history.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    pub version: i64,
    pub time: String,
    /// The user who made the change.
    pub by: String,
    /// What made it: grant, revoke, settings, population_add, population_remove,
    /// dataset_delete, rollback, import.
    pub change: String,
    #[serde(flatten)]
    pub diff: PolicyDiff,
}

pub fn invalid(line: Option<u64>, message: impl std::fmt::Display) -> Error {
    match line {
        Some(l) => Error::bad("invalid_policy", format!("line {l}: {message}")),
        None => Error::bad("invalid_policy", message),
    }
}

/// A field as CSV writes it: quoted when it holds a delimiter, quote, line break or edge
/// space (so that `parse` reads it back unchanged).
fn field(s: &str) -> String {
    let needs = s.contains([',', '"', '\n', '\r', '#'])
        || s.starts_with(char::is_whitespace)
        || s.ends_with(char::is_whitespace);
    if needs {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl PolicyDocument {
    /// The document's lines in canonical order (what versions store and diffs compare).
    pub fn lines(&self) -> Vec<String> {
        let o = &self.owner;
        let mut out: Vec<String> = self
            .grants
            .iter()
            .map(|g| {
                let mut f = vec!["p".to_string()];
                f.extend(g.to_casbin());
                f.iter().map(|x| field(x)).collect::<Vec<_>>().join(",")
            })
            .collect();
        for (d, s) in &self.settings {
            for (name, value) in [
                ("min_entities", s.min_entities.to_string()),
                ("epsilon", s.epsilon.to_string()),
                ("budget", s.budget.to_string()),
                ("max_groups_per_entity", s.max_groups_per_entity.to_string()),
            ] {
                out.push(format!("setting,{o},{d},{name},{value}"));
            }
            for (col, [lo, hi]) in &s.bounds {
                out.push(format!("bounds,{o},{d},{},{lo},{hi}", field(col)));
            }
        }
        for p in &self.populations {
            out.push(format!(
                "population,{o},{},{},{}",
                p.dataset,
                p.name,
                field(&p.filter)
            ));
        }
        out
    }

    /// The canonical text: one line per rule, no comments.
    pub fn body(&self) -> String {
        let mut s = self.lines().join("\n");
        if !s.is_empty() {
            s.push('\n');
        }
        s
    }

    /// The export form: the canonical text under a header that says what it is.
    pub fn export(&self, version: i64) -> String {
        format!(
            "# escrow policy of {}, version {version}\n\
             # p,GRANTEE,OWNER,DATASET,COLUMN|POPULATION|*,USAGE      casbin rules (policies/model.conf)\n\
             # setting,OWNER,DATASET,min_entities|epsilon|budget|max_groups_per_entity,VALUE\n\
             # bounds,OWNER,DATASET,COLUMN,LOW,HIGH\n\
             # population,OWNER,DATASET,NAME,FILTER\n{}",
            self.owner,
            self.body()
        )
    }

    /// Parse a document of `owner`. Every line is checked on its own here (fields, names,
    /// values, that it is about `owner`'s datasets); `validate` checks it against the catalog.
    pub fn parse(owner: &str, text: &str) -> Result<Self> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .comment(Some(b'#'))
            .from_reader(text.as_bytes());
        let mut doc = PolicyDocument {
            owner: owner.to_string(),
            ..Default::default()
        };
        let mut grants = BTreeSet::new();
        // Settings given per dataset: which fields were set (the rest keep the defaults).
        let mut seen_settings: BTreeSet<(String, String)> = BTreeSet::new();
        let mut seen_bounds: BTreeSet<(String, String)> = BTreeSet::new();
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map(|p| line_of(text, p));
                invalid(line, format!("not CSV: {e}"))
            })?;
            let line = record.position().map(|p| line_of(text, p));
            let f: Vec<String> = record.iter().map(|s| s.trim().to_string()).collect();
            let Some((kind, rest)) = f.split_first().filter(|_| f.iter().any(|s| !s.is_empty()))
            else {
                continue;
            };
            let rule_owner = rest.get(if kind == "p" { 1 } else { 0 });
            if let Some(o) = rule_owner
                && o != owner
            {
                return Err(invalid(
                    line,
                    format!(
                        "names a dataset of {o}; a partner's policy covers only its own datasets ({owner})"
                    ),
                ));
            }
            let arity = |n: usize| -> Result<()> {
                if rest.len() == n {
                    Ok(())
                } else {
                    Err(invalid(
                        line,
                        format!(
                            "a {kind} line has {n} fields after {kind}, this one has {}",
                            rest.len()
                        ),
                    ))
                }
            };
            let dataset_name = |d: &str| -> Result<()> {
                if escrow_policies::is_valid_name(d) {
                    Ok(())
                } else {
                    Err(invalid(line, format!("dataset {d:?} is not a valid name")))
                }
            };
            match kind.as_str() {
                "p" => {
                    arity(5)?;
                    let g = Grant::from_casbin(rest).map_err(|e| invalid(line, e))?;
                    grants.insert(g);
                }
                "setting" => {
                    arity(4)?;
                    let (d, name, value) = (&rest[1], &rest[2], &rest[3]);
                    dataset_name(d)?;
                    if !seen_settings.insert((d.clone(), name.clone())) {
                        return Err(invalid(line, format!("{d}: {name} is set twice")));
                    }
                    let s = doc.settings.entry(d.clone()).or_default();
                    let bad = || {
                        invalid(
                            line,
                            format!("{name} of {d}: {value:?} is not a valid value"),
                        )
                    };
                    match name.as_str() {
                        "min_entities" => s.min_entities = value.parse().map_err(|_| bad())?,
                        "epsilon" => s.epsilon = value.parse().map_err(|_| bad())?,
                        "budget" => s.budget = value.parse().map_err(|_| bad())?,
                        "max_groups_per_entity" => {
                            s.max_groups_per_entity = value.parse().map_err(|_| bad())?
                        }
                        other => {
                            return Err(invalid(
                                line,
                                format!(
                                    "unknown setting {other:?} (min_entities, epsilon, budget, max_groups_per_entity)"
                                ),
                            ));
                        }
                    }
                }
                "bounds" => {
                    arity(5)?;
                    let (d, col) = (&rest[1], &rest[2]);
                    dataset_name(d)?;
                    if !seen_bounds.insert((d.clone(), col.clone())) {
                        return Err(invalid(line, format!("{d}: bounds of {col} are set twice")));
                    }
                    let num = |s: &str| {
                        s.parse::<f64>().map_err(|_| {
                            invalid(line, format!("bounds of {col}: {s:?} is not a number"))
                        })
                    };
                    let (lo, hi) = (num(&rest[3])?, num(&rest[4])?);
                    doc.settings
                        .entry(d.clone())
                        .or_default()
                        .bounds
                        .insert(col.clone(), [lo, hi]);
                }
                "population" => {
                    arity(4)?;
                    let (d, name) = (&rest[1], &rest[2]);
                    dataset_name(d)?;
                    if !escrow_policies::is_valid_name(name) {
                        return Err(invalid(
                            line,
                            format!("population {name:?} is not a valid name"),
                        ));
                    }
                    if doc
                        .populations
                        .iter()
                        .any(|p| &p.dataset == d && &p.name == name)
                    {
                        return Err(invalid(
                            line,
                            format!("{d} defines population {name} twice"),
                        ));
                    }
                    doc.populations.push(PopulationDef {
                        dataset: d.clone(),
                        name: name.clone(),
                        filter: rest[3].clone(),
                    });
                }
                other => {
                    return Err(invalid(
                        line,
                        format!("unknown line type {other:?} (p, setting, bounds, population)"),
                    ));
                }
            }
        }
        doc.grants = grants.into_iter().collect();
        // Canonical order: by dataset, definition order within each.
        doc.populations.sort_by(|a, b| a.dataset.cmp(&b.dataset));
        Ok(doc)
    }

    /// The datasets the document names.
    pub fn datasets(&self) -> BTreeSet<&str> {
        self.grants
            .iter()
            .map(|g| g.dataset.as_str())
            .chain(self.settings.keys().map(String::as_str))
            .chain(self.populations.iter().map(|p| p.dataset.as_str()))
            .collect()
    }
}

/// The line a record starts on. The csv crate reports where it started reading, before the
/// blank and comment lines it skipped; those are counted here.
fn line_of(text: &str, p: &csv::Position) -> u64 {
    let mut line = p.line();
    let mut rest = text.get(p.byte() as usize..).unwrap_or_default();
    loop {
        if rest.starts_with('#') {
            let Some(end) = rest.find('\n') else { break };
            rest = &rest[end + 1..];
        } else if let Some(r) = rest
            .strip_prefix("\r\n")
            .or_else(|| rest.strip_prefix('\n'))
        {
            rest = r;
        } else {
            break;
        }
        line += 1;
    }
    line
}

/// The lines of `to` that `from` lacks, and the reverse.
pub fn diff(from: &str, to: &str) -> PolicyDiff {
    let a: BTreeSet<&str> = from.lines().collect();
    let b: BTreeSet<&str> = to.lines().collect();
    PolicyDiff {
        removed: from
            .lines()
            .filter(|l| !b.contains(l))
            .map(str::to_string)
            .collect(),
        added: to
            .lines()
            .filter(|l| !a.contains(l))
            .map(str::to_string)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_through_their_text() {
        let text = "# a comment\n\
            p,globex,acme,accounts,website,join\n\
            p,*,acme,accounts,customers,overlap\n\
            setting,acme,accounts,epsilon,0.5\n\
            bounds,acme,accounts,arr,0,1000000\n\
            population,acme,accounts,customers,\"region IN ('emea', 'apac') AND name <> \"\"x\"\"\"\n";
        let doc = PolicyDocument::parse("acme", text).unwrap();
        assert_eq!(doc.grants.len(), 2);
        assert_eq!(doc.settings["accounts"].epsilon, 0.5);
        assert_eq!(
            doc.settings["accounts"].min_entities, 5,
            "unset fields keep defaults"
        );
        assert_eq!(
            doc.populations[0].filter,
            "region IN ('emea', 'apac') AND name <> \"x\""
        );
        let again = PolicyDocument::parse("acme", &doc.body()).unwrap();
        assert_eq!(again, doc);
        assert_eq!(PolicyDocument::parse("acme", &doc.export(3)).unwrap(), doc);
    }

    #[test]
    fn bad_lines_are_refused_with_their_line_number() {
        for (text, needle) in [
            (
                "p,globex,acme,accounts,website\n",
                "line 1: a p line has 5 fields",
            ),
            (
                "\np,globex,globex,accounts,website,join\n",
                "line 2: names a dataset of globex",
            ),
            ("p,globex,acme,accounts,website,peek\n", "unknown usage"),
            ("setting,acme,accounts,epsilon,lots\n", "not a valid value"),
            ("setting,acme,accounts,k,5\n", "unknown setting"),
            (
                "setting,acme,accounts,budget,1\nsetting,acme,accounts,budget,2\n",
                "set twice",
            ),
            ("grant,acme,accounts,x,y\n", "unknown line type"),
            ("population,acme,Accounts,c,x = 1\n", "not a valid name"),
        ] {
            let e = PolicyDocument::parse("acme", text).unwrap_err();
            assert_eq!(e.code(), "invalid_policy");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }

    /// The export is a casbin policy file for policies/model.conf: casbin's own file adapter
    /// loads exactly the grants (and skips escrow's other lines) and decides with them.
    #[tokio::test]
    async fn casbin_loads_the_export_with_the_model() {
        use casbin::{CoreApi, DefaultModel, Enforcer, FileAdapter, MgmtApi};
        let text = "p,globex,acme,accounts,website,join\n\
            p,*,acme,accounts,customers,overlap\n\
            setting,acme,accounts,epsilon,0.5\n\
            population,acme,accounts,customers,\"status IN ('customer', 'partner')\"\n";
        let doc = PolicyDocument::parse("acme", text).unwrap();
        let dir = std::env::temp_dir().join(format!("escrow-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acme.csv");
        std::fs::write(&path, doc.export(4)).unwrap();
        let model = DefaultModel::from_str(escrow_policies::MODEL)
            .await
            .unwrap();
        let e = Enforcer::new(model, FileAdapter::new(path.to_string_lossy().into_owned()))
            .await
            .unwrap();
        let mut loaded = e.get_policy();
        loaded.sort();
        let mut expected: Vec<Vec<String>> = doc.grants.iter().map(Grant::to_casbin).collect();
        expected.sort();
        assert_eq!(loaded, expected);
        assert!(
            e.enforce(("globex", "acme", "accounts", "website", "join"))
                .unwrap()
        );
        assert!(
            !e.enforce(("globex", "acme", "accounts", "region", "join"))
                .unwrap()
        );
        assert!(
            e.enforce(("initech", "acme", "accounts", "customers", "overlap"))
                .unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn diffs_name_removed_and_added_lines() {
        let d = diff("a\nb\nc\n", "b\nc\nd\n");
        assert_eq!(d.removed, vec!["a"]);
        assert_eq!(d.added, vec!["d"]);
    }
}
