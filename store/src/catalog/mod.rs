//! The catalog: partners, identities, datasets and their versions (with wrapped data keys),
//! grants, settings, populations, policy versions, the privacy ledger, released answers,
//! console sessions and the audit anchor.
//!
//! Two backends behind one seam ([`sql::Backend`]): SQLite in the data directory (the
//! embedded default, one node) and PostgreSQL (`--catalog postgres://...`, any number of
//! nodes). The SQL is written once (`sql.rs`), the schema is one set of versioned migrations
//! (`schema.rs`), and each table group has its file. All methods are blocking; async callers
//! run them on the blocking pool.

use std::path::Path;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub use assumed::Assumed;
pub use identities::Revocations;
pub use sql::{Backend, Mode, Row, Tx, Value};

use sql::params;

use crate::{Error, Result};

pub mod assumed;
mod console;
pub mod datasets;
pub mod identities;
pub mod keys;
mod ledger;
pub mod policy;
mod postgres;
mod schema;
pub mod sql;
mod sqlite;
pub mod testdb;

/// Where the catalog stands, for what nodes keep in memory: each part moves with every change
/// of its kind, on whichever node made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generations {
    /// Grants, settings, populations, dataset deletions.
    pub policy: i64,
    /// Dataset versions: uploads, deletions, re-wrapped keys; and the number of versions
    /// (which moves with an upload made by a node from before the `data` generation, during
    /// a rolling upgrade).
    pub data: (i64, i64),
    /// Identities (registered, revoked) and partners (registered plus revoked).
    pub identities: (i64, i64, i64),
}

/// The six columns of [`Generations`], in order.
pub(crate) const GENERATION_COLUMNS: [&str; 6] = [
    "(SELECT value FROM generations WHERE name = 'policy')",
    "(SELECT value FROM generations WHERE name = 'data')",
    "(SELECT COUNT(*) FROM dataset_versions)",
    "(SELECT COUNT(*) FROM identities)",
    "(SELECT COUNT(revoked_at) FROM identities)",
    "(SELECT COUNT(*) + COUNT(revoked_at) FROM partners)",
];

/// The six columns of [`Generations`], as one `SELECT` list.
pub(crate) fn generations_list() -> String {
    GENERATION_COLUMNS.join(", ")
}

impl Generations {
    /// From the first six columns of `r` (selected as [`GENERATIONS`]).
    pub(crate) fn of(r: &Row) -> Result<Self> {
        Ok(Generations {
            policy: r.get(0)?,
            data: (r.get(1)?, r.get(2)?),
            identities: (r.get(3)?, r.get(4)?, r.get(5)?),
        })
    }
}

/// Move the `data` generation (in the transaction of a change to the versions).
pub(crate) fn data_changed(tx: &Tx<'_>) -> Result<()> {
    tx.execute(
        "UPDATE generations SET value = value + 1 WHERE name = 'data'",
        params![],
    )?;
    Ok(())
}

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
    /// Tokens one partner's identities may hold together: past it a new one of that
    /// partner is refused (so one partner's many users cannot fill `max` for everyone).
    pub per_partner: usize,
    /// Tokens kept in all: past it a new one is refused (nobody else's is dropped).
    pub max: usize,
    /// A token in use has its idle time restarted at most this often (a write); in between,
    /// using it only reads.
    pub touch_ms: i64,
}

/// Whether a new console token was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKept {
    Kept,
    /// Its partner holds `per_partner` tokens of the kind already.
    PartnerFull,
    /// The kind holds `max` tokens already.
    Full,
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
    db: Box<dyn Backend>,
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
    /// Charged (`new`) or already paid; each charge's total spent afterwards. `kept`: when
    /// the read that found it paid also read what is kept for the question
    /// ([`Catalog::released_answer`]), that (`Some(None)`: nothing is).
    ///
    /// `ledger`: when found paid by a read, how many rows `partner`'s ledger holds on each
    /// owner's data ([`Assumed::ledger`]: the ledger only grows, so the same counts mean the
    /// same totals); empty otherwise.
    Charged {
        new: bool,
        totals: Vec<f64>,
        kept: Option<Option<Vec<u8>>>,
        ledger: Vec<(String, i64)>,
    },
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
    rfc3339(OffsetDateTime::now_utc())
}

/// Now, in milliseconds since the Unix epoch (the catalog's times kept as numbers: console
/// tokens, renewals).
pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// `t` as the catalog and the API write times (RFC 3339).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Where a catalog lives: a SQLite file (one node) or a PostgreSQL database (several).
/// Shown (Debug) without the URL's password.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    File(std::path::PathBuf),
    Postgres(String),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(path) => f.debug_tuple("File").field(path).finish(),
            Location::Postgres(url) => f.debug_tuple("Postgres").field(&redacted(url)).finish(),
        }
    }
}

/// A value of the catalog's own `catalog_meta` (its id, its object store's id).
fn meta(tx: &Tx<'_>, name: &str) -> Result<Option<String>> {
    tx.row(
        "SELECT value FROM catalog_meta WHERE name = ?1",
        params![name],
    )?
    .map(|r| r.get(0))
    .transpose()
}

/// `url` with its password, if any, replaced by `***`.
pub fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(not a URL)".into(),
    }
}

impl Location {
    /// `postgres://...` or `postgresql://...` is a PostgreSQL database; anything else is
    /// refused (a file catalog is the data directory's own, named by no URL).
    pub fn parse_url(url: &str) -> Result<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Location::Postgres(url.to_string()))
        } else {
            Err(Error::bad(
                "bad_catalog_url",
                "--catalog takes a postgres:// URL (without it, the catalog is the data directory's SQLite file)",
            ))
        }
    }
}

impl Catalog {
    /// Open (creating if needed) the SQLite catalog at `path` and bring its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<Self> {
        let sqlite = sqlite::Sqlite::open(path)?;
        sqlite.with_connection(schema::upgrade_unversioned)?;
        Self::on(Box::new(sqlite))
    }

    /// Connect to the PostgreSQL catalog at `url` and bring its schema up to date.
    pub fn connect(url: &str) -> Result<Self> {
        Self::on(Box::new(postgres::Postgres::connect(url)?))
    }

    pub fn open_at(location: &Location) -> Result<Self> {
        match location {
            Location::File(path) => Self::open(path),
            Location::Postgres(url) => Self::connect(url),
        }
    }

    fn on(db: Box<dyn Backend>) -> Result<Self> {
        let postgres = db.kind() == "postgres";
        let catalog = Catalog { db };
        catalog.write(|tx| schema::migrate(tx, postgres))?;
        Ok(catalog)
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.db.kind()
    }

    /// The id binding this catalog to its data directory (`DataDir::open_catalog`), if it
    /// has one yet.
    pub fn id(&self) -> Result<Option<String>> {
        self.read(|tx| meta(tx, "id"))
    }

    /// Give the catalog an id (random, 128 bits) unless it has one; returns the id it has.
    pub fn bind_new_id(&self) -> Result<String> {
        let new = crate::crypto::random_id()?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO catalog_meta (name, value) VALUES ('id', ?1) ON CONFLICT DO NOTHING",
                params![new.as_str()],
            )?;
            Ok(meta(tx, "id")?.unwrap_or(new))
        })
    }

    /// The id of the object store this catalog's sealed versions are in, once bound
    /// (`objects::bind`).
    pub fn objects_id(&self) -> Result<Option<String>> {
        self.read(|tx| meta(tx, "objects"))
    }

    /// Record `new` as the object store's id if the catalog still records `expected` (none,
    /// or the store being replaced); returns the id recorded afterwards, so that of nodes
    /// binding at once, all follow the first.
    pub fn swap_objects_id(&self, expected: Option<&str>, new: &str) -> Result<String> {
        self.write(|tx| {
            let current = meta(tx, "objects")?;
            if current.as_deref() != expected {
                return Ok(current.unwrap_or_default());
            }
            tx.execute(
                "INSERT INTO catalog_meta (name, value) VALUES ('objects', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![new],
            )?;
            Ok(new.to_string())
        })
    }

    /// The catalog's generations in one read: what a node may keep while they stand.
    pub fn generations(&self) -> Result<Generations> {
        let r = self.read(|tx| tx.row(&format!("SELECT {}", generations_list()), params![]))?;
        Generations::of(&r.ok_or_else(|| Error::internal("catalog: no generations"))?)
    }

    /// Run `f` in one write transaction, serialised with every other writer (of every
    /// process and node); committed only if `f` succeeds. Audit appends run inside it, so
    /// the catalog's write lock always comes before the audit file lock.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.run(Mode::Write, f)
    }

    /// After rows holding key material were deleted and committed: make the database drop
    /// them from wherever it still keeps them (SQLite: its write-ahead log).
    pub fn purge(&self) -> Result<()> {
        self.db.purge()
    }

    /// Run a read-only `f` on one consistent view of the catalog.
    pub fn read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.run(Mode::Read, f)
    }

    fn run<T>(&self, mode: Mode, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut f = Some(f);
        let mut out = None;
        self.db.run(mode, &mut |tx| {
            let f = f
                .take()
                .ok_or_else(|| Error::internal("catalog: a transaction ran twice"))?;
            out = Some(f(tx)?);
            Ok(())
        })?;
        out.ok_or_else(|| Error::internal("catalog: a transaction did not run"))
    }
}

#[cfg(test)]
mod conformance;
