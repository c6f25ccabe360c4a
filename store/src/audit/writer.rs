//! Appending to the log: the file, its lock and tail, the catalog's anchor, and the
//! change value an audited action commits through.

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use serde_json::value::RawValue;

use super::{Actor, Event, Outcome, Record};
use super::{
    CHECKPOINT_DOMAIN, CHECKPOINT_EVERY, Checkpoint, Head, Line, SIGNATURE_DOMAIN, chain_hash,
    decode32, digest_of, signed_message,
};
use crate::catalog::sql::params;
use crate::catalog::{Catalog, Tx, now_rfc3339};
use crate::datadir::DataDir;
use crate::{Error, Result};

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

// ---- recording actions ------------------------------------------------------------------

/// Record `event` on its own (questions, refusals), in its own catalog transaction.
pub fn record(catalog: &Catalog, log: &AuditLog, event: &Event) -> Result<Head> {
    catalog.write(|tx| log.append(tx, event))
}

/// One audited change: the event it records and the catalog write transaction it commits in.
///
/// [`Change::commit`] opens the write transaction, runs the change's statements, appends the
/// event (with what the statements report) in that same transaction and commits: the change
/// and its record become durable together, or neither does. [`Change::finish`] ends the
/// change: a failure before the commit (the checks, the work before the transaction, the
/// statements, the append, the commit itself) is recorded instead, in a transaction of its
/// own; if even that cannot be recorded, the audit's error is returned. Nothing happens
/// unaudited. A failure after the commit (a step that follows it) is returned and logged,
/// not recorded: the record of the change, which did happen, stands.
#[must_use = "a change is recorded only when it commits or finishes"]
pub struct Change<'a> {
    catalog: &'a Catalog,
    log: &'a AuditLog,
    event: Event,
    state: Cell<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Its commit was tried and failed (nothing of it is in the catalog).
    Failed,
    Committed,
}

impl<'a> Change<'a> {
    pub fn new(catalog: &'a Catalog, log: &'a AuditLog, event: Event) -> Self {
        Change {
            catalog,
            log,
            event,
            state: Cell::new(State::Open),
        }
    }

    /// Run `statements` in one catalog write transaction and append this change's record in
    /// it, with the detail they return added to the event's; then commit. Once per change.
    pub fn commit<T>(
        &self,
        statements: impl FnOnce(&Tx<'_>) -> Result<(T, serde_json::Value)>,
    ) -> Result<T> {
        if self.state.get() != State::Open {
            return Err(Error::internal("an audited change committed twice"));
        }
        let committed = self.catalog.write(|tx| {
            let (out, detail) = statements(tx)?;
            self.log.append(tx, &self.event.clone().with(detail))?;
            crate::faults::hit(&format!("{}.committing", self.event.kind))?;
            Ok(out)
        });
        self.state.set(match committed {
            Ok(_) => State::Committed,
            Err(_) => State::Failed,
        });
        committed
    }

    /// End the change with its `outcome`: a failure before the commit is recorded (and
    /// returned); a success must have committed.
    pub fn finish<T>(self, outcome: Result<T>) -> Result<T> {
        let committed = self.state.get() == State::Committed;
        let outcome = match outcome {
            Ok(_) if !committed => Err(Error::internal(format!(
                "an audited change ({}) ended without committing",
                self.event.kind
            ))),
            Err(e) if committed => {
                tracing::error!(kind = %self.event.kind, error = %e, "a step after an audited change committed failed");
                return Err(e);
            }
            other => other,
        };
        outcome.map_err(
            |e| match record(self.catalog, self.log, &self.event.clone().failed(&e)) {
                Ok(_) => e,
                Err(_) if matches!(e, Error::AuditUnavailable(_) | Error::Integrity(_)) => e,
                Err(audit) => audit,
            },
        )
    }

    /// Run `steps` (checks, work outside the transaction, then [`Change::commit`]) as this
    /// change, and finish it with their outcome.
    pub fn run<T>(self, steps: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let outcome = steps(&self);
        self.finish(outcome)
    }

    /// A change that is nothing but its statements: commit them, and finish.
    pub fn apply<T>(
        self,
        statements: impl FnOnce(&Tx<'_>) -> Result<(T, serde_json::Value)>,
    ) -> Result<T> {
        self.run(|c| c.commit(statements))
    }
}
