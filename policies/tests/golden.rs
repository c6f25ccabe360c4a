//! Golden tables through the loader: grants x requests -> decision.

use escrow_policies::{ColumnUse, Decision, Grant, PolicyError, PolicySet, Usage};

fn grant(grantee: &str, owner: &str, dataset: &str, column: Option<&str>, usage: Usage) -> Grant {
    Grant {
        owner: owner.into(),
        dataset: dataset.into(),
        column: column.map(Into::into),
        grantee: grantee.into(),
        usage,
    }
}

fn use_of(owner: &str, dataset: &str, column: &str, usage: Usage) -> ColumnUse {
    ColumnUse {
        owner: owner.into(),
        dataset: dataset.into(),
        column: column.into(),
        usage,
    }
}

#[tokio::test]
async fn golden_decisions() {
    let set = PolicySet::build(vec![
        grant("globex", "acme", "accounts", Some("website"), Usage::Join),
        grant("globex", "acme", "accounts", Some("website"), Usage::Count),
        grant("globex", "acme", "accounts", None, Usage::Dimension),
        grant("*", "acme", "pipeline", Some("region"), Usage::Filter),
    ])
    .await
    .expect("valid set");
    // (subject, owner, dataset, column, usage, allowed?)
    let table: &[(&str, &str, &str, &str, Usage, bool)] = &[
        ("globex", "acme", "accounts", "website", Usage::Join, true),
        ("globex", "acme", "accounts", "website", Usage::Count, true),
        ("globex", "acme", "accounts", "website", Usage::Sum, false),
        (
            "globex",
            "acme",
            "accounts",
            "industry",
            Usage::Dimension,
            true,
        ),
        (
            "globex",
            "acme",
            "accounts",
            "website",
            Usage::Dimension,
            true,
        ), // column "*" covers it
        (
            "globex",
            "acme",
            "accounts",
            "industry",
            Usage::Filter,
            false,
        ),
        ("globex", "acme", "accounts2", "website", Usage::Join, false),
        ("initech", "acme", "accounts", "website", Usage::Join, false),
        ("initech", "acme", "pipeline", "region", Usage::Filter, true),
        ("globex", "acme", "pipeline", "region", Usage::Filter, true),
        (
            "globex",
            "acme",
            "pipeline",
            "region",
            Usage::Dimension,
            false,
        ),
        ("acme", "globex", "accounts", "website", Usage::Join, false), // grants are one-way
        ("acme", "acme", "accounts", "anything", Usage::Sum, true),    // own data
        ("globex", "acme", "accounts", "*", Usage::Join, false), // a literal "*" column is not a wildcard request
    ];
    for &(sub, owner, ds, col, usage, want) in table {
        let d = set
            .decide(sub, &use_of(owner, ds, col, usage))
            .expect("decide");
        assert_eq!(
            d.allowed(),
            want,
            "{sub} on {owner}.{ds}.{col} as {usage}: {d:?}"
        );
    }
    // the decision names the rule
    match set
        .decide(
            "globex",
            &use_of("acme", "accounts", "region", Usage::Dimension),
        )
        .expect("d")
    {
        Decision::Granted(g) => assert_eq!(
            g,
            grant("globex", "acme", "accounts", None, Usage::Dimension)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        set.decide("acme", &use_of("acme", "x", "y", Usage::Join))
            .expect("d"),
        Decision::Owner
    );
}

#[tokio::test]
async fn empty_policy_refuses_every_foreign_use() {
    let set = PolicySet::build(vec![]).await.expect("empty set");
    for usage in Usage::ALL {
        for col in ["website", "*", ""] {
            let d = set
                .decide("globex", &use_of("acme", "accounts", col, usage))
                .expect("decide");
            assert_eq!(d, Decision::Missing, "{col} {usage}");
        }
    }
}

#[tokio::test]
async fn one_bad_rule_rejects_the_whole_set() {
    let bad = [
        grant("globex", "acme", "Accounts", None, Usage::Join),
        grant("globex", "acme", "accounts", Some("a,b"), Usage::Join),
        grant("globex", "acme", "accounts", Some("*"), Usage::Join),
        grant("acme", "acme", "accounts", None, Usage::Join),
        grant("Glo bex", "acme", "accounts", None, Usage::Join),
        // standalone is about a whole dataset, never a column
        grant(
            "globex",
            "acme",
            "accounts",
            Some("website"),
            Usage::Standalone,
        ),
    ];
    for b in bad {
        let set = PolicySet::build(vec![
            grant("globex", "acme", "accounts", None, Usage::Count),
            b.clone(),
        ])
        .await;
        assert!(
            matches!(set, Err(PolicyError::InvalidRule(_))),
            "{b:?} accepted"
        );
    }
    assert!("select".parse::<Usage>().is_err());
    assert_eq!("avg".parse::<Usage>().expect("usage"), Usage::Avg);
}

#[tokio::test]
async fn casbin_lines_round_trip() {
    let g = grant("*", "acme", "accounts", Some("region"), Usage::Filter);
    assert_eq!(Grant::from_casbin(&g.to_casbin()).expect("parse"), g);
    let all = grant("globex", "acme", "accounts", None, Usage::Avg);
    assert_eq!(all.to_casbin()[3], "*");
    assert_eq!(Grant::from_casbin(&all.to_casbin()).expect("parse"), all);
    assert!(Grant::from_casbin(&["a".to_string()]).is_err());
}

#[tokio::test]
async fn standalone_is_its_own_dataset_wide_grant() {
    let set = PolicySet::build(vec![
        grant("globex", "acme", "directory", None, Usage::Standalone),
        grant("globex", "acme", "accounts", None, Usage::Join),
    ])
    .await
    .expect("set");
    let standalone = |d: &str| ColumnUse::dataset_wide("acme", d, Usage::Standalone);
    assert!(matches!(
        set.decide("globex", &standalone("directory")).expect("d"),
        Decision::Granted(g) if g.usage == Usage::Standalone
    ));
    // Every-column grants of other usages do not allow standalone use, nor the reverse.
    assert_eq!(
        set.decide("globex", &standalone("accounts")).expect("d"),
        Decision::Missing
    );
    assert_eq!(
        set.decide(
            "globex",
            &use_of("acme", "directory", "website", Usage::Join)
        )
        .expect("d"),
        Decision::Missing
    );
    assert_eq!(
        set.decide("initech", &standalone("directory")).expect("d"),
        Decision::Missing
    );
    assert_eq!(
        standalone("directory").to_string(),
        "acme.directory as standalone"
    );
}

#[tokio::test]
async fn overlap_grants_name_populations_not_columns() {
    let set = PolicySet::build(vec![
        grant(
            "globex",
            "acme",
            "accounts",
            Some("customers"),
            Usage::Overlap,
        ),
        grant("initech", "acme", "accounts", None, Usage::Overlap),
        grant("globex", "acme", "accounts", None, Usage::Dimension),
    ])
    .await
    .expect("set");
    let overlap = |who: &str, p: &str| {
        set.decide(who, &ColumnUse::overlap("acme", "accounts", p))
            .expect("d")
    };
    assert!(matches!(
        overlap("globex", "customers"),
        Decision::Granted(g) if g.column.as_deref() == Some("customers")
    ));
    // A grant of one population is not a grant of the others...
    assert_eq!(overlap("globex", "prospects"), Decision::Missing);
    // ...an every-population grant covers them all...
    assert!(overlap("initech", "prospects").allowed());
    // ...and an every-column grant of another usage is no overlap grant.
    assert_eq!(overlap("hooli", "customers"), Decision::Missing);
    assert_eq!(
        set.decide(
            "initech",
            &use_of("acme", "accounts", "industry", Usage::Dimension)
        )
        .expect("d"),
        Decision::Missing
    );
    assert_eq!(
        ColumnUse::overlap("acme", "accounts", "customers").to_string(),
        "population customers of acme.accounts as overlap"
    );
    let g = grant(
        "globex",
        "acme",
        "accounts",
        Some("customers"),
        Usage::Overlap,
    );
    assert_eq!(
        g.to_string(),
        "globex may see overlap counts of population customers of acme.accounts"
    );
    assert_eq!(Grant::from_casbin(&g.to_casbin()).expect("parse"), g);
    // Population names follow the naming rule.
    let bad = grant(
        "globex",
        "acme",
        "accounts",
        Some("Customers!"),
        Usage::Overlap,
    );
    assert!(bad.validate().is_err());
}
