use std::fs::{self, OpenOptions};
use std::io::Write;

use super::*;
use crate::Error;
use crate::catalog::Catalog;
use crate::catalog::testdb::TestDatabase;
use crate::datadir::DataDir;

fn setup() -> (tempfile::TempDir, DataDir, Catalog, AuditLog) {
    let (tmp, dir, catalog) = catalog_lines(None);
    let log = AuditLog::open_in(&dir, Lines::File(dir.audit_log())).expect("log");
    (tmp, dir, catalog, log)
}

/// Append `bytes` to the log file, as an append torn by a crash leaves them.
fn tear(dir: &DataDir, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.audit_log())
        .expect("open");
    f.write_all(bytes).expect("torn");
}

fn event(i: usize) -> Event {
    Event::new(
        "query",
        Actor::user("acme", "ann", "analyst"),
        Outcome::Ok,
        serde_json::json!({ "sql": format!("SELECT {i}"), "epsilon": 0.5 }),
    )
    .touching(["globex"])
}

fn opts() -> VerifyOptions {
    VerifyOptions::default()
}

#[test]
fn chain_verifies_and_every_kind_of_tampering_is_named() {
    let (_t, dir, catalog, log) = setup();
    for i in 0..70 {
        catalog
            .write(|tx| log.append(tx, &event(i)))
            .expect("append");
    }
    catalog.write(|tx| log.checkpoint(tx)).expect("checkpoint");
    let text = fs::read_to_string(dir.audit_log()).expect("read");
    let v = verify(text.as_bytes(), &opts()).expect("intact");
    assert_eq!((v.records, v.checkpoints), (70, 2));
    assert_eq!(v.public_key, log.public_key());

    let lines: Vec<&str> = text.lines().collect();
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    // Edit one record's content.
    let mut edited = owned.clone();
    edited[10] = edited[10].replace("SELECT 10", "SELECT 11");
    let e = verify(join(&edited).as_bytes(), &opts()).expect_err("edit");
    assert_eq!((e.line, e.seq), (11, Some(11)), "{e}");
    // Delete one record.
    let mut deleted = owned.clone();
    deleted.remove(5);
    let e = verify(join(&deleted).as_bytes(), &opts()).expect_err("delete");
    assert_eq!(e.seq, Some(7), "{e}");
    // Reorder two records.
    let mut reordered = owned.clone();
    reordered.swap(3, 4);
    assert!(verify(join(&reordered).as_bytes(), &opts()).is_err());
    // Truncate and forge: keep 20 records and append records chained by a different key.
    let other = tempfile::tempdir().expect("tmp");
    let odir = DataDir::new(other.path());
    odir.create_dirs().expect("dirs");
    crate::crypto::keys::create_secret_if_missing(&odir.audit_key()).expect("key");
    let forger = AuditLog::open_in(&odir, Lines::File(odir.audit_log())).expect("forger");
    let ocat = Catalog::open(&odir.catalog()).expect("cat");
    let mut forged_log = join(&owned[..20]);
    fs::write(odir.audit_log(), &forged_log).expect("plant");
    for i in 0..5 {
        ocat.write(|tx| forger.append(tx, &event(100 + i)))
            .expect("forge");
    }
    forged_log = fs::read_to_string(odir.audit_log()).expect("read");
    let e = verify(forged_log.as_bytes(), &opts()).expect_err("forged tail");
    assert!(
        e.reason.contains("signature") || e.reason.contains("key"),
        "{e}"
    );
    // ... also when the forger drops every checkpoint and re-signs from the start: a
    // pinned key catches it.
    let pinned = VerifyOptions {
        public_key: Some(log.public_key().to_string()),
        ..opts()
    };
    let e = verify(forged_log.as_bytes(), &pinned).expect_err("pinned");
    assert!(e.reason.contains("signature"), "{e}");
    // Truncation alone is caught by a kept checkpoint (or the catalog's anchor).
    let kept = VerifyOptions {
        must_contain: vec![(70, v.head.clone())],
        ..pinned
    };
    let e = verify(join(&owned[..40]).as_bytes(), &kept).expect_err("truncated");
    assert!(e.reason.contains("truncated"), "{e}");
}

#[test]
fn torn_append_is_cut_and_recorded_and_truncation_is_refused() {
    let (_t, dir, catalog, log) = setup();
    for i in 0..3 {
        catalog
            .write(|tx| log.append(tx, &event(i)))
            .expect("append");
    }
    tear(&dir, b"{\"seq\":4,\"prev\":\"ab");
    let text = fs::read(dir.audit_log()).expect("read");
    let v = verify(&text[..], &opts());
    // No checkpoint yet: the key is unknown without a pin.
    assert!(v.is_err());
    let pinned = VerifyOptions {
        public_key: Some(log.public_key().into()),
        ..opts()
    };
    assert!(verify(&text[..], &pinned).expect("torn ok").torn_tail);
    catalog
        .write(|tx| log.append(tx, &event(9)))
        .expect("append");
    let records = list(&log, &catalog, &Viewer::Operator, None).expect("list");
    assert_eq!(records.len(), 5);
    assert_eq!(records[3].event.kind, "audit_repair");
    assert_eq!(records[3].event.detail["torn_bytes_removed"], 19);
    let text = fs::read(dir.audit_log()).expect("read");
    assert!(!verify(&text[..], &pinned).expect("repaired").torn_tail);

    // Truncating the stored log makes the next append fail (fail closed), not restart.
    let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
    fs::write(dir.audit_log(), lines[..2].concat()).expect("truncate");
    let e = catalog
        .write(|tx| log.append(tx, &event(10)))
        .expect_err("refused");
    assert!(matches!(e, Error::Integrity(_)), "{e}");
    fs::remove_file(dir.audit_log()).expect("rm");
    let e = catalog
        .write(|tx| log.append(tx, &event(10)))
        .expect_err("refused");
    assert!(matches!(e, Error::Integrity(_)), "{e}");
}

#[test]
fn partners_see_their_events_and_redacted_exports_still_verify() {
    let (_t, _dir, catalog, log) = setup();
    catalog.write(|tx| log.append(tx, &event(1))).expect("a");
    let other = Event::new(
        "upload",
        Actor::user("initech", "bob", "uploader"),
        Outcome::Ok,
        serde_json::json!({"dataset": "leads"}),
    );
    catalog.write(|tx| log.append(tx, &other)).expect("b");
    catalog.write(|tx| log.checkpoint(tx)).expect("cp");
    let globex = Viewer::Partner("globex".into());
    assert_eq!(list(&log, &catalog, &globex, None).expect("list").len(), 1);
    let mut out = Vec::new();
    export(&log, &catalog, &globex, &mut out).expect("export");
    let text = String::from_utf8(out).expect("utf8");
    assert!(!text.contains("initech"), "{text}");
    let v = verify(
        text.as_bytes(),
        &VerifyOptions {
            whole: true,
            ..opts()
        },
    )
    .expect("ok");
    assert_eq!((v.records, v.redacted), (2, 1));
}

/// The log's bytes as its reader gives them.
fn read_all(log: &AuditLog, catalog: &Catalog) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(mut r) = log.reader(catalog).expect("reader") {
        std::io::Read::read_to_end(&mut r, &mut out).expect("read");
    }
    out
}

/// A directory with an audit key, and a catalog: SQLite in the directory, or PostgreSQL.
fn catalog_lines(postgres: Option<&TestDatabase>) -> (tempfile::TempDir, DataDir, Catalog) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = DataDir::new(tmp.path());
    dir.create_dirs().expect("dirs");
    crate::crypto::keys::create_secret_if_missing(&dir.audit_key()).expect("key");
    let catalog = connect(postgres, &dir);
    (tmp, dir, catalog)
}

/// Another connection to the catalog of `catalog_lines` (another node's).
fn connect(postgres: Option<&TestDatabase>, dir: &DataDir) -> Catalog {
    match postgres {
        Some(db) => Catalog::connect(db.url()).expect("connect"),
        None => Catalog::open(&dir.catalog()).expect("catalog"),
    }
}

fn lines_in_the_catalog_are_one_chain_for_every_node(postgres: Option<&TestDatabase>) {
    let (_t, dir, catalog) = catalog_lines(postgres);
    // Four nodes, each with its own connection and writer, appending at once (half of them
    // records of their own, which follow on from the node's last record when they can);
    // more than one page of lines (1024) in all.
    let nodes: Vec<(Catalog, AuditLog)> = (0..4)
        .map(|_| {
            (
                connect(postgres, &dir),
                AuditLog::open_in(&dir, Lines::Catalog).expect("log"),
            )
        })
        .collect();
    std::thread::scope(|s| {
        for (n, (c, log)) in nodes.iter().enumerate() {
            s.spawn(move || {
                for i in 0..260 {
                    if i % 2 == 0 {
                        c.write(|tx| log.append(tx, &event(n * 1000 + i)))
                            .expect("append");
                    } else {
                        record(c, log, &event(n * 1000 + i)).expect("record");
                    }
                }
            });
        }
    });
    let log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    catalog.write(|tx| log.checkpoint(tx)).expect("checkpoint");
    assert!(!dir.audit_log().exists(), "no file beside a catalog log");
    let anchor = catalog.read(anchor).expect("anchor");
    let kept = VerifyOptions {
        public_key: Some(log.public_key().to_string()),
        must_contain: vec![(anchor.seq, hex::encode(anchor.hash))],
        whole: true,
    };
    let v = verify(&read_all(&log, &catalog)[..], &kept).expect("intact");
    assert_eq!(
        (v.records, v.checkpoints),
        (1040, 1040 / CHECKPOINT_EVERY + 1)
    );
    assert_eq!(
        list(&log, &catalog, &Viewer::Operator, None)
            .expect("list")
            .len(),
        1040
    );

    // An append whose change fails leaves no line.
    let before = read_all(&log, &catalog);
    catalog
        .write(|tx| {
            log.append(tx, &event(1))?;
            Err::<(), _>(Error::internal("the change fails after its append"))
        })
        .expect_err("rolled back");
    assert_eq!(read_all(&log, &catalog), before);

    // Lines removed behind the anchor: the next append is refused, not continued.
    catalog
        .write(|tx| {
            tx.execute(
                "DELETE FROM audit_lines WHERE pos > (SELECT MAX(pos) - 3 FROM audit_lines)",
                crate::catalog::sql::params![],
            )
        })
        .expect("remove");
    let e = catalog
        .write(|tx| log.append(tx, &event(2)))
        .expect_err("refused");
    assert!(matches!(e, Error::Integrity(_)), "{e}");
}

/// Empty a catalog log (a PostgreSQL test database holds the lines of the test's earlier
/// logs).
fn empty_log(catalog: &Catalog) {
    catalog
        .write(|tx| tx.batch("DELETE FROM audit_lines; DELETE FROM audit_anchor"))
        .expect("empty");
}

/// The number each record of the log asked about (`event(N)`: "SELECT N"), in order.
fn asked(log: &AuditLog, catalog: &Catalog) -> Vec<String> {
    let text = String::from_utf8(read_all(log, catalog)).expect("utf-8");
    text.lines()
        .filter_map(|l| Some(l.split("SELECT ").nth(1)?.split('"').next()?.to_string()))
        .collect()
}

fn a_record_follows_on_only_from_the_last_line(postgres: Option<&TestDatabase>) {
    let (_t, dir, catalog) = catalog_lines(postgres);
    let log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    let other = connect(postgres, &dir);
    let other_log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    let lines = |c: &Catalog| read_all(&log, c).split(|b| *b == b'\n').count() - 1;
    // The first record reads the tail; the next ones follow on from it.
    for i in 0..3 {
        record(&catalog, &log, &event(i)).expect("record");
        assert_eq!(log.following(), Some(lines(&catalog) as i64), "{i}");
    }
    // Another node's record comes in between: the follow-on fails, leaves no line, and the
    // record is made after the other node's.
    record(&other, &other_log, &event(10)).expect("other");
    record(&catalog, &log, &event(3)).expect("after the other's");
    // An audited change of this node: what it followed is behind.
    catalog
        .write(|tx| log.append(tx, &event(4)))
        .expect("change");
    assert_eq!(log.following(), None);
    let pinned = VerifyOptions {
        public_key: Some(log.public_key().to_string()),
        ..opts()
    };
    let v = verify(&read_all(&log, &catalog)[..], &pinned).expect("intact");
    assert_eq!(v.records, 6);
    assert_eq!(asked(&log, &catalog), ["0", "1", "2", "10", "3", "4"]);

    // The line this node followed lost and another written in its place (a catalog failed
    // over to a replica that missed the last commit): the follow-on is refused, and the
    // record goes after the line that is there.
    let (_t, dir, catalog) = catalog_lines(postgres);
    empty_log(&catalog);
    let log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    let other = connect(postgres, &dir);
    let other_log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    record(&catalog, &log, &event(0)).expect("first");
    let first = catalog.read(anchor).expect("anchor");
    record(&catalog, &log, &event(1)).expect("followed on");
    catalog
        .write(|tx| {
            tx.execute(
                "DELETE FROM audit_lines WHERE pos = 2",
                crate::catalog::sql::params![],
            )?;
            tx.execute(
                "UPDATE audit_anchor SET seq = ?1, hash = ?2 WHERE id = 1",
                crate::catalog::sql::params![first.seq as i64, first.hash.to_vec()],
            )
        })
        .expect("lose line 2");
    record(&other, &other_log, &event(20)).expect("in its place");
    record(&catalog, &log, &event(2)).expect("after it");
    assert_eq!(asked(&log, &catalog), ["0", "20", "2"]);
    let pinned = VerifyOptions {
        public_key: Some(log.public_key().to_string()),
        ..opts()
    };
    verify(&read_all(&log, &catalog)[..], &pinned).expect("one chain");

    // A writer following a line that is no longer the last (lines cut behind the anchor)
    // adds nothing: its insert is refused, and the record the usual way finds the cut.
    let (_t, dir, catalog) = catalog_lines(postgres);
    empty_log(&catalog);
    let log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    for i in 0..5 {
        record(&catalog, &log, &event(i)).expect("record");
    }
    catalog
        .write(|tx| {
            tx.execute(
                "DELETE FROM audit_lines WHERE pos > 2",
                crate::catalog::sql::params![],
            )
        })
        .expect("cut");
    let before = read_all(&log, &catalog);
    let e = record(&catalog, &log, &event(9)).expect_err("refused");
    assert!(matches!(e, Error::Integrity(_)), "{e}");
    assert_eq!(read_all(&log, &catalog), before, "no gap, no line");
}

#[test]
fn a_record_follows_on_only_from_the_last_line_in_sqlite() {
    a_record_follows_on_only_from_the_last_line(None);
}

#[test]
fn a_record_follows_on_only_from_the_last_line_in_postgres() {
    a_record_follows_on_only_from_the_last_line(Some(&TestDatabase::new()));
}

#[test]
fn lines_in_a_sqlite_catalog_are_one_chain_for_every_node() {
    lines_in_the_catalog_are_one_chain_for_every_node(None);
}

#[test]
fn lines_in_a_postgres_catalog_are_one_chain_for_every_node() {
    lines_in_the_catalog_are_one_chain_for_every_node(Some(&TestDatabase::new()));
}

#[test]
fn a_log_file_moves_into_a_sqlite_catalog_once() {
    a_log_file_moves_into_the_catalog_once(None);
}

#[test]
fn a_log_file_moves_into_a_postgres_catalog_once() {
    a_log_file_moves_into_the_catalog_once(Some(&TestDatabase::new()));
}

fn a_log_file_moves_into_the_catalog_once(postgres: Option<&TestDatabase>) {
    let (_t, dir, catalog) = catalog_lines(postgres);
    let file_log = AuditLog::open_in(&dir, Lines::File(dir.audit_log())).expect("file log");
    for i in 0..70 {
        catalog
            .write(|tx| file_log.append(tx, &event(i)))
            .expect("append");
    }
    // A torn append at the end (never acknowledged) stays behind.
    tear(&dir, b"{\"seq\":71,");
    let text = fs::read_to_string(dir.audit_log()).expect("read");
    let whole = &text[..text.rfind('\n').expect("lines") + 1];

    // Two nodes starting at once: one moves it.
    let log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                log.take_over(&connect(postgres, &dir), &dir.audit_log())
                    .expect("take over");
            });
        }
    });
    assert!(!dir.audit_log().exists());
    let mut moved = dir.audit_log().into_os_string();
    moved.push(".moved");
    assert_eq!(fs::read_to_string(&moved).expect("kept"), text);
    let moved_lines = read_all(&log, &catalog);
    assert!(moved_lines.starts_with(whole.as_bytes()));
    // Once: a file put back later is left alone.
    fs::write(dir.audit_log(), "not a log\n").expect("file");
    log.take_over(&catalog, &dir.audit_log()).expect("again");
    assert_eq!(read_all(&log, &catalog), moved_lines);

    catalog
        .write(|tx| log.append(tx, &event(99)))
        .expect("append");
    let anchor = catalog.read(anchor).expect("anchor");
    // 70 moved, the record of the move, one more
    assert_eq!(anchor.seq, 72);
    let records = list(&log, &catalog, &Viewer::Operator, None).expect("list");
    assert_eq!(records[70].event.kind, "audit_moved");
    assert_eq!(records[70].event.detail["lines"], 71);
    let v = verify(
        &read_all(&log, &catalog)[..],
        &VerifyOptions {
            public_key: Some(log.public_key().to_string()),
            must_contain: vec![(anchor.seq, hex::encode(anchor.hash))],
            whole: true,
        },
    )
    .expect("intact");
    assert_eq!(v.records, 72);
}

#[test]
fn writers_sharing_one_log_take_its_locks_in_one_order() {
    // An audited change takes the catalog's write lock with its first statement, then
    // appends; a question's record appends first. Sharing one writer (its process mutex),
    // on a catalog whose write lock comes with the first statement, neither may wait for
    // the other: 4 threads, half of them changes, finish.
    let db = TestDatabase::new();
    for lines in ["file", "catalog"] {
        let (_t, dir, catalog) = catalog_lines(Some(&db));
        let log = match lines {
            "file" => AuditLog::open_in(&dir, Lines::File(dir.audit_log())),
            _ => AuditLog::open_in(&dir, Lines::Catalog),
        }
        .expect("log");
        std::thread::scope(|s| {
            for n in 0..4 {
                let (log, url) = (&log, db.url());
                s.spawn(move || {
                    let c = Catalog::connect(url).expect("connect");
                    for i in 0..40 {
                        c.write(|tx| {
                            if n % 2 == 0 {
                                tx.execute(
                                    "UPDATE generations SET value = value WHERE name = 'policy'",
                                    crate::catalog::sql::params![],
                                )?;
                            }
                            log.append(tx, &event(n * 100 + i))
                        })
                        .expect("append");
                    }
                });
            }
        });
        let anchor = catalog.read(anchor).expect("anchor");
        assert!(anchor.seq >= 160, "{lines}: {}", anchor.seq);
        empty_log(&catalog);
    }
}

/// A question's record made only while what its request assumed (`catalog::Assumed`: its
/// caller's identity, the generations, its ledger and kept answer, as the node last read
/// them) still holds, on the one-round-trip follow-on and on the usual path alike; when it
/// does not, nothing is written.
fn a_record_assuming_is_made_only_while_its_assumptions_hold(postgres: Option<&TestDatabase>) {
    use crate::catalog::identities::{add_identity, add_partner, revoke_user};
    use crate::catalog::{Assumed, BudgetCharge};
    let (_t, dir, catalog) = catalog_lines(postgres);
    let log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    let other = connect(postgres, &dir);
    let other_log = AuditLog::open_in(&dir, Lines::Catalog).expect("log");
    for p in ["acme", "globex"] {
        catalog.write(|tx| add_partner(tx, p)).expect("partner");
    }
    catalog
        .write(|tx| add_identity(tx, "0a", "acme", "ann", "analyst"))
        .expect("identity");
    let charge = BudgetCharge {
        owner: "globex".into(),
        dataset: "accounts".into(),
        budget: 10.0,
    };
    catalog
        .spend(
            "acme",
            std::slice::from_ref(&charge),
            1.0,
            "fp",
            false,
            None,
        )
        .expect("spend");
    catalog
        .keep_answer("acme", "fp", &["v1".into()], b"answer")
        .expect("keep");
    // What a repeated question reads, as a node keeps it.
    let assumed = |c: &Catalog| {
        let (id, at) = c.active_identity("0a").expect("identity");
        let mut a = Assumed::default();
        if let Some(id) = id {
            a.identity("0a", &id);
        }
        a.generations(at);
        let rows = c
            .read(|tx| {
                tx.value::<i64>(
                    "SELECT COUNT(*) FROM privacy_ledger WHERE partner = 'acme' AND owner = 'globex'",
                    crate::catalog::sql::params![],
                )
            })
            .expect("ledger");
        a.ledger("acme", "globex", rows);
        a.kept("acme", "fp", b"answer");
        a
    };
    let held = assumed(&catalog);
    assert!(catalog.read(|tx| held.hold(tx)).expect("hold"));
    let lines = |c: &Catalog| read_all(&log, c).split(|b| *b == b'\n').count() - 1;
    record(&catalog, &log, &event(0)).expect("first");
    // Following on (one round trip), and the usual way after another node's record.
    assert_eq!(
        record_assuming(&catalog, &log, &event(1), &held).expect("held"),
        Some(catalog.read(anchor).expect("anchor"))
    );
    assert_eq!(log.following(), Some(lines(&catalog) as i64));
    record(&other, &other_log, &event(10)).expect("other");
    assert!(
        record_assuming(&catalog, &log, &event(2), &held)
            .expect("held")
            .is_some()
    );

    // Each kind of change, made by another node, refuses a record assuming what was there
    // before it, following on or not, and leaves the log as it was.
    type Change<'a> = (&'a str, Box<dyn Fn(&Catalog) + 'a>);
    let changes: [Change<'_>; 4] = [
        (
            "generations",
            Box::new(|c: &Catalog| {
                c.write(|tx| {
                    tx.execute(
                        "UPDATE generations SET value = value + 1 WHERE name = 'policy'",
                        crate::catalog::sql::params![],
                    )
                })
                .map(drop)
                .expect("policy moved")
            }),
        ),
        (
            "ledger",
            Box::new(|c: &Catalog| {
                c.spend(
                    "acme",
                    std::slice::from_ref(&charge),
                    1.0,
                    "fp2",
                    false,
                    None,
                )
                .map(drop)
                .expect("another question paid")
            }),
        ),
        (
            "kept answer",
            Box::new(|c: &Catalog| {
                c.write(|tx| {
                    tx.execute(
                        "UPDATE released_answers SET answer = ?1 WHERE fingerprint = 'fp'",
                        crate::catalog::sql::params![b"other".to_vec()],
                    )
                })
                .map(drop)
                .expect("kept answer replaced")
            }),
        ),
        (
            "identity",
            Box::new(|c: &Catalog| {
                c.write(|tx| revoke_user(tx, "acme", "ann"))
                    .map(drop)
                    .expect("revoked")
            }),
        ),
    ];
    for (what, change) in changes {
        let before = assumed(&catalog);
        // Held, then changed on the other node.
        assert!(catalog.read(|tx| before.hold(tx)).expect("hold"), "{what}");
        change(&other);
        assert!(!catalog.read(|tx| before.hold(tx)).expect("hold"), "{what}");
        for follow in [true, false] {
            if follow {
                record(&catalog, &log, &event(12)).expect("this node's");
                assert!(log.following().is_some(), "{what}");
            } else {
                record(&other, &other_log, &event(11)).expect("other");
            }
            let log_before = read_all(&log, &catalog);
            assert_eq!(
                record_assuming(&catalog, &log, &event(99), &before).expect(what),
                None,
                "{what}, following on: {follow}"
            );
            assert_eq!(
                read_all(&log, &catalog),
                log_before,
                "{what}: nothing written"
            );
        }
        if what == "kept answer" {
            // (the bytes it was read with, back: the next kind starts from a held state)
            other
                .write(|tx| {
                    tx.execute(
                        "UPDATE released_answers SET answer = ?1 WHERE fingerprint = 'fp'",
                        crate::catalog::sql::params![b"answer".to_vec()],
                    )
                })
                .expect("restored");
        }
    }
    // Assumed afresh after the ledger moved: the record is made.
    let mut fresh = Assumed::default();
    fresh.generations(catalog.generations().expect("generations"));
    fresh.ledger("acme", "globex", 2);
    assert!(
        record_assuming(&catalog, &log, &event(3), &fresh)
            .expect("fresh")
            .is_some()
    );
    let pinned = VerifyOptions {
        public_key: Some(log.public_key().to_string()),
        ..opts()
    };
    verify(&read_all(&log, &catalog)[..], &pinned).expect("one chain");
    assert_eq!(
        asked(&log, &catalog),
        [
            "0", "1", "10", "2", "12", "11", "12", "11", "12", "11", "12", "11", "3"
        ]
    );
}

#[test]
fn a_record_assuming_in_sqlite() {
    a_record_assuming_is_made_only_while_its_assumptions_hold(None);
}

#[test]
fn a_record_assuming_in_postgres() {
    a_record_assuming_is_made_only_while_its_assumptions_hold(Some(&TestDatabase::new()));
}
