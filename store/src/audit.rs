//! The audit log: every upload, delete, query, overlap, policy change, user and partner
//! change, startup and recovery, as one append-only, hash-chained, signed JSON-lines file
//! (`DIR/audit/log.jsonl`). Engine code: no HTTP.
//!
//! Record line (one per event):
//!
//! ```text
//! {"seq":N,"prev":HEX,"digest":HEX,"hash":HEX,"sig":HEX,"record":{...}}
//! digest = SHA-256("escrow/audit/record/v1\0" || exact bytes of "record")
//! hash   = SHA-256("escrow/audit/chain/v1\0" || u64be(N) || prev || digest)
//! sig    = Ed25519(audit key, "escrow/audit/signature/v1\0" || hash)
//! ```
//!
//! `prev` of the first record is 32 zero bytes. A checkpoint line
//! `{"checkpoint":{"seq","hash","time","records","public_key"},"signature":HEX}` (signature
//! over `"escrow/audit/checkpoint/v1\0"` || the checkpoint's exact bytes) follows every 64th
//! record, and is written on shutdown, periodically while the server runs, and before every
//! export, so a partner can keep the latest one and later detect a rewritten history.
//! Partners' exports replace the records they may not see with
//! `{"seq","prev","digest","hash","sig","redacted":true}`: the chain and every signature
//! still verify, the content stays hidden.
//!
//! Writing is fail-closed: the record is durable (fsync) before the action it describes is
//! committed or answered, and an append that fails fails the action (`audit_unavailable`).
//! Appends run inside a catalog write transaction that also moves the catalog's anchor (the
//! last record's sequence number and hash): the log file may never fall behind the anchor,
//! so a truncated or replaced log is refused instead of being continued. Several processes
//! (the server and operator commands) append under an exclusive file lock. An append torn
//! by a crash (a last line without its newline) is cut off by the next append, which first
//! records the repair.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::catalog::sql::params;
use crate::catalog::{Catalog, Tx, now_rfc3339};
use crate::datadir::DataDir;
use crate::{Error, Result};

const RECORD_DOMAIN: &[u8] = b"escrow/audit/record/v1\0";
const CHAIN_DOMAIN: &[u8] = b"escrow/audit/chain/v1\0";
const SIGNATURE_DOMAIN: &[u8] = b"escrow/audit/signature/v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"escrow/audit/checkpoint/v1\0";

/// A checkpoint follows every record whose sequence number is a multiple of this.
pub const CHECKPOINT_EVERY: u64 = 64;

/// Who did something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Actor {
    /// The partner of the identity; `None` for the operator and the escrow itself.
    pub partner: Option<String>,
    pub user: String,
    pub role: String,
    /// `console` when the action came from a browser session of the web console (absent
    /// for a client with its certificate, the operator and the escrow itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

impl Actor {
    /// An authenticated user of a partner.
    pub fn user(partner: &str, user: &str, role: &str) -> Self {
        Actor {
            partner: Some(partner.into()),
            user: user.into(),
            role: role.into(),
            via: None,
        }
    }

    /// The partner acting; an operator or the escrow own no datasets.
    pub fn partner_name(&self) -> Result<&str> {
        self.partner
            .as_deref()
            .ok_or_else(|| Error::internal("a partner's action without a partner"))
    }

    /// Someone running operator commands on the data directory.
    pub fn operator() -> Self {
        Actor {
            partner: None,
            user: "operator".into(),
            role: "operator".into(),
            via: None,
        }
    }

    /// The escrow service itself (startup, recovery, shutdown).
    pub fn system() -> Self {
        Actor {
            partner: None,
            user: "escrow".into(),
            role: "system".into(),
            via: None,
        }
    }
}

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done (and answered, for questions).
    Ok,
    /// Refused: bad input, a rule, a missing grant or role.
    Refused,
    /// Failed on the server side.
    Failed,
}

/// One audited event, as the code describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// What happened: `upload`, `delete`, `query`, `overlap`, `report`, `grant`, ...
    pub kind: String,
    pub actor: Actor,
    /// Partners whose datasets or rules the event touched (their compliance officers see it).
    pub parties: Vec<String>,
    pub outcome: Outcome,
    /// The refusal rule or error code, when not `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Kind-specific facts (the SQL, datasets and versions, rows, ε, the change, ...).
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Event {
    pub fn new(kind: &str, actor: Actor, outcome: Outcome, detail: serde_json::Value) -> Self {
        let parties = actor.partner.iter().cloned().collect();
        Event {
            kind: kind.into(),
            actor,
            parties,
            outcome,
            code: None,
            detail,
        }
    }

    /// Add the fields of `detail` (an object) to the event's detail.
    pub fn with(mut self, detail: serde_json::Value) -> Self {
        if let serde_json::Value::Object(extra) = detail {
            if !self.detail.is_object() {
                self.detail = serde_json::Value::Object(Default::default());
            }
            if let serde_json::Value::Object(d) = &mut self.detail {
                d.extend(extra);
            }
        }
        self
    }

    /// Add partners the event touched.
    pub fn touching<'a>(mut self, partners: impl IntoIterator<Item = &'a str>) -> Self {
        for p in partners {
            if !self.parties.iter().any(|q| q == p) {
                self.parties.push(p.to_string());
            }
        }
        self
    }

    /// The same event for a failed action: `refused` for client faults, `failed` otherwise.
    pub fn failed(mut self, e: &Error) -> Self {
        self.outcome = match e {
            Error::Internal(_)
            | Error::Integrity(_)
            | Error::AuditUnavailable(_)
            | Error::StorageFull(_) => Outcome::Failed,
            _ => Outcome::Refused,
        };
        self.code = Some(match e {
            Error::Refused { rule, .. } => (*rule).to_string(),
            other => other.code().to_string(),
        });
        if let Error::Refused { message, .. } | Error::BadInput { message, .. } = e {
            self.detail["message"] = serde_json::Value::String(message.clone());
        }
        self
    }

    /// May a compliance officer of `partner` see this event?
    pub fn visible_to(&self, partner: &str) -> bool {
        self.actor.partner.as_deref() == Some(partner) || self.parties.iter().any(|p| p == partner)
    }
}

/// A stored record: the event with its place and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
}

/// A signed statement that the log had `records` records ending in `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub time: String,
    pub public_key: String,
}

/// Where an append left the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    const GENESIS: Head = Head {
        seq: 0,
        hash: [0; 32],
    };
}

/// Every field any line may have; which ones are present says what the line is.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Line<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sig: Option<String>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    record: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    redacted: bool,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    checkpoint: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
}

fn digest_of(raw: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(raw);
    h.finalize().into()
}

fn chain_hash(seq: u64, prev: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(prev);
    h.update(digest);
    h.finalize().into()
}

fn signed_message(domain: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = domain.to_vec();
    m.extend_from_slice(body);
    m
}

fn audit_error(context: impl std::fmt::Display) -> Error {
    Error::AuditUnavailable(context.to_string())
}

/// The writer of one data directory's audit log.
pub struct AuditLog {
    path: PathBuf,
    key: Ed25519KeyPair,
    public_key: String,
    /// Serialises this process's appends (other processes are kept out by the file lock).
    local: Mutex<()>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("public_key", &self.public_key)
            .finish()
    }
}

/// The anchor kept in the catalog: the last record's sequence number and hash.
pub fn anchor(tx: &Tx<'_>) -> Result<Head> {
    let Some(r) = tx.row("SELECT seq, hash FROM audit_anchor WHERE id = 1", params![])? else {
        return Ok(Head::GENESIS);
    };
    Ok(Head {
        seq: r.get::<i64>(0)? as u64,
        hash: r
            .get::<Vec<u8>>(1)?
            .try_into()
            .map_err(|_| Error::internal("bad audit anchor in catalog"))?,
    })
}

fn set_anchor(tx: &Tx<'_>, head: Head) -> Result<()> {
    tx.execute(
        "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
        params![head.seq as i64, head.hash.to_vec()],
    )?;
    Ok(())
}

/// The public key (hex) of a data directory's audit signing key.
pub fn public_key_of(dir: &DataDir) -> Result<String> {
    Ok(load_key(dir)?.1)
}

fn load_key(dir: &DataDir) -> Result<(Ed25519KeyPair, String)> {
    let seed = crate::crypto::keys::load_secret(&dir.audit_key(), "audit signing key")?;
    let key = Ed25519KeyPair::from_seed_unchecked(&seed[..])
        .map_err(|e| Error::internal(format!("audit signing key: {e}")))?;
    let public_key = hex::encode(key.public_key().as_ref());
    Ok((key, public_key))
}

impl AuditLog {
    /// Open the audit log of an initialised data directory (the key must exist).
    pub fn open(dir: &DataDir) -> Result<Self> {
        let (key, public_key) = load_key(dir)?;
        fs::create_dir_all(dir.audit_dir())?;
        Ok(AuditLog {
            path: dir.audit_log(),
            key,
            public_key,
            local: Mutex::new(()),
        })
    }

    /// The public half of the signing key, hex.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `event`, durably, inside the caller's catalog write transaction `tx` (which
    /// also moves the anchor). If this fails the caller must fail its action.
    pub fn append(&self, tx: &Tx<'_>, event: &Event) -> Result<Head> {
        let _local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let (mut file, tail, mut out) = self.begin(tx)?;
        let head = self.encode(&mut out, tail.head, event)?;
        if head.seq.is_multiple_of(CHECKPOINT_EVERY) {
            self.encode_checkpoint(&mut out, head)?;
        }
        self.finish(tx, &mut file, &out, head)?;
        Ok(head)
    }

    /// Write a signed checkpoint of the current head unless the log already ends with one
    /// (or is empty). Returns the checkpoint in force afterwards, if any.
    pub fn checkpoint(&self, tx: &Tx<'_>) -> Result<Option<Checkpoint>> {
        let _local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let (mut file, tail, mut out) = self.begin(tx)?;
        let head = tail.head;
        if head.seq == 0 {
            return Ok(None);
        }
        if let Some(c) = tail.checkpoint {
            return Ok(Some(c));
        }
        let c = self.encode_checkpoint(&mut out, head)?;
        self.finish(tx, &mut file, &out, head)?;
        Ok(Some(c))
    }

    /// Open and lock the log, find its head (cutting a torn last line off, and encoding the
    /// record of that repair into the returned buffer, whose head is then the returned
    /// one), and check it against the anchor.
    fn begin(&self, tx: &Tx<'_>) -> Result<(File, Tail, Vec<u8>)> {
        let mut file = self.open_locked(tx)?;
        let mut tail = read_tail(&mut file).map_err(audit_error)?;
        let anchored = check_anchor(tx, tail.head)?;
        let mut out = Vec::new();
        if tail.head.seq > anchored {
            // Records whose catalog transaction never committed (the server died or the
            // action failed after its append): say so in the chain, so nobody reads them as
            // done.
            let (first, last) = (anchored + 1, tail.head.seq);
            tracing::warn!(
                first,
                last,
                "audit log: records of actions that did not commit"
            );
            let note = Event::new(
                "audit_uncommitted",
                Actor::system(),
                Outcome::Ok,
                serde_json::json!({
                    "first": first,
                    "last": last,
                    "reason": "these records were written but the action they describe did not commit (it failed, or the process stopped before committing): it did not take effect",
                }),
            );
            tail.head = self.encode(&mut out, tail.head, &note)?;
            tail.checkpoint = None;
        }
        if let Some(bytes) = tail.torn {
            tracing::warn!(
                torn_bytes = bytes,
                "audit log: removed an incomplete last line"
            );
            let repair = Event::new(
                "audit_repair",
                Actor::system(),
                Outcome::Ok,
                serde_json::json!({
                    "torn_bytes_removed": bytes,
                    "reason": "an append was interrupted (crash); the incomplete last line was cut off",
                }),
            );
            tail.head = self.encode(&mut out, tail.head, &repair)?;
            tail.checkpoint = None;
        }
        Ok((file, tail, out))
    }

    /// Write `out` durably and move the anchor to `head`.
    fn finish(&self, tx: &Tx<'_>, file: &mut File, out: &[u8], head: Head) -> Result<()> {
        let mut rest = out;
        if crate::faults::is_armed("audit.torn") {
            // Crash tests: half the bytes reach the file, then the process dies.
            let (first, second) = out.split_at(out.len() / 2);
            file.write_all(first).map_err(audit_error)?;
            file.sync_data().map_err(audit_error)?;
            crate::faults::hit("audit.torn").map_err(audit_error)?;
            rest = second;
        }
        file.write_all(rest).map_err(audit_error)?;
        file.sync_data().map_err(audit_error)?;
        crate::faults::hit("audit.written").map_err(audit_error)?;
        set_anchor(tx, head)
    }

    /// Open the log for appending and take the exclusive lock. A missing log is created
    /// only while the anchor is at the start: otherwise it was removed, which is refused.
    fn open_locked(&self, tx: &Tx<'_>) -> Result<File> {
        let exists = self.path.exists();
        if !exists {
            let recorded = anchor(tx)?.seq;
            if recorded > 0 {
                return Err(Error::Integrity(format!(
                    "audit log {} is missing but the catalog records {recorded} entries",
                    self.path.display()
                )));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| audit_error(format!("opening {}: {e}", self.path.display())))?;
        file.lock()
            .map_err(|e| audit_error(format!("locking {}: {e}", self.path.display())))?;
        if !exists {
            crate::fsutil::sync_parent(&self.path).map_err(audit_error)?;
        }
        Ok(file)
    }

    fn encode(&self, out: &mut Vec<u8>, head: Head, event: &Event) -> Result<Head> {
        let seq = head.seq + 1;
        let record = Record {
            seq,
            time: now_rfc3339(),
            event: event.clone(),
        };
        let raw = serde_json::to_string(&record).map_err(Error::internal)?;
        let digest = digest_of(raw.as_bytes());
        let hash = chain_hash(seq, &head.hash, &digest);
        let sig = self
            .key
            .sign(&signed_message(SIGNATURE_DOMAIN, &hash))
            .as_ref()
            .to_vec();
        let raw = RawValue::from_string(raw).map_err(Error::internal)?;
        let line = Line {
            seq: Some(seq),
            prev: Some(hex::encode(head.hash)),
            digest: Some(hex::encode(digest)),
            hash: Some(hex::encode(hash)),
            sig: Some(hex::encode(sig)),
            record: Some(&raw),
            ..Line::default()
        };
        serde_json::to_writer(&mut *out, &line).map_err(Error::internal)?;
        out.push(b'\n');
        Ok(Head { seq, hash })
    }

    fn encode_checkpoint(&self, out: &mut Vec<u8>, head: Head) -> Result<Checkpoint> {
        let c = Checkpoint {
            seq: head.seq,
            hash: hex::encode(head.hash),
            time: now_rfc3339(),
            public_key: self.public_key.clone(),
        };
        let raw = serde_json::to_string(&c).map_err(Error::internal)?;
        let signature = self
            .key
            .sign(&signed_message(CHECKPOINT_DOMAIN, raw.as_bytes()));
        let raw = RawValue::from_string(raw).map_err(Error::internal)?;
        let line = Line {
            checkpoint: Some(&raw),
            signature: Some(hex::encode(signature.as_ref())),
            ..Line::default()
        };
        serde_json::to_writer(&mut *out, &line).map_err(Error::internal)?;
        out.push(b'\n');
        Ok(c)
    }
}

/// Check the log's head against the catalog's anchor; returns the anchor's sequence number.
fn check_anchor(tx: &Tx<'_>, head: Head) -> Result<u64> {
    let anchor = anchor(tx)?;
    // The file is written before the anchor moves (in the same catalog transaction), so
    // it may be ahead after a crash or a rolled-back action, never behind.
    if head.seq < anchor.seq || (head.seq == anchor.seq && head.hash != anchor.hash) {
        return Err(Error::Integrity(format!(
            "audit log ends at entry {} but the catalog records {} entries: the log was truncated or replaced",
            head.seq, anchor.seq
        )));
    }
    Ok(anchor.seq)
}

/// The last complete line of `file` (without its newline) and how many bytes follow it
/// without a newline (a torn append), reading backwards in chunks.
fn last_line(file: &mut File) -> std::io::Result<(Option<Vec<u8>>, u64)> {
    const CHUNK: u64 = 64 << 10;
    let len = file.seek(SeekFrom::End(0))?;
    let mut start = len;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        match tail.iter().rposition(|&b| b == b'\n') {
            Some(last) => {
                let torn = (tail.len() - 1 - last) as u64;
                match tail[..last].iter().rposition(|&b| b == b'\n') {
                    Some(p) => return Ok((Some(tail[p + 1..last].to_vec()), torn)),
                    None if start == 0 => return Ok((Some(tail[..last].to_vec()), torn)),
                    None => {}
                }
            }
            None if start == 0 => return Ok((None, len)),
            None => {}
        }
        let from = start.saturating_sub(CHUNK);
        let mut buf = vec![0u8; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut buf)?;
        buf.extend_from_slice(&tail);
        tail = buf;
        start = from;
    }
}

/// How the log ends.
struct Tail {
    head: Head,
    /// Bytes of a torn last line that were cut off.
    torn: Option<u64>,
    /// The last line, when it is a checkpoint (of `head`).
    checkpoint: Option<Checkpoint>,
}

/// The head of the chain as the file ends, cutting off a torn last line first.
fn read_tail(file: &mut File) -> std::io::Result<Tail> {
    let (line, torn) = last_line(file)?;
    let torn = if torn > 0 {
        let len = file.seek(SeekFrom::End(0))?;
        file.set_len(len - torn)?;
        file.sync_data()?;
        Some(torn)
    } else {
        None
    };
    let Some(line) = line else {
        return Ok(Tail {
            head: Head::GENESIS,
            torn,
            checkpoint: None,
        });
    };
    let bad = |m: &str| std::io::Error::other(format!("audit log: last line {m}"));
    let parsed: Line<'_> = serde_json::from_slice(&line).map_err(|_| bad("is not a log line"))?;
    let (seq, hash, checkpoint) = match (parsed.seq, parsed.hash, parsed.checkpoint) {
        (Some(seq), Some(hash), None) => (seq, hash, None),
        (None, None, Some(c)) => {
            let c: Checkpoint =
                serde_json::from_str(c.get()).map_err(|_| bad("has a bad checkpoint"))?;
            (c.seq, c.hash.clone(), Some(c))
        }
        _ => return Err(bad("is neither a record nor a checkpoint")),
    };
    let hash = decode32(&hash).ok_or_else(|| bad("has a bad hash"))?;
    Ok(Tail {
        head: Head { seq, hash },
        torn,
        checkpoint,
    })
}

fn decode32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

// ---- recording actions ------------------------------------------------------------------

/// Record `event` on its own (questions, refusals), in its own catalog transaction.
pub fn record(catalog: &Catalog, log: &AuditLog, event: &Event) -> Result<Head> {
    catalog.write(|tx| log.append(tx, event))
}

/// Given to a change so it appends its record inside its own catalog transaction, adding
/// what only the change knows (a version number, whether anything changed).
pub struct Hook<'a> {
    log: &'a AuditLog,
    event: &'a Event,
}

impl Hook<'_> {
    pub fn append(&self, tx: &Tx<'_>, detail: serde_json::Value) -> Result<()> {
        self.log
            .append(tx, &self.event.clone().with(detail))
            .map(|_| ())
    }
}

/// Run `change`, which commits its catalog write together with `event` through the hook.
/// If the change fails, its failure is recorded instead; if even that cannot be recorded,
/// the audit's error is returned (nothing happens unaudited).
pub fn audited<T>(
    catalog: &Catalog,
    log: &AuditLog,
    event: Event,
    change: impl FnOnce(&Hook<'_>) -> Result<T>,
) -> Result<T> {
    let hook = Hook { log, event: &event };
    change(&hook).map_err(|e| match record(catalog, log, &event.clone().failed(&e)) {
        Ok(_) => e,
        Err(_) if matches!(e, Error::AuditUnavailable(_) | Error::Integrity(_)) => e,
        Err(audit) => audit,
    })
}

// ---- reading, exporting, verifying ---------------------------------------------------------

/// Which records an export or listing shows in full.
#[derive(Debug, Clone)]
pub enum Viewer {
    /// The operator: everything.
    Operator,
    /// A partner's compliance officer or admin: its own events and those touching its data.
    Partner(String),
}

impl Viewer {
    fn sees(&self, e: &Event) -> bool {
        match self {
            Viewer::Operator => true,
            Viewer::Partner(p) => e.visible_to(p),
        }
    }
}

/// Parse a `--since` time (RFC 3339).
pub fn parse_since(s: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
        Error::bad(
            "invalid_request",
            format!("since must be an RFC 3339 time such as 2026-11-21T09:00:00Z, got {s:?}"),
        )
    })
}

/// The records `viewer` may see, oldest first, optionally only those at or after `since`.
pub fn list(path: &Path, viewer: &Viewer, since: Option<OffsetDateTime>) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for_each_line(path, |_, line| {
        if let Some(raw) = line.record {
            let r = parse_record(raw)?;
            let recent = || {
                OffsetDateTime::parse(&r.time, &Rfc3339)
                    .map(|t| since.is_none_or(|s| t >= s))
                    .unwrap_or(true)
            };
            if viewer.sees(&r.event) && recent() {
                out.push(r);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The log as JSON lines for `viewer`: records it may not see are redacted to their
/// hashes and signatures, so the whole chain still verifies.
pub fn export(path: &Path, viewer: &Viewer, out: &mut impl Write) -> Result<u64> {
    let mut n = 0;
    for_each_line(path, |text, line| {
        let hidden = match line.record {
            Some(raw) => !viewer.sees(&parse_record(raw)?.event),
            None => false,
        };
        if hidden {
            let redacted = Line {
                record: None,
                redacted: true,
                ..line
            };
            serde_json::to_writer(&mut *out, &redacted).map_err(Error::internal)?;
        } else {
            out.write_all(text.as_bytes())?;
        }
        out.write_all(b"\n")?;
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

fn parse_record(raw: &RawValue) -> Result<Record> {
    serde_json::from_str(raw.get()).map_err(|e| Error::internal(format!("audit record: {e}")))
}

fn for_each_line(path: &Path, mut f: impl FnMut(&str, Line<'_>) -> Result<()>) -> Result<()> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut reader = BufReader::new(file);
    let mut buf = String::new();
    loop {
        buf.clear();
        if reader.read_line(&mut buf)? == 0 || !buf.ends_with('\n') {
            // End, or a torn last line (never acknowledged; the next append removes it).
            return Ok(());
        }
        let text = buf.trim_end_matches('\n');
        let line: Line<'_> = serde_json::from_str(text)
            .map_err(|e| Error::internal(format!("audit log line: {e}")))?;
        f(text, line)?;
    }
}

/// What a successful verification saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub records: u64,
    pub redacted: u64,
    pub checkpoints: u64,
    /// The signing key every signature was checked against.
    pub public_key: String,
    /// The last record's hash (hex), to compare with a checkpoint kept elsewhere.
    pub head: String,
    /// Records after the last checkpoint (signed one by one, but not yet certified).
    pub after_last_checkpoint: u64,
    /// A torn last line (an append interrupted by a crash; cut off by the next append).
    pub torn_tail: bool,
}

/// The first place a log stops verifying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {reason}", seq.map(|s| format!(" (record {s})")).unwrap_or_default())]
pub struct VerifyFailure {
    /// 1-based line number.
    pub line: u64,
    /// The record's sequence number, if the line had one.
    pub seq: Option<u64>,
    pub reason: String,
}

/// What the verifier must also hold true.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Check every signature against this key (hex) rather than the key the checkpoints
    /// name. A partner pins the key it got from the escrow.
    pub public_key: Option<String>,
    /// The log must reach these heads, `(seq, hash hex)` (the catalog's anchor, checkpoints
    /// a partner kept).
    pub must_contain: Vec<(u64, String)>,
    /// A torn last line is an error (exports are written whole).
    pub whole: bool,
}

/// Verify a log or an export: consecutive sequence numbers from 1, each record's digest
/// (unless redacted), chain hash and signature, each checkpoint's signature and position.
pub fn verify(input: impl Read, opts: &VerifyOptions) -> Result<Verified, VerifyFailure> {
    let mut reader = BufReader::new(input);
    let mut v = Verified::default();
    let mut head = Head::GENESIS;
    let mut key: Option<Vec<u8>> = match &opts.public_key {
        Some(k) => Some(hex::decode(k).map_err(|_| VerifyFailure {
            line: 0,
            seq: None,
            reason: "the pinned public key is not hex".into(),
        })?),
        None => None,
    };
    // Records are checked once the key is known (the first checkpoint names it when none
    // is pinned): hold their hashes and signatures until then.
    let mut unsigned: Vec<(u64, u64, [u8; 32], Vec<u8>)> = Vec::new();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| VerifyFailure {
                line: line_no + 1,
                seq: None,
                reason: format!("cannot read: {e}"),
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            if opts.whole {
                return Err(fail(line_no, None, "incomplete last line"));
            }
            v.torn_tail = true;
            break;
        }
        let text = &buf[..buf.len() - 1];
        let line: Line<'_> = serde_json::from_slice(text)
            .map_err(|e| fail(line_no, None, &format!("not a log line ({e})")))?;
        if let Some(c) = line.checkpoint {
            let sig = line
                .signature
                .as_deref()
                .and_then(|s| hex::decode(s).ok())
                .ok_or_else(|| fail(line_no, None, "checkpoint without a signature"))?;
            let cp: Checkpoint = serde_json::from_str(c.get())
                .map_err(|e| fail(line_no, None, &format!("bad checkpoint ({e})")))?;
            let named = hex::decode(&cp.public_key).map_err(|_| fail(line_no, None, "bad key"))?;
            let k = key.get_or_insert_with(|| named.clone()).clone();
            if k != named {
                return Err(fail(
                    line_no,
                    Some(cp.seq),
                    "checkpoint names another signing key",
                ));
            }
            check_sig(&k, CHECKPOINT_DOMAIN, c.get().as_bytes(), &sig)
                .map_err(|()| fail(line_no, Some(cp.seq), "bad checkpoint signature"))?;
            if cp.seq != head.seq || decode32(&cp.hash) != Some(head.hash) {
                return Err(fail(
                    line_no,
                    Some(cp.seq),
                    "checkpoint does not match the records before it",
                ));
            }
            for (l, s, h, sig) in unsigned.drain(..) {
                check_sig(&k, SIGNATURE_DOMAIN, &h, &sig)
                    .map_err(|()| fail(l, Some(s), "bad signature"))?;
            }
            v.checkpoints += 1;
            v.after_last_checkpoint = 0;
            continue;
        }
        let seq = line
            .seq
            .ok_or_else(|| fail(line_no, None, "neither a record nor a checkpoint"))?;
        if seq != head.seq + 1 {
            return Err(fail(
                line_no,
                Some(seq),
                &format!(
                    "expected record {} (records missing, reordered or repeated)",
                    head.seq + 1
                ),
            ));
        }
        let field = |f: &Option<String>, name: &str| {
            f.as_deref()
                .and_then(decode32)
                .ok_or_else(|| fail(line_no, Some(seq), &format!("missing or bad {name}")))
        };
        let prev = field(&line.prev, "prev")?;
        let digest = field(&line.digest, "digest")?;
        let hash = field(&line.hash, "hash")?;
        if prev != head.hash {
            return Err(fail(
                line_no,
                Some(seq),
                "does not chain to the record before it",
            ));
        }
        match (line.record, line.redacted) {
            (Some(raw), false) => {
                if digest_of(raw.get().as_bytes()) != digest {
                    return Err(fail(
                        line_no,
                        Some(seq),
                        "content does not match its digest",
                    ));
                }
                let r: Record = serde_json::from_str(raw.get())
                    .map_err(|e| fail(line_no, Some(seq), &format!("bad record ({e})")))?;
                if r.seq != seq {
                    return Err(fail(line_no, Some(seq), "record names another position"));
                }
            }
            (None, true) => v.redacted += 1,
            _ => return Err(fail(line_no, Some(seq), "record missing")),
        }
        if chain_hash(seq, &prev, &digest) != hash {
            return Err(fail(line_no, Some(seq), "hash does not match"));
        }
        let sig = line
            .sig
            .as_deref()
            .and_then(|s| hex::decode(s).ok())
            .ok_or_else(|| fail(line_no, Some(seq), "missing signature"))?;
        match &key {
            Some(k) => check_sig(k, SIGNATURE_DOMAIN, &hash, &sig)
                .map_err(|()| fail(line_no, Some(seq), "bad signature"))?,
            None => unsigned.push((line_no, seq, hash, sig)),
        }
        head = Head { seq, hash };
        v.records += 1;
        v.after_last_checkpoint += 1;
        if opts
            .must_contain
            .iter()
            .any(|(s, h)| *s == seq && decode32(h) != Some(hash))
        {
            return Err(fail(
                line_no,
                Some(seq),
                "differs from the checkpoint it must match (history rewritten)",
            ));
        }
    }
    if let Some((l, s, _, _)) = unsigned.first() {
        return Err(fail(
            *l,
            Some(*s),
            "no key to check signatures against (no checkpoint, and none pinned)",
        ));
    }
    if let Some(s) = opts.must_contain.iter().map(|(s, _)| *s).max()
        && s > head.seq
    {
        return Err(fail(
            line_no,
            None,
            &format!(
                "the log ends at record {} but must reach record {s} (truncated)",
                head.seq
            ),
        ));
    }
    v.public_key = key.map(hex::encode).unwrap_or_default();
    v.head = hex::encode(head.hash);
    Ok(v)
}

fn fail(line: u64, seq: Option<u64>, reason: &str) -> VerifyFailure {
    VerifyFailure {
        line,
        seq,
        reason: reason.into(),
    }
}

fn check_sig(key: &[u8], domain: &[u8], body: &[u8], sig: &[u8]) -> std::result::Result<(), ()> {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&signed_message(domain, body), sig)
        .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, DataDir, Catalog, AuditLog) {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = DataDir::new(tmp.path());
        dir.create_dirs().expect("dirs");
        crate::crypto::keys::create_secret_if_missing(&dir.audit_key()).expect("key");
        let catalog = Catalog::open(&dir.catalog()).expect("catalog");
        let log = AuditLog::open(&dir).expect("log");
        (tmp, dir, catalog, log)
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
        let forger = AuditLog::open(&odir).expect("forger");
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
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.audit_log())
            .expect("open");
        f.write_all(b"{\"seq\":4,\"prev\":\"ab").expect("torn");
        drop(f);
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
        let records = list(&dir.audit_log(), &Viewer::Operator, None).expect("list");
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
        let (_t, dir, catalog, log) = setup();
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
        assert_eq!(
            list(&dir.audit_log(), &globex, None).expect("list").len(),
            1
        );
        let mut out = Vec::new();
        export(&dir.audit_log(), &globex, &mut out).expect("export");
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
}
