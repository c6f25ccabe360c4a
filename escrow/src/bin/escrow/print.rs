//! How the CLI prints the API's answers as text (`--format table`): every function takes a
//! typed answer from `escrow::wire`.

use escrow::wire;

/// Columns padded to their widest value, two spaces apart.
pub fn table(header: &[String], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, v) in width.iter_mut().zip(r) {
            *w = (*w).max(v.chars().count());
        }
    }
    let line = |vals: &[String]| {
        vals.iter()
            .zip(&width)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header));
    for r in rows {
        println!("{}", line(r));
    }
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// `none` when the list is empty; true when there is something to print.
fn any_or_say<T>(items: &[T], none: &str) -> bool {
    if items.is_empty() {
        println!("{none}");
    }
    !items.is_empty()
}

fn rows_text(n: usize) -> String {
    format!("({n} row{})", if n == 1 { "" } else { "s" })
}

/// A number as the API's JSON writes it (`1.0`, not `1`): what the CLI has always printed.
fn num(x: f64) -> String {
    serde_json::Value::from(x).to_string()
}

/// A JSON value of an answer's cell or an audit detail as text (`-` for null).
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

pub fn datasets(out: &wire::DatasetList) {
    if !any_or_say(&out.datasets, "no datasets") {
        return;
    }
    println!(
        "{:<24} {:>7} {:>10}  {:<16} {:<20}  COLUMNS",
        "NAME", "VERSION", "ROWS", "KEY COLUMN", "CREATED (UTC)"
    );
    for d in &out.datasets {
        let cols: Vec<String> = d
            .columns
            .iter()
            .map(|c| format!("{}:{}", c.name, c.data_type))
            .collect();
        let created = &d.created_at;
        println!(
            "{:<24} {:>7} {:>10}  {:<16} {:<20}  {}",
            d.name,
            d.version,
            d.rows,
            d.key_column.as_deref().unwrap_or("-"),
            created.get(..19).unwrap_or(created).replace('T', " "),
            cols.join(", ")
        );
    }
}

pub fn versions(out: &wire::DatasetVersions) {
    let rows: Vec<Vec<String>> = out
        .versions
        .iter()
        .map(|v| {
            let matched = |f: fn(&escrow::matching::MatchStats) -> u64| {
                v.matching.map(|m| f(&m).to_string()).unwrap_or("-".into())
            };
            vec![
                v.version.to_string(),
                v.created_at
                    .get(..19)
                    .unwrap_or(&v.created_at)
                    .replace('T', " "),
                v.uploaded_by.clone(),
                v.rows.to_string(),
                v.source_bytes.to_string(),
                v.key_column.clone().unwrap_or_else(|| "-".into()),
                matched(|m| m.by_domain),
                matched(|m| m.by_name),
                matched(|m| m.unmatched),
            ]
        })
        .collect();
    println!("{}:", out.dataset);
    table(
        &header(&[
            "VERSION",
            "CREATED (UTC)",
            "BY",
            "ROWS",
            "BYTES",
            "KEY COLUMN",
            "BY DOMAIN",
            "BY NAME",
            "UNMATCHED",
        ]),
        &rows,
    );
}

pub fn upload(out: &wire::UploadOutcome) {
    let matching = match &out.matching {
        None => String::new(),
        Some(m) => format!(
            " matched_by_domain={} matched_by_name={} unmatched={}",
            m.by_domain, m.by_name, m.unmatched
        ),
    };
    let places = if out.places.is_empty() {
        String::new()
    } else {
        format!(" places={}", out.places.join(","))
    };
    println!(
        "dataset={} version={} rows={} bytes={} format={} key_column={}{matching}{places}",
        out.dataset,
        out.version,
        out.rows,
        out.bytes,
        out.format,
        out.key_column.as_deref().unwrap_or("-"),
    );
}

pub fn grant_line(g: &wire::GrantView) -> String {
    if g.usage == "overlap" {
        let which = match g.population.as_deref() {
            Some("*") | None => "every population".to_string(),
            Some(p) => format!("population {p}"),
        };
        return format!(
            "{} may see overlap counts of {which} of {}",
            g.to, g.dataset
        );
    }
    format!("{} may use {}.{} as {}", g.to, g.dataset, g.column, g.usage)
}

pub fn grants(out: &wire::GrantList) {
    for (title, list) in [
        ("granted by you", &out.granted),
        ("granted to you", &out.received),
    ] {
        println!("{title}: {}", if list.is_empty() { "none" } else { "" });
        for g in list {
            println!("  {}", grant_line(g));
        }
    }
}

pub fn settings(out: &wire::SettingsNow) {
    let s = &out.settings;
    let bounds = serde_json::to_string(&s.bounds).unwrap_or_default();
    println!(
        "{}: min_entities={} epsilon={} budget={} max_groups_per_entity={} bounds={bounds}",
        out.dataset,
        s.min_entities,
        num(s.epsilon),
        num(s.budget),
        s.max_groups_per_entity
    );
}

/// Each dataset's settings, one line each as `policy set` prints them.
pub fn settings_list(out: &wire::SettingsList) {
    if any_or_say(&out.datasets, "no datasets yet") {
        out.datasets.iter().for_each(settings);
    }
}

/// The `removed` and `added` lines of a policy diff, as `- line` / `+ line`.
pub fn diff(d: &wire::PolicyDiff, indent: &str) {
    for (sign, lines) in [("-", &d.removed), ("+", &d.added)] {
        for line in lines {
            println!("{indent}{sign} {line}");
        }
    }
}

pub fn history(out: &wire::PolicyHistory) {
    if !any_or_say(&out.versions, "no policy changes yet") {
        return;
    }
    for v in &out.versions {
        println!("v{}  {}  {}  {}", v.version, v.time, v.by, v.change);
        diff(&v.diff, "    ");
    }
}

pub fn populations(out: &wire::PopulationList) {
    if !any_or_say(&out.populations, "no populations") {
        return;
    }
    for p in &out.populations {
        println!("{}.{}  where {}", p.dataset, p.name, p.filter);
    }
}

pub fn explanation(e: &wire::Explanation) {
    match &e.refusal {
        None => println!("allowed"),
        Some(r) => println!("refused by rule {}: {}", r.rule, r.message),
    }
    if !e.datasets.is_empty() {
        println!("reads: {}", e.datasets.join(", "));
    }
    for u in &e.uses {
        let target = match (&u.column, &u.population) {
            (Some(c), _) => format!("{}.{c}", u.dataset),
            (_, Some(p)) => format!("population {p} of {}", u.dataset),
            _ => u.dataset.clone(),
        };
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
        let why = match u.decision.as_str() {
            "owner" => "your own data".to_string(),
            "granted" => format!("granted by {}", or_unknown(&u.rule)),
            _ => format!("MISSING GRANT ({})", or_unknown(&u.missing_grant)),
        };
        println!("  {target} as {}: {why}", u.usage);
    }
    if let Some(p) = &e.protection {
        println!(
            "protection: min_entities={} epsilon={} max_groups_per_entity={} (settings of {})",
            p.min_entities,
            num(p.epsilon),
            p.max_groups_per_entity,
            p.from.join(", ")
        );
    }
    if let Some(c) = &e.cost {
        let repeat = if c.repeated {
            " (asked before: no new spend)"
        } else {
            ""
        };
        println!("cost: epsilon {}{repeat}", num(c.epsilon_spent));
        for b in &c.budgets {
            println!(
                "  budget of {}: {} of {} spent after it",
                b.dataset,
                num(b.spent),
                num(b.budget)
            );
        }
    }
}

pub fn preview(p: &wire::Preview) {
    let partner = &p.partner;
    for d in &p.datasets {
        let seen = if d.visible {
            "can name it in queries"
        } else {
            "cannot see it"
        };
        println!("{} (v{}): {partner} {seen}", d.dataset, d.version);
        for c in &d.columns {
            let usages: Vec<&str> = c.usages.iter().map(|u| u.usage.as_str()).collect();
            println!("  {}: {}", c.column, usages.join(", "));
        }
        match &d.standalone {
            Some(rule) => println!("  standalone: yes ({rule})"),
            None => println!("  standalone: no (only joined to {partner}'s own datasets)"),
        }
        let pops: Vec<String> = d
            .populations
            .iter()
            .map(|x| {
                let seen = if x.visible { "visible" } else { "hidden" };
                format!("{} ({seen})", x.name)
            })
            .collect();
        if !pops.is_empty() {
            println!("  populations: {}", pops.join(", "));
        }
        let st = &d.settings;
        println!(
            "  protection: min_entities={} epsilon={} max_groups_per_entity={}; budget {} spent {} remaining {}",
            st.min_entities,
            num(st.epsilon),
            st.max_groups_per_entity,
            num(st.budget),
            num(d.budget.spent),
            num(d.remaining)
        );
        println!("  guarantee: {}", d.guarantee);
        for n in &d.notes {
            println!("  note: {n}");
        }
    }
}

pub fn audit(records: &[wire::Record]) {
    if !any_or_say(records, "no audit events") {
        return;
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let e = &r.event;
            let who = match &e.actor.partner {
                Some(p) => format!("{p}/{}", e.actor.user),
                None => e.actor.user.clone(),
            };
            let outcome = text(&serde_json::to_value(e.outcome).unwrap_or_default());
            let outcome = match &e.code {
                Some(c) => format!("{outcome} ({c})"),
                None => outcome,
            };
            vec![
                r.seq.to_string(),
                r.time.clone(),
                e.kind.clone(),
                who,
                outcome,
                audit_summary(&e.detail),
            ]
        })
        .collect();
    table(
        &header(&["seq", "time", "kind", "by", "outcome", "detail"]),
        &rows,
    );
}

/// The detail of an audit record on one line (the SQL shortened).
fn audit_summary(detail: &serde_json::Value) -> String {
    let Some(o) = detail.as_object() else {
        return String::new();
    };
    let mut parts = Vec::new();
    for (k, v) in o {
        if v.is_null() {
            continue;
        }
        let mut s = text(v);
        if s.chars().count() > 60 {
            s = s.chars().take(57).collect::<String>() + "...";
        }
        parts.push(format!("{k}={s}"));
    }
    parts.join(" ")
}

/// The protection applied and the budget it cost, under an answer.
fn protection(p: Option<&wire::Protection>, cost: &wire::Charge, withheld: &str) {
    let Some(p) = p else {
        return;
    };
    let sensitivity = match p.sensitivity {
        Some(s) => format!(" and sensitivity {s}"),
        None => String::new(),
    };
    println!(
        "protected: rows need >= {} entities (release threshold {:.1}), noise with epsilon {}{sensitivity} (sd {:.1} per count); {withheld}",
        p.min_entities,
        p.release_threshold,
        num(p.epsilon),
        p.noise_sd
    );
    if cost.repeated {
        println!("same question on the same data as before: same answer, no budget spent");
    } else {
        println!("budget spent: {}", num(cost.epsilon_spent));
    }
    for b in &cost.budgets {
        println!(
            "  {}: {} of {} spent",
            b.dataset,
            num(b.spent),
            num(b.budget)
        );
    }
}

/// An answer as a table; suppressed rows and the protection applied are stated under it.
pub fn answer(out: &wire::QueryAnswer) {
    let cols: Vec<String> = out.columns.iter().map(|c| c.name.clone()).collect();
    let rows: Vec<Vec<String>> = out
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut row: Vec<String> = r.iter().map(text).collect();
            if out.suppressed.get(i) == Some(&true) {
                row.push("(suppressed: too few entities)".into());
            }
            row
        })
        .collect();
    table(&cols, &rows);
    println!("{}", rows_text(rows.len()));
    protection(
        out.protection.as_ref(),
        &out.cost,
        "groups below the threshold are not listed",
    );
}

fn count_text(c: &wire::OverlapCell) -> String {
    match (c.suppressed, c.count) {
        (true, _) => "suppressed".into(),
        (false, Some(n)) => n.to_string(),
        (false, None) => "-".into(),
    }
}

/// Released overlaps, one line per cell: when, the versions, the populations and the count.
pub fn overlap_history(out: &wire::OverlapHistory) {
    if !any_or_say(
        &out.released,
        &format!("no overlap with {} released yet", out.with),
    ) {
        return;
    }
    let header: Vec<String> = [
        "released at",
        "mine",
        "theirs",
        "my population",
        "their population",
        "count",
    ]
    .map(String::from)
    .into();
    let rows: Vec<Vec<String>> = (out.released.iter())
        .flat_map(|r| {
            r.cells.iter().map(|c| {
                vec![
                    r.released_at.clone(),
                    r.mine.clone(),
                    r.theirs.clone(),
                    c.mine.clone(),
                    c.theirs.clone(),
                    c.count
                        .map_or_else(|| "suppressed".into(), |n| n.to_string()),
                ]
            })
        })
        .collect();
    table(&header, &rows);
    println!("{}", rows_text(rows.len()));
}

/// Overlap cells as a list: mine, theirs, [value,] count.
fn cell_rows(by: Option<&str>, cells: &[wire::OverlapCell]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = header(&["MINE", "THEIRS"]);
    header.extend(by.map(str::to_uppercase));
    header.push("COUNT".into());
    let rows = cells
        .iter()
        .map(|c| {
            let mut row = vec![c.mine.clone(), c.theirs.clone()];
            if by.is_some() {
                row.push(c.value().unwrap_or("-").to_string());
            }
            row.push(count_text(c));
            row
        })
        .collect();
    (header, rows)
}

const WITHHELD_CELLS: &str = "suppressed cells have fewer companies than the threshold";
const UNLISTED_CELLS: &str = "cells below the threshold are not listed";

/// The matrix (my populations down, theirs across), or the breakdown as a list.
pub fn overlap(out: &wire::OverlapAnswer) {
    println!("overlap of {} (yours) with {}", out.mine, out.theirs);
    if out.by.is_none() {
        let theirs = &out.populations.theirs;
        let mut header = vec!["mine \\ theirs".to_string()];
        header.extend(theirs.iter().cloned());
        let rows: Vec<Vec<String>> = out
            .populations
            .mine
            .iter()
            .map(|m| {
                let mut row = vec![m.clone()];
                row.extend(theirs.iter().map(|t| {
                    out.rows
                        .iter()
                        .find(|c| &c.mine == m && &c.theirs == t)
                        .map(count_text)
                        .unwrap_or_else(|| "-".into())
                }));
                row
            })
            .collect();
        table(&header, &rows);
        protection(Some(&out.protection), &out.cost, WITHHELD_CELLS);
    } else {
        let (header, rows) = cell_rows(out.by.as_deref(), &out.rows);
        table(&header, &rows);
        println!("{}", rows_text(rows.len()));
        protection(Some(&out.protection), &out.cost, UNLISTED_CELLS);
    }
}

/// The co-selling report, one section per pair of populations.
pub fn co_selling(out: &wire::CoSellingAnswer) {
    println!(
        "co-selling with {} (your {} x their {})",
        out.theirs.split('.').next().unwrap_or("?"),
        out.mine,
        out.theirs
    );
    for s in &out.sections {
        println!();
        println!("your {} x their {}", s.mine, s.theirs);
        let (header, rows) = cell_rows(out.by.as_deref(), &s.rows);
        if rows.is_empty() {
            println!("  nothing released");
        } else {
            table(&header, &rows);
        }
    }
    println!();
    let withheld = if out.by.is_none() {
        WITHHELD_CELLS
    } else {
        UNLISTED_CELLS
    };
    protection(Some(&out.protection), &out.cost, withheld);
}
