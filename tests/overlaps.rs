//! Account mapping end to end: two messy generated lists (`gen_accounts.py`, exact truth in
//! truth.json) uploaded with company matching, populations by status, overlap grants, and
//! the matrix compared against the truth; symmetry between the partners; refusals without
//! grants; breakdowns, the co-selling report and the budget charged once per matrix.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::harness::{Env, Run, Server, accounts_csv, shared_dir, words};

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
        // The generator's region column is detected as the companies' place, unless
        // name-context columns qualify the names instead.
        assert_eq!(
            out.stdout.contains(" places=region"),
            extra.is_empty(),
            "{}",
            out.stdout
        );
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
/// (one company can change up to 4 pairs, L2 at most 4), so the noise has sd 4 / 4 = 1.
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

    // A question on one's own list before the matrix, and after it on the other's: a
    // version's batches are kept in one form whichever reads them first.
    let own = |who: &str| {
        let sql = format!("SELECT COUNT(DISTINCT website) FROM {who}.accounts");
        let out = env
            .cli(&server, who, &["query", &sql, "--format", "json"])
            .ok();
        let v: Value = serde_json::from_str(&out.stdout).expect("query json");
        let companies = v["rows"][0][0].as_u64().expect("a count");
        assert!((9_000..10_000).contains(&companies), "{who}: {v}");
    };
    own("acme");
    let a = overlap(&env, &server, "acme", "globex", &[]);
    own("globex");
    let mine = cells(&a);
    assert_eq!(mine.len(), 9, "3 x 3 populations: {a}");
    assert_eq!(a["protection"]["sensitivity"], 4, "names link: {a}");
    assert_eq!(a["protection"]["epsilon"], 4.0);
    let mut total = 0u64;
    for (m, t, count, suppressed) in &mine {
        let want = truth["by_status"][format!("{m}|{t}")].as_u64().unwrap_or(0);
        let got = count.expect("every cell of a 10k x 10k overlap is large enough");
        assert!(!suppressed);
        // Within the noise (discrete Gaussian, sd 1) plus what matching gets wrong: names
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

    // The history: one release (asked twice on the same versions), the counts as answered.
    let h = history(&env, &server, "acme", "globex");
    let released = h["released"].as_array().expect("released");
    assert_eq!(released.len(), 1, "{h}");
    assert_eq!(released[0]["mine"], "acme.accounts@v1");
    assert_eq!(released[0]["theirs"], "globex.accounts@v1");
    assert_eq!(history_cells(&released[0]), answered_cells(&mine));

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

    // A new version of acme's list: asked again, a second release over the new version.
    let flags = ["--key-column", "website", "--name-column", "company_name"];
    env.upload(&server, "acme", &dir.join("acme.arrow"), "accounts", &flags)
        .ok();
    let fresh = overlap(&env, &server, "acme", "globex", &[]);
    assert_eq!(fresh["repeated"], false);
    let h = history(&env, &server, "acme", "globex");
    let released = h["released"].as_array().expect("released");
    assert_eq!(released.len(), 2, "{h}");
    assert_eq!(released[1]["mine"], "acme.accounts@v2");
    assert_eq!(history_cells(&released[1]), answered_cells(&cells(&fresh)));
    // A breakdown is not part of the history; the table form lists every cell.
    let table = env
        .cli(&server, "acme", &words("report history --with globex"))
        .ok();
    assert!(
        table.stdout.contains("acme.accounts@v2"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("(18 rows)"), "{}", table.stdout);
    // Only one's own releases: globex asked on v1 only; a partner never asked and an unknown
    // one answer alike (nothing).
    let g = history(&env, &server, "globex", "acme");
    let theirs = g["released"].as_array().expect("released");
    assert!(!theirs.is_empty(), "{g}");
    assert!(
        theirs.iter().all(|r| r["theirs"] == "acme.accounts@v1"),
        "{g}"
    );
    for other in ["initech", "nosuch"] {
        let h = history(&env, &server, "acme", other);
        assert_eq!(h["released"], json!([]), "{other}: {h}");
    }
    // Crypto-shredding a list takes the releases computed from it, both partners'.
    env.cli(&server, "acme", &["datasets", "delete", "accounts"])
        .ok();
    for (who, with) in [("acme", "globex"), ("globex", "acme")] {
        let h = history(&env, &server, who, with);
        assert_eq!(h["released"], json!([]), "{who}: {h}");
    }
}

/// `escrow report history --with WITH --format json` as `who`.
fn history(env: &Env, server: &Server, who: &str, with: &str) -> Value {
    let out = env
        .cli(
            server,
            who,
            &["report", "history", "--with", with, "--format", "json"],
        )
        .ok();
    serde_json::from_str(&out.stdout).expect("history json")
}

/// (mine, theirs, count) of a released overlap in the history, sorted.
fn history_cells(r: &Value) -> Vec<(String, String, Option<u64>)> {
    let mut out: Vec<_> = (r["cells"].as_array().expect("cells").iter())
        .map(|c| {
            (
                c["mine"].as_str().expect("mine").to_string(),
                c["theirs"].as_str().expect("theirs").to_string(),
                c["count"].as_u64(),
            )
        })
        .collect();
    out.sort();
    out
}

fn answered_cells(
    cells: &[(String, String, Option<u64>, bool)],
) -> Vec<(String, String, Option<u64>)> {
    let mut out: Vec<_> = (cells.iter())
        .map(|(m, t, c, _)| (m.clone(), t.clone(), *c))
        .collect();
    out.sort();
    out
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
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(30, "a"))
        .ok();
    // Without populations of mine there is no matrix.
    env.cli(&server, "acme", &["overlap", "--with", "globex"])
        .fails_with("no_populations");
    env.define_customers(&server, "acme");
    env.cli(&server, "acme", &["overlap", "--with", "acme"])
        .fails_with("invalid_request");
    // A partner without datasets or grants: a refusal, not an empty matrix; a partner that
    // does not exist gets the same one.
    env.cli(&server, "acme", &["overlap", "--with", "globex"])
        .fails_with("usage_not_granted");
    env.cli(&server, "acme", &["overlap", "--with", "nobody"])
        .fails_with("usage_not_granted");
    // Overlap grants name populations, not columns; the population must exist.
    let grant = |extra: &[&str]| grant(&env, &server, "acme", "globex", extra);
    grant(&["overlap", "--population", "vips"]).fails_with("unknown_population");
    grant(&["overlap", "--column", "status"]).fails_with("invalid_rule");
    grant(&["join", "--population", "customers"]).fails_with("invalid_rule");
}

/// `csv` with one more column `name`, valued `value(i)` on the i-th row.
fn with_column(csv: &str, name: &str, value: impl Fn(usize) -> String) -> String {
    let mut lines = csv.lines();
    let mut out = format!("{},{name}\n", lines.next().expect("header"));
    for (i, l) in lines.enumerate() {
        out.push_str(&format!("{l},{}\n", value(i)));
    }
    out
}

/// Names of acme's and initech's that globex was never granted: no answer, refusal or
/// explanation globex gets may contain one unless globex typed it.
const NOT_SHARED: [&str; 6] = [
    "secret_churn",
    "risk_internal",
    "secret_pipeline",
    "hidden_deals",
    "vip_secret",
    "initech_private",
];

fn assert_names_nothing_not_shared(what: &str, text: &str) {
    for name in NOT_SHARED {
        assert!(!text.contains(name), "{what} names {name}: {text}");
    }
}

/// acme shares one population of `accounts` (`customer`) with globex and keeps another
/// (`secret_churn`, over a column it never shared) and two more datasets (`secret_pipeline`:
/// no grant at all; `leads`: a join grant, no overlap grant) to itself; initech exists and
/// shares nothing.
fn partly_shared() -> (Env, Server) {
    let env = Env::new();
    env.op(&["partner", "add", "initech"]).ok();
    let server = env.serve(&[]);
    let acme = with_column(&accounts_csv(60, "shared"), "risk_internal", |i| {
        (i % 10).to_string()
    });
    env.upload_csv(&server, "acme", "accounts", &acme).ok();
    env.upload_csv(
        &server,
        "acme",
        "secret_pipeline",
        &accounts_csv(30, "pipe"),
    )
    .ok();
    env.upload_csv(&server, "acme", "leads", &accounts_csv(30, "shared"))
        .ok();
    let globex = with_column(&accounts_csv(60, "shared"), "zzz_nothing", |_| "z".into());
    env.upload_csv(&server, "globex", "accounts", &globex).ok();
    env.upload_csv(&server, "initech", "accounts", &accounts_csv(30, "ini"))
        .ok();
    for (partner, dataset, population, filter) in [
        ("acme", "accounts", "customer", "status = 'customer'"),
        ("acme", "accounts", "secret_churn", "risk_internal > 5"),
        (
            "acme",
            "secret_pipeline",
            "hidden_deals",
            "status = 'opportunity'",
        ),
        ("acme", "leads", "vip_secret", "status = 'customer'"),
        ("globex", "accounts", "customers", "status = 'customer'"),
        (
            "globex",
            "accounts",
            "opportunities",
            "status = 'opportunity'",
        ),
        (
            "initech",
            "accounts",
            "initech_private",
            "status = 'customer'",
        ),
    ] {
        env.cli(
            &server,
            partner,
            &["population", "add", dataset, population, "--filter", filter],
        )
        .ok();
    }
    for grant in [
        "policy grant accounts --to globex --usage overlap --population customer",
        "policy grant leads --to globex --usage join --column website",
    ] {
        env.cli(&server, "acme", &words(grant)).ok();
    }
    (env, server)
}

#[test]
fn overlaps_explain_and_reports_name_nothing_the_other_partner_did_not_share() {
    let (env, server) = partly_shared();
    let run = |args: &[&str]| env.cli(&server, "globex", args);

    // Explanations list the populations globex may see, and nothing else of acme's.
    for args in [
        &["policy", "explain", "--with", "acme", "--format", "json"][..],
        &["policy", "explain", "--with", "acme"],
        &[
            "policy", "explain", "--with", "acme", "--by", "region", "--format", "json",
        ],
        &["policy", "explain", "--with", "acme", "--by", "region"],
    ] {
        let out = run(args).ok();
        assert_names_nothing_not_shared(&args.join(" "), &out.stdout);
    }
    let e: Value = serde_json::from_str(
        &run(&["policy", "explain", "--with", "acme", "--format", "json"])
            .ok()
            .stdout,
    )
    .expect("json");
    assert_eq!(e["allowed"], true, "{e}");
    let uses = e["uses"].as_array().expect("uses");
    assert_eq!(uses.len(), 1, "{e}");
    assert_eq!(uses[0]["population"], "customer");
    assert_eq!(
        uses[0]["rule"], "p,globex,acme,accounts,customer,overlap",
        "{e}"
    );
    let by: Value = serde_json::from_str(
        &run(&[
            "policy", "explain", "--with", "acme", "--by", "region", "--format", "json",
        ])
        .ok()
        .stdout,
    )
    .expect("json");
    let datasets: Vec<&str> = by["uses"]
        .as_array()
        .expect("uses")
        .iter()
        .map(|u| u["dataset"].as_str().expect("dataset"))
        .collect();
    assert_eq!(datasets, ["acme.accounts", "acme.accounts"], "{by}");
    assert_eq!(by["refusal"]["rule"], "usage_not_granted", "{by}");

    // A partner that shares nothing: a refusal, and an explanation without its populations.
    let out = run(&["policy", "explain", "--with", "initech", "--format", "json"]).ok();
    assert_names_nothing_not_shared("explain --with initech", &out.stdout);
    let refused = run(&["overlap", "--with", "initech"]).fails_with("usage_not_granted");
    assert_names_nothing_not_shared("overlap --with initech", &refused.stderr);

    // Answers: the matrix and the report show the shared population only.
    for args in [
        &["overlap", "--with", "acme", "--format", "json"][..],
        &["overlap", "--with", "acme", "--format", "csv"],
        &["overlap", "--with", "acme"],
        &[
            "report",
            "co-selling",
            "--with",
            "acme",
            "--their-opportunities",
            "customer",
            "--format",
            "json",
        ],
    ] {
        let out = run(args).ok();
        assert_names_nothing_not_shared(&args.join(" "), &out.stdout);
    }
    let refused = run(&["report", "co-selling", "--with", "acme"]).fails_with("unknown_population");
    assert_names_nothing_not_shared("co-selling without roles", &refused.stderr);
    let refused =
        run(&["overlap", "--with", "acme", "--by", "region"]).fails_with("usage_not_granted");
    assert_names_nothing_not_shared("overlap --by region", &refused.stderr);

    // acme's new upload drops the column its unshared population filters on: the overlap
    // fails (every population takes part), without naming that population or its column.
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(60, "shared"))
        .ok();
    let refused = run(&["overlap", "--with", "acme"]).fails_with("population_invalid");
    assert_names_nothing_not_shared("population_invalid", &refused.stderr);
    assert!(
        refused.stderr.contains("acme.accounts"),
        "{}",
        refused.stderr
    );
    // acme is told which one and why.
    env.cli(
        &server,
        "globex",
        &words("policy grant accounts --to acme --usage overlap"),
    )
    .ok();
    let own = env
        .cli(
            &server,
            "acme",
            &words("overlap --with globex --mine accounts"),
        )
        .fails_with("population_invalid");
    assert!(own.stderr.contains("secret_churn"), "{}", own.stderr);
}

#[test]
fn overlaps_answer_unknown_names_as_they_answer_names_not_shared() {
    let (env, server) = partly_shared();
    // Each group: requests that differ only in one name globex typed; the status and the
    // whole body must be identical once that name is taken out.
    let same = |path: &str, requests: &[(&str, Value)]| {
        let mut first: Option<(String, u16, String)> = None;
        for (name, body) in requests {
            let (status, text) = env.raw_post(&server, "globex", path, body);
            for secret in NOT_SHARED.iter().filter(|s| !name.contains(*s)) {
                assert!(
                    !text.contains(secret),
                    "{path} {body} names {secret}: {text}"
                );
            }
            let seen = (status, text.replace(name, "NAME"));
            match &first {
                None => first = Some((name.to_string(), seen.0, seen.1)),
                Some((n, s, t)) => assert_eq!(
                    (s, t),
                    (&seen.0, &seen.1),
                    "{path}: {n} and {name} are answered differently"
                ),
            }
        }
        first.map(|(_, s, t)| (s, t)).expect("requests")
    };
    for path in [
        "v1/overlaps",
        "v1/overlaps/explain",
        "v1/reports/co-selling",
    ] {
        // an unknown partner, and one that shares nothing
        let (status, _) = same(
            path,
            &[
                ("nobody", json!({"with": "nobody"})),
                ("initech", json!({"with": "initech"})),
            ],
        );
        let want = if path.ends_with("explain") { 200 } else { 403 };
        assert_eq!(status, want, "{path}");
        // their dataset: unknown, not shared at all, shared without an overlap grant
        same(
            path,
            &[
                ("nope", json!({"with": "acme", "theirs": "nope"})),
                (
                    "secret_pipeline",
                    json!({"with": "acme", "theirs": "secret_pipeline"}),
                ),
                ("leads", json!({"with": "acme", "theirs": "leads"})),
            ],
        );
        // a breakdown column acme lacks, and one acme has but did not share
        same(
            path,
            &[
                ("zzz_nothing", json!({"with": "acme", "by": "zzz_nothing"})),
                ("region", json!({"with": "acme", "by": "region"})),
            ],
        );
    }
    // report roles: a population acme did not share, and none of that name
    let (status, body) = same(
        "v1/reports/co-selling",
        &[
            (
                "secret_churn",
                json!({"with": "acme", "their_opportunities": "customer", "their_customers": "secret_churn"}),
            ),
            (
                "nope_pop",
                json!({"with": "acme", "their_opportunities": "customer", "their_customers": "nope_pop"}),
            ),
        ],
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown_population"), "{body}");
    // SQL names another partner's datasets too: unknown, not shared, unknown partner.
    let sql = |t: &str| {
        json!({"sql": format!(
            "SELECT COUNT(DISTINCT g.website) FROM globex.accounts g JOIN {t} t ON g.website = t.website"
        )})
    };
    for path in ["v1/queries", "v1/queries/explain"] {
        same(
            path,
            &[
                ("acme.nope", sql("acme.nope")),
                ("acme.secret_pipeline", sql("acme.secret_pipeline")),
                ("nobody.accounts", sql("nobody.accounts")),
                ("initech.accounts", sql("initech.accounts")),
            ],
        );
    }
}

/// globex grants acme a join and a count of its list, and acme joins it with its own.
fn join_as_acme(env: &Env, server: &Server) {
    for u in ["join", "count"] {
        grant(env, server, "globex", "acme", &[u]).ok();
    }
    let sql = "SELECT COUNT(DISTINCT a.website) FROM acme.accounts a \
               JOIN globex.accounts b ON a.website = b.website";
    env.cli(server, "acme", &["query", sql, "--format", "json"])
        .ok();
}

/// Whether `g` is `a` transposed: the other partner's matrix over the same lists.
fn same_transposed(a: &Value, g: &Value, what: &str) {
    let mut transposed: Vec<_> = (cells(g).into_iter())
        .map(|(m, t, c, s)| (t, m, c, s))
        .collect();
    transposed.sort();
    let mut mine = cells(a);
    mine.sort();
    assert_eq!(transposed, mine, "{what}");
}

/// Wait (20 s at most) until the server's log has `n` lines with every one of `words`.
fn wait_said(server: &Server, words: &[&str], n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let said = || {
        (server.log().lines())
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .count()
    };
    while said() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "never said {words:?} {n} times:\n{}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A fourth population of acme's list: every row with a status.
const ALL: [&str; 6] = [
    "population",
    "add",
    "accounts",
    "all",
    "--filter",
    "status IS NOT NULL",
];

/// What a first question reads is reduced ahead of it, for every partner asking: a list's
/// overlap side after its upload and after each change of its populations (one question
/// that comes while it is being made waits for it), and another partner's companies for a
/// SQL join after its upload. The matrix then reads neither list, and answers as one that
/// read them.
#[test]
fn the_first_questions_after_uploads_find_the_lists_reduced_ahead() {
    let env = Env::new();
    let dir = env.tmp.path().join("gen");
    let truth = generate(&dir, 3_000);
    let server = env
        .serve_env(&[("ESCROW_LOG", "info,escrow=debug")], &[])
        .expect("server starts");
    setup(&env, &server, &dir, &[]);
    const AHEAD: &str = "overlap side made ahead of questions";
    // Made after each population added: the side with all three at last.
    for p in ["partner=acme", "partner=globex"] {
        wait_said(&server, &[AHEAD, p, "populations=3"], 1);
    }
    epsilon_4(&env, &server);
    grant(&env, &server, "acme", "globex", &["overlap"]).ok();
    grant(&env, &server, "globex", "acme", &["overlap"]).ok();
    let kept = |log: &str| {
        log.lines()
            .filter(|l| l.contains("overlap side ready") && l.contains("found=Memory"))
            .count()
    };

    let a = overlap(&env, &server, "acme", "globex", &[]);
    let g = overlap(&env, &server, "globex", "acme", &[]);
    let log = server.log();
    assert_eq!(kept(&log), 4, "both sides of both matrices: {log}");
    assert!(!log.contains("found=Reduced"), "{log}");
    for (m, t, count, suppressed) in cells(&a) {
        let want = truth["by_status"][format!("{m}|{t}")].as_u64().unwrap_or(0);
        let got = count.expect("every cell is large enough");
        assert!(!suppressed);
        assert!(
            got.abs_diff(want) <= 12 + want / 50,
            "{m} x {t}: {got} vs {want}"
        );
    }
    same_transposed(&a, &g, "both partners count the same");

    // A population more: its side is made ahead, or by the matrix if that comes first (the
    // other waits for it); the other side is still kept.
    env.cli(&server, "acme", &ALL).ok();
    let a = overlap(&env, &server, "acme", "globex", &[]);
    assert_eq!(cells(&a).len(), 12, "4 x 3 populations: {a}");
    let log = server.log();
    assert_eq!(log.matches("overlap side ready").count(), 6, "{log}");
    assert!((5..=6).contains(&kept(&log)), "{log}");
    // Reduced from the rows once per list (its first side); every side after that, this
    // one of four populations too, derived from the side before.
    assert_eq!(
        log.matches("overlap side read and reduced").count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("overlap side derived from the side of other populations"),
        "{log}"
    );

    // SQL: the first join over globex's list finds its companies reduced after its upload.
    wait_said(
        &server,
        &["entity columns read into the cache after an upload"],
        2,
    );
    join_as_acme(&env, &server);
    assert!(
        server
            .log()
            .contains("another partner's table as reduced before"),
        "{}",
        server.log()
    );
}

/// A list's overlap side is sealed beside its version once reduced, so a restarted server's
/// first matrix reads the sides instead of reducing the lists again, and counts as the first
/// server did; its first SQL join reads the other list's companies so too. A seal that does not open (altered on disk) is logged and its side reduced
/// again; deleting a list takes its seals with it.
#[test]
fn a_restarted_server_reads_the_sides_sealed_beside_their_versions() {
    let env = Env::new();
    let dir = env.tmp.path().join("gen");
    generate(&dir, 3_000);
    let debug = [("ESCROW_LOG", "info,escrow=debug")];
    let server = env.serve_env(&debug, &[]).expect("server starts");
    setup(&env, &server, &dir, &[]);
    epsilon_4(&env, &server);
    grant(&env, &server, "acme", "globex", &["overlap"]).ok();
    grant(&env, &server, "globex", "acme", &["overlap"]).ok();
    let a = overlap(&env, &server, "acme", "globex", &[]);
    for side in ["acme.accounts@v1", "globex.accounts@v1"] {
        wait_said(
            &server,
            &[
                "overlap side sealed beside its version",
                side,
                "populations=3",
            ],
            1,
        );
    }
    env.wait_derived(4);
    drop(server);
    // One side per list (the last made: a side of fewer populations made ahead while they
    // were added is replaced), and both lists' companies (for SQL joins).
    let sealed = env.derived_files();
    assert_eq!(sealed.len(), 4, "{sealed:?}");

    // Restarted: globex's first matrix reads both sides from their seals, and counts what
    // acme's counted (transposed; same question, same noise).
    let server = env.serve_env(&debug, &[]).expect("server restarts");
    let g = overlap(&env, &server, "globex", "acme", &[]);
    let log = server.log();
    assert_eq!(
        log.matches("overlap side read from its seal").count(),
        2,
        "{log}"
    );
    assert!(!log.contains("found=Reduced"), "{log}");
    same_transposed(&a, &g, "read back, the sides count the same");
    // A SQL join over globex's list reads its companies from their seal too.
    join_as_acme(&env, &server);
    let log = server.log();
    assert!(
        log.contains("a version's companies read from their seal"),
        "{log}"
    );
    assert!(
        log.contains("another partner's table as reduced before"),
        "{log}"
    );
    // A population more: the side is derived from the sealed one (of the three), not
    // reduced from the rows again.
    env.cli(&server, "acme", &ALL).ok();
    let more = overlap(&env, &server, "acme", "globex", &[]);
    assert_eq!(cells(&more).len(), 12, "4 x 3 populations: {more}");
    let log = server.log();
    assert!(
        log.contains("overlap side derived from the side of other populations"),
        "{log}"
    );
    assert!(!log.contains("overlap side read and reduced"), "{log}");
    let removal = ["population", "remove", "accounts", "all"];
    env.cli(&server, "acme", &removal).ok();
    drop(server);

    // Every seal altered: a new question (another ε) reduces both sides again.
    for s in &sealed {
        let mut bytes = std::fs::read(s).expect("seal");
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        std::fs::write(s, bytes).expect("altered");
    }
    let server = env.serve_env(&debug, &[]).expect("server restarts");
    env.cli(&server, "acme", &words("policy set accounts --epsilon 2"))
        .ok();
    let again = overlap(&env, &server, "acme", "globex", &[]);
    assert_eq!(cells(&again).len(), 9, "{again}");
    let log = server.log();
    assert_eq!(
        log.matches("a sealed overlap side does not read back")
            .count(),
        2,
        "{log}"
    );
    assert_eq!(log.matches("found=Reduced").count(), 2, "{log}");
    // Sealed again, off the answer's path.
    for side in ["acme.accounts@v1", "globex.accounts@v1"] {
        wait_said(
            &server,
            &["overlap side sealed beside its version", side],
            1,
        );
    }

    // Deleted, a list takes its seals with it; the other's stay.
    env.cli(&server, "acme", &["datasets", "delete", "accounts"])
        .ok();
    let left = env.derived_files();
    assert_eq!(left.len(), 2, "{left:?}");
    let globex = left[0].parent().expect("dir").to_path_buf();
    assert!(left.iter().all(|p| p.parent() == Some(&globex)), "{left:?}");
}
