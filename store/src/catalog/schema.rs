//! The catalog's schema: one definition for both backends, in versioned migrations.
//!
//! Each migration runs once, in one write transaction with the version it reaches (kept in
//! `schema_version`), so nodes starting together on one PostgreSQL catalog apply it once.
//! The statements are written with SQLite's type names; PostgreSQL gets `BIGINT`, `DOUBLE
//! PRECISION` and `BYTEA` for them ([`for_postgres`]), the same 64-bit integers, doubles and
//! bytes. Catalogs made by escrow before versioned migrations (SQLite only) are brought to
//! version 1 by [`upgrade_unversioned`] first.

use rusqlite::{Connection, TransactionBehavior};

use super::sql::{Tx, params};
use crate::{Error, Result};

/// One step of the schema.
struct Migration {
    version: i64,
    sql: &'static str,
}

/// Every migration, in order. A new one is appended with the next version; none is edited
/// once released.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: V1,
    },
    Migration {
        version: 2,
        sql: V2,
    },
    Migration {
        version: 3,
        sql: V3,
    },
    Migration {
        version: 4,
        sql: V4,
    },
    Migration {
        version: 5,
        sql: V5,
    },
    Migration {
        version: 6,
        sql: V6,
    },
];

/// Version 6: enrollment. An invitation (`partner invite`, `user invite`) names the identity
/// it may enroll and who made it, and keeps only a hash of its token's secret; it is closed
/// once: used, replaced by a newer invitation for the same identity, or revoked with that
/// identity or with the identity that made it. A renewed identity's old certificate names the
/// one that replaced it and when (`replaced_by`, `replaced_ms`); it is accepted for a grace
/// day after that (a renewal whose answer was lost), and is no longer listed.
const V6: &str = r#"
CREATE TABLE IF NOT EXISTS invitations (
    id          TEXT PRIMARY KEY,              -- random 128-bit id, hex (named in the audit log)
    secret_hash TEXT NOT NULL UNIQUE,          -- SHA-256 of the token's secret, hex
    partner     TEXT NOT NULL REFERENCES partners(name),
    "user"      TEXT NOT NULL,
    role        TEXT NOT NULL,
    cert_days   INTEGER NOT NULL,              -- lifetime of the certificate it enrolls
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    closed_at   TEXT,
    closed_how  TEXT,                          -- enrolled | replaced | revoked
    serial      TEXT,                          -- the certificate it enrolled
    by_partner  TEXT,                          -- who made it (NULL: the operator)
    by_user     TEXT NOT NULL,
    refusals    INTEGER NOT NULL DEFAULT 0     -- refused uses (the first few are audited)
);
CREATE INDEX IF NOT EXISTS invitations_by_identity ON invitations(partner, "user");
ALTER TABLE identities ADD COLUMN replaced_by TEXT;
ALTER TABLE identities ADD COLUMN replaced_ms INTEGER;
"#;

/// Version 5: the audit log's lines, for a catalog shared by several nodes (audit/writer.rs
/// `Lines::Catalog`): each line (a record or a checkpoint, exactly as a log file holds it)
/// at its position, written in the transaction of the change it records. A node's own
/// SQLite catalog keeps its log in a file beside it and leaves this table empty.
const V5: &str = r#"
CREATE TABLE IF NOT EXISTS audit_lines (
    pos     INTEGER PRIMARY KEY,
    line    TEXT NOT NULL
);
"#;

/// Version 4: the `data` generation, moved by every change to the versions a question may
/// read (an upload, a delete, a key rotation's re-wrapping), so a node can keep what it
/// resolved for a question while it stands.
const V4: &str = r#"
INSERT INTO generations (name, value) VALUES ('data', 0) ON CONFLICT DO NOTHING;
"#;

/// Version 3: the catalog's own facts; `id` binds it to its data directory (the directory
/// keeps it in `catalog.id`), so a node pointed at the wrong catalog, or at none, refuses
/// to start instead of taking another catalog's files for orphans.
const V3: &str = r#"
CREATE TABLE IF NOT EXISTS catalog_meta (
    name    TEXT PRIMARY KEY,
    value   TEXT NOT NULL
);
"#;

/// Version 2: generations kept in the catalog, so that a change made on one node is seen by
/// every node (`policy`: grants, settings, populations, dataset deletions).
const V2: &str = r#"
CREATE TABLE IF NOT EXISTS generations (
    name    TEXT PRIMARY KEY,
    value   INTEGER NOT NULL
);
INSERT INTO generations (name, value) VALUES ('policy', 0) ON CONFLICT DO NOTHING;
"#;

/// Version 1: the tables as of escrow's first release of the shared catalog.
const V1: &str = r#"
CREATE TABLE IF NOT EXISTS partners (
    name        TEXT PRIMARY KEY,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE TABLE IF NOT EXISTS identities (
    serial      TEXT PRIMARY KEY,              -- certificate serial, lowercase hex
    partner     TEXT NOT NULL REFERENCES partners(name),
    "user"      TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE INDEX IF NOT EXISTS identities_by_partner ON identities(partner, "user");
CREATE TABLE IF NOT EXISTS datasets (
    id          TEXT PRIMARY KEY,              -- random 128-bit id, hex
    owner       TEXT NOT NULL REFERENCES partners(name),
    name        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (owner, name)
);
CREATE TABLE IF NOT EXISTS dataset_versions (
    dataset_id   TEXT NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    version      INTEGER NOT NULL,
    version_id   TEXT NOT NULL UNIQUE,         -- random 128-bit id, hex; bound into the sealed file
    rows         INTEGER NOT NULL,
    source_bytes INTEGER NOT NULL,             -- bytes received from the client
    sealed_bytes INTEGER NOT NULL,             -- bytes of the sealed file
    format       TEXT NOT NULL,
    schema_json  TEXT NOT NULL,
    key_column   TEXT,
    wrapped_dek  BLOB NOT NULL,
    kek_id       TEXT NOT NULL,
    uploaded_by  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    matching     TEXT,                         -- JSON matching::MatchStats (website keys)
    PRIMARY KEY (dataset_id, version)
);
CREATE TABLE IF NOT EXISTS grants (
    owner       TEXT NOT NULL REFERENCES partners(name),
    dataset     TEXT NOT NULL,                 -- dataset name of the owner
    col         TEXT NOT NULL,                 -- a column, or '*' for every column
    grantee     TEXT NOT NULL,                 -- a partner, or '*' for every partner
    usage       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    PRIMARY KEY (owner, dataset, col, grantee, usage)
);
CREATE INDEX IF NOT EXISTS grants_by_grantee ON grants(grantee);
CREATE TABLE IF NOT EXISTS dataset_settings (
    owner       TEXT NOT NULL REFERENCES partners(name),
    dataset     TEXT NOT NULL,
    settings    TEXT NOT NULL,                 -- JSON, see settings::DatasetSettings
    updated_at  TEXT NOT NULL,
    updated_by  TEXT NOT NULL,
    PRIMARY KEY (owner, dataset)
);
-- Privacy budget spent: one row per (querying partner, data owner, question) with the
-- question's ε; `dataset` names the owner's datasets the question read (comma-separated).
-- What a partner has spent on an owner is √(Σ ε²) over all of that owner's datasets and
-- versions (zCDP composition, Catalog::spend; rows of older releases count too). A question asked again on the same data versions finds its
-- row and spends nothing.
CREATE TABLE IF NOT EXISTS privacy_ledger (
    partner     TEXT NOT NULL,
    owner       TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    epsilon     REAL NOT NULL,
    spent_at    TEXT NOT NULL,
    PRIMARY KEY (partner, owner, dataset, fingerprint)
);
-- Answers released to a partner for a question that read other partners' data (queries.rs
-- `kept`): asked again on the same data versions, the question is answered from here without
-- running, so its time and memory cannot be measured again. Removed with the datasets read.
CREATE TABLE IF NOT EXISTS released_answers (
    partner     TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    versions    TEXT NOT NULL,                 -- ' id1 id2 ': the version ids read
    answer      BLOB NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (partner, fingerprint)
);
-- Overlap matrices (without a breakdown) released to a partner, one row per release, for the
-- history of an account mapping over dataset versions (overlaps.rs `overlap_history`): only
-- what the partner was shown, noisy counts already released. Removed with the datasets read.
CREATE TABLE IF NOT EXISTS released_overlaps (
    partner     TEXT NOT NULL,
    with_partner TEXT NOT NULL,
    mine        TEXT NOT NULL,                 -- owner.dataset@vN of each side
    theirs      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    versions    TEXT NOT NULL,                 -- ' id1 id2 ': the version ids read
    cells       TEXT NOT NULL,                 -- JSON: the cells as released
    released_at TEXT NOT NULL,
    PRIMARY KEY (partner, fingerprint, versions)
);
-- Populations: a data owner's named subsets of one of its datasets (a SQL predicate over its
-- columns, validated at definition). `position` orders them per dataset (definition order).
CREATE TABLE IF NOT EXISTS populations (
    owner       TEXT NOT NULL REFERENCES partners(name),
    dataset     TEXT NOT NULL,
    name        TEXT NOT NULL,
    filter      TEXT NOT NULL,
    position    INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    PRIMARY KEY (owner, dataset, name)
);
-- Every version of each partner's policy document (policy.rs): the whole canonical text, and
-- its diff against the version before. Written in the transaction of the change.
CREATE TABLE IF NOT EXISTS policy_versions (
    owner       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    change      TEXT NOT NULL,
    document    TEXT NOT NULL,
    diff        TEXT NOT NULL,                 -- JSON {removed: [...], added: [...]}
    PRIMARY KEY (owner, version)
);
-- The audit log's last record (audit.rs): the log file may run ahead of it, never behind.
CREATE TABLE IF NOT EXISTS audit_anchor (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    seq     INTEGER NOT NULL,
    hash    BLOB NOT NULL
);
-- The key-encryption key that wraps new data keys (its id). A rotation switches it in the
-- transaction that re-wraps every data key, so no version is ever committed under a retired key.
CREATE TABLE IF NOT EXISTS kek_state (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    current TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS crl_state (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    number  INTEGER NOT NULL
);
INSERT INTO crl_state (id, number) VALUES (1, 1) ON CONFLICT DO NOTHING;
-- The web console's sign-in links (kind 'link') and browser sessions (kind 'session'), kept
-- in the catalog so that every node sharing it knows them and a restart ends none. Tokens
-- are kept by their SHA-256 only (`digest`, hex): a copy of the catalog cannot be replayed.
-- Times are milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS console_tokens (
    kind        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    serial      TEXT NOT NULL,                 -- the certificate the link was minted with
    partner     TEXT NOT NULL,
    "user"      TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    seen_ms     INTEGER NOT NULL,
    PRIMARY KEY (kind, digest)
);
"#;

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
)";

/// `sql` with SQLite's type names replaced by PostgreSQL's.
pub(super) fn for_postgres(sql: &str) -> String {
    // Word by word (a word with what follows it), so a type name is found whatever ends it.
    sql.split_inclusive(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .map(|piece| {
            let word = piece.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            let pg = match word {
                "INTEGER" => "BIGINT",
                "REAL" => "DOUBLE PRECISION",
                "BLOB" => "BYTEA",
                _ => return piece.to_string(),
            };
            format!("{pg}{}", &piece[word.len()..])
        })
        .collect()
}

/// Apply the migrations `tx`'s catalog lacks (`postgres`: in PostgreSQL's types); returns
/// the version reached. Refuses a catalog written by a newer escrow.
pub(super) fn migrate(tx: &Tx<'_>, postgres: bool) -> Result<i64> {
    let dialect = |sql: &str| {
        if postgres {
            for_postgres(sql)
        } else {
            sql.to_string()
        }
    };
    tx.batch(&dialect(VERSION_TABLE))?;
    let mut version: i64 = tx
        .row("SELECT version FROM schema_version WHERE id = 1", params![])?
        .map(|r| r.get(0))
        .transpose()?
        .unwrap_or(0);
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    if version > latest {
        return Err(Error::bad(
            "catalog_too_new",
            format!(
                "the catalog has schema version {version}; this escrow knows versions up to {latest}: upgrade escrow"
            ),
        ));
    }
    let from = version;
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        tx.batch(&dialect(m.sql))?;
        tx.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            params![m.version],
        )?;
        version = m.version;
    }
    Ok(version)
}

/// Bring a SQLite catalog made by escrow before versioned migrations to version 1: the
/// `matching` column and budgets in zCDP units. Nothing for a new or a versioned catalog.
pub(super) fn upgrade_unversioned(conn: &mut Connection) -> Result<()> {
    let exists = |conn: &Connection, table: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )
    };
    if !exists(conn, "partners")? {
        // A new catalog: its budgets are in zCDP units from the start, which an older
        // escrow opening it must know too (or it would convert them again).
        conn.execute_batch(&format!("PRAGMA user_version = {DATA_VERSION}"))?;
        return Ok(());
    }
    if exists(conn, "schema_version")? {
        return Ok(());
    }
    add_column(conn, "dataset_versions", "matching", "TEXT")?;
    convert_budgets(conn)
}

/// The catalog's data version (SQLite `user_version`): 1 = budgets in zCDP units.
const DATA_VERSION: i64 = 1;

/// Add a column a catalog made by an older escrow lacks.
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> Result<()> {
    let has: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
        rusqlite::params![table, column],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

/// One-time conversions of stored values whose meaning changed, each in one transaction.
///
/// Version 1: budgets compose in squares (zCDP, [`super::Catalog::spend`]); before, the ε of
/// questions added up linearly. A stored budget B at ε allowed B/ε questions; left as it
/// was, it would now allow (B/ε)², far more than its owner agreed to. It becomes √(B·ε)
/// (rounded up to a millionth), which allows the same B/ε questions at ε. The documents of
/// policy versions from before are converted alike, so a rollback to one restores what it
/// meant (their diffs and the audit log keep the numbers as they were written then).
fn convert_budgets(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= DATA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let rows: Vec<(String, String, String)> = {
        let mut st = tx.prepare("SELECT owner, dataset, settings FROM dataset_settings")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (owner, dataset, json) in rows {
        let mut v: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| Error::internal(format!("bad settings in catalog: {e}")))?;
        let (Some(budget), Some(epsilon)) = (v["budget"].as_f64(), v["epsilon"].as_f64()) else {
            return Err(Error::internal(
                "settings in catalog without budget or epsilon",
            ));
        };
        let converted = zcdp_budget(budget, epsilon);
        v["budget"] = serde_json::json!(converted);
        tx.execute(
            "UPDATE dataset_settings SET settings = ?3 WHERE owner = ?1 AND dataset = ?2",
            rusqlite::params![owner, dataset, v.to_string()],
        )?;
        tracing::warn!(
            %owner, %dataset, budget, converted,
            "privacy budgets now compose in squares (zCDP): budget converted to keep the same number of questions"
        );
    }
    let versions: Vec<(String, i64, String)> = {
        let mut st = tx.prepare("SELECT owner, version, document FROM policy_versions")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (owner, version, document) in versions {
        if let Some(converted) = zcdp_document(&document) {
            tx.execute(
                "UPDATE policy_versions SET document = ?3 WHERE owner = ?1 AND version = ?2",
                rusqlite::params![owner, version, converted],
            )?;
        }
    }
    tx.execute_batch(&format!("PRAGMA user_version = {DATA_VERSION}"))?;
    tx.commit()?;
    Ok(())
}

/// A linear budget `budget` at `epsilon` in zCDP units: √(budget·ε), rounded up to a
/// millionth (the same number of questions at ε).
fn zcdp_budget(budget: f64, epsilon: f64) -> f64 {
    ((budget * epsilon).max(0.0).sqrt() * 1e6).ceil() / 1e6
}

/// A policy document (policy.rs: lines `setting,OWNER,DATASET,NAME,VALUE`) with each
/// dataset's budget line converted by [`zcdp_budget`] at that dataset's ε; `None` when it
/// has no budget line.
fn zcdp_document(document: &str) -> Option<String> {
    let setting = |line: &str| -> Option<(String, String, String)> {
        let f: Vec<&str> = line.strip_prefix("setting,")?.split(',').collect();
        match f.as_slice() {
            [owner, dataset, name, value] => Some((
                format!("{owner},{dataset}"),
                (*name).to_string(),
                (*value).to_string(),
            )),
            _ => None,
        }
    };
    let epsilons: std::collections::BTreeMap<String, f64> = document
        .lines()
        .filter_map(setting)
        .filter(|(_, name, _)| name == "epsilon")
        .filter_map(|(d, _, v)| Some((d, v.parse().ok()?)))
        .collect();
    let mut changed = false;
    let lines: Vec<String> = document
        .split('\n')
        .map(|line| match setting(line) {
            Some((d, name, value)) if name == "budget" => {
                let (Ok(budget), Some(epsilon)) = (value.parse::<f64>(), epsilons.get(&d)) else {
                    return line.to_string();
                };
                changed = true;
                format!("setting,{d},budget,{}", zcdp_budget(budget, *epsilon))
            }
            _ => line.to_string(),
        })
        .collect();
    changed.then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    /// A catalog written before budgets composed in squares: its stored budget is converted
    /// once, to allow the same number of questions (B/ε = 10 at ε = 1, and √10 now).
    #[test]
    fn postgres_gets_its_type_names_whatever_ends_them() {
        assert_eq!(
            for_postgres(
                "a INTEGER NOT NULL, b INTEGER,\nc INTEGER);d REAL\ne BLOB; INTEGERS x_REAL"
            ),
            "a BIGINT NOT NULL, b BIGINT,\nc BIGINT);d DOUBLE PRECISION\ne BYTEA; INTEGERS x_REAL"
        );
        for sql in [V1, V2, V3, VERSION_TABLE] {
            let pg = for_postgres(sql);
            for word in pg.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                assert!(
                    !["INTEGER", "REAL", "BLOB"].contains(&word),
                    "{word} in {pg}"
                );
            }
        }
    }

    /// A new catalog says its budgets are in zCDP units, so an older escrow opening it
    /// does not convert them a second time.
    #[test]
    fn a_new_catalog_is_marked_as_holding_zcdp_budgets() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("catalog.db");
        drop(Catalog::open(&path).expect("new"));
        let conn = Connection::open(&path).expect("open");
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("user_version");
        assert_eq!(v, DATA_VERSION);
    }

    #[test]
    fn stored_budgets_keep_their_number_of_questions_across_the_zcdp_change() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("catalog.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(V1).expect("schema");
            conn.execute_batch(
                "INSERT INTO partners (name, created_at) VALUES ('acme', 'now');
                 INSERT INTO dataset_settings VALUES ('acme', 'a',
                   '{\"min_entities\":5,\"epsilon\":1.0,\"budget\":10.0,\"max_groups_per_entity\":1,\"bounds\":{}}',
                   'now', 'admin');
                 INSERT INTO dataset_settings VALUES ('acme', 'b',
                   '{\"min_entities\":5,\"epsilon\":0.5,\"budget\":2.0,\"max_groups_per_entity\":1,\"bounds\":{}}',
                   'now', 'admin');",
            )
            .expect("old rows");
            conn.execute(
                "INSERT INTO policy_versions VALUES ('acme', 1, 'now', 'admin', 'settings', ?1, '{}')",
                rusqlite::params![
                    "p,globex,acme,a,website,join\nsetting,acme,a,budget,10\nsetting,acme,a,epsilon,1\nsetting,acme,a,min_entities,5\n"
                ],
            )
            .expect("old version");
        }
        let budget = |c: &Catalog, d: &str| -> f64 {
            let json = c.settings_json("acme", d).expect("read").expect("row");
            serde_json::from_str::<serde_json::Value>(&json).expect("json")["budget"]
                .as_f64()
                .expect("budget")
        };
        let catalog = Catalog::open(&path).expect("migrate");
        assert_eq!(budget(&catalog, "a"), 3.162278);
        assert_eq!(budget(&catalog, "b"), 1.0);
        // Still ten questions at ε = 1 (√10 rounded up to a millionth), not eleven.
        assert!(10.0 <= 3.162278f64.powi(2) && 11.0 > 3.162278f64.powi(2));
        // The old policy version means the same too: a rollback to it restores √10.
        let (_, v1) = catalog.policy_text("acme", Some(1)).expect("v1");
        assert_eq!(
            v1,
            "p,globex,acme,a,website,join\nsetting,acme,a,budget,3.162278\nsetting,acme,a,epsilon,1\nsetting,acme,a,min_entities,5\n"
        );
        drop(catalog);
        // Once only: opening again changes nothing.
        let catalog = Catalog::open(&path).expect("reopen");
        assert_eq!(budget(&catalog, "a"), 3.162278);
        assert_eq!(catalog.policy_text("acme", Some(1)).expect("v1").1, v1);
    }
}
