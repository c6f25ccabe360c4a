//! Policy commands: data owners grant and revoke column uses; grants are validated whole.

use crate::harness::{Env, Server, accounts_csv};

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
        &[
            "policy",
            "grant",
            "accounts",
            "--to",
            "globex",
            "--usage",
            "dimension",
        ],
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
        &[
            "policy", "revoke", "accounts", "--to", "globex", "--usage", "join", "--column",
            "website",
        ],
    )
    .ok();
    env.cli(
        &server,
        "acme",
        &[
            "policy", "revoke", "accounts", "--to", "globex", "--usage", "join", "--column",
            "website",
        ],
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
        &[
            "policy", "grant", "accounts", "--to", "acme", "--usage", "join",
        ],
    )
    .fails_with("not_found");

    // deleting the dataset removes the consent given for it
    env.cli(&server, "acme", &["datasets", "delete", "accounts"])
        .ok();
    let after = policies(&env, &server, "globex");
    assert_eq!(after["received"].as_array().expect("a").len(), 0, "{after}");
}
