//! Policy commands: data owners grant and revoke column uses; grants are validated whole.

use crate::harness::{Env, Server, accounts_csv, words};

const GRANT_JOIN: [&str; 9] = [
    "policy", "grant", "accounts", "--to", "globex", "--usage", "join", "--column", "website",
];

fn policies(env: &Env, server: &Server, partner: &str) -> serde_json::Value {
    let out = env
        .cli(server, partner, &["policy", "list", "--format", "json"])
        .ok();
    serde_json::from_str(&out.stdout).expect("policy list json")
}

#[test]
fn owners_grant_list_and_revoke() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(20, "p"))
        .ok();

    let out = env.cli(&server, "acme", &GRANT_JOIN).ok();
    assert!(
        out.stdout
            .contains("granted: globex may use acme.accounts.website as join"),
        "{}",
        out.stdout
    );
    let again = env.cli(&server, "acme", &GRANT_JOIN).ok();
    assert!(again.stdout.contains("already granted"), "{}", again.stdout);
    env.cli(
        &server,
        "acme",
        &words("policy grant accounts --to globex --usage dimension"),
    )
    .ok();

    let mine = policies(&env, &server, "acme");
    assert_eq!(mine["granted"].as_array().expect("a").len(), 2, "{mine}");
    assert_eq!(mine["received"].as_array().expect("a").len(), 0);
    let theirs = policies(&env, &server, "globex");
    assert_eq!(
        theirs["received"].as_array().expect("a").len(),
        2,
        "{theirs}"
    );
    assert_eq!(theirs["received"][0]["dataset"], "acme.accounts");
    let table = env.cli(&server, "globex", &["policy", "list"]).ok();
    assert!(table.stdout.contains("granted to you"), "{}", table.stdout);

    env.cli(
        &server,
        "acme",
        &words("policy revoke accounts --to globex --usage join --column website"),
    )
    .ok();
    env.cli(
        &server,
        "acme",
        &words("policy revoke accounts --to globex --usage join --column website"),
    )
    .fails_with("not_found");

    // invalid grants are refused whole, with stable codes
    for (args, code) in [
        (
            vec!["accounts", "--to", "globex", "--usage", "select"],
            "invalid_rule",
        ),
        (
            vec!["accounts", "--to", "acme", "--usage", "join"],
            "invalid_rule",
        ),
        (
            vec![
                "accounts", "--to", "globex", "--usage", "sum", "--column", "no_such",
            ],
            "unknown_column",
        ),
        (
            vec!["accounts", "--to", "nobody", "--usage", "join"],
            "not_found",
        ),
        (
            vec!["missing", "--to", "globex", "--usage", "join"],
            "not_found",
        ),
        (
            vec!["Bad Name", "--to", "globex", "--usage", "join"],
            "invalid_name",
        ),
    ] {
        let mut full = vec!["policy", "grant"];
        full.extend(args);
        env.cli(&server, "acme", &full).fails_with(code);
    }
    // globex cannot grant on acme's dataset: names are always the caller's own datasets
    env.cli(
        &server,
        "globex",
        &words("policy grant accounts --to acme --usage join"),
    )
    .fails_with("not_found");

    // deleting the dataset removes the consent given for it
    env.cli(&server, "acme", &["datasets", "delete", "accounts"])
        .ok();
    let after = policies(&env, &server, "globex");
    assert_eq!(after["received"].as_array().expect("a").len(), 0, "{after}");
}

fn json_of(run: crate::harness::Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).expect("json output")
}

/// acme's policy in force, as casbin CSV without its header.
fn export_body(env: &Env, server: &Server, version: Option<&str>) -> String {
    let mut args = vec!["policy", "export"];
    if let Some(v) = version {
        args.extend(["--version", v]);
    }
    let out = env.cli(server, "acme", &args).ok();
    assert!(
        out.stdout.starts_with("# escrow policy of acme"),
        "{}",
        out.stdout
    );
    out.stdout
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Every decision acme's policy makes for globex and for every other partner: each column
/// and usage, standalone use, each population's visibility, and the protection settings.
/// (initech must exist.)
fn decisions(env: &Env, server: &Server) -> Vec<serde_json::Value> {
    ["globex", "initech"]
        .iter()
        .flat_map(|p| {
            let out = preview(env, server, &["--partner", p]);
            out["datasets"]
                .as_array()
                .expect("datasets")
                .iter()
                .map(|d| {
                    serde_json::json!([
                        p,
                        d["dataset"],
                        d["visible"],
                        d["standalone"],
                        d["columns"],
                        d["populations"],
                        d["settings"],
                        d["notes"]
                    ])
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

const BY_REGION: &str = "SELECT a.region, COUNT(DISTINCT g.website) AS n FROM globex.accounts g JOIN acme.accounts a ON g.website = a.website GROUP BY a.region";

fn acme(env: &Env, server: &Server, args: &[&str]) {
    env.cli(server, "acme", args).ok();
}

#[test]
fn every_change_is_a_version_and_rollback_restores_the_exact_decisions() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.customers_shared(&server); // acme v1: population customers
    env.op(&["partner", "add", "initech"]).ok();
    acme(&env, &server, &GRANT_JOIN); // v2
    acme(
        &env,
        &server,
        &words("policy grant accounts --to globex --usage dimension --column region"),
    ); // v3
    acme(
        &env,
        &server,
        &words("policy set accounts --epsilon 0.25 --min-entities 7"),
    ); // v4
    // The settings in force, as JSON: what was set, defaults for the rest.
    let settings = json_of(
        env.cli(&server, "acme", &words("policy settings --format json"))
            .ok(),
    );
    assert_eq!(
        settings,
        serde_json::json!({"datasets": [{"dataset": "accounts", "settings": {
            "min_entities": 7, "epsilon": 0.25, "budget": 0.4,
            "max_groups_per_entity": 1, "bounds": {}}}]}),
    );
    // A refused setting names its field, for a form to show the reason beside it; nothing
    // changes (no version).
    for (body, field) in [
        (
            serde_json::json!({"dataset": "accounts", "epsilon": 0}),
            "epsilon",
        ),
        (
            serde_json::json!({"dataset": "accounts", "min_entities": 1}),
            "min_entities",
        ),
        (
            serde_json::json!({"dataset": "accounts", "bounds": {"region": [0, 1]}}),
            "bounds.region",
        ),
    ] {
        let (status, text) = env.raw_post(&server, "acme", "v1/policies/settings", &body);
        let e: serde_json::Value = serde_json::from_str(&text).expect("json error");
        assert_eq!(status, 400, "{text}");
        assert_eq!(e["error"]["code"], "invalid_setting", "{text}");
        assert_eq!(e["error"]["field"], field, "{text}");
    }
    let table = env.cli(&server, "acme", &words("policy settings")).ok();
    assert!(
        table
            .stdout
            .contains("accounts: min_entities=7 epsilon=0.25 budget=0.4"),
        "{}",
        table.stdout
    );
    acme(
        &env,
        &server,
        &words("policy grant accounts --to globex --usage overlap --population customers"),
    ); // v5
    // A change that changes nothing is not a version.
    env.cli(&server, "acme", &GRANT_JOIN).ok();
    let v5 = export_body(&env, &server, None);
    assert_eq!(v5, export_body(&env, &server, Some("5")));
    let decisions_v5 = decisions(&env, &server);
    let answer_v5 = json_of(
        env.cli(&server, "globex", &["query", BY_REGION, "--format", "json"])
            .ok(),
    );
    assert_eq!(answer_v5["repeated"], false);
    assert_eq!(answer_v5["protection"]["min_entities"], 7, "{answer_v5}");

    // Three more changes: the question is refused, the overlap is gone.
    acme(
        &env,
        &server,
        &words("policy revoke accounts --to globex --usage join --column website"),
    ); // v6
    acme(
        &env,
        &server,
        &["policy", "set", "accounts", "--epsilon", "2"],
    ); // v7
    acme(
        &env,
        &server,
        &["population", "remove", "accounts", "customers"],
    ); // v8
    env.cli(&server, "globex", &["query", BY_REGION])
        .fails_with("rule usage_not_granted");
    assert_ne!(decisions(&env, &server), decisions_v5);

    let history = json_of(
        env.cli(&server, "acme", &["policy", "history", "--format", "json"])
            .ok(),
    );
    let versions = history["versions"].as_array().expect("versions");
    let changes: Vec<&str> = versions
        .iter()
        .map(|v| v["change"].as_str().expect("c"))
        .collect();
    assert_eq!(
        changes,
        [
            "population_add",
            "grant",
            "grant",
            "settings",
            "grant",
            "revoke",
            "settings",
            "population_remove"
        ],
        "{history}"
    );
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(v["version"], i as i64 + 1);
        assert_eq!(v["by"], "admin", "{v}");
        assert!(v["time"].as_str().expect("t").ends_with('Z'), "{v}");
    }
    // Removing the population took its overlap grant with it, in the same version.
    assert_eq!(
        versions[7]["removed"],
        serde_json::json!([
            "p,globex,acme,accounts,customers,overlap",
            "population,acme,accounts,customers,status = 'customer'"
        ]),
        "{}",
        versions[7]
    );
    assert_eq!(
        versions[1]["added"],
        serde_json::json!(["p,globex,acme,accounts,website,join"])
    );

    let diff = env.cli(&server, "acme", &["policy", "diff", "5", "8"]).ok();
    for line in [
        "- p,globex,acme,accounts,website,join",
        "- setting,acme,accounts,epsilon,0.25",
        "+ setting,acme,accounts,epsilon,2",
        "- population,acme,accounts,customers,status = 'customer'",
    ] {
        assert!(diff.stdout.contains(line), "{line:?} in {}", diff.stdout);
    }
    assert!(
        !diff.stdout.contains("region"),
        "unchanged rules are not in the diff: {}",
        diff.stdout
    );

    // Only rule-makers roll back; an analyst may read the history but not change it.
    let analyst = env.add_user("acme", "ann", "analyst");
    env.cli_as(&server, &analyst, &["policy", "history"]).ok();
    env.cli_as(&server, &analyst, &["policy", "rollback", "5"])
        .fails_with("forbidden");
    env.cli(&server, "acme", &["policy", "rollback", "99"])
        .fails_with("no policy version 99");

    let rolled = env.cli(&server, "acme", &["policy", "rollback", "5"]).ok();
    assert!(
        rolled.stdout.contains("policy v9: the rules of v5 again"),
        "{}",
        rolled.stdout
    );
    assert_eq!(
        export_body(&env, &server, None),
        v5,
        "v9 is v5's document, exactly"
    );
    assert_eq!(
        decisions(&env, &server),
        decisions_v5,
        "and decides exactly as v5 did"
    );
    // The same question is allowed again and, under the same protection, is the same
    // question: the same answer, nothing spent.
    let again = json_of(
        env.cli(&server, "globex", &["query", BY_REGION, "--format", "json"])
            .ok(),
    );
    assert_eq!(again["rows"], answer_v5["rows"]);
    assert_eq!(again["repeated"], true, "{again}");
    let overlap = json_of(
        env.cli(
            &server,
            "globex",
            &["overlap", "--with", "acme", "--format", "json"],
        )
        .ok(),
    );
    assert_eq!(
        overlap["populations"]["theirs"],
        serde_json::json!(["customers"])
    );
    let history = json_of(
        env.cli(&server, "acme", &["policy", "history", "--format", "json"])
            .ok(),
    );
    assert_eq!(history["versions"][8]["change"], "rollback");
    // Rolling back to the policy in force changes nothing.
    let same = env.cli(&server, "acme", &["policy", "rollback", "9"]).ok();
    assert!(same.stdout.contains("nothing changed"), "{}", same.stdout);
}

#[test]
fn an_invalid_import_changes_nothing_and_a_valid_one_is_one_version() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.customers_shared(&server);
    acme(&env, &server, &GRANT_JOIN);
    let before = export_body(&env, &server, None);
    let history_len = || {
        json_of(
            env.cli(&server, "acme", &["policy", "history", "--format", "json"])
                .ok(),
        )["versions"]
            .as_array()
            .expect("versions")
            .len()
    };
    let versions_before = history_len();

    let exported = env.cli(&server, "acme", &["policy", "export"]).ok().stdout;
    let bad: [(&str, &str); 10] = [
        (
            "p,globex,acme,accounts,no_such_column,join\n",
            "has no column \"no_such_column\"",
        ),
        (
            "p,acme,globex,accounts,website,join\n",
            "names a dataset of globex",
        ),
        ("p,globex,acme,accounts,website,peek\n", "unknown usage"),
        (
            "p,globex,acme,nothing_here,*,dimension\n",
            "acme has no dataset nothing_here",
        ),
        (
            "p,nobody,acme,accounts,*,dimension\n",
            "no active partner named nobody",
        ),
        (
            "p,globex,acme,accounts,opportunities,overlap\n",
            "has no population opportunities",
        ),
        (
            "setting,acme,accounts,epsilon,0\n",
            "epsilon must be a multiple of 0.001",
        ),
        ("bounds,acme,accounts,arr_usd,0,5e-324\n", "not sub-normal"),
        (
            "population,acme,accounts,by_site,website = 'x'\n",
            "population by_site of accounts",
        ),
        ("bounds,acme,accounts,company_name,0,10\n", "not one"),
    ];
    for (line, needle) in bad {
        // Valid rules first, the bad one last: nothing of the file may apply.
        let doc = format!("{exported}p,globex,acme,accounts,*,dimension\n{line}");
        let f = env.file("bad.csv", doc.as_bytes());
        let run = env
            .cli(
                &server,
                "acme",
                &["policy", "import", f.to_str().expect("p")],
            )
            .fails_with("invalid_policy");
        assert!(run.stderr.contains(needle), "{line:?}: {}", run.stderr);
        assert_eq!(
            export_body(&env, &server, None),
            before,
            "{line:?} changed the policy"
        );
    }
    let not_csv = env.file("bad.csv", b"p,\"globex,acme\n");
    env.cli(
        &server,
        "acme",
        &["policy", "import", not_csv.to_str().expect("p")],
    )
    .fails_with("invalid_policy");
    assert_eq!(
        history_len(),
        versions_before,
        "refused imports write no version"
    );

    // A dry run says what would change and changes nothing.
    let doc = format!(
        "{exported}p,globex,acme,accounts,region,dimension\nsetting,acme,accounts,min_entities,9\n"
    );
    let f = env.file("good.csv", doc.as_bytes());
    let dry = env
        .cli(
            &server,
            "acme",
            &["policy", "import", f.to_str().expect("p"), "--dry-run"],
        )
        .ok();
    assert!(
        dry.stdout
            .contains("+ p,globex,acme,accounts,region,dimension"),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout
            .contains("+ setting,acme,accounts,min_entities,9"),
        "{}",
        dry.stdout
    );
    assert_eq!(export_body(&env, &server, None), before);

    let done = env
        .cli(
            &server,
            "acme",
            &["policy", "import", f.to_str().expect("p")],
        )
        .ok();
    assert!(
        done.stdout
            .contains(&format!("imported as policy v{}", versions_before + 1)),
        "{}",
        done.stdout
    );
    let after = export_body(&env, &server, None);
    assert!(
        after.contains("p,globex,acme,accounts,region,dimension\n"),
        "{after}"
    );
    assert!(
        after.contains("setting,acme,accounts,min_entities,9\n"),
        "{after}"
    );
    assert!(
        after.contains("setting,acme,accounts,epsilon,0.125\n"),
        "unset settings take the defaults: {after}"
    );
    assert_eq!(history_len(), versions_before + 1);

    // The audit log has the import, with its diff, and the refusals.
    let audit = json_of(
        env.cli(&server, "acme", &["audit", "list", "--format", "json"])
            .ok(),
    );
    let imports: Vec<&serde_json::Value> = audit
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["kind"] == "policy_import")
        .collect();
    assert_eq!(
        imports.len(),
        12,
        "10 + 1 refused, 1 applied (dry runs are not changes)"
    );
    let applied = imports.last().expect("applied");
    assert_eq!(applied["outcome"], "ok", "{applied}");
    assert_eq!(
        applied["detail"]["policy_version"],
        versions_before as i64 + 1
    );
    assert!(
        applied["detail"]["diff"]["added"]
            .as_array()
            .expect("added")
            .contains(&serde_json::json!(
                "p,globex,acme,accounts,region,dimension"
            )),
        "{applied}"
    );

    // globex's compliance officer imports acme's document: it is about acme's datasets.
    let officer = env.add_user("globex", "gina", "compliance");
    let mine = env.file("acme.csv", after.as_bytes());
    env.cli_as(
        &server,
        &officer,
        &["policy", "import", mine.to_str().expect("p")],
    )
    .fails_with("a partner's policy covers only its own datasets");
    assert_eq!(export_body(&env, &server, None), after);
}

fn explain(env: &Env, server: &Server, partner: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["policy", "explain"];
    all.extend_from_slice(args);
    all.extend(["--format", "json"]);
    json_of(env.cli(server, partner, &all).ok())
}

fn use_of<'a>(
    e: &'a serde_json::Value,
    dataset: &str,
    column: &str,
    usage: &str,
) -> &'a serde_json::Value {
    e["uses"]
        .as_array()
        .expect("uses")
        .iter()
        .find(|u| {
            u["dataset"] == dataset
                && (u["column"] == column || u["population"] == column)
                && u["usage"] == usage
        })
        .unwrap_or_else(|| panic!("no use {dataset}.{column} as {usage} in {e}"))
}

#[test]
fn explain_names_the_grant_or_the_missing_grant_of_every_use() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.customers_shared(&server);
    acme(&env, &server, &GRANT_JOIN);
    // Before acme shares anything of region, globex cannot tell it exists.
    env.cli(&server, "globex", &["query", BY_REGION])
        .fails_with("rule unknown_column");
    // Shared as a filter, it is there, and its use as a dimension is what is missing.
    acme(
        &env,
        &server,
        &words("policy grant accounts --to globex --usage filter --column region"),
    );

    let refused = env
        .cli(&server, "globex", &["query", BY_REGION])
        .fails_with("rule usage_not_granted");
    assert!(
        refused
            .stderr
            .contains("`escrow policy explain \"SQL\"` shows each rule"),
        "{}",
        refused.stderr
    );

    let e = explain(&env, &server, "globex", &[BY_REGION]);
    assert_eq!(e["allowed"], false, "{e}");
    assert_eq!(e["refusal"]["rule"], "usage_not_granted");
    assert_eq!(
        e["datasets"],
        serde_json::json!(["globex.accounts@v1", "acme.accounts@v1"])
    );
    let join = use_of(&e, "acme.accounts", "website", "join");
    assert_eq!(join["decision"], "granted");
    assert_eq!(join["rule"], "p,globex,acme,accounts,website,join");
    let region = use_of(&e, "acme.accounts", "region", "dimension");
    assert_eq!(region["decision"], "missing", "{e}");
    let fix = region["missing_grant"].as_str().expect("the missing grant");
    assert_eq!(
        fix,
        "acme runs: escrow policy grant accounts --to globex --usage dimension --column region"
    );
    assert_eq!(
        use_of(&e, "globex.accounts", "website", "count")["decision"],
        "owner"
    );
    assert_eq!(e["protection"]["min_entities"], 5);
    assert_eq!(e["protection"]["epsilon"], 0.125);
    assert_eq!(
        e["protection"]["from"],
        serde_json::json!(["acme.accounts"])
    );
    let table = env
        .cli(&server, "globex", &["policy", "explain", BY_REGION])
        .ok();
    assert!(
        table
            .stdout
            .contains("acme.accounts.region as dimension: MISSING GRANT"),
        "{}",
        table.stdout
    );

    // The owner runs exactly the command the explanation names; now it is allowed, and the
    // cost it predicts is what answering costs.
    let args: Vec<&str> = fix
        .trim_start_matches("acme runs: escrow ")
        .split(' ')
        .collect();
    acme(&env, &server, &args);
    let e = explain(&env, &server, "globex", &[BY_REGION]);
    assert_eq!(e["allowed"], true, "{e}");
    assert_eq!(e["refusal"], serde_json::Value::Null);
    assert_eq!(
        use_of(&e, "acme.accounts", "region", "dimension")["rule"],
        "p,globex,acme,accounts,region,dimension"
    );
    assert_eq!(e["cost"]["epsilon_spent"], 0.125, "{e}");
    let explained_again = explain(&env, &server, "globex", &[BY_REGION]);
    assert_eq!(
        explained_again["cost"]["repeated"], false,
        "explaining spends nothing"
    );
    assert_eq!(explained_again["cost"]["budgets"][0]["spent"], 0.125);
    let answer = json_of(
        env.cli(&server, "globex", &["query", BY_REGION, "--format", "json"])
            .ok(),
    );
    assert_eq!(answer["budgets"], e["cost"]["budgets"], "{answer}");
    assert_eq!(answer["epsilon_spent"], 0.125);
    let after = explain(&env, &server, "globex", &[BY_REGION]);
    assert_eq!(after["cost"]["repeated"], true, "{after}");
    assert_eq!(after["cost"]["epsilon_spent"], 0.0);

    // A query the gate refuses outright is explained by its rule.
    let rows = explain(
        &env,
        &server,
        "globex",
        &["SELECT website FROM acme.accounts"],
    );
    assert_eq!(rows["allowed"], false);
    assert!(
        rows["refusal"]["rule"].as_str().expect("rule").len() > 3,
        "{rows}"
    );

    // Overlap questions: globex may not see acme's populations, so the explanation names
    // none of them (only the grant that would help); acme may see globex's.
    let o = explain(&env, &server, "globex", &["--with", "acme"]);
    assert_eq!(o["allowed"], false, "{o}");
    assert_eq!(o["refusal"]["rule"], "usage_not_granted");
    assert_eq!(o["uses"], serde_json::json!([]), "{o}");
    assert!(!o.to_string().contains("customers"), "{o}");
    assert!(
        o["refusal"]["message"]
            .as_str()
            .expect("message")
            .contains("escrow policy grant DATASET --to globex --usage overlap"),
        "{o}"
    );
    env.cli(&server, "globex", &["overlap", "--with", "acme"])
        .fails_with("`escrow policy explain --with acme` shows each rule");
    let o = explain(
        &env,
        &server,
        "acme",
        &["--with", "globex", "--by", "region"],
    );
    assert_eq!(
        o["allowed"], false,
        "the breakdown column is not granted: {o}"
    );
    assert_eq!(
        use_of(&o, "globex.accounts", "customers", "overlap")["rule"],
        "p,acme,globex,accounts,*,overlap"
    );
    assert_eq!(
        use_of(&o, "globex.accounts", "region", "dimension")["decision"],
        "missing"
    );
    let o = explain(&env, &server, "acme", &["--with", "globex"]);
    assert_eq!(o["allowed"], true, "{o}");
    assert_eq!(
        o["protection"]["from"],
        serde_json::json!(["acme.accounts", "globex.accounts"])
    );
    assert_eq!(o["cost"]["budgets"][0]["dataset"], "globex.accounts");

    // Explaining is reading policy: analysts may, uploaders may not.
    let uploader = env.add_user("globex", "uma", "uploader");
    env.cli_as(&server, &uploader, &["policy", "explain", BY_REGION])
        .fails_with("forbidden");
    env.cli(&server, "globex", &["policy", "explain"])
        .fails_with("give the SQL to explain");
}

fn preview(env: &Env, server: &Server, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["policy", "preview", "--format", "json"];
    all.extend_from_slice(args);
    json_of(env.cli(server, "acme", &all).ok())
}

#[test]
fn preview_shows_what_a_partner_can_ask_before_and_after_a_grant() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.customers_shared(&server);
    let before = preview(&env, &server, &["--partner", "globex"]);
    let d = &before["datasets"][0];
    assert_eq!(d["dataset"], "acme.accounts", "{before}");
    assert_eq!(d["visible"], false);
    assert_eq!(d["columns"], serde_json::json!([]));
    assert_eq!(d["standalone"], serde_json::Value::Null);
    assert_eq!(
        d["populations"],
        serde_json::json!([{"name": "customers", "visible": false, "rule": null}])
    );
    assert_eq!(d["remaining"], 0.4);

    acme(&env, &server, &GRANT_JOIN);
    acme(
        &env,
        &server,
        &words("policy grant accounts --to * --usage sum --column arr_usd"),
    );
    acme(
        &env,
        &server,
        &words("policy grant accounts --to globex --usage overlap --population customers"),
    );
    let after = preview(
        &env,
        &server,
        &["--partner", "globex", "--dataset", "accounts"],
    );
    let d = &after["datasets"][0];
    assert_eq!(d["visible"], true);
    assert_eq!(
        d["columns"],
        serde_json::json!([
            {"column": "website", "usages": [{"usage": "join", "rule": "p,globex,acme,accounts,website,join"}]},
            {"column": "arr_usd", "usages": [{"usage": "sum", "rule": "p,*,acme,accounts,arr_usd,sum"}]},
        ]),
        "{after}"
    );
    assert_eq!(d["populations"][0]["visible"], true);
    assert!(
        d["notes"][0]
            .as_str()
            .expect("note")
            .contains("sum of arr_usd is granted but refused until you set its bounds"),
        "{after}"
    );
    acme(
        &env,
        &server,
        &["policy", "set", "accounts", "--bounds", "arr_usd=0:100000"],
    );
    // globex spends on the dataset: the preview shows what it has left.
    env.cli(
        &server,
        "globex",
        &["query", "SELECT COUNT(DISTINCT g.website) FROM globex.accounts g JOIN acme.accounts a ON g.website = a.website"],
    )
    .ok();
    let spent = preview(&env, &server, &["--partner", "globex"]);
    let d = &spent["datasets"][0];
    assert_eq!(d["notes"], serde_json::json!([]), "{spent}");
    // One question at the default ε 0.125 of the default budget 0.4: what is left is the ε
    // of one more question, √(0.4² - 0.125²) (ε add up in squares).
    assert_eq!(d["budget"]["spent"], 0.125);
    let remaining = d["remaining"].as_f64().expect("remaining");
    assert!((remaining - 0.379967).abs() < 1e-5, "{spent}");
    let table = env
        .cli(
            &server,
            "acme",
            &["policy", "preview", "--partner", "globex"],
        )
        .ok();
    assert!(
        table
            .stdout
            .contains("acme.accounts (v1): globex can name it in queries"),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("  website: join"), "{}", table.stdout);
    // The guarantee in plain words, with the numbers in force (defaults: budget 0.4, ε 0.125).
    assert!(
        table.stdout.contains(
            "  guarantee: a partner that spends its whole budget on your data (0.4 in all: 10 questions at epsilon 0.125, whose epsilons add up in squares) can guess whether one given company is in your list right at most 60.0% of the time, where a coin toss is right 50% of the time"
        ),
        "{}",
        table.stdout
    );
    acme(
        &env,
        &server,
        &words("policy set accounts --epsilon 0.1 --budget 1.1"),
    );
    let tighter = preview(&env, &server, &["--partner", "globex"]);
    let g = tighter["datasets"][0]["guarantee"]
        .as_str()
        .expect("guarantee");
    assert!(
        g.contains("121 questions at epsilon 0.1, whose epsilons add up in squares) can guess whether one given company is in your list right at most 77.5% of the time"),
        "{g}"
    );

    env.cli(&server, "acme", &["policy", "preview", "--partner", "acme"])
        .fails_with("invalid_request");
    env.cli(
        &server,
        "acme",
        &["policy", "preview", "--partner", "nobody"],
    )
    .fails_with("no partner named nobody");
    // ... which tells acme nothing a grant would not: partners' names are not secret (their
    // datasets and populations are; overlap questions do not tell them from unknown ones).
    env.cli(
        &server,
        "acme",
        &words("policy grant accounts --to nobody --usage join --column website"),
    )
    .fails_with("no partner named nobody");
    env.cli(
        &server,
        "acme",
        &words("policy preview --partner globex --dataset nope"),
    )
    .fails_with("no dataset named nope");
}
