//! Roles inside a partner: each role x each action, allowed or refused by the casbin role
//! policy; no role of one partner reaches another partner's rules or users.

use std::path::PathBuf;

use crate::harness::{Env, Run, accounts_csv, words};

const ROLES: [&str; 4] = ["admin", "compliance", "analyst", "uploader"];

/// acme's users, one per role (admin is the partner's first identity).
fn users(env: &Env) -> Vec<(&'static str, PathBuf)> {
    ROLES
        .iter()
        .map(|r| {
            let bundle = if *r == "admin" {
                env.bundle("acme")
            } else {
                env.add_user("acme", &format!("{r}_user"), r)
            };
            (*r, bundle)
        })
        .collect()
}

fn allowed_or_forbidden(run: Run, allowed: bool, what: &str, role: &str) {
    if allowed {
        assert_eq!(
            run.code,
            Some(0),
            "{role} should be allowed to {what}: {run:?}"
        );
    } else {
        let run = run.fails_with("forbidden");
        assert!(
            run.stderr.contains(&format!("role {role} of acme may not")),
            "the refusal names the role: {}",
            run.stderr
        );
    }
}

#[test]
fn each_role_may_do_exactly_what_the_role_policy_says() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.customers_shared(&server);
    let users = users(&env);
    let small = env.file("small.csv", accounts_csv(10, "r").as_bytes());
    // One dataset per role to delete, uploaded by the admin.
    for role in ROLES {
        env.upload(
            &server,
            "acme",
            &small,
            &format!("scratch_{role}"),
            &["--key-column", "website"],
        )
        .ok();
    }
    let may = |role: &str, allowed: &[&str]| allowed.contains(&role);
    for (role, bundle) in &users {
        let role = *role;
        let cli = |args: &[&str]| env.cli_as(&server, bundle, args);
        allowed_or_forbidden(
            cli(&["datasets", "--format", "json"]),
            true,
            "list datasets",
            role,
        );
        let dataset = format!("upload_{role}");
        allowed_or_forbidden(
            cli(&[
                "upload",
                small.to_str().expect("p"),
                "--dataset",
                &dataset,
                "--key-column",
                "website",
            ]),
            may(role, &["admin", "uploader"]),
            "upload",
            role,
        );
        allowed_or_forbidden(
            cli(&["datasets", "delete", &format!("scratch_{role}")]),
            may(role, &["admin", "uploader"]),
            "delete a dataset",
            role,
        );
        allowed_or_forbidden(
            cli(&["policy", "list", "--format", "json"]),
            may(role, &["admin", "compliance", "analyst"]),
            "read policies",
            role,
        );
        allowed_or_forbidden(
            cli(&words(
                "policy grant accounts --to globex --usage dimension --column region",
            )),
            may(role, &["admin", "compliance"]),
            "grant",
            role,
        );
        allowed_or_forbidden(
            cli(&["policy", "set", "accounts", "--min-entities", "5"]),
            may(role, &["admin", "compliance"]),
            "change settings",
            role,
        );
        allowed_or_forbidden(
            cli(&[
                "population",
                "add",
                "accounts",
                &format!("pop_{role}"),
                "--filter",
                "region = 'NA'",
            ]),
            may(role, &["admin", "compliance"]),
            "define a population",
            role,
        );
        allowed_or_forbidden(
            cli(&[
                "query",
                "SELECT region, COUNT(DISTINCT website) AS n FROM acme.accounts GROUP BY region",
            ]),
            may(role, &["admin", "analyst"]),
            "query",
            role,
        );
        allowed_or_forbidden(
            cli(&["overlap", "--with", "globex", "--format", "json"]),
            may(role, &["admin", "analyst"]),
            "ask for the overlap",
            role,
        );
        allowed_or_forbidden(
            cli(&["audit", "list", "--format", "json"]),
            may(role, &["admin", "compliance"]),
            "read the audit log",
            role,
        );
        let out = env.tmp.path().join(format!("new_{role}"));
        allowed_or_forbidden(
            cli(&[
                "user",
                "add",
                "acme",
                &format!("new_{role}"),
                "--role",
                "analyst",
                "--identity",
                bundle.to_str().expect("p"),
                "--server",
                &server.url,
                "--out",
                out.to_str().expect("p"),
            ]),
            may(role, &["admin"]),
            "add a user",
            role,
        );
    }
    // What the refused roles did not do did not happen.
    let names = env.dataset_names(&server, "acme");
    for role in ROLES {
        let uploads = may(role, &["admin", "uploader"]);
        assert_eq!(
            names.contains(&format!("upload_{role}")),
            uploads,
            "{names:?}"
        );
        assert_eq!(
            names.contains(&format!("scratch_{role}")),
            !uploads,
            "{names:?}"
        );
    }
    // The user the admin added through the API works, with its role.
    let new = env.tmp.path().join("new_admin");
    let who = env.cli_as(&server, &new, &["whoami"]).ok();
    assert!(
        who.stdout
            .contains("partner=acme user=new_admin role=analyst"),
        "{}",
        who.stdout
    );
}

#[test]
fn no_role_of_one_partner_reaches_another_partners_rules_or_users() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.customers_shared(&server);
    let globex_compliance = env.add_user("globex", "gina", "compliance");
    // acme grants globex a join on its accounts.
    env.cli(
        &server,
        "acme",
        &words("policy grant accounts --to globex --usage join --column website"),
    )
    .ok();
    // globex's compliance officer revokes "accounts" grants: that names globex's own
    // dataset, never acme's; acme's grant stays.
    env.cli_as(
        &server,
        &globex_compliance,
        &words("policy revoke accounts --to globex --usage join --column website"),
    )
    .fails_with("");
    let acme = env
        .cli(&server, "acme", &["policy", "list", "--format", "json"])
        .ok();
    let acme: serde_json::Value = serde_json::from_str(&acme.stdout).expect("json");
    assert!(
        acme["granted"]
            .as_array()
            .expect("a")
            .iter()
            .any(|g| g["usage"] == "join" && g["to"] == "globex"),
        "{acme}"
    );
    // Nor can it change acme's settings: `policy set accounts` is globex's own dataset.
    env.cli_as(
        &server,
        &globex_compliance,
        &["policy", "set", "accounts", "--min-entities", "50"],
    )
    .ok();
    let acme_settings = env
        .cli(&server, "acme", &["policy", "set", "accounts"])
        .ok();
    assert!(
        acme_settings.stdout.contains("min_entities=5 "),
        "{}",
        acme_settings.stdout
    );
    // globex's admin cannot add or revoke acme's users.
    let out = env.tmp.path().join("mallory");
    env.cli(
        &server,
        "globex",
        &[
            "user",
            "add",
            "acme",
            "mallory",
            "--role",
            "admin",
            "--identity",
            env.bundle("globex").to_str().expect("p"),
            "--server",
            &server.url,
            "--out",
            out.to_str().expect("p"),
        ],
    )
    .fails_with("forbidden");
    assert!(!out.exists());
    env.op(&["user", "add", "acme", "ann", "--role", "analyst"])
        .ok();
    env.cli(
        &server,
        "globex",
        &[
            "user",
            "revoke",
            "acme",
            "ann",
            "--identity",
            env.bundle("globex").to_str().expect("p"),
            "--server",
            &server.url,
        ],
    )
    .fails_with("forbidden");
    let ann = env.data.join("identities/acme/ann");
    env.cli_as(&server, &ann, &["whoami"]).ok();
    // Operator revocation works at once, and bad roles are refused with a clear code.
    env.op(&["user", "revoke", "acme", "ann"]).ok();
    env.cli_as(&server, &ann, &["whoami"]).fails_with("");
    env.op(&["user", "add", "acme", "bob", "--role", "root"])
        .fails_with("unknown role");
    env.op(&["user", "add", "acme", "admin", "--role", "analyst"])
        .fails_with("already has a user admin");
    env.op(&["user", "add", "nobody", "bob", "--role", "analyst"])
        .fails_with("no active partner");
}
