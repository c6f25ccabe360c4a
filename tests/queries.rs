//! Queries through the real service: the SQL corpus (tests/corpus/*.test) against real
//! uploads, and the output-protection properties (suppression, noise, budget, repeatability,
//! neighbouring datasets).
//!
//! Corpus format (blank line between cases, `#` comments):
//!
//! ```text
//! query PARTNER [rowsort]        answered; expected rows follow `----`, values joined by |
//! SQL ...                        NULL for null; a withheld row shows its group values
//!                                then SUPPRESSED (`gold|SUPPRESSED`, or just `SUPPRESSED`),
//! ----                           V~T for a number within T of V (noisy sums)
//! energy|10
//!
//! refused PARTNER RULE           refused with QUERY_REFUSED and that rule
//! SQL ...
//! ```

use std::path::Path;

use crate::harness::{Env, Server, words};

/// The corpus world: acme (60 companies, one duplicate row) and globex (60 companies, 30 of
/// them acme's), acme sharing some columns of `accounts` with globex under exact-ish settings
/// (ε = 100, so noise on counts is below rounding), `secret` shared with nobody.
fn corpus_world() -> (Env, Server) {
    let env = Env::new();
    let server = env.serve(&[]);
    let industries = ["retail", "energy", "finance"];
    let mut acme = String::from("website,industry,region,tier,status,revenue,employees\n");
    for i in 0..60 {
        acme.push_str(&format!(
            "co{i}.example,{},{},{},{},{},{}\n",
            industries[i % 3],
            ["na", "emea"][i % 2],
            if [31, 33, 35].contains(&i) {
                "gold"
            } else {
                "silver"
            },
            if i < 30 { "customer" } else { "prospect" },
            100 * (i % 5 + 1),
            10 * (i % 7 + 1)
        ));
    }
    acme.push_str("co0.example,retail,na,silver,customer,100,10\n");
    let mut globex = String::from("website,stage,segment,deal\n");
    for i in 30..90 {
        globex.push_str(&format!(
            "co{i}.example,{},{},{}\n",
            ["open", "won"][i % 2],
            ["smb", "ent", "mid"][i % 3],
            1000 * (i % 4 + 1)
        ));
    }
    let secret = "website,note\nco1.example,x\nco2.example,y\n";
    // acme.directory: granted to globex standalone (queried without a join to globex's data).
    let mut directory = String::from("website,industry\n");
    for i in 0..40 {
        directory.push_str(&format!("co{i}.example,{}\n", industries[i % 2]));
    }
    for (partner, name, body) in [
        ("acme", "accounts", acme.as_str()),
        ("acme", "secret", secret),
        ("acme", "directory", directory.as_str()),
        ("globex", "accounts", globex.as_str()),
    ] {
        env.upload_csv(&server, partner, name, body).ok();
    }
    // acme.notes has no key column: no privacy unit, so nobody else can query it.
    let notes = env.file("notes.csv", b"note,amount\nx,1\ny,2\n");
    env.upload(&server, "acme", &notes, "notes", &[]).ok();
    for args in [
        &["directory", "--usage", "standalone"][..],
        &["directory", "--usage", "count", "--column", "website"],
        &["directory", "--usage", "dimension", "--column", "industry"],
        &["notes", "--usage", "standalone"],
        &["notes", "--usage", "sum"],
    ] {
        let mut a = vec!["policy", "grant"];
        a.extend_from_slice(&args[..1]);
        a.extend(["--to", "globex"]);
        a.extend_from_slice(&args[1..]);
        env.cli(&server, "acme", &a).ok();
    }
    env.cli(
        &server,
        "acme",
        &words("policy set directory --epsilon 100 --budget 1000000"),
    )
    .ok();
    for (usage, column) in [
        ("join", Some("website")),
        ("count", Some("website")),
        ("dimension", Some("industry")),
        ("dimension", Some("region")),
        ("dimension", Some("tier")),
        ("filter", Some("industry")),
        ("filter", Some("region")),
        ("filter", Some("tier")),
        ("sum", None),
        ("avg", Some("revenue")),
        ("avg", Some("employees")),
    ] {
        let mut args = vec![
            "policy", "grant", "accounts", "--to", "globex", "--usage", usage,
        ];
        if let Some(c) = column {
            args.extend(["--column", c]);
        }
        env.cli(&server, "acme", &args).ok();
    }
    env.cli(
        &server,
        "acme",
        &words("policy set accounts --epsilon 100 --budget 1000000 --bounds revenue=0:500"),
    )
    .ok();
    (env, server)
}

#[derive(Debug)]
enum Expect {
    Rows { rowsort: bool, rows: Vec<String> },
    Refused(String),
}

#[derive(Debug)]
struct Case {
    at: String,
    partner: String,
    sql: String,
    expect: Expect,
}

fn parse_corpus(path: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(path).expect("read corpus file");
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut cases = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line.is_empty() || line.starts_with('#') {
            i += 1;
            continue;
        }
        let at = format!("{name}:{}", i + 1);
        let words: Vec<&str> = line.split_whitespace().collect();
        i += 1;
        let mut sql = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() && lines[i].trim() != "----" {
            sql.push(lines[i]);
            i += 1;
        }
        let expect = match words.as_slice() {
            ["query", partner, opts @ ..] => {
                let mut rows = Vec::new();
                if i < lines.len() && lines[i].trim() == "----" {
                    i += 1;
                    while i < lines.len() && !lines[i].trim().is_empty() {
                        rows.push(lines[i].trim().to_string());
                        i += 1;
                    }
                }
                cases.push(Case {
                    at,
                    partner: partner.to_string(),
                    sql: sql.join("\n"),
                    expect: Expect::Rows {
                        rowsort: opts.contains(&"rowsort"),
                        rows,
                    },
                });
                continue;
            }
            ["refused", partner, rule] => Case {
                at,
                partner: partner.to_string(),
                sql: sql.join("\n"),
                expect: Expect::Refused(rule.to_string()),
            },
            _ => panic!("{at}: cannot parse case header {line:?}"),
        };
        cases.push(expect);
    }
    cases
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "NULL".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Does `got` match `want` (exact text, equal numbers, or `V~T`)?
fn cell_matches(got: &str, want: &str) -> bool {
    if got == want {
        return true;
    }
    let num = |s: &str| s.parse::<f64>().ok();
    if let Some((v, t)) = want.split_once('~') {
        return match (num(got), num(v), num(t)) {
            (Some(g), Some(v), Some(t)) => (g - v).abs() <= t,
            _ => false,
        };
    }
    match (num(got), num(want)) {
        (Some(g), Some(w)) => (g - w).abs() <= 1e-9 * w.abs().max(1.0),
        _ => false,
    }
}

fn run_case(env: &Env, server: &Server, case: &Case) -> Result<(), String> {
    let out = env.cli(
        server,
        &case.partner,
        &["query", &case.sql, "--format", "json"],
    );
    match &case.expect {
        Expect::Refused(rule) => {
            if out.code == Some(0) {
                return Err(format!(
                    "expected refusal {rule}, got answer {}",
                    out.stdout
                ));
            }
            let want = format!("QUERY_REFUSED, rule {rule})");
            if !out.stderr.contains(&want) || out.stderr.lines().count() != 1 {
                return Err(format!("expected rule {rule}, got {:?}", out.stderr));
            }
            Ok(())
        }
        Expect::Rows { rowsort, rows } => {
            if out.code != Some(0) {
                return Err(format!("expected an answer, got {:?}", out.stderr.trim()));
            }
            let v: serde_json::Value =
                serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
            let suppressed = v["suppressed"].as_array().cloned().unwrap_or_default();
            let mut got: Vec<Vec<String>> = v["rows"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let cells = r.as_array().unwrap().iter();
                    if suppressed.get(i) == Some(&serde_json::Value::Bool(true)) {
                        // Withheld: its (public) group values, SUPPRESSED for the rest.
                        let shown: Vec<String> = cells.filter(|c| !c.is_null()).map(cell).collect();
                        shown
                            .into_iter()
                            .chain(std::iter::once("SUPPRESSED".to_string()))
                            .collect()
                    } else {
                        cells.map(cell).collect()
                    }
                })
                .collect();
            let mut want: Vec<Vec<String>> = rows
                .iter()
                .map(|r| r.split('|').map(str::to_string).collect())
                .collect();
            if *rowsort {
                got.sort();
                want.sort();
            }
            let ok = got.len() == want.len()
                && got.iter().zip(&want).all(|(g, w)| {
                    g.len() == w.len() && g.iter().zip(w).all(|(g, w)| cell_matches(g, w))
                });
            if ok {
                Ok(())
            } else {
                Err(format!("expected {want:?}, got {got:?}"))
            }
        }
    }
}

#[test]
fn sql_corpus_through_the_service() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/corpus")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "test"))
        .collect();
    files.sort();
    let cases: Vec<Case> = files.iter().flat_map(|f| parse_corpus(f)).collect();
    assert!(cases.len() >= 80, "corpus has only {} cases", cases.len());
    let answered = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Rows { .. }))
        .count();
    assert!(answered >= 20, "only {answered} answered cases");

    let (env, server) = corpus_world();
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            run_case(&env, &server, c)
                .err()
                .map(|e| format!("{}: {e}\n    {}", c.at, c.sql.replace('\n', " ")))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Refusals and answers never put engine internals in front of a client.
    let log = server.log();
    assert!(!log.contains("panicked"), "server log: {log}");
}

/// `escrow query SQL --format json` as `partner`, parsed.
fn ask(env: &Env, server: &Server, partner: &str, sql: &str) -> serde_json::Value {
    let out = env
        .cli(server, partner, &["query", sql, "--format", "json"])
        .ok();
    serde_json::from_str(&out.stdout).expect("query json")
}

/// A CSV of companies `co{i}.example` for `ids`, with one extra column.
fn companies(
    ids: impl IntoIterator<Item = usize>,
    column: &str,
    value: &dyn Fn(usize) -> String,
) -> String {
    let mut s = format!("website,{column}\n");
    for i in ids {
        s.push_str(&format!("co{i}.example,{}\n", value(i)));
    }
    s
}

/// acme shares `accounts` (companies `ids`) with globex for join/count/dimension/filter.
fn shared_world(ids: impl IntoIterator<Item = usize>, settings: &[&str]) -> (Env, Server) {
    let env = Env::new();
    let server = env.serve(&[]);
    let acme = companies(ids, "industry", &|i| {
        ["retail", "energy"][i % 2].to_string()
    });
    env.upload_csv(&server, "acme", "accounts", &acme).ok();
    for usage in ["join", "count", "dimension", "filter"] {
        env.cli(
            &server,
            "acme",
            &[
                "policy", "grant", "accounts", "--to", "globex", "--usage", usage,
            ],
        )
        .ok();
    }
    if !settings.is_empty() {
        let mut args = vec!["policy", "set", "accounts"];
        args.extend_from_slice(settings);
        env.cli(&server, "acme", &args).ok();
    }
    (env, server)
}

/// globex uploads its own list (`ids`, with a `segment` column) as `mine`.
fn attacker_upload(env: &Env, server: &Server, ids: &[usize], segment: &dyn Fn(usize) -> String) {
    let list = companies(ids.iter().copied(), "segment", segment);
    env.upload_csv(server, "globex", "mine", &list).ok();
}

const OVERLAP: &str = "SELECT COUNT(DISTINCT m.website) AS n FROM globex.mine m JOIN acme.accounts a ON m.website = a.website";

#[test]
fn same_question_same_answer_without_new_spend_and_budget_runs_out() {
    // Three questions at ε 1 cost √3 = 1.732 (ε add up in squares); a fourth costs 2.
    let (env, server) = shared_world(0..200, &["--epsilon", "1", "--budget", "1.733"]);
    attacker_upload(&env, &server, &(100..300).collect::<Vec<_>>(), &|_| {
        "x".into()
    });

    let first = ask(&env, &server, "globex", OVERLAP);
    assert_eq!(first["epsilon_spent"], 1.0, "{first}");
    assert_eq!(first["repeated"], false);
    let n = first["rows"][0][0].as_i64().expect("released count");
    assert!(
        (n - 100).abs() <= 20,
        "100 overlapping companies, noisy: {n}"
    );
    // Same question, other spelling: the same answer, nothing spent.
    let again = ask(
        &env,
        &server,
        "globex",
        &OVERLAP.to_lowercase().replace(" join ", "\n   JOIN  "),
    );
    assert_eq!(again["rows"], first["rows"], "{again}");
    assert_eq!(again["repeated"], true);
    assert_eq!(again["epsilon_spent"], 0.0);
    assert_eq!(again["budgets"][0]["spent"], 1.0);

    // Two more distinct questions spend the rest of the budget of 1.733; the next is refused.
    ask(
        &env,
        &server,
        "globex",
        &format!("{OVERLAP} WHERE a.industry = 'retail'"),
    );
    ask(
        &env,
        &server,
        "globex",
        &format!("{OVERLAP} WHERE a.industry = 'energy'"),
    );
    env.cli(
        &server,
        "globex",
        &[
            "query",
            &format!("{OVERLAP} WHERE a.industry IN ('retail', 'energy')"),
        ],
    )
    .fails_with("rule budget_exhausted");
    // Questions already paid for are still answered, identically.
    let paid = ask(&env, &server, "globex", OVERLAP);
    assert_eq!(paid["rows"], first["rows"]);

    // The owner's changes apply to the next query, without restart.
    env.cli(
        &server,
        "acme",
        &["policy", "set", "accounts", "--budget", "2"],
    )
    .ok();
    ask(
        &env,
        &server,
        "globex",
        &format!("{OVERLAP} WHERE a.industry IN ('retail', 'energy')"),
    );
    env.cli(
        &server,
        "acme",
        &words("policy revoke accounts --to globex --usage join"),
    )
    .ok();
    env.cli(&server, "globex", &["query", OVERLAP])
        .fails_with("rule usage_not_granted");
}

/// The same attack against acme's list with and without a target company must not tell the
/// two apart: the attacker knows 4 of acme's companies and adds the target (k - 1 + 1), and
/// gives the target a dimension value of its own.
#[test]
fn neighbouring_datasets_small_group_attacks_see_nothing() {
    const TARGET: usize = 7;
    let mut answers = Vec::new();
    for with_target in [true, false] {
        let ids: Vec<usize> = (0..60).filter(|&i| with_target || i != TARGET).collect();
        let (env, server) = shared_world(ids, &[]);
        attacker_upload(&env, &server, &[1, 2, 3, 4, TARGET], &|i| {
            if i == TARGET {
                "zzz".into()
            } else {
                "known".into()
            }
        });
        let count = ask(&env, &server, "globex", OVERLAP);
        let by_segment = ask(
            &env,
            &server,
            "globex",
            "SELECT m.segment, COUNT(DISTINCT a.website) FROM globex.mine m JOIN acme.accounts a ON m.website = a.website GROUP BY m.segment",
        );
        answers.push((
            count["rows"].clone(),
            count["suppressed"].clone(),
            by_segment["rows"].clone(),
        ));
    }
    assert_eq!(answers[0], answers[1], "the target's presence is visible");
    assert_eq!(answers[0].0, serde_json::json!([[null]]));
    assert_eq!(answers[0].1, serde_json::json!([true]));
    assert_eq!(answers[0].2, serde_json::json!([]));
}

/// Re-uploading one's own list with one account added, and asking again: every answer is
/// noisy (fresh noise per data version), and the budget ends the averaging.
#[test]
fn neighbouring_datasets_reupload_differencing_is_noisy_and_bounded() {
    const TARGET: usize = 150;
    // Eight questions at ε 0.5 cost √8 · 0.5 = 1.414; a ninth would cost 1.5.
    let (env, server) = shared_world(0..200, &["--epsilon", "0.5", "--budget", "1.415"]);
    let known: Vec<usize> = (0..100).collect();
    let mut exact = 0;
    for round in 0..8 {
        let mut ids = known.clone();
        if round % 2 == 1 {
            ids.push(TARGET);
        }
        attacker_upload(&env, &server, &ids, &|_| "x".into());
        let out = env.cli(&server, "globex", &["query", OVERLAP, "--format", "json"]);
        if out.code != Some(0) {
            // Budget 1.415 at ε 0.5: eight questions on eight data versions, then nothing.
            panic!("round {round} refused early: {}", out.stderr);
        }
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        let n = v["rows"][0][0].as_i64().expect("released");
        let truth = ids.len() as i64;
        assert!((n - truth).abs() < 40, "noise out of scale: {n} vs {truth}");
        if n == truth {
            exact += 1;
        }
    }
    assert!(exact < 8, "answers carry no noise");
    let mut ids = known.clone();
    ids.push(TARGET);
    ids.push(TARGET + 1);
    attacker_upload(&env, &server, &ids, &|_| "x".into());
    env.cli(&server, "globex", &["query", OVERLAP])
        .fails_with("rule budget_exhausted");
}

/// Two partners spell the same companies differently; the overlap counts companies: website
/// spellings reduce to one registrable domain, rows without a usable website match by
/// normalised name, duplicates count once, unusable rows are unmatched (never one company).
#[test]
fn messy_spellings_match_as_companies() {
    let env = Env::new();
    let server = env.serve(&[]);
    let mut acme = String::from("website,company_name\n");
    for i in 0..30 {
        acme.push_str(&format!("https://www.c{i}.co.uk/about,C{i} Systems\n"));
    }
    acme.push_str("C10.CO.UK.,C10 Systems Ltd\n"); // a duplicate of c10
    for i in 40..45 {
        acme.push_str(&format!(",\"The C{i} Systems, LLC\"\n")); // no website: by name
    }
    acme.push_str("n/a,\n"); // nothing usable: unmatched
    let mut globex = String::from("website,company_name\n");
    for i in 10..40 {
        globex.push_str(&format!(
            "shop.C{i}.CO.UK:8080/?utm_source=crm,c{i} systems inc\n"
        ));
    }
    for i in 40..45 {
        globex.push_str(&format!("sales{i}@gmail.com,C{i} SYSTEMS\n")); // free mail: by name
    }
    globex.push_str("localhost,N/A\n");
    let mut outcomes = Vec::new();
    for (partner, csv) in [("acme", &acme), ("globex", &globex)] {
        let f = env.file(&format!("{partner}-crm.csv"), csv.as_bytes());
        outcomes.push(
            env.upload(
                &server,
                partner,
                &f,
                "crm",
                &["--key-column", "website", "--name-column", "company_name"],
            )
            .ok()
            .stdout,
        );
    }
    assert!(
        outcomes[0].contains("matched_by_domain=31 matched_by_name=5 unmatched=1"),
        "{}",
        outcomes[0]
    );
    assert!(
        outcomes[1].contains("matched_by_domain=30 matched_by_name=5 unmatched=1"),
        "{}",
        outcomes[1]
    );
    for usage in ["join", "count"] {
        env.cli(
            &server,
            "globex",
            &["policy", "grant", "crm", "--to", "acme", "--usage", usage],
        )
        .ok();
    }
    env.cli(
        &server,
        "globex",
        &words("policy set crm --epsilon 100 --budget 1000"),
    )
    .ok();
    // c10..c29 by domain (20) + c40..c44 by name (5).
    let v = ask(
        &env,
        &server,
        "acme",
        "SELECT COUNT(DISTINCT a.website) FROM acme.crm a JOIN globex.crm g ON a.website = g.website",
    );
    assert_eq!(v["rows"], serde_json::json!([[25]]), "{v}");
    // Own data: 30 domains + 5 names; the duplicate and the unmatched row are no companies.
    let v = ask(
        &env,
        &server,
        "acme",
        "SELECT COUNT(DISTINCT website) FROM acme.crm",
    );
    assert_eq!(v["rows"], serde_json::json!([[35]]), "{v}");
    // A name column needs a website key; a reserved column name is refused.
    let f = env.file("ids.csv", b"duns,company_name\n123,Acme\n");
    env.upload(
        &server,
        "acme",
        &f,
        "ids",
        &["--key-column", "duns", "--name-column", "company_name"],
    )
    .fails_with("invalid_name_column");
    // Name-context and place columns qualify a name column, and must be other columns of
    // the upload.
    let f = env.file(
        "ctx.csv",
        b"website,company_name,region\nacme.com,Acme,EMEA\n",
    );
    for (flag, own, code) in [
        ("--name-context", "company_name", "invalid_name_context"),
        ("--places", "website", "invalid_places"),
    ] {
        for flags in [
            vec!["--key-column", "website", flag, "region"],
            [
                words("--key-column website --name-column company_name"),
                vec![flag, "country"],
            ]
            .concat(),
            [
                words("--key-column website --name-column company_name"),
                vec![flag, own],
            ]
            .concat(),
        ] {
            env.upload(&server, "acme", &f, "ctx", &flags)
                .fails_with(code);
        }
    }
    // The region column is detected as the place unless `--places none` or a name context.
    for (flags, places) in [
        (
            &words("--key-column website --name-column company_name")[..],
            true,
        ),
        (
            &words("--key-column website --name-column company_name --places none"),
            false,
        ),
        (
            &words("--key-column website --name-column company_name --name-context region"),
            false,
        ),
    ] {
        let out = env.upload(&server, "acme", &f, "ctx", flags).ok();
        assert_eq!(
            out.stdout.contains(" places=region"),
            places,
            "{}",
            out.stdout
        );
    }
    let f = env.file("reserved.csv", b"website,__escrow_company\na.com,x\n");
    env.upload(
        &server,
        "acme",
        &f,
        "reserved",
        &["--key-column", "website"],
    )
    .fails_with("reserved_column");
}

/// The shared cases at the default settings (ε = 0.125 per question, k = 5, L = 1), where the
/// corpus runs at ε = 100 to compare exact numbers: every assertion holds under the noise
/// (tolerances of 5 standard deviations of the discrete Gaussian noise, sd 8 for a lone
/// count: each fails with probability below 10^-6; groups of 150 clear the release
/// threshold of about 47 by 13 sd).
#[test]
fn shared_answers_at_default_settings_hold_under_noise() {
    let env = Env::new();
    let server = env.serve(&[]);
    let mut acme = String::from("website,industry,revenue\n");
    for i in 0..800 {
        acme.push_str(&format!("co{i}.example,i{},{}\n", i % 4, i % 500));
    }
    env.upload_csv(&server, "acme", "accounts", &acme).ok();
    attacker_upload(&env, &server, &(0..600).collect::<Vec<_>>(), &|_| {
        "x".into()
    });
    env.grants(
        &server,
        "acme",
        "accounts",
        "globex",
        &[
            "--usage join --column website",
            "--usage count --column website",
            "--usage dimension --column industry",
            "--usage filter --column industry",
            "--usage sum --column revenue",
            "--usage avg --column revenue",
        ],
    );
    env.cli(
        &server,
        "acme",
        &words("policy set accounts --bounds revenue=0:500"),
    )
    .ok();
    let near = |got: &serde_json::Value, want: f64, tolerance: f64| {
        let g = got
            .as_f64()
            .unwrap_or_else(|| panic!("a released number: {got}"));
        assert!(
            (g - want).abs() <= tolerance,
            "{g} vs {want} +- {tolerance}"
        );
    };
    let join = "FROM globex.mine m JOIN acme.accounts a ON m.website = a.website";

    let total = ask(
        &env,
        &server,
        "globex",
        &format!("SELECT COUNT(DISTINCT a.website) {join}"),
    );
    assert_eq!(total["protection"]["epsilon"], 0.125, "{total}");
    assert_eq!(total["protection"]["noise_sd"], 8.0, "{total}");
    near(&total["rows"][0][0], 600.0, 40.0);

    let by = ask(
        &env,
        &server,
        "globex",
        &format!(
            "SELECT a.industry, COUNT(DISTINCT a.website) {join} GROUP BY a.industry ORDER BY a.industry"
        ),
    );
    let rows = by["rows"].as_array().expect("rows");
    assert_eq!(
        rows.len(),
        4,
        "150 companies per industry clear the threshold: {by}"
    );
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row[0], format!("i{i}"));
        near(&row[1], 150.0, 40.0);
    }

    // count + sum: two statistics at ρ/2 each; the sum's noise sd is 500 x √2 / 0.125 = 5657
    // and the count's √2 / 0.125 = 11.3.
    let exact_sum: f64 = (0..600).map(|i| f64::from(i % 500)).sum();
    let sums = ask(
        &env,
        &server,
        "globex",
        &format!("SELECT COUNT(DISTINCT a.website), SUM(a.revenue) {join}"),
    );
    near(&sums["rows"][0][0], 600.0, 57.0);
    near(&sums["rows"][0][1], exact_sum, 28_300.0);
    let avg = ask(
        &env,
        &server,
        "globex",
        &format!("SELECT AVG(a.revenue) {join}"),
    );
    // (sum ± 28,300) / (600 ± 57): within 75 of the exact mean.
    near(&avg["rows"][0][0], exact_sum / 600.0, 75.0);

    // Enumerated groups: a value nobody has is listed, withheld; the others are released.
    let listed = ask(
        &env,
        &server,
        "globex",
        &format!(
            "SELECT a.industry, COUNT(DISTINCT a.website) {join} WHERE a.industry IN ('i0', 'i1', 'none') GROUP BY a.industry ORDER BY a.industry"
        ),
    );
    let rows = listed["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3, "{listed}");
    assert_eq!(
        listed["suppressed"],
        serde_json::json!([false, false, true])
    );
    near(&rows[0][1], 150.0, 40.0);
    assert!(rows[2][1].is_null());
    // Five questions at ε 0.125: √5 · 0.125 of the default budget 0.4.
    near(&listed["budgets"][0]["spent"], 5f64.sqrt() * 0.125, 1e-9);
}
