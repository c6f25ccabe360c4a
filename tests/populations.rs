//! Populations: owners define named subsets of their datasets by a predicate over their own
//! columns; checked at definition, listed, removed, and gone with the dataset.

use crate::harness::{Env, accounts_csv};

#[test]
fn owners_define_list_and_remove_populations() {
    let env = Env::new();
    let server = env.serve(&[]);
    env.upload_csv(&server, "acme", "accounts", &accounts_csv(30, "a"))
        .ok();
    let add = |partner: &str, name: &str, filter: &str| {
        env.cli(
            &server,
            partner,
            &["population", "add", "accounts", name, "--filter", filter],
        )
    };
    let out = add("acme", "customers", "status = 'customer'").ok();
    assert!(
        out.stdout.starts_with("defined: accounts.customers"),
        "{}",
        out.stdout
    );
    add(
        "acme",
        "open",
        "status IN ('opportunity') AND arr_usd > 1000",
    )
    .ok();
    // The same definition again changes nothing; another filter under the name is a conflict.
    let again = add("acme", "customers", "status = 'customer'").ok();
    assert!(
        again.stdout.starts_with("already defined"),
        "{}",
        again.stdout
    );
    add("acme", "customers", "status = 'prospect'").fails_with("conflict");
    // Checked at definition: never the key column, one boolean over known columns.
    add(
        "acme",
        "target",
        "website = 'https://www.zyqxa1.example/about'",
    )
    .fails_with("population_names_key");
    add("acme", "bad", "status = 'a') OR (1 = 1").fails_with("invalid_filter");
    add("acme", "bad", "nope = 1").fails_with("invalid_filter");
    add("acme", "bad", "arr_usd").fails_with("invalid_filter");
    add(
        "acme",
        "bad",
        "status IN (SELECT status FROM acme.accounts)",
    )
    .fails_with("invalid_filter");
    add("acme", "Bad Name", "status = 'customer'").fails_with("invalid_name");
    // Only the owner defines populations of its datasets.
    add("globex", "customers", "status = 'customer'").fails_with("not_found");

    let list = env
        .cli(&server, "acme", &["population", "list", "--format", "json"])
        .ok();
    let v: serde_json::Value = serde_json::from_str(&list.stdout).expect("json");
    let names: Vec<(&str, i64)> = v["populations"]
        .as_array()
        .expect("array")
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["position"].as_i64().unwrap()))
        .collect();
    assert_eq!(names, [("customers", 1), ("open", 2)]);
    let theirs = env
        .cli(
            &server,
            "globex",
            &["population", "list", "--format", "json"],
        )
        .ok();
    assert!(
        theirs.stdout.contains("\"populations\": []"),
        "{}",
        theirs.stdout
    );

    env.cli(
        &server,
        "acme",
        &["population", "remove", "accounts", "open"],
    )
    .ok();
    env.cli(
        &server,
        "acme",
        &["population", "remove", "accounts", "open"],
    )
    .fails_with("not_found");
    // Deleting the dataset removes its populations.
    env.cli(&server, "acme", &["datasets", "delete", "accounts"])
        .ok();
    let list = env.cli(&server, "acme", &["population", "list"]).ok();
    assert!(list.stdout.contains("no populations"), "{}", list.stdout);
}
