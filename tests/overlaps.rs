//! Account mapping end to end: two messy generated lists (`gen_accounts.py`, exact truth in
//! truth.json) uploaded with company matching, populations by status, overlap grants, and
//! the matrix compared against the truth; symmetry between the partners; refusals without
//! grants; breakdowns, the co-selling report and the budget charged once per matrix.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::harness::{Env, Run, Server, shared_dir, words};

const STATUSES: [&str; 3] = ["customer", "opportunity", "prospect"];

/// Generate a pair of lists of `rows` each into `dir`; the truth of the pair.
fn generate(dir: &Path, rows: usize) -> Value {
    let out = std::process::Command::new("python3")
        .arg(shared_dir().join("bench/gen_accounts.py"))
        .args(["--out", dir.to_str().expect("utf-8")])
        .args(["--rows", &rows.to_string(), "--seed", "5"])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "gen_accounts.py failed (pip install pyarrow): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let truth: Value =
        serde_json::from_slice(&std::fs::read(dir.join("truth.json")).expect("truth"))
            .expect("json");
    truth["pairs"]["acme|globex"].clone()
}

/// Upload both generated lists with company matching (`extra` matching flags) and define
/// populations by status.
fn setup(env: &Env, server: &Server, dir: &Path, extra: &[&str]) {
    for p in ["acme", "globex"] {
        let file: PathBuf = dir.join(format!("{p}.arrow"));
        let mut flags = vec!["--key-column", "website", "--name-column", "company_name"];
        flags.extend_from_slice(extra);
        let out = env.upload(server, p, &file, "accounts", &flags).ok();
        assert!(out.stdout.contains("matched_by_domain="), "{}", out.stdout);
        for s in STATUSES {
            let filter = format!("status = '{s}'");
            env.cli(
                server,
                p,
                &["population", "add", "accounts", s, "--filter", &filter],
            )
            .ok();
        }
    }
}

/// Both partners set ε = 4 on their lists: with name links the matrix's sensitivity is 4
/// (one company can change up to 4 pairs), so the noise has scale 4 / 4 = 1.
fn epsilon_4(env: &Env, server: &Server) {
    for p in ["acme", "globex"] {
        env.cli(
            server,
            p,
            &words("policy set accounts --epsilon 4 --budget 40"),
        )
        .ok();
    }
}

/// `escrow policy grant accounts --to TO --usage EXTRA...` as `owner`.
fn grant(env: &Env, server: &Server, owner: &str, to: &str, extra: &[&str]) -> Run {
    let mut args = vec!["policy", "grant", "accounts", "--to", to, "--usage"];
    args.extend_from_slice(extra);
    env.cli(server, owner, &args)
}

fn overlap(env: &Env, server: &Server, who: &str, with: &str, extra: &[&str]) -> Value {
    let mut args = vec!["overlap", "--with", with, "--format", "json"];
    args.extend_from_slice(extra);
    let out = env.cli(server, who, &args).ok();
    serde_json::from_str(&out.stdout).expect("overlap json")
}

/// (mine, theirs) -> (count, suppressed)
fn cells(v: &Value) -> Vec<(String, String, Option<u64>, bool)> {
    v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let keys: Vec<&String> = r.as_object().expect("object").keys().collect();
            assert_eq!(keys, ["count", "mine", "suppressed", "theirs"], "{r}");
            (
                r["mine"].as_str().expect("mine").to_string(),
                r["theirs"].as_str().expect("theirs").to_string(),
                r["count"].as_u64(),
                r["suppressed"].as_bool().expect("bool"),
            )
        })
        .collect()
}

#[test]
fn overlap_matrix_matches_the_truth_and_both_partners_see_the_same_counts() {
    let env = Env::new();
    let dir = env.tmp.path().join("gen");
    let truth = generate(&dir, 10_000);
    let server = env.serve(&[]);
    setup(&env, &server, &dir, &[]);
    epsilon_4(&env, &server);

    // Without an overlap grant: a refusal naming the rule, never a matrix of zeros.
    env.cli(&server, "globex", &["overlap", "--with", "acme"])
        .fails_with("usage_not_granted");
    grant(&env, &server, "acme", "globex", &["overlap"]).ok();
    grant(&env, &server, "globex", "acme", &["overlap"]).ok();

    let a = overlap(&env, &server, "acme", "globex", &[]);
    let mine = cells(&a);
    assert_eq!(mine.len(), 9, "3 x 3 populations: {a}");
    assert_eq!(a["protection"]["sensitivity"], 4, "names link: {a}");
    assert_eq!(a["protection"]["epsilon"], 4.0);
    let mut total = 0u64;
    for (m, t, count, suppressed) in &mine {
        let want = truth["by_status"][format!("{m}|{t}")].as_u64().unwrap_or(0);
        let got = count.expect("every cell of a 10k x 10k overlap is large enough");
        assert!(!suppressed);
        // Within the noise (discrete Laplace, scale 1) plus what matching gets wrong: names
        // link most companies without a website in one list (~2% of the overlap), not all.
        let tolerance = 12 + want * 15 / 1000;
        assert!(
            got.abs_diff(want) <= tolerance,
            "{m} x {t}: {got} vs truth {want}"
        );
        total += got;
    }
    // Each common company counts once (L = 1): the matrix adds up to the matched overlap,
    // the name-only remainder (companies without a website in one list) included.
    let matchable = truth["overlap_matchable_by_website"].as_u64().expect("n");
    let overall = truth["overlap_companies"].as_u64().expect("n");
    assert!(
        overall - matchable >= 30,
        "the pair has a name-only remainder"
    );
    assert!(
        total + 20 >= overall * 995 / 1000,
        "recall: {total} of {overall} ({matchable} by website)"
    );
    assert!(total <= overall + 20, "precision: {total} > {overall}");

    // Symmetry: globex's matrix is acme's transposed, cell for cell.
    let g = overlap(&env, &server, "globex", "acme", &[]);
    let mut transposed: Vec<_> = cells(&g)
        .into_iter()
        .map(|(m, t, c, s)| (t, m, c, s))
        .collect();
    transposed.sort();
    let mut sorted = mine.clone();
    sorted.sort();
    assert_eq!(transposed, sorted);

    // One budget charge per matrix; the same question again costs nothing.
    assert_eq!(a["epsilon_spent"], 4.0);
    assert_eq!(a["budgets"][0]["dataset"], "globex.accounts");
    assert_eq!(a["budgets"][0]["spent"], 4.0);
    let again = overlap(&env, &server, "acme", "globex", &[]);
    assert_eq!(again["repeated"], true);
    assert_eq!(again["epsilon_spent"], 0.0);
    assert_eq!(cells(&again), mine);

    // Granting one population shows only that one; its cells keep their numbers.
    env.cli(
        &server,
        "acme",
        &words("policy revoke accounts --to globex --usage overlap"),
    )
    .ok();
    env.cli(&server, "globex", &["overlap", "--with", "acme"])
        .fails_with("usage_not_granted");
    grant(
        &env,
        &server,
        "acme",
        "globex",
        &["overlap", "--population", "customer"],
    )
    .ok();
    let only = overlap(&env, &server, "globex", "acme", &[]);
    assert_eq!(
        only["populations"]["theirs"],
        serde_json::json!(["customer"])
    );
    let only_cells = cells(&only);
    assert_eq!(only_cells.len(), 3);
    for (m, t, c, s) in only_cells {
        assert_eq!(t, "customer");
        assert!(sorted.contains(&(t.clone(), m.clone(), c, s)), "{m} x {t}");
    }

    // The table form shows the matrix.
    let table = env
        .cli(&server, "acme", &["overlap", "--with", "globex"])
        .ok();
    assert!(table.stdout.contains("mine \\ theirs"), "{}", table.stdout);
    assert!(table.stdout.contains("prospect"), "{}", table.stdout);
    // CSV: a header and one line per cell.
    let csv = env
        .cli(
            &server,
            "acme",
            &["overlap", "--with", "globex", "--format", "csv"],
        )
        .ok();
    let lines: Vec<&str> = csv.stdout.lines().collect();
    assert_eq!(lines[0], "mine,theirs,count,suppressed");
    assert_eq!(lines.len(), 10);
}

#[test]
fn breakdowns_need_a_dimension_grant_and_feed_the_co_selling_report() {
    let env = Env::new();
    let dir = env.tmp.path().join("gen");
    let truth = generate(&dir, 6_000);
    let server = env.serve(&[]);
    setup(&env, &server, &dir, &["--name-context", "region"]);
    epsilon_4(&env, &server);
    grant(&env, &server, "acme", "globex", &["overlap"]).ok();
    grant(&env, &server, "globex", "acme", &["overlap"]).ok();

    // Breaking down by their column needs their dimension grant; never by the key.
    env.cli(
        &server,
        "acme",
        &["overlap", "--with", "globex", "--by", "industry"],
    )
    .fails_with("usage_not_granted");
    env.cli(
        &server,
        "acme",
        &["overlap", "--with", "globex", "--by", "nope"],
    )
    .fails_with("unknown_column");
    grant(
        &env,
        &server,
        "globex",
        "acme",
        &["dimension", "--column", "website"],
    )
    .ok();
    env.cli(
        &server,
        "acme",
        &["overlap", "--with", "globex", "--by", "website"],
    )
    .fails_with("group_by_key");
    grant(
        &env,
        &server,
        "globex",
        "acme",
        &["dimension", "--column", "industry"],
    )
    .ok();
    let by = overlap(&env, &server, "acme", "globex", &["--by", "industry"]);
    let rows = by["rows"].as_array().expect("rows");
    assert!(!rows.is_empty());
    let mut per_cell = std::collections::BTreeMap::<(String, String), u64>::new();
    for r in rows {
        assert_eq!(
            r["suppressed"], false,
            "withheld breakdown rows are not listed"
        );
        let industry = r["industry"]
            .as_str()
            .expect("industry is shared by both lists");
        assert!(!industry.is_empty());
        *per_cell
            .entry((
                r["mine"].as_str().unwrap().into(),
                r["theirs"].as_str().unwrap().into(),
            ))
            .or_default() += r["count"].as_u64().expect("count");
    }
    // The breakdown adds up to about the cell (the truth's cell, within noise, matching
    // and the industries below the threshold).
    let want = truth["by_status"]["prospect|prospect"].as_u64().expect("n");
    let got = per_cell[&("prospect".to_string(), "prospect".to_string())];
    assert!(got.abs_diff(want) <= 60 + want * 5 / 100, "{got} vs {want}");

    // The co-selling report is cut from the same question: no new charge.
    let report = env
        .cli(
            &server,
            "acme",
            &words("report co-selling --with globex --by industry --format json"),
        )
        .ok();
    let r: Value = serde_json::from_str(&report.stdout).expect("json");
    assert_eq!(r["repeated"], true, "{r}");
    let sections = r["sections"].as_array().expect("sections");
    assert_eq!(sections.len(), 2);
    assert_eq!(
        (&sections[0]["mine"], &sections[0]["theirs"]),
        (&Value::from("customer"), &Value::from("opportunity"))
    );
    assert_eq!(
        (&sections[1]["mine"], &sections[1]["theirs"]),
        (&Value::from("opportunity"), &Value::from("customer"))
    );
    for s in sections {
        for row in s["rows"].as_array().expect("rows") {
            assert!(
                rows.contains(row),
                "report rows are rows of the breakdown: {row}"
            );
        }
    }
    let table = env
        .cli(
            &server,
            "acme",
            &words("report co-selling --with globex --by industry"),
        )
        .ok();
    assert!(
        table.stdout.contains("your customer x their opportunity"),
        "{}",
        table.stdout
    );
    // Population roles that do not exist are named.
    env.cli(
        &server,
        "acme",
        &words("report co-selling --with globex --my-customers vips"),
    )
    .fails_with("unknown_population");

    // Removing a population removes the grants that name it.
    grant(
        &env,
        &server,
        "globex",
        "acme",
        &["overlap", "--population", "customer"],
    )
    .ok();
    env.cli(
        &server,
        "globex",
        &["population", "remove", "accounts", "customer"],
    )
    .ok();
    let list = env
        .cli(&server, "globex", &["policy", "list", "--format", "json"])
        .ok();
    assert!(
        !list.stdout.contains("\"population\": \"customer\""),
        "{}",
        list.stdout
    );
}

#[test]
fn overlap_requests_are_checked() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(
        &server,
        "acme",
        "accounts",
        &crate::harness::accounts_csv(30, "a"),
    )
    .ok();
    // Without populations of mine there is no matrix.
    env.cli(&server, "acme", &["overlap", "--with", "globex"])
        .fails_with("no_populations");
    env.define_customers(&server, "acme");
    env.cli(&server, "acme", &["overlap", "--with", "acme"])
        .fails_with("invalid_request");
    env.cli(&server, "acme", &["overlap", "--with", "nobody"])
        .fails_with("not_found");
    // A partner without datasets or grants: a refusal, not an empty matrix.
    env.cli(&server, "acme", &["overlap", "--with", "globex"])
        .fails_with("usage_not_granted");
    // Overlap grants name populations, not columns; the population must exist.
    let grant = |extra: &[&str]| grant(&env, &server, "acme", "globex", extra);
    grant(&["overlap", "--population", "vips"]).fails_with("unknown_population");
    grant(&["overlap", "--column", "status"]).fails_with("invalid_rule");
    grant(&["join", "--population", "customers"]).fails_with("invalid_rule");
}
