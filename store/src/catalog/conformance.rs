//! The catalog's conformance suite: every behaviour the service relies on, run against both
//! backends (a SQLite file, and a PostgreSQL database of the test's own). Where several
//! nodes matter, two handles on one catalog stand for two nodes.

use std::sync::Arc;

use escrow_policies::{Grant, Usage};

use super::testdb::TestDatabase;
use super::*;

enum Fixture {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

impl Fixture {
    /// A new handle on the fixture's catalog (another node, for PostgreSQL; another
    /// process's connection, for SQLite).
    fn open(&self) -> Catalog {
        match self {
            Fixture::Sqlite(dir) => Catalog::open(&dir.path().join("escrow.db")).expect("open"),
            Fixture::Postgres(db) => Catalog::connect(db.url()).expect("connect"),
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&super::Fixture::Sqlite(tempfile::tempdir().expect("tmp")));
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                super::$name(&super::Fixture::Postgres(super::TestDatabase::new()));
            })*
        }
    };
}

conformance!(
    schema_is_applied_once_and_reopening_changes_nothing,
    partners_identities_and_the_crl,
    invitations_enroll_once_and_renewals_replace,
    a_failed_transaction_leaves_nothing_behind,
    versions_keys_and_deletion_with_everything_derived,
    grants_settings_populations_and_policy_versions,
    the_budget_is_spent_once_under_concurrent_nodes,
    released_answers_and_overlaps,
    console_tokens_expire_are_single_use_and_capped,
    key_rotation_rewraps_every_data_key,
    the_audit_anchor_moves_only_with_its_transaction,
    every_change_a_question_reads_moves_a_generation,
);

fn grant(owner: &str, dataset: &str, column: Option<&str>, grantee: &str, usage: Usage) -> Grant {
    Grant {
        owner: owner.into(),
        dataset: dataset.into(),
        column: column.map(Into::into),
        grantee: grantee.into(),
        usage,
    }
}

/// Protection settings (JSON) with `epsilon`, the rest default.
fn settings(epsilon: f64) -> String {
    serde_json::to_string(&crate::model::settings::DatasetSettings {
        epsilon,
        ..Default::default()
    })
    .expect("json")
}

fn version(dataset_id: &str, version_id: &str, rows: i64) -> NewVersion {
    NewVersion {
        dataset_id: dataset_id.into(),
        version_id: version_id.into(),
        rows,
        source_bytes: 10 * rows,
        sealed_bytes: 12 * rows,
        format: "csv".into(),
        columns: vec![ColumnInfo {
            name: "website".into(),
            data_type: "Utf8".into(),
            nullable: true,
        }],
        key_column: Some("website".into()),
        uploaded_by: "admin".into(),
        matching: Some(crate::matching::MatchStats {
            by_domain: 3,
            by_name: 2,
            unmatched: 1,
        }),
    }
}

/// `owner` with a dataset `name` holding one version; returns the dataset id.
fn dataset(c: &Catalog, owner: &str, name: &str) -> String {
    if !c
        .partners()
        .expect("partners")
        .iter()
        .any(|(p, _)| p == owner)
    {
        c.write(|tx| identities::add_partner(tx, owner))
            .expect("partner");
    }
    c.ensure_current_kek("kek-1").expect("kek");
    let id = c
        .dataset_id_for_upload(owner, name, &format!("id-{owner}-{name}"))
        .expect("id");
    c.write(|tx| {
        datasets::commit_version(
            tx,
            &version(&id, &format!("v-{owner}-{name}-1"), 6),
            |kek| Ok(format!("wrapped under {kek}").into_bytes()),
        )
    })
    .expect("commit");
    id
}

fn schema_is_applied_once_and_reopening_changes_nothing(f: &Fixture) {
    let c = f.open();
    c.write(|tx| identities::add_partner(tx, "acme"))
        .expect("partner");
    let version = |c: &Catalog| -> i64 {
        c.read(|tx| tx.value("SELECT version FROM schema_version WHERE id = 1", params![]))
            .expect("version")
    };
    assert_eq!(version(&c), 6);
    // One id, kept once given.
    assert_eq!(c.id().expect("id"), None);
    let id = c.bind_new_id().expect("bind");
    assert_eq!(f.open().bind_new_id().expect("again"), id);
    drop(c);
    let again = f.open();
    assert_eq!(version(&again), 6);
    assert_eq!(again.id().expect("id"), Some(id));
    assert_eq!(
        again.partners().expect("partners"),
        vec![("acme".into(), true)]
    );
    // The CRL starts at number 1, once.
    assert_eq!(again.revocations().expect("crl").1, 1);
}

fn partners_identities_and_the_crl(f: &Fixture) {
    let c = f.open();
    c.write(|tx| identities::add_partner(tx, "acme"))
        .expect("acme");
    c.write(|tx| identities::add_partner(tx, "globex"))
        .expect("globex");
    assert!(matches!(
        c.write(|tx| identities::add_partner(tx, "acme")),
        Err(Error::Conflict(_))
    ));
    c.write(|tx| identities::add_identity(tx, "0a", "acme", "admin", "admin"))
        .expect("id");
    c.write(|tx| identities::add_identity(tx, "0b", "acme", "ana", "analyst"))
        .expect("id");
    c.write(|tx| identities::add_identity(tx, "0c", "globex", "admin", "admin"))
        .expect("id");
    let roles = c.role_assignments().expect("roles");
    assert_eq!(
        roles
            .iter()
            .map(|r| (r.partner.as_str(), r.user.as_str(), r.role.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("acme", "admin", "admin"),
            ("acme", "ana", "analyst"),
            ("globex", "admin", "admin")
        ]
    );
    let identities = |c: &Catalog| {
        let g = c.generations().expect("generations").identities;
        (g.0, g.1)
    };
    assert_eq!(identities(&c), (3, 0));
    // Read with the generations, in one statement: the same as read alone.
    let (ana, at) = c.active_identity("0b").expect("active");
    assert_eq!(at, c.generations().expect("generations"));
    assert_eq!(
        ana,
        Some(IdentityRow {
            partner: "acme".into(),
            user: "ana".into(),
            role: "analyst".into()
        })
    );
    assert!(c.user_is_active("acme", "ana").expect("active"));

    // Another node sees a revocation at once, with the CRL that lists it.
    let other = f.open();
    let (crl, number) = c
        .write(|tx| identities::revoke_user(tx, "acme", "ana"))
        .expect("revoke");
    assert_eq!((crl.len(), number), (1, 2));
    let (gone, at) = other.active_identity("0b").expect("gone");
    assert_eq!((gone, at.identities.1), (None, 1));
    assert!(!other.user_is_active("acme", "ana").expect("inactive"));
    assert_eq!(other.revocations().expect("crl").0[0].0, "0b");
    assert!(matches!(
        c.write(|tx| identities::revoke_user(tx, "acme", "ana")),
        Err(Error::NotFound(_))
    ));

    let (crl, number) = other
        .write(|tx| identities::revoke_partner(tx, "acme"))
        .expect("revoke partner");
    assert_eq!((crl.len(), number), (2, 3));
    assert!(!c.partner_is_active("acme").expect("inactive"));
    assert_eq!(c.active_identity("0a").expect("gone").0, None);
    assert!(matches!(
        c.write(|tx| identities::revoke_partner(tx, "acme")),
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        c.write(|tx| identities::revoke_partner(tx, "nobody")),
        Err(Error::NotFound(_))
    ));
    // Revoked names are not reused.
    assert!(matches!(
        c.write(|tx| identities::add_partner(tx, "acme")),
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        c.partners().expect("partners"),
        vec![("acme".into(), false), ("globex".into(), true)]
    );
    assert_eq!(identities(&c), (3, 2));
}

fn invitations_enroll_once_and_renewals_replace(f: &Fixture) {
    let c = f.open();
    let other = f.open();
    c.write(|tx| identities::add_partner(tx, "acme"))
        .expect("acme");
    let invitation = |id: &str, user: &str| identities::Invitation {
        id: id.into(),
        partner: "acme".into(),
        user: user.into(),
        role: "analyst".into(),
        cert_days: 90,
        expires_at: OffsetDateTime::now_utc() + time::Duration::hours(1),
        closed: None,
        refusals: 0,
    };
    let operator = (None, "operator");
    let replaced = c
        .write(|tx| identities::invite(tx, &invitation("i1", "ana"), "d1", operator))
        .expect("invite");
    assert!(replaced.is_empty());
    // A newer invitation for the same identity closes the older one.
    let replaced = c
        .write(|tx| identities::invite(tx, &invitation("i2", "ana"), "d2", operator))
        .expect("invite again");
    assert_eq!(replaced, vec!["i1".to_string()]);
    let i1 = other.invitation("d1").expect("read").expect("known");
    assert_eq!(i1.closed.as_deref(), Some("replaced"));
    let i2 = other.invitation("d2").expect("read").expect("known");
    assert_eq!(
        (
            i2.id.as_str(),
            i2.user.as_str(),
            i2.cert_days,
            i2.closed,
            i2.refusals
        ),
        ("i2", "ana", 90, None, 0)
    );
    let refused = |c: &Catalog| {
        c.write(|tx| identities::count_refusal(tx, "i2"))
            .expect("count")
    };
    assert_eq!((refused(&c), refused(&other)), (1, 2));
    let expiry = invitation("i2", "ana").expires_at - i2.expires_at;
    assert!(expiry.abs() < time::Duration::seconds(5), "{expiry}");
    assert_eq!(other.invitation("nothing").expect("read"), None);

    // Single use, across nodes: the second taker finds it closed, and nothing of its
    // transaction stays.
    let who = c
        .write(|tx| identities::enroll(tx, "i2", "0a"))
        .expect("enroll");
    assert_eq!((who.user.as_str(), who.role.as_str()), ("ana", "analyst"));
    assert!(matches!(
        other.write(|tx| identities::enroll(tx, "i2", "0b")),
        Err(Error::Unauthenticated(_))
    ));
    assert_eq!(other.active_identity("0b").expect("read").0, None);
    assert_eq!(
        other
            .invitation("d2")
            .expect("read")
            .expect("known")
            .closed
            .as_deref(),
        Some("enrolled")
    );
    // An enrolled user cannot be invited again before it is revoked.
    assert!(matches!(
        c.write(|tx| identities::invite(tx, &invitation("i3", "ana"), "d3", operator)),
        Err(Error::Conflict(_))
    ));

    // A renewal registers the new serial and lists the identity once; the old is accepted
    // for a grace day, and cannot renew again; the identity renews at most once an hour.
    let renewed = other
        .write(|tx| identities::renew(tx, "0a", "0c"))
        .expect("renew");
    assert_eq!(renewed.user, "ana");
    assert!(c.active_identity("0a").expect("old").0.is_some());
    assert!(c.active_identity("0c").expect("new").0.is_some());
    assert!(matches!(
        c.write(|tx| identities::renew(tx, "0a", "0x")),
        Err(Error::Conflict(m)) if m.contains("renewed already")
    ));
    assert!(matches!(
        c.write(|tx| identities::renew(tx, "0c", "0x")),
        Err(Error::Conflict(m)) if m.contains("less than an hour")
    ));
    assert_eq!(c.active_identity("0x").expect("none").0, None);
    // Past the grace day (the renewal moved back in time), the old one is refused and the
    // new one renews.
    c.write(|tx| {
        tx.execute(
            "UPDATE identities SET replaced_ms = ?2 WHERE serial = ?1",
            params!["0a", 1_i64],
        )
    })
    .expect("age");
    assert_eq!(other.active_identity("0a").expect("old").0, None);
    assert!(other.active_identity("0c").expect("new").0.is_some());
    let users = |c: &Catalog| {
        c.role_assignments()
            .expect("roles")
            .into_iter()
            .map(|r| r.user)
            .collect::<Vec<_>>()
    };
    assert_eq!(users(&c), vec!["ana".to_string()]);
    // A revoked certificate cannot renew; revoking the user ends every certificate of it
    // and its open invitations.
    // ana invites bob: revoking ana withdraws it.
    c.write(|tx| identities::invite(tx, &invitation("i4", "bob"), "d4", (Some("acme"), "ana")))
        .expect("invite bob");
    let (crl, _) = c
        .write(|tx| identities::revoke_user(tx, "acme", "ana"))
        .expect("revoke");
    assert_eq!(crl.len(), 2, "the renewed certificate and its predecessor");
    assert!(matches!(
        c.write(|tx| identities::renew(tx, "0c", "0d")),
        Err(Error::Unauthenticated(_))
    ));
    assert_eq!(
        c.invitation("d4")
            .expect("read")
            .expect("known")
            .closed
            .as_deref(),
        Some("revoked"),
        "what a revoked identity invited goes with it"
    );
    // Revoking a user who is only invited withdraws the invitation.
    c.write(|tx| identities::invite(tx, &invitation("i5", "cy"), "d5", operator))
        .expect("invite cy");
    c.write(|tx| identities::revoke_user(tx, "acme", "cy"))
        .expect("revoke an invited user");
    assert_eq!(
        c.invitation("d5")
            .expect("read")
            .expect("known")
            .closed
            .as_deref(),
        Some("revoked")
    );
    assert!(matches!(
        c.write(|tx| identities::revoke_user(tx, "acme", "bob")),
        Err(Error::NotFound(_))
    ));
    assert!(users(&c).is_empty());
}

fn a_failed_transaction_leaves_nothing_behind(f: &Fixture) {
    let c = f.open();
    let failed = c.write(|tx| {
        identities::add_partner(tx, "acme")?;
        Err::<(), _>(Error::AuditUnavailable("disk".into()))
    });
    assert!(matches!(failed, Err(Error::AuditUnavailable(_))));
    assert!(c.partners().expect("partners").is_empty());
    // A panic inside a transaction rolls it back too, and the catalog keeps working.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.write(|tx| -> Result<()> {
            identities::add_partner(tx, "acme")?;
            panic!("audit writer crashed")
        })
    }));
    assert!(panicked.is_err());
    assert!(c.partners().expect("partners").is_empty());
    c.write(|tx| identities::add_partner(tx, "acme"))
        .expect("after");
    assert_eq!(c.partners().expect("partners").len(), 1);

    // Statements run at the commit: one that fails fails the commit, and nothing of the
    // transaction stays; a transaction that fails before its commit never runs them.
    let insert = "INSERT INTO partners (name, created_at) VALUES (?1, ?2)";
    let at_commit = |name: &str| {
        vec![(
            insert.to_string(),
            vec![Value::from(name), Value::from("2026-01-01T00:00:00Z")],
        )]
    };
    let failed = c.write(|tx| {
        identities::add_partner(tx, "globex")?;
        tx.execute_at_commit(at_commit("acme"))
    });
    assert!(failed.is_err(), "a duplicate partner at the commit");
    assert_eq!(c.partners().expect("partners").len(), 1);
    let failed = c.write(|tx| {
        tx.execute_at_commit(at_commit("initech"))?;
        Err::<(), _>(Error::internal("the change fails before its commit"))
    });
    assert!(failed.is_err());
    assert_eq!(c.partners().expect("partners").len(), 1);
    c.write(|tx| tx.execute_at_commit(at_commit("initech")))
        .expect("alone");
    c.write(|tx| {
        identities::add_partner(tx, "globex")?;
        tx.execute_at_commit(at_commit("hooli"))
    })
    .expect("with others");
    assert_eq!(c.partners().expect("partners").len(), 4);
}

fn versions_keys_and_deletion_with_everything_derived(f: &Fixture) {
    let c = f.open();
    let id = dataset(&c, "acme", "accounts");
    // The same name keeps its id; a second version becomes the live one.
    assert_eq!(
        c.dataset_id_for_upload("acme", "accounts", "other")
            .expect("id"),
        id
    );
    let n = c
        .write(|tx| datasets::commit_version(tx, &version(&id, "v-2", 9), |_| Ok(vec![7; 40])))
        .expect("v2");
    assert_eq!(n, 2);
    let live = c.list_datasets("acme").expect("list");
    assert_eq!((live.len(), live[0].version, live[0].rows), (1, 2, 9));
    assert_eq!(live[0].columns[0].name, "website");
    let versions = c.dataset_versions("acme", "accounts").expect("versions");
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(versions[0].matching.map(|m| m.by_name), Some(2));
    let keys = c.version_keys("acme", "accounts").expect("keys");
    assert_eq!(keys[0].wrapped_dek, vec![7; 40]);
    assert_eq!(keys[1].wrapped_dek, b"wrapped under kek-1".to_vec());
    assert_eq!(c.all_version_ids().expect("ids").len(), 2);
    assert_eq!(c.kek_ids_in_use().expect("keks"), vec!["kek-1".to_string()]);

    // Visible to its owner and, once granted, to the grantee only.
    c.write(|tx| identities::add_partner(tx, "globex"))
        .expect("globex");
    c.write(|tx| identities::add_partner(tx, "initech"))
        .expect("initech");
    assert_eq!(c.queryable("globex").expect("q").len(), 0);
    c.write(|tx| {
        policy::add_grant(
            tx,
            &grant("acme", "accounts", Some("website"), "globex", Usage::Join),
            "admin",
        )
    })
    .expect("grant");
    let q = c.queryable("globex").expect("q");
    assert_eq!((q.len(), q[0].live.version, q[0].rows), (1, 2, 9));
    assert!(c.queryable("initech").expect("q").is_empty());

    // Deleting takes versions, keys, grants, settings, populations and answers with it.
    c.write(|tx| policy::put_settings_json(tx, "acme", "accounts", &settings(0.5), "admin"))
        .expect("settings");
    c.keep_answer("globex", "fp", &["v-2".into()], b"answer")
        .expect("keep");
    c.keep_answer("globex", "other", &["v-unrelated".into()], b"kept")
        .expect("keep");
    let gone = c
        .write(|tx| datasets::delete_dataset(tx, "acme", "accounts", "admin"))
        .expect("delete");
    assert_eq!((gone.dataset_id, gone.versions), (id, 2));
    assert!(gone.policy.is_some(), "the policy changed");
    assert!(c.list_datasets("acme").expect("list").is_empty());
    assert!(c.version_keys("acme", "accounts").expect("keys").is_empty());
    assert!(c.queryable("globex").expect("q").is_empty());
    assert_eq!(c.settings_json("acme", "accounts").expect("settings"), None);
    assert_eq!(c.released_answer("globex", "fp").expect("answer"), None);
    assert_eq!(
        c.released_answer("globex", "other").expect("answer"),
        Some(b"kept".to_vec())
    );
    assert!(matches!(
        c.write(|tx| datasets::delete_dataset(tx, "acme", "accounts", "admin")),
        Err(Error::NotFound(_))
    ));
    // An upload whose dataset was deleted meanwhile is refused; its empty row goes at startup.
    let fresh = c
        .dataset_id_for_upload("acme", "later", "id-later")
        .expect("id");
    // Not yet, when it may be another node's upload in progress; then it goes.
    assert_eq!(
        c.remove_empty_datasets(Some("2000-01-01T00:00:00Z"))
            .expect("young"),
        0
    );
    assert_eq!(c.remove_empty_datasets(None).expect("cleanup"), 1);
    assert!(matches!(
        c.write(|tx| datasets::commit_version(tx, &version(&fresh, "v-x", 1), |_| Ok(vec![1]))),
        Err(Error::Conflict(_))
    ));
}

fn grants_settings_populations_and_policy_versions(f: &Fixture) {
    let c = f.open();
    dataset(&c, "acme", "accounts");
    c.write(|tx| identities::add_partner(tx, "globex"))
        .expect("globex");
    let g = grant("acme", "accounts", Some("website"), "globex", Usage::Join);
    // Another node sees the policy move (and rebuilds its policy set from it).
    let other = f.open();
    let before = other.generations().expect("generation").policy;
    let (new, v) = c
        .write(|tx| policy::add_grant(tx, &g, "admin"))
        .expect("grant");
    assert!(new);
    assert_eq!(v.map(|v| v.version), Some(1));
    let after = other.generations().expect("generation").policy;
    assert!(after > before);
    let (new, v) = c
        .write(|tx| policy::add_grant(tx, &g, "admin"))
        .expect("again");
    assert!(!new && v.is_none());
    assert_eq!(other.generations().expect("unchanged").policy, after);
    let every = grant("acme", "accounts", None, "*", Usage::Count);
    c.write(|tx| policy::add_grant(tx, &every, "admin"))
        .expect("grant");
    let (made, received) = c.grants_of("acme").expect("of acme");
    assert_eq!((made.len(), received.len()), (2, 0));
    let (made, received) = c.grants_of("globex").expect("of globex");
    assert_eq!((made.len(), received.len()), (0, 2));
    assert_eq!(c.all_grants().expect("all").len(), 2);

    c.write(|tx| policy::put_settings_json(tx, "acme", "accounts", &settings(0.5), "admin"))
        .expect("settings");
    assert_eq!(
        c.settings_json("acme", "accounts").expect("settings"),
        Some(settings(0.5))
    );

    let p = |name: &str, filter: &str| Population {
        owner: "acme".into(),
        dataset: "accounts".into(),
        name: name.into(),
        filter: filter.into(),
        position: 0,
    };
    assert_eq!(
        c.write(|tx| policy::add_population(tx, &p("customers", "status = 'c'"), "admin"))
            .expect("add")
            .0,
        (1, true)
    );
    assert_eq!(
        c.write(|tx| policy::add_population(tx, &p("prospects", "status = 'p'"), "admin"))
            .expect("add")
            .0,
        (2, true)
    );
    assert_eq!(
        c.write(|tx| policy::add_population(tx, &p("customers", "status = 'c'"), "admin"))
            .expect("same")
            .0,
        (1, false)
    );
    assert!(matches!(
        c.write(|tx| policy::add_population(tx, &p("customers", "status = 'x'"), "admin")),
        Err(Error::Conflict(_))
    ));
    let overlap = grant(
        "acme",
        "accounts",
        Some("customers"),
        "globex",
        Usage::Overlap,
    );
    c.write(|tx| policy::add_grant(tx, &overlap, "admin"))
        .expect("overlap grant");
    assert!(
        c.write(|tx| policy::remove_population(tx, "acme", "accounts", "customers", "admin"))
            .expect("remove")
            .0
    );
    assert!(
        !c.write(|tx| policy::remove_population(tx, "acme", "accounts", "customers", "admin"))
            .expect("none")
            .0
    );
    // Its overlap grant went with it.
    assert!(!c.all_grants().expect("all").contains(&overlap));
    assert_eq!(
        c.populations_of("acme")
            .expect("pops")
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        vec!["prospects"]
    );
    assert!(
        c.write(|tx| policy::remove_grant(tx, &every, "admin"))
            .expect("revoke")
            .0
    );
    assert!(
        !c.write(|tx| policy::remove_grant(tx, &every, "admin"))
            .expect("none")
            .0
    );

    let history = c.policy_history("acme").expect("history");
    let changes: Vec<&str> = history.iter().map(|h| h.change.as_str()).collect();
    assert_eq!(
        changes,
        vec![
            "grant",
            "grant",
            "settings",
            "population_add",
            "population_add",
            "grant",
            "population_remove",
            "revoke"
        ]
    );
    assert_eq!(
        history.iter().map(|h| h.version).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let (latest, text) = c.policy_text("acme", None).expect("text");
    assert_eq!(latest, 8);
    assert_eq!(c.policy_text("acme", Some(8)).expect("v8").1, text);
    assert_eq!(
        c.policy_text("acme", Some(0)).expect("v0"),
        (0, String::new())
    );
    assert!(matches!(
        c.policy_text("acme", Some(99)),
        Err(Error::NotFound(_))
    ));
    // Rolling back to version 1 restores exactly its document, as a new version.
    let (_, v1) = c.policy_text("acme", Some(1)).expect("v1");
    let doc = crate::model::policy::PolicyDocument::parse("acme", &v1).expect("parse");
    let v = c
        .write(|tx| policy::replace_policy(tx, &doc, "admin", "rollback"))
        .expect("rollback");
    assert_eq!(v.map(|v| v.version), Some(9));
    assert_eq!(c.policy_text("acme", None).expect("now").1, v1);
    assert!(c.populations_of("acme").expect("pops").is_empty());
    assert_eq!(c.settings_json("acme", "accounts").expect("settings"), None);
    assert_eq!(
        c.write(|tx| policy::replace_policy(tx, &doc, "admin", "again"))
            .expect("same")
            .map(|v| v.version),
        None
    );
}

fn the_budget_is_spent_once_under_concurrent_nodes(f: &Fixture) {
    let charge = |budget: f64| BudgetCharge {
        owner: "acme".into(),
        dataset: "accounts".into(),
        budget,
    };
    let c = f.open();
    // A dry run spends nothing.
    let dry = c
        .spend("globex", &[charge(2.0)], 1.0, "q0", true, None)
        .expect("dry");
    assert!(matches!(dry, Spend::Charged { new: true, .. }));
    assert_eq!(c.spent("globex", "acme").expect("spent"), 0.0);
    // Four distinct questions at ε = 1 fit a budget of 2 (√4); four nodes race to ask
    // sixteen (eight distinct): exactly four are charged, each once, whichever node asked.
    // A hundred races, each by a partner of its own, then the one examined below.
    let nodes: Vec<Arc<Catalog>> = (0..4).map(|_| Arc::new(f.open())).collect();
    let race = |who: &str| -> Vec<Spend> {
        let mut threads = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            for j in 0..4 {
                let (node, who) = (Arc::clone(node), who.to_string());
                threads.push(std::thread::spawn(move || {
                    let q = format!("q{}", (i + j) % 8);
                    let versions = vec![format!("v-{q}")];
                    let running = Some((versions.as_slice(), b"running".as_slice()));
                    node.spend(&who, &[charge(2.0)], 1.0, &q, false, running)
                        .expect("spend")
                }));
            }
        }
        let outcomes: Vec<Spend> = threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let charged = outcomes
            .iter()
            .filter(|s| matches!(s, Spend::Charged { new: true, .. }))
            .count();
        assert_eq!(charged, 4, "{who}: {outcomes:?}");
        let spent = c.spent(who, "acme").expect("spent");
        assert!((spent - 2.0).abs() < 1e-9, "{who} spent {spent}");
        outcomes
    };
    for round in 0..100 {
        race(&format!("racer{round}"));
    }
    race("globex");
    let paid: i64 = c
        .read(|tx| {
            tx.value(
                "SELECT COUNT(*) FROM privacy_ledger WHERE partner = ?1",
                params!["globex"],
            )
        })
        .expect("ledger");
    assert_eq!(paid, 4);
    // Each new charge was marked as running in its own transaction, and only those: the
    // same question asked again at once finds it paid and marked, never unmarked.
    let marked: Vec<String> = c
        .read(|tx| {
            tx.column(
                "SELECT fingerprint FROM released_answers WHERE answer = ?1 AND partner = ?2
                 ORDER BY fingerprint",
                params![b"running".as_slice(), "globex"],
            )
        })
        .expect("marked");
    let charged: Vec<String> = c
        .read(|tx| {
            tx.column(
                "SELECT fingerprint FROM privacy_ledger WHERE partner = ?1 ORDER BY fingerprint",
                params!["globex"],
            )
        })
        .expect("charged");
    assert_eq!(marked, charged);
    // A question already paid for is free; a new one is refused with what was spent.
    let paid_fp: String = c
        .read(|tx| {
            tx.value(
                "SELECT fingerprint FROM privacy_ledger WHERE partner = ?1
                 ORDER BY fingerprint LIMIT 1",
                params!["globex"],
            )
        })
        .expect("fp");
    // The read that finds it paid brings what is kept for it (here its running marker).
    match c
        .spend("globex", &[charge(2.0)], 1.0, &paid_fp, false, None)
        .expect("again")
    {
        Spend::Charged {
            new: false, kept, ..
        } => {
            assert_eq!(kept, Some(Some(b"running".to_vec())))
        }
        other => panic!("{other:?}"),
    }
    match c
        .spend("globex", &[charge(2.0)], 1.0, "q-new", false, None)
        .expect("over")
    {
        Spend::Exhausted { spent, .. } => assert!((spent - 2.0).abs() < 1e-9),
        other => panic!("{other:?}"),
    }
    // All or nothing across owners: a question over one owner's budget charges no owner.
    let other_owner = BudgetCharge {
        owner: "initech".into(),
        dataset: "deals".into(),
        budget: 0.5,
    };
    let refused = c
        .spend(
            "hooli",
            &[charge(2.0), other_owner],
            1.0,
            "q-both",
            false,
            None,
        )
        .expect("both");
    assert!(matches!(refused, Spend::Exhausted { .. }), "{refused:?}");
    assert_eq!(c.spent("hooli", "acme").expect("spent"), 0.0);
    assert_eq!(c.spent("hooli", "initech").expect("spent"), 0.0);
    // Paid with nothing kept (charged before answers were kept): read as nothing; a new
    // charge reads nothing kept.
    let spend = |fp: &str| {
        c.spend("umbrella", &[charge(2.0)], 1.0, fp, false, None)
            .expect("spend")
    };
    assert!(
        matches!(
            spend("q-unkept"),
            Spend::Charged {
                new: true,
                kept: None,
                ..
            }
        ),
        "new"
    );
    assert!(
        matches!(
            spend("q-unkept"),
            Spend::Charged {
                new: false,
                kept: Some(None),
                ..
            }
        ),
        "paid"
    );
}

fn released_answers_and_overlaps(f: &Fixture) {
    let c = f.open();
    assert_eq!(c.released_answer("globex", "fp").expect("none"), None);
    c.keep_answer("globex", "fp", &["a".into(), "b".into()], b"one")
        .expect("keep");
    c.keep_answer("globex", "fp", &["a".into(), "b".into()], b"two")
        .expect("replace");
    assert_eq!(
        c.released_answer("globex", "fp").expect("kept"),
        Some(b"two".to_vec())
    );
    assert_eq!(c.released_answer("acme", "fp").expect("not acme's"), None);
    for (mine, versions) in [
        ("acme.a@v1", "v1"),
        ("acme.a@v2", "v2"),
        ("acme.a@v2", "v2"),
    ] {
        c.keep_overlap(
            "acme",
            "globex",
            mine,
            "globex.b@v1",
            "fp",
            &[versions.into(), "w1".into()],
            "[]",
        )
        .expect("overlap");
    }
    let history = c.released_overlaps("acme", "globex").expect("history");
    assert_eq!(
        history.iter().map(|h| h.1.as_str()).collect::<Vec<_>>(),
        vec!["acme.a@v1", "acme.a@v2"]
    );
    assert!(
        c.released_overlaps("globex", "acme")
            .expect("other way")
            .is_empty()
    );
}

fn console_tokens_expire_are_single_use_and_capped(f: &Fixture) {
    let c = f.open();
    let rules = TokenRules {
        idle_ms: 1_000,
        absolute_ms: 10_000,
        per_identity: 2,
        per_partner: 3,
        max: 4,
        touch_ms: 0,
    };
    let who = |serial: &str| ConsoleIdentity {
        serial: serial.into(),
        partner: "acme".into(),
        user: "ana".into(),
    };
    assert_eq!(
        c.console_token_insert("session", "d1", &who("s1"), 0, &rules)
            .expect("d1"),
        TokenKept::Kept
    );
    assert_eq!(
        c.console_token_insert("session", "d2", &who("s1"), 10, &rules)
            .expect("d2"),
        TokenKept::Kept
    );
    // A third for the same identity drops its least recently used.
    assert_eq!(
        c.console_token_insert("session", "d3", &who("s1"), 20, &rules)
            .expect("d3"),
        TokenKept::Kept
    );
    assert_eq!(
        c.console_token("session", "d1", 30, &rules, TokenUse::Peek)
            .expect("d1"),
        None
    );
    assert_eq!(
        c.console_token("session", "d2", 30, &rules, TokenUse::Touch)
            .expect("d2"),
        Some(who("s1"))
    );
    assert_eq!(
        c.console_token_insert("session", "d4", &who("s2"), 40, &rules)
            .expect("d4"),
        TokenKept::Kept
    );
    // The partner is full: nobody's is dropped, its new one is refused; another partner's
    // is kept, until the kind is full.
    assert_eq!(
        c.console_token_insert("session", "d5", &who("s3"), 50, &rules)
            .expect("partner full"),
        TokenKept::PartnerFull
    );
    let globex = |serial: &str| ConsoleIdentity {
        partner: "globex".into(),
        ..who(serial)
    };
    assert_eq!(
        c.console_token_insert("session", "g1", &globex("s5"), 50, &rules)
            .expect("globex"),
        TokenKept::Kept
    );
    assert_eq!(
        c.console_token_insert("session", "g2", &globex("s6"), 50, &rules)
            .expect("full"),
        TokenKept::Full
    );
    // Idle past its limit (d3 last seen at 20): ended, and dropped.
    assert_eq!(
        c.console_token("session", "d3", 1_020, &rules, TokenUse::Peek)
            .expect("idle"),
        None
    );
    // Another node takes a link once.
    assert_eq!(
        c.console_token_insert("link", "l1", &who("s1"), 0, &rules)
            .expect("link"),
        TokenKept::Kept
    );
    let other = f.open();
    assert_eq!(
        other
            .console_token("link", "l1", 5, &rules, TokenUse::Take)
            .expect("take"),
        Some(who("s1"))
    );
    assert_eq!(
        c.console_token("link", "l1", 6, &rules, TokenUse::Take)
            .expect("used"),
        None
    );
    c.console_token_end("session", "d4").expect("logout");
    assert_eq!(
        other
            .console_token("session", "d4", 50, &rules, TokenUse::Peek)
            .expect("ended"),
        None
    );
    // Past the absolute limit even when kept busy.
    assert_eq!(
        c.console_token_insert("session", "d6", &who("s4"), 100, &rules)
            .expect("d6"),
        TokenKept::Kept
    );
    for t in (600..10_100).step_by(500) {
        c.console_token("session", "d6", t, &rules, TokenUse::Touch)
            .expect("touch");
    }
    assert_eq!(
        c.console_token("session", "d6", 10_100, &rules, TokenUse::Peek)
            .expect("absolute"),
        None
    );
}

fn key_rotation_rewraps_every_data_key(f: &Fixture) {
    let c = f.open();
    dataset(&c, "acme", "a");
    dataset(&c, "acme", "b");
    assert_eq!(c.ensure_current_kek("kek-other").expect("kept"), "kek-1");
    assert!(matches!(
        c.write(|tx| keys::rewrap_all(tx, "kek-0", "kek-2", |_, _, w| Ok(w.to_vec()))),
        Err(Error::Conflict(_))
    ));
    // A failing re-wrap changes nothing.
    assert!(
        c.write(
            |tx| keys::rewrap_all(tx, "kek-1", "kek-2", |_, _, _| Err(Error::internal(
                "hsm down"
            )))
        )
        .is_err()
    );
    assert_eq!(c.current_kek().expect("kek"), "kek-1");
    let n = c
        .write(|tx| {
            keys::rewrap_all(tx, "kek-1", "kek-2", |d, v, w| {
                Ok([d.as_bytes(), v.as_bytes(), w].concat())
            })
        })
        .expect("rotate");
    assert_eq!(n, 2);
    assert_eq!(f.open().current_kek().expect("kek"), "kek-2");
    assert_eq!(
        c.kek_ids_in_use().expect("in use"),
        vec!["kek-2".to_string()]
    );
    let k = &c.version_keys("acme", "a").expect("keys")[0];
    assert!(k.wrapped_dek.ends_with(b"wrapped under kek-1") && k.kek_id == "kek-2");
}

fn the_audit_anchor_moves_only_with_its_transaction(f: &Fixture) {
    let c = f.open();
    // What audit.rs reads as the anchor (the audit writer sits above the catalog).
    let head = |c: &Catalog| -> Option<(i64, Vec<u8>)> {
        c.read(|tx| {
            tx.row("SELECT seq, hash FROM audit_anchor WHERE id = 1", params![])?
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .transpose()
        })
        .expect("anchor")
    };
    assert_eq!(head(&c), None);
    c.write(|tx| {
        tx.execute(
            "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, ?1, ?2)",
            params![7i64, vec![9u8; 32]],
        )
    })
    .expect("anchor");
    let failed: Result<()> = c.write(|tx| {
        tx.execute("UPDATE audit_anchor SET seq = 8 WHERE id = 1", params![])?;
        Err(Error::internal("the action failed"))
    });
    assert!(failed.is_err());
    let other = f.open();
    assert_eq!(head(&other), Some((7, vec![9u8; 32])));
}

/// What a node keeps of a question's catalog reads stands while `generations` does: each
/// kind of change a question reads moves its part, seen from another node.
fn every_change_a_question_reads_moves_a_generation(f: &Fixture) {
    let c = f.open();
    let other = f.open();
    let mut at = other.generations().expect("generations");
    let mut moved = |what: &str, change: &dyn Fn()| {
        change();
        let now = other.generations().expect("generations");
        assert_ne!(now, at, "{what} moved no generation");
        at = now;
    };
    moved("a partner", &|| {
        c.write(|tx| identities::add_partner(tx, "globex"))
            .expect("partner")
    });
    moved("an upload", &|| {
        dataset(&c, "acme", "accounts");
    });
    moved("an identity", &|| {
        c.write(|tx| identities::add_identity(tx, "0a", "globex", "ana", "analyst"))
            .expect("identity")
    });
    moved("a grant", &|| {
        let g = grant("acme", "accounts", None, "globex", Usage::Count);
        c.write(|tx| policy::add_grant(tx, &g, "admin"))
            .expect("grant");
    });
    moved("a population", &|| {
        let p = Population {
            owner: "acme".into(),
            dataset: "accounts".into(),
            name: "customers".into(),
            filter: "status = 'c'".into(),
            position: 0,
        };
        c.write(|tx| policy::add_population(tx, &p, "admin"))
            .expect("population");
    });
    moved("a population removed", &|| {
        c.write(|tx| policy::remove_population(tx, "acme", "accounts", "customers", "admin"))
            .expect("removed");
    });
    moved("a grant removed", &|| {
        let g = grant("acme", "accounts", None, "globex", Usage::Count);
        c.write(|tx| policy::remove_grant(tx, &g, "admin"))
            .expect("revoke");
    });
    moved("a second version", &|| {
        let id = c
            .dataset_id_for_upload("acme", "accounts", "unused")
            .expect("id");
        c.write(|tx| datasets::commit_version(tx, &version(&id, "v-again", 3), |_| Ok(vec![1])))
            .expect("version");
    });
    moved("settings", &|| {
        c.write(|tx| policy::put_settings_json(tx, "acme", "accounts", &settings(0.5), "admin"))
            .expect("settings");
    });
    moved("a key rotation", &|| {
        c.write(|tx| keys::rewrap_all(tx, "kek-1", "kek-2", |_, _, w| Ok(w.to_vec())))
            .expect("rotate");
    });
    moved("a user revoked", &|| {
        c.write(|tx| identities::revoke_user(tx, "globex", "ana"))
            .expect("revoke");
    });
    moved("a partner revoked", &|| {
        c.write(|tx| identities::revoke_partner(tx, "globex"))
            .expect("revoke");
    });
    moved("a delete", &|| {
        c.write(|tx| datasets::delete_dataset(tx, "acme", "accounts", "admin"))
            .expect("delete");
    });
    // A question asked, charged and kept moves nothing.
    c.keep_answer("acme", "fp", &["v".into()], b"answer")
        .expect("keep");
    assert_eq!(other.generations().expect("generations"), at);
}
