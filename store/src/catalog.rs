//! The catalog: partners, identities, datasets and their versions (with wrapped data keys).
//!
//! Embedded default: SQLite in WAL mode with `secure_delete` on, so a deleted wrapped key
//! is overwritten in the database file rather than left in a free page. All methods are
//! blocking; async callers run them on the blocking pool.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use escrow_policies::{Grant, Usage};

use crate::model::policy::{self, PolicyDocument, PolicyVersion};
use crate::{Error, Result};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS partners (
    name        TEXT PRIMARY KEY,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE TABLE IF NOT EXISTS identities (
    serial      TEXT PRIMARY KEY,              -- certificate serial, lowercase hex
    partner     TEXT NOT NULL REFERENCES partners(name),
    user        TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE INDEX IF NOT EXISTS identities_by_partner ON identities(partner, user);
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
-- The web console's sign-in links (kind 'link') and browser sessions (kind 'session'), kept
-- in the catalog so that every node sharing it knows them and a restart ends none. Tokens
-- are kept by their SHA-256 only (`digest`, hex): a copy of the catalog cannot be replayed.
-- Times are milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS console_tokens (
    kind        TEXT NOT NULL,
    digest      TEXT NOT NULL,
    serial      TEXT NOT NULL,                 -- the certificate the link was minted with
    partner     TEXT NOT NULL,
    user        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    seen_ms     INTEGER NOT NULL,
    PRIMARY KEY (kind, digest)
);
"#;

/// Who a console link or session acts as: the serial of the certificate it was minted with,
/// its partner and its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleIdentity {
    pub serial: String,
    pub partner: String,
    pub user: String,
}

/// How long console tokens of one kind live and how many are kept.
#[derive(Debug, Clone, Copy)]
pub struct TokenRules {
    /// A token unused for this long has ended.
    pub idle_ms: i64,
    /// A token this old has ended, used or not.
    pub absolute_ms: i64,
    /// Tokens one identity may hold: another drops that identity's least recently used.
    pub per_identity: usize,
    /// Tokens kept in all: past it a new one is refused (nobody else's is dropped).
    pub max: usize,
}

/// What to do with a console token found live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// Look only.
    Peek,
    /// Restart its idle time.
    Touch,
    /// Use it up (a sign-in link works once).
    Take,
}

/// Handle on the catalog database.
pub struct Catalog {
    conn: Mutex<Connection>,
    /// Bumped on every change that can alter a policy decision (grants, settings, deletes),
    /// so the query engine knows when to rebuild its policy set.
    policy_generation: AtomicU64,
}

/// A dataset a partner may name in a query: its own, or one shared with it by a grant.
#[derive(Debug, Clone)]
pub struct QueryableDataset {
    pub owner: String,
    pub name: String,
    pub key_column: Option<String>,
    pub live: VersionKey,
    /// Rows of the live version.
    pub rows: i64,
}

/// What `Catalog::spend` did.
#[derive(Debug, Clone)]
pub enum Spend {
    /// Charged (`new`) or already paid; each charge's total spent afterwards.
    Charged { new: bool, totals: Vec<f64> },
    /// Nothing spent: this dataset's budget would be exceeded (`spent` so far).
    Exhausted { charge: BudgetCharge, spent: f64 },
}

/// The budget a querying partner needs from one dataset, and what it may spend there.
#[derive(Debug, Clone)]
pub struct BudgetCharge {
    pub owner: String,
    pub dataset: String,
    pub budget: f64,
}

/// A registered, unrevoked identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRow {
    pub partner: String,
    pub user: String,
    pub role: String,
}

/// One column of a stored dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ColumnInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
    pub nullable: bool,
}

/// A named subset of a dataset, defined by its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Population {
    pub owner: String,
    pub dataset: String,
    pub name: String,
    /// SQL predicate over the dataset's columns.
    pub filter: String,
    /// Definition order within the dataset (1, 2, ...).
    pub position: i64,
}

/// Metadata of the live (latest) version of a dataset. Never any row content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema, serde::Deserialize)]
pub struct DatasetInfo {
    pub owner: String,
    pub name: String,
    pub version: i64,
    pub rows: i64,
    pub source_bytes: i64,
    pub sealed_bytes: i64,
    pub format: String,
    pub key_column: Option<String>,
    pub columns: Vec<ColumnInfo>,
    pub created_at: String,
    pub uploaded_by: String,
}

/// Everything needed to open one sealed version.
#[derive(Debug, Clone)]
pub struct VersionKey {
    pub dataset_id: String,
    pub version_id: String,
    pub version: i64,
    pub wrapped_dek: Vec<u8>,
    pub kek_id: String,
}

/// A new version to record at commit.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub dataset_id: String,
    pub version_id: String,
    pub rows: i64,
    pub source_bytes: i64,
    pub sealed_bytes: i64,
    pub format: String,
    pub columns: Vec<ColumnInfo>,
    pub key_column: Option<String>,
    pub uploaded_by: String,
    /// How website keys matched (none for id keys or no key).
    pub matching: Option<crate::matching::MatchStats>,
}

/// One version of a dataset, as its owner sees it. Never any row content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct VersionInfo {
    pub version: i64,
    pub rows: i64,
    pub source_bytes: i64,
    pub sealed_bytes: i64,
    pub format: String,
    pub key_column: Option<String>,
    pub columns: Vec<ColumnInfo>,
    /// Rows keyed by domain, by name, and unmatched (website keys; absent for id keys and
    /// for versions uploaded before escrow kept these).
    pub matching: Option<crate::matching::MatchStats>,
    pub created_at: String,
    pub uploaded_by: String,
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The catalog's data version (SQLite `user_version`): 1 = budgets in zCDP units.
const DATA_VERSION: i64 = 1;

/// One-time conversions of stored values whose meaning changed, each in one transaction.
///
/// Version 1: budgets compose in squares (zCDP, [`Catalog::spend`]); before, the ε of
/// questions added up linearly. A stored budget B at ε allowed B/ε questions; left as it
/// was, it would now allow (B/ε)², far more than its owner agreed to. It becomes √(B·ε)
/// (rounded up to a millionth), which allows the same B/ε questions at ε. The documents of
/// policy versions from before are converted alike, so a rollback to one restores what it
/// meant (their diffs and the audit log keep the numbers as they were written then).
/// Add a column a catalog made by an older escrow lacks (`CREATE TABLE IF NOT EXISTS` does
/// not change an existing table).
fn add_column(conn: &Connection, table: &str, column: &str, decl: &str) -> Result<()> {
    let has: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, column],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
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
            params![owner, dataset, v.to_string()],
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
                params![owner, version, converted],
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

impl Catalog {
    /// Open (creating if needed) the catalog and bring its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA secure_delete = ON;",
        )?;
        conn.execute_batch(SCHEMA)?;
        add_column(&conn, "dataset_versions", "matching", "TEXT")?;
        conn.execute(
            "INSERT OR IGNORE INTO crl_state (id, number) VALUES (1, 1)",
            [],
        )?;
        migrate(&mut conn)?;
        Ok(Catalog {
            conn: Mutex::new(conn),
            policy_generation: AtomicU64::new(0),
        })
    }

    /// Changes with every grant, setting or dataset deletion (see `policy_generation`).
    pub fn policy_generation(&self) -> u64 {
        self.policy_generation.load(Ordering::Acquire)
    }

    fn policy_changed(&self) {
        self.policy_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Run `f` in one write transaction (taken at once, so writers queue here rather than
    /// fail later); committed only if `f` succeeds. Audit appends run inside it, so the
    /// catalog lock always comes before the audit file lock, in every process.
    pub fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Run a read-only `f` on the connection (no write lock taken).
    pub fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        f(&self.conn())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- keys --------------------------------------------------------------------------

    /// Record `id` as the current key-encryption key unless one is recorded (a new or older
    /// data directory); returns the recorded one.
    pub fn ensure_current_kek(&self, id: &str) -> Result<String> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO kek_state (id, current) VALUES (1, ?1)",
                [id],
            )?;
            current_kek_in(tx)
        })
    }

    /// The key-encryption key new data keys are wrapped under.
    pub fn current_kek(&self) -> Result<String> {
        current_kek_in(&self.conn())
    }

    /// Every key-encryption key some data key is wrapped under.
    pub fn kek_ids_in_use(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT DISTINCT kek_id FROM dataset_versions")?;
        let ids = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// Re-wrap every data key wrapped under `from` with `rewrap(dataset_id, version_id,
    /// wrapped)` and make `to` the current key, in one transaction with `after` (the audit
    /// record). Inside it, the inventory must show no data key wrapped under anything but
    /// `to`, or nothing changes. Returns the number re-wrapped.
    pub fn rewrap_all(
        &self,
        from: &str,
        to: &str,
        rewrap: impl Fn(&str, &str, &[u8]) -> Result<Vec<u8>>,
        after: impl FnOnce(&Connection, usize) -> Result<()>,
    ) -> Result<usize> {
        self.write(|tx| {
            let current = current_kek_in(tx)?;
            if current != from {
                return Err(Error::Conflict(format!(
                    "the catalog's current key-encryption key is {current}, not {from}"
                )));
            }
            let rows: Vec<(String, String, Vec<u8>)> = {
                let mut st = tx.prepare(
                    "SELECT dataset_id, version_id, wrapped_dek FROM dataset_versions WHERE kek_id = ?1",
                )?;
                st.query_map([from], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<rusqlite::Result<_>>()?
            };
            for (dataset_id, version_id, wrapped) in &rows {
                let new = rewrap(dataset_id, version_id, wrapped)?;
                tx.execute(
                    "UPDATE dataset_versions SET wrapped_dek = ?3, kek_id = ?4
                     WHERE dataset_id = ?1 AND version_id = ?2",
                    params![dataset_id, version_id, new, to],
                )?;
            }
            tx.execute("UPDATE kek_state SET current = ?1 WHERE id = 1", [to])?;
            let left: i64 = tx.query_row(
                "SELECT COUNT(*) FROM dataset_versions WHERE kek_id <> ?1",
                [to],
                |r| r.get(0),
            )?;
            if left != 0 {
                return Err(Error::internal(format!(
                    "{left} data keys are wrapped under neither {from} nor {to}"
                )));
            }
            after(tx, rows.len())?;
            Ok(rows.len())
        })
    }

    // ---- partners and identities -------------------------------------------------------

    /// Register a partner; fails with `conflict` if it exists. `after` runs in the same
    /// transaction (the audit record).
    pub fn add_partner(
        &self,
        name: &str,
        after: impl FnOnce(&Connection) -> Result<()>,
    ) -> Result<()> {
        self.write(|conn| {
            let exists: Option<Option<String>> = conn
                .query_row(
                    "SELECT revoked_at FROM partners WHERE name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?;
            match exists {
                Some(None) => Err(Error::Conflict(format!("partner {name} already exists"))),
                Some(Some(_)) => Err(Error::Conflict(format!(
                    "partner {name} was revoked; partner names are not reused"
                ))),
                None => {
                    conn.execute(
                        "INSERT INTO partners (name, created_at) VALUES (?1, ?2)",
                        params![name, now_rfc3339()],
                    )?;
                    after(conn)
                }
            }
        })
    }

    /// Record an issued identity certificate.
    pub fn add_identity(
        &self,
        serial: &str,
        partner: &str,
        user: &str,
        role: &str,
        after: impl FnOnce(&Connection) -> Result<()>,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO identities (serial, partner, user, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![serial, partner, user, role, now_rfc3339()],
            )?;
            after(tx)
        })
    }

    /// Revoke a partner and all its identities; returns the new CRL contents and number.
    pub fn revoke_partner(
        &self,
        name: &str,
        after: impl FnOnce(&Connection) -> Result<()>,
    ) -> Result<(Vec<(String, OffsetDateTime)>, u64)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_rfc3339();
        let changed = tx.execute(
            "UPDATE partners SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
            params![name, now],
        )?;
        if changed == 0 {
            let known: bool = tx
                .query_row("SELECT 1 FROM partners WHERE name = ?1", [name], |_| {
                    Ok(true)
                })
                .optional()?
                .unwrap_or(false);
            return Err(if known {
                Error::Conflict(format!("partner {name} is already revoked"))
            } else {
                Error::NotFound(format!("no partner named {name}"))
            });
        }
        tx.execute(
            "UPDATE identities SET revoked_at = ?2 WHERE partner = ?1 AND revoked_at IS NULL",
            params![name, now],
        )?;
        tx.execute("UPDATE crl_state SET number = number + 1 WHERE id = 1", [])?;
        let out = revocations_in(&tx)?;
        after(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Revoke one user's active identity; returns the new CRL contents and number.
    pub fn revoke_user(
        &self,
        partner: &str,
        user: &str,
        after: impl FnOnce(&Connection) -> Result<()>,
    ) -> Result<(Vec<(String, OffsetDateTime)>, u64)> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE identities SET revoked_at = ?3
                 WHERE partner = ?1 AND user = ?2 AND revoked_at IS NULL",
                params![partner, user, now_rfc3339()],
            )?;
            if n == 0 {
                return Err(Error::NotFound(format!(
                    "{partner} has no active user {user}"
                )));
            }
            tx.execute("UPDATE crl_state SET number = number + 1 WHERE id = 1", [])?;
            let out = revocations_in(tx)?;
            after(tx)?;
            Ok(out)
        })
    }

    pub fn partner_is_active(&self, name: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM partners WHERE name = ?1 AND revoked_at IS NULL",
                [name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn user_is_active(&self, partner: &str, user: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM identities WHERE partner = ?1 AND user = ?2 AND revoked_at IS NULL",
                params![partner, user],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Every active user's role (the grouping rules of the role policy), and a generation
    /// that changes whenever an identity is added or revoked.
    pub fn role_assignments(&self) -> Result<(Vec<IdentityRow>, (i64, i64))> {
        let conn = self.conn();
        let generation = identity_generation_in(&conn)?;
        let mut st = conn.prepare(
            "SELECT i.partner, i.user, i.role FROM identities i JOIN partners p ON p.name = i.partner
             WHERE i.revoked_at IS NULL AND p.revoked_at IS NULL ORDER BY i.partner, i.user",
        )?;
        let rows = st.query_map([], |r| {
            Ok(IdentityRow {
                partner: r.get(0)?,
                user: r.get(1)?,
                role: r.get(2)?,
            })
        })?;
        Ok((rows.collect::<rusqlite::Result<_>>()?, generation))
    }

    /// The generation of `role_assignments`, cheaply.
    pub fn identity_generation(&self) -> Result<(i64, i64)> {
        identity_generation_in(&self.conn())
    }

    /// Every revoked serial with its revocation time, and the current CRL number.
    pub fn revocations(&self) -> Result<(Vec<(String, OffsetDateTime)>, u64)> {
        revocations_in(&self.conn())
    }

    /// The identity registered for this certificate serial, if it and its partner are active.
    pub fn active_identity(&self, serial: &str) -> Result<Option<IdentityRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT i.partner, i.user, i.role FROM identities i JOIN partners p ON p.name = i.partner
                 WHERE i.serial = ?1 AND i.revoked_at IS NULL AND p.revoked_at IS NULL",
                [serial],
                |r| {
                    Ok(IdentityRow {
                        partner: r.get(0)?,
                        user: r.get(1)?,
                        role: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Names of all partners and whether they are active.
    pub fn partners(&self) -> Result<Vec<(String, bool)>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT name, revoked_at IS NULL FROM partners ORDER BY name")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- datasets ----------------------------------------------------------------------

    /// The id of `owner`'s dataset `name`, creating the dataset row if needed.
    /// A dataset row without versions is invisible and removed at startup.
    pub fn dataset_id_for_upload(&self, owner: &str, name: &str, new_id: &str) -> Result<String> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO datasets (id, owner, name, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![new_id, owner, name, now_rfc3339()],
        )?;
        Ok(conn.query_row(
            "SELECT id FROM datasets WHERE owner = ?1 AND name = ?2",
            params![owner, name],
            |r| r.get(0),
        )?)
    }

    /// Record a complete version; it becomes the live one. Returns its version number.
    /// `after` runs in the same transaction with the version number (the audit record).
    /// `wrap` wraps the version's data key under the current key-encryption key (its id is
    /// given), inside the transaction, so a rotation cannot slip between wrap and commit.
    pub fn commit_version(
        &self,
        v: &NewVersion,
        wrap: impl FnOnce(&str) -> Result<Vec<u8>>,
        after: impl FnOnce(&Connection, i64) -> Result<()>,
    ) -> Result<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM datasets WHERE id = ?1",
                [&v.dataset_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !exists {
            return Err(Error::Conflict(
                "the dataset was deleted while this upload was in progress".into(),
            ));
        }
        let version: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM dataset_versions WHERE dataset_id = ?1",
            [&v.dataset_id],
            |r| r.get(0),
        )?;
        let schema_json = serde_json::to_string(&v.columns).map_err(Error::internal)?;
        let matching = v
            .matching
            .map(|m| serde_json::to_string(&m))
            .transpose()
            .map_err(Error::internal)?;
        let kek_id = current_kek_in(&tx)?;
        let wrapped_dek = wrap(&kek_id)?;
        tx.execute(
            "INSERT INTO dataset_versions (dataset_id, version, version_id, rows, source_bytes,
                sealed_bytes, format, schema_json, key_column, wrapped_dek, kek_id, uploaded_by, created_at,
                matching)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                v.dataset_id,
                version,
                v.version_id,
                v.rows,
                v.source_bytes,
                v.sealed_bytes,
                v.format,
                schema_json,
                v.key_column,
                wrapped_dek,
                kek_id,
                v.uploaded_by,
                now_rfc3339(),
                matching
            ],
        )?;
        after(&tx, version)?;
        tx.commit()?;
        Ok(version)
    }

    /// The live version of every dataset `owner` has.
    pub fn list_datasets(&self, owner: &str) -> Result<Vec<DatasetInfo>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT d.owner, d.name, v.version, v.rows, v.source_bytes, v.sealed_bytes, v.format,
                    v.key_column, v.schema_json, v.created_at, v.uploaded_by
             FROM datasets d JOIN dataset_versions v ON v.dataset_id = d.id
             WHERE d.owner = ?1
               AND v.version = (SELECT MAX(version) FROM dataset_versions WHERE dataset_id = d.id)
             ORDER BY d.name",
        )?;
        let rows = st.query_map([owner], |r| {
            let schema: String = r.get(8)?;
            Ok((
                DatasetInfo {
                    owner: r.get(0)?,
                    name: r.get(1)?,
                    version: r.get(2)?,
                    rows: r.get(3)?,
                    source_bytes: r.get(4)?,
                    sealed_bytes: r.get(5)?,
                    format: r.get(6)?,
                    key_column: r.get(7)?,
                    columns: Vec::new(),
                    created_at: r.get(9)?,
                    uploaded_by: r.get(10)?,
                },
                schema,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut info, schema) = row?;
            info.columns = serde_json::from_str(&schema)
                .map_err(|e| Error::internal(format!("bad schema in catalog: {e}")))?;
            out.push(info);
        }
        Ok(out)
    }

    /// Every version of `owner`'s dataset `name`, oldest first.
    pub fn dataset_versions(&self, owner: &str, name: &str) -> Result<Vec<VersionInfo>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT v.version, v.rows, v.source_bytes, v.sealed_bytes, v.format, v.key_column,
                    v.schema_json, v.matching, v.created_at, v.uploaded_by
             FROM datasets d JOIN dataset_versions v ON v.dataset_id = d.id
             WHERE d.owner = ?1 AND d.name = ?2
             ORDER BY v.version",
        )?;
        let rows = st.query_map([owner, name], |r| {
            Ok((
                VersionInfo {
                    version: r.get(0)?,
                    rows: r.get(1)?,
                    source_bytes: r.get(2)?,
                    sealed_bytes: r.get(3)?,
                    format: r.get(4)?,
                    key_column: r.get(5)?,
                    columns: Vec::new(),
                    matching: None,
                    created_at: r.get(8)?,
                    uploaded_by: r.get(9)?,
                },
                r.get::<_, String>(6)?,
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut info, schema, matching) = row?;
            let bad =
                |e: serde_json::Error| Error::internal(format!("bad version in catalog: {e}"));
            info.columns = serde_json::from_str(&schema).map_err(bad)?;
            info.matching = matching
                .map(|m| serde_json::from_str(&m))
                .transpose()
                .map_err(bad)?;
            out.push(info);
        }
        Ok(out)
    }

    /// Keys of every version of a dataset (newest first).
    pub fn version_keys(&self, owner: &str, name: &str) -> Result<Vec<VersionKey>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT d.id, v.version_id, v.version, v.wrapped_dek, v.kek_id
             FROM datasets d JOIN dataset_versions v ON v.dataset_id = d.id
             WHERE d.owner = ?1 AND d.name = ?2 ORDER BY v.version DESC",
        )?;
        let rows = st.query_map(params![owner, name], |r| version_key(r, 0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Delete a dataset and every version row (with its wrapped key). Returns the dataset id
    /// and the number of versions removed; `not_found` if the owner has no such dataset.
    pub fn delete_dataset(
        &self,
        owner: &str,
        name: &str,
        by: &str,
        after: impl FnOnce(&Connection, usize, Option<&PolicyVersion>) -> Result<()>,
    ) -> Result<(String, usize)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id: Option<String> = tx
            .query_row(
                "SELECT id FROM datasets d WHERE owner = ?1 AND name = ?2
                   AND EXISTS (SELECT 1 FROM dataset_versions v WHERE v.dataset_id = d.id)",
                params![owner, name],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else {
            return Err(Error::NotFound(format!("no dataset named {name}")));
        };
        // Answers computed from these versions go with them.
        for table in ["released_answers", "released_overlaps"] {
            tx.execute(
                &format!(
                    "DELETE FROM {table} WHERE EXISTS (SELECT 1 FROM dataset_versions v
                       WHERE v.dataset_id = ?1 AND instr(versions, ' ' || v.version_id || ' ') > 0)"
                ),
                [&id],
            )?;
        }
        let n = tx.execute("DELETE FROM dataset_versions WHERE dataset_id = ?1", [&id])?;
        // Consent was given for this dataset; a later upload under the same name starts bare.
        tx.execute(
            "DELETE FROM grants WHERE owner = ?1 AND dataset = ?2",
            params![owner, name],
        )?;
        tx.execute(
            "DELETE FROM dataset_settings WHERE owner = ?1 AND dataset = ?2",
            params![owner, name],
        )?;
        tx.execute(
            "DELETE FROM populations WHERE owner = ?1 AND dataset = ?2",
            params![owner, name],
        )?;
        tx.execute("DELETE FROM datasets WHERE id = ?1", [&id])?;
        let v = record_policy_version(&tx, owner, by, "dataset_delete")?;
        after(&tx, n, v.as_ref())?;
        tx.commit()?;
        self.policy_changed();
        // Push the deleted pages out of the WAL into the (secure-deleted) main file.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok((id, n))
    }

    /// Every (dataset id, version id) with a catalog row: used to find orphan files.
    pub fn all_version_ids(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT dataset_id, version_id FROM dataset_versions")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- populations -------------------------------------------------------------------

    /// Define a population (`p.position` is ignored). Returns its position and whether it is
    /// new: the same definition again changes nothing; a different filter under the same
    /// name is a conflict.
    pub fn add_population(
        &self,
        p: &Population,
        by: &str,
        after: impl FnOnce(&Connection, Option<&PolicyVersion>) -> Result<()>,
    ) -> Result<(i64, bool)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<(String, i64)> = tx
            .query_row(
                "SELECT filter, position FROM populations WHERE owner = ?1 AND dataset = ?2 AND name = ?3",
                params![p.owner, p.dataset, p.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match existing {
            Some((f, position)) if f == p.filter => {
                after(&tx, None)?;
                tx.commit()?;
                return Ok((position, false));
            }
            Some(_) => {
                return Err(Error::Conflict(format!(
                    "{}.{} already has a population {}; remove it first",
                    p.owner, p.dataset, p.name
                )));
            }
            None => {}
        }
        let position: i64 = tx.query_row(
            "SELECT COALESCE(MAX(position), 0) + 1 FROM populations WHERE owner = ?1 AND dataset = ?2",
            params![p.owner, p.dataset],
            |r| r.get(0),
        )?;
        insert_population_in(&tx, p, position, by)?;
        let v = record_policy_version(&tx, &p.owner, by, "population_add")?;
        after(&tx, v.as_ref())?;
        tx.commit()?;
        self.policy_changed();
        Ok((position, true))
    }

    /// Remove a population and the overlap grants that name it (a later population of the
    /// same name is a new definition and needs its own grants); false if there was none
    /// (nothing changes then and `after` does not run).
    pub fn remove_population(
        &self,
        owner: &str,
        dataset: &str,
        name: &str,
        by: &str,
        after: impl FnOnce(&Connection, Option<&PolicyVersion>) -> Result<()>,
    ) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM populations WHERE owner = ?1 AND dataset = ?2 AND name = ?3",
            params![owner, dataset, name],
        )?;
        tx.execute(
            "DELETE FROM grants WHERE owner = ?1 AND dataset = ?2 AND col = ?3 AND usage = ?4",
            params![owner, dataset, name, Usage::Overlap.as_str()],
        )?;
        if n == 0 {
            return Ok(false);
        }
        let v = record_policy_version(&tx, owner, by, "population_remove")?;
        after(&tx, v.as_ref())?;
        tx.commit()?;
        drop(conn);
        self.policy_changed();
        Ok(n == 1)
    }

    /// `owner`'s populations, by dataset then definition order.
    pub fn populations_of(&self, owner: &str) -> Result<Vec<Population>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT owner, dataset, name, filter, position FROM populations
             WHERE owner = ?1 ORDER BY dataset, position",
        )?;
        let rows = st.query_map([owner], |r| {
            Ok(Population {
                owner: r.get(0)?,
                dataset: r.get(1)?,
                name: r.get(2)?,
                filter: r.get(3)?,
                position: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- grants ------------------------------------------------------------------------

    /// Record a grant; returns false if it already existed (nothing changed). `after` runs
    /// in the same transaction.
    pub fn add_grant(
        &self,
        g: &Grant,
        by: &str,
        after: impl FnOnce(&Connection, Option<&PolicyVersion>) -> Result<()>,
    ) -> Result<bool> {
        let n = self.write(|tx| {
            let n = insert_grant_in(tx, g, by)?;
            let v = if n == 1 {
                record_policy_version(tx, &g.owner, by, "grant")?
            } else {
                None
            };
            after(tx, v.as_ref())?;
            Ok(n)
        })?;
        self.policy_changed();
        Ok(n == 1)
    }

    /// Remove a grant; returns false if there was no such grant (then `after` does not
    /// run).
    pub fn remove_grant(
        &self,
        g: &Grant,
        by: &str,
        after: impl FnOnce(&Connection, Option<&PolicyVersion>) -> Result<()>,
    ) -> Result<bool> {
        let n = self.write(|tx| {
            let n = tx.execute(
            "DELETE FROM grants WHERE owner = ?1 AND dataset = ?2 AND col = ?3 AND grantee = ?4 AND usage = ?5",
            params![
                g.owner,
                g.dataset,
                g.column.as_deref().unwrap_or("*"),
                g.grantee,
                g.usage.as_str()
            ],
        )?;
            if n == 1 {
                let v = record_policy_version(tx, &g.owner, by, "revoke")?;
                after(tx, v.as_ref())?;
            }
            Ok(n)
        })?;
        self.policy_changed();
        Ok(n == 1)
    }

    /// Grants made by `owner` (`made`) and grants made to `partner` or to everyone
    /// (`received`), each ordered.
    pub fn grants_of(&self, partner: &str) -> Result<(Vec<Grant>, Vec<Grant>)> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT grantee, owner, dataset, col, usage FROM grants
             WHERE owner = ?1 OR grantee = ?1 OR grantee = '*'
             ORDER BY owner, dataset, col, grantee, usage",
        )?;
        let (mut made, mut received) = (Vec::new(), Vec::new());
        for g in read_grants(&mut st, [partner])? {
            if g.owner == partner {
                made.push(g);
            } else {
                received.push(g);
            }
        }
        Ok((made, received))
    }

    // ---- queries: visibility, settings, privacy budget ---------------------------------

    /// The live version of every dataset `partner` may name in a query: its own and those
    /// with at least one grant to it (or to every partner).
    pub fn queryable(&self, partner: &str) -> Result<Vec<QueryableDataset>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT d.owner, d.name, v.key_column, d.id, v.version_id, v.version, v.wrapped_dek, v.kek_id,
                    v.rows
             FROM datasets d JOIN dataset_versions v ON v.dataset_id = d.id
             WHERE v.version = (SELECT MAX(version) FROM dataset_versions WHERE dataset_id = d.id)
               AND (d.owner = ?1 OR EXISTS (SELECT 1 FROM grants g
                     WHERE g.owner = d.owner AND g.dataset = d.name
                       AND (g.grantee = ?1 OR g.grantee = '*')))
             ORDER BY d.owner, d.name",
        )?;
        let rows = st.query_map([partner], |r| {
            Ok(QueryableDataset {
                owner: r.get(0)?,
                name: r.get(1)?,
                key_column: r.get(2)?,
                live: version_key(r, 3)?,
                rows: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The stored protection settings of a dataset (JSON), if the owner set any.
    pub fn settings_json(&self, owner: &str, dataset: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT settings FROM dataset_settings WHERE owner = ?1 AND dataset = ?2",
                params![owner, dataset],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Replace a dataset's protection settings.
    pub fn put_settings_json(
        &self,
        owner: &str,
        dataset: &str,
        json: &str,
        by: &str,
        after: impl FnOnce(&Connection, Option<&PolicyVersion>) -> Result<()>,
    ) -> Result<()> {
        self.write(|tx| {
            put_settings_in(tx, owner, dataset, json, by)?;
            let v = record_policy_version(tx, owner, by, "settings")?;
            after(tx, v.as_ref())
        })?;
        self.policy_changed();
        Ok(())
    }

    /// Spend `epsilon` for the question `fingerprint` once per data owner among `charges`,
    /// all or nothing. Composition is zCDP's, per (asking partner, owner): a question at ε
    /// costs ρ = ε²/2 and the ρ of every distinct question that read any of the owner's
    /// datasets add up; the total is reported as the ε of one equivalent question,
    /// `√(Σ ε²)` (escrow_query::noise). A question already paid for spends nothing. The limit
    /// for an owner is the smallest budget of its datasets the question reads, in the same
    /// unit: `√(Σ ε²) <= budget`. Returns whether anything
    /// was spent and, per charge, the owner's total spent by `partner` afterwards; if a limit
    /// would be exceeded, nothing is spent and that charge and the total are returned. With
    /// `dry_run`, the same answer with nothing spent (the transaction rolls back).
    pub fn spend(
        &self,
        partner: &str,
        charges: &[BudgetCharge],
        epsilon: f64,
        fingerprint: &str,
        dry_run: bool,
    ) -> Result<Spend> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut new = false;
        let mut owner_totals: std::collections::BTreeMap<&str, f64> = Default::default();
        let owners: std::collections::BTreeSet<&str> =
            charges.iter().map(|c| c.owner.as_str()).collect();
        for owner in owners {
            let of_owner: Vec<&BudgetCharge> =
                charges.iter().filter(|c| c.owner == owner).collect();
            let (spent_sq, paid): (f64, bool) = tx.query_row(
                "SELECT COALESCE(SUM(epsilon * epsilon), 0), COALESCE(MAX(fingerprint = ?3), 0)
                 FROM privacy_ledger WHERE partner = ?1 AND owner = ?2",
                params![partner, owner, fingerprint],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if paid {
                owner_totals.insert(owner, spent_sq.sqrt());
                continue;
            }
            // The strictest budget of the owner's datasets read; a small tolerance so that
            // budget² / epsilon² questions fit exactly.
            let limit = of_owner
                .iter()
                .copied()
                .min_by(|a, b| a.budget.total_cmp(&b.budget))
                .ok_or_else(|| Error::internal("a charge without datasets"))?;
            let after_sq = spent_sq + epsilon * epsilon;
            if after_sq > limit.budget * limit.budget * (1.0 + 1e-9) + 1e-12 {
                return Ok(Spend::Exhausted {
                    charge: limit.clone(),
                    spent: spent_sq.sqrt(),
                });
            }
            let mut names: Vec<&str> = of_owner.iter().map(|c| c.dataset.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            tx.execute(
                "INSERT INTO privacy_ledger (partner, owner, dataset, fingerprint, epsilon, spent_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![partner, owner, names.join(","), fingerprint, epsilon, now_rfc3339()],
            )?;
            new = true;
            owner_totals.insert(owner, after_sq.sqrt());
        }
        let totals = charges
            .iter()
            .map(|c| owner_totals.get(c.owner.as_str()).copied().unwrap_or(0.0))
            .collect();
        if !dry_run {
            tx.commit()?;
        }
        Ok(Spend::Charged { new, totals })
    }

    // ---- policy versions -----------------------------------------------------------------

    /// `owner`'s policy history, oldest first.
    pub fn policy_history(&self, owner: &str) -> Result<Vec<policy::HistoryEntry>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT version, created_at, created_by, change, diff FROM policy_versions
             WHERE owner = ?1 ORDER BY version",
        )?;
        let rows = st.query_map([owner], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (version, time, by, change, diff) = row?;
            let diff = serde_json::from_str(&diff)
                .map_err(|e| Error::internal(format!("bad policy diff in catalog: {e}")))?;
            out.push(policy::HistoryEntry {
                version,
                time,
                by,
                change,
                diff,
            });
        }
        Ok(out)
    }

    /// The canonical text of `owner`'s policy at `version` (0: empty, before any change) with
    /// that number; `None`: the policy in force and the latest version number.
    pub fn policy_text(&self, owner: &str, version: Option<i64>) -> Result<(i64, String)> {
        let conn = self.conn();
        match version {
            None => Ok((
                latest_policy_in(&conn, owner)?.0,
                policy_document_in(&conn, owner)?.body(),
            )),
            Some(0) => Ok((0, String::new())),
            Some(v) => conn
                .query_row(
                    "SELECT document FROM policy_versions WHERE owner = ?1 AND version = ?2",
                    params![owner, v],
                    |r| r.get(0),
                )
                .optional()?
                .map(|text| (v, text))
                .ok_or_else(|| Error::NotFound(format!("{owner} has no policy version {v}"))),
        }
    }

    /// Replace the owner's whole policy (grants, settings, populations) with `doc`, already
    /// validated, in one transaction with `after` (the audit record). Returns the version
    /// written (`None`: the document is the policy in force, nothing changed).
    pub fn replace_policy(
        &self,
        doc: &PolicyDocument,
        by: &str,
        change: &str,
        after: impl FnOnce(&Connection, Option<&PolicyVersion>) -> Result<()>,
    ) -> Result<Option<PolicyVersion>> {
        let owner = doc.owner.as_str();
        let v = self.write(|tx| {
            // Validation ran before this transaction: a dataset deleted since then fails here
            // rather than leaving rules about a dataset that no longer exists.
            for d in doc.datasets() {
                let live: bool = tx
                    .query_row(
                        "SELECT 1 FROM datasets WHERE owner = ?1 AND name = ?2",
                        params![owner, d],
                        |_| Ok(true),
                    )
                    .optional()?
                    .unwrap_or(false);
                if !live {
                    return Err(Error::Conflict(format!(
                        "dataset {d} was deleted while the policy was being replaced"
                    )));
                }
            }
            for table in ["grants", "dataset_settings", "populations"] {
                tx.execute(&format!("DELETE FROM {table} WHERE owner = ?1"), [owner])?;
            }
            for g in &doc.grants {
                insert_grant_in(tx, g, by)?;
            }
            for (d, s) in &doc.settings {
                let json = serde_json::to_string(s).map_err(Error::internal)?;
                put_settings_in(tx, owner, d, &json, by)?;
            }
            let mut position = 0;
            let mut last = "";
            for p in &doc.populations {
                if p.dataset != last {
                    (position, last) = (0, p.dataset.as_str());
                }
                position += 1;
                let population = Population {
                    owner: owner.to_string(),
                    dataset: p.dataset.clone(),
                    name: p.name.clone(),
                    filter: p.filter.clone(),
                    position,
                };
                insert_population_in(tx, &population, position, by)?;
            }
            let v = record_policy_version(tx, owner, by, change)?;
            after(tx, v.as_ref())?;
            Ok(v)
        })?;
        self.policy_changed();
        Ok(v)
    }

    /// The answer kept for `partner`'s question `fingerprint`, if any.
    pub fn released_answer(&self, partner: &str, fingerprint: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT answer FROM released_answers WHERE partner = ?1 AND fingerprint = ?2",
                params![partner, fingerprint],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Keep the answer released to `partner` for `fingerprint`, computed from `versions`.
    pub fn keep_answer(
        &self,
        partner: &str,
        fingerprint: &str,
        versions: &[String],
        answer: &[u8],
    ) -> Result<()> {
        let versions = format!(" {} ", versions.join(" "));
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO released_answers
                   (partner, fingerprint, versions, answer, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![partner, fingerprint, versions, answer, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    /// Keep an overlap matrix released to `partner` (asked of `with`), computed from
    /// `versions`: `mine` and `theirs` are `owner.dataset@vN`, `cells` the released cells
    /// (JSON). Released again on the same versions, it is kept once.
    #[allow(clippy::too_many_arguments)]
    pub fn keep_overlap(
        &self,
        partner: &str,
        with: &str,
        mine: &str,
        theirs: &str,
        fingerprint: &str,
        versions: &[String],
        cells: &str,
    ) -> Result<()> {
        let versions = format!(" {} ", versions.join(" "));
        self.write(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO released_overlaps
                   (partner, with_partner, mine, theirs, fingerprint, versions, cells, released_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    partner,
                    with,
                    mine,
                    theirs,
                    fingerprint,
                    versions,
                    cells,
                    now_rfc3339()
                ],
            )?;
            Ok(())
        })
    }

    /// The overlap matrices released to `partner` with `with`, oldest first: (released at,
    /// mine, theirs, cells JSON).
    pub fn released_overlaps(
        &self,
        partner: &str,
        with: &str,
    ) -> Result<Vec<(String, String, String, String)>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT released_at, mine, theirs, cells FROM released_overlaps
             WHERE partner = ?1 AND with_partner = ?2 ORDER BY released_at, rowid",
        )?;
        let rows = st
            .query_map(params![partner, with], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Keep a new console token of `kind` for `who` (`rules`: ended tokens of that kind
    /// are dropped first, then `who`'s least recently used beyond its share). `false` when
    /// the kind is full: nothing was kept.
    pub fn console_token_insert(
        &self,
        kind: &str,
        digest: &str,
        who: &ConsoleIdentity,
        now_ms: i64,
        rules: &TokenRules,
    ) -> Result<bool> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM console_tokens
                 WHERE kind = ?1 AND (?2 - seen_ms >= ?3 OR ?2 - created_ms >= ?4)",
                params![kind, now_ms, rules.idle_ms, rules.absolute_ms],
            )?;
            let own: i64 = tx.query_row(
                "SELECT COUNT(*) FROM console_tokens WHERE kind = ?1 AND serial = ?2",
                params![kind, who.serial],
                |r| r.get(0),
            )?;
            let over = own + 1 - rules.per_identity as i64;
            if over > 0 {
                tx.execute(
                    "DELETE FROM console_tokens WHERE rowid IN (SELECT rowid FROM console_tokens
                       WHERE kind = ?1 AND serial = ?2 ORDER BY seen_ms, rowid LIMIT ?3)",
                    params![kind, who.serial, over],
                )?;
            }
            let all: i64 = tx.query_row(
                "SELECT COUNT(*) FROM console_tokens WHERE kind = ?1",
                [kind],
                |r| r.get(0),
            )?;
            if all >= rules.max as i64 {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO console_tokens (kind, digest, serial, partner, user, created_ms, seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![kind, digest, who.serial, who.partner, who.user, now_ms],
            )?;
            Ok(true)
        })
    }

    /// The live console token `digest` of `kind`, used as `how`; `None` if unknown or ended
    /// (an ended one is dropped).
    pub fn console_token(
        &self,
        kind: &str,
        digest: &str,
        now_ms: i64,
        rules: &TokenRules,
        how: TokenUse,
    ) -> Result<Option<ConsoleIdentity>> {
        self.write(|tx| {
            let row: Option<(ConsoleIdentity, i64, i64)> = tx
                .query_row(
                    "SELECT serial, partner, user, created_ms, seen_ms FROM console_tokens
                     WHERE kind = ?1 AND digest = ?2",
                    params![kind, digest],
                    |r| {
                        Ok((
                            ConsoleIdentity {
                                serial: r.get(0)?,
                                partner: r.get(1)?,
                                user: r.get(2)?,
                            },
                            r.get(3)?,
                            r.get(4)?,
                        ))
                    },
                )
                .optional()?;
            let Some((who, created, seen)) = row else {
                return Ok(None);
            };
            let ended = now_ms - seen >= rules.idle_ms || now_ms - created >= rules.absolute_ms;
            let drop = ended || how == TokenUse::Take;
            if drop {
                tx.execute(
                    "DELETE FROM console_tokens WHERE kind = ?1 AND digest = ?2",
                    params![kind, digest],
                )?;
            } else if how == TokenUse::Touch && now_ms > seen {
                tx.execute(
                    "UPDATE console_tokens SET seen_ms = ?3 WHERE kind = ?1 AND digest = ?2",
                    params![kind, digest, now_ms],
                )?;
            }
            Ok((!ended).then_some(who))
        })
    }

    /// Forget the console token `digest` of `kind` (logout).
    pub fn console_token_end(&self, kind: &str, digest: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM console_tokens WHERE kind = ?1 AND digest = ?2",
                params![kind, digest],
            )?;
            Ok(())
        })
    }

    /// What `partner` has spent on `owner`'s data, every dataset and version of it, as the
    /// ε of one equivalent question: `√(Σ ε²)` ([`Catalog::spend`]).
    pub fn spent(&self, partner: &str, owner: &str) -> Result<f64> {
        let squares: f64 = self.conn().query_row(
            "SELECT COALESCE(SUM(epsilon * epsilon), 0) FROM privacy_ledger
             WHERE partner = ?1 AND owner = ?2",
            params![partner, owner],
            |r| r.get(0),
        )?;
        Ok(squares.sqrt())
    }

    /// Every grant, for the policy engine.
    pub fn all_grants(&self) -> Result<Vec<Grant>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT grantee, owner, dataset, col, usage FROM grants")?;
        read_grants(&mut st, [])
    }

    /// Remove dataset rows that never got a version (uploads that did not complete).
    pub fn remove_empty_datasets(&self) -> Result<usize> {
        Ok(self.conn().execute(
            "DELETE FROM datasets WHERE NOT EXISTS
               (SELECT 1 FROM dataset_versions v WHERE v.dataset_id = datasets.id)",
            [],
        )?)
    }
}

/// A `VersionKey` from columns `first..first + 5` of a row: dataset id, version id, version,
/// wrapped DEK, KEK id.
fn version_key(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<VersionKey> {
    Ok(VersionKey {
        dataset_id: r.get(first)?,
        version_id: r.get(first + 1)?,
        version: r.get(first + 2)?,
        wrapped_dek: r.get(first + 3)?,
        kek_id: r.get(first + 4)?,
    })
}

/// Grants from a statement selecting `grantee, owner, dataset, col, usage` (casbin order).
fn read_grants(
    st: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<Grant>> {
    let rows = st.query_map(params, |r| {
        Ok([
            r.get::<_, String>(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
        ])
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(
            Grant::from_casbin(&row?)
                .map_err(|e| Error::internal(format!("bad grant in catalog: {e}")))?,
        );
    }
    Ok(out)
}

/// Insert a grant unless it exists; 1 if inserted, 0 if it was there.
fn insert_grant_in(conn: &Connection, g: &Grant, by: &str) -> Result<usize> {
    Ok(conn.execute(
        "INSERT OR IGNORE INTO grants (owner, dataset, col, grantee, usage, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            g.owner,
            g.dataset,
            g.column.as_deref().unwrap_or("*"),
            g.grantee,
            g.usage.as_str(),
            now_rfc3339(),
            by
        ],
    )?)
}

/// Set a dataset's protection settings (JSON), replacing any.
fn put_settings_in(
    conn: &Connection,
    owner: &str,
    dataset: &str,
    json: &str,
    by: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO dataset_settings (owner, dataset, settings, updated_at, updated_by)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (owner, dataset) DO UPDATE SET
           settings = excluded.settings, updated_at = excluded.updated_at,
           updated_by = excluded.updated_by",
        params![owner, dataset, json, now_rfc3339(), by],
    )?;
    Ok(())
}

/// Insert a population at `position` of its dataset.
fn insert_population_in(conn: &Connection, p: &Population, position: i64, by: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO populations (owner, dataset, name, filter, position, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            p.owner,
            p.dataset,
            p.name,
            p.filter,
            position,
            now_rfc3339(),
            by
        ],
    )?;
    Ok(())
}

/// The id of the key-encryption key that wraps new data keys.
fn current_kek_in(conn: &Connection) -> Result<String> {
    conn.query_row("SELECT current FROM kek_state WHERE id = 1", [], |r| {
        r.get(0)
    })
    .optional()?
    .ok_or_else(|| Error::internal("the catalog records no current key-encryption key"))
}

/// `owner`'s policy document as the tables hold it.
fn policy_document_in(conn: &Connection, owner: &str) -> Result<PolicyDocument> {
    let mut st =
        conn.prepare("SELECT grantee, owner, dataset, col, usage FROM grants WHERE owner = ?1")?;
    let mut grants = read_grants(&mut st, [owner])?;
    grants.sort();
    let mut settings = std::collections::BTreeMap::new();
    let mut st = conn.prepare("SELECT dataset, settings FROM dataset_settings WHERE owner = ?1")?;
    let rows = st.query_map([owner], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    for row in rows {
        let (d, json) = row?;
        let s = serde_json::from_str(&json)
            .map_err(|e| Error::internal(format!("bad settings in catalog: {e}")))?;
        settings.insert(d, s);
    }
    let mut st = conn.prepare(
        "SELECT dataset, name, filter FROM populations WHERE owner = ?1 ORDER BY dataset, position",
    )?;
    let rows = st.query_map([owner], |r| {
        Ok(policy::PopulationDef {
            dataset: r.get(0)?,
            name: r.get(1)?,
            filter: r.get(2)?,
        })
    })?;
    Ok(PolicyDocument {
        owner: owner.to_string(),
        grants,
        settings,
        populations: rows.collect::<rusqlite::Result<_>>()?,
    })
}

/// The latest version of `owner`'s policy and its text (0 and empty before any change).
fn latest_policy_in(conn: &Connection, owner: &str) -> Result<(i64, String)> {
    Ok(conn
        .query_row(
            "SELECT version, document FROM policy_versions WHERE owner = ?1
             ORDER BY version DESC LIMIT 1",
            [owner],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
        .unwrap_or_default())
}

/// After a change made in `conn`: write the next version of `owner`'s policy if the change
/// altered it (`None` if the document is unchanged).
fn record_policy_version(
    conn: &Connection,
    owner: &str,
    by: &str,
    change: &str,
) -> Result<Option<PolicyVersion>> {
    let text = policy_document_in(conn, owner)?.body();
    let (version, previous) = latest_policy_in(conn, owner)?;
    if text == previous {
        return Ok(None);
    }
    let diff = policy::diff(&previous, &text);
    conn.execute(
        "INSERT INTO policy_versions (owner, version, created_at, created_by, change, document, diff)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            owner,
            version + 1,
            now_rfc3339(),
            by,
            change,
            text,
            serde_json::to_string(&diff).map_err(Error::internal)?
        ],
    )?;
    crate::faults::hit("policy.versioned")?;
    Ok(Some(PolicyVersion {
        version: version + 1,
        diff,
    }))
}

/// Identities ever added and ever revoked: changes with every add or revoke (rows are never
/// deleted).
fn identity_generation_in(conn: &Connection) -> Result<(i64, i64)> {
    Ok(conn.query_row(
        "SELECT COUNT(*), COUNT(revoked_at) FROM identities",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

fn revocations_in(conn: &Connection) -> Result<(Vec<(String, OffsetDateTime)>, u64)> {
    let number: i64 = conn.query_row("SELECT number FROM crl_state WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    let mut st = conn.prepare(
        "SELECT serial, revoked_at FROM identities WHERE revoked_at IS NOT NULL ORDER BY serial",
    )?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (serial, at) = row?;
        let at = OffsetDateTime::parse(&at, &Rfc3339)
            .map_err(|e| Error::internal(format!("bad time in catalog: {e}")))?;
        out.push((serial, at));
    }
    Ok((out, number as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog written before budgets composed in squares: its stored budget is converted
    /// once, to allow the same number of questions (B/ε = 10 at ε = 1, and √10 now).
    #[test]
    fn stored_budgets_keep_their_number_of_questions_across_the_zcdp_change() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("catalog.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(SCHEMA).expect("schema");
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
                params![
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
