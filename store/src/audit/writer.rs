//! Appending to the log: where its lines are kept (a file beside a node's own catalog, or
//! rows of a shared catalog), their tail, the catalog's anchor, reading them back, and the
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
use crate::catalog::sql::{Value, params};
use crate::catalog::{Assumed, Catalog, Location, Tx, now_rfc3339};
use crate::datadir::DataDir;
use crate::{Error, Result};

fn audit_error(context: impl std::fmt::Display) -> Error {
    Error::AuditUnavailable(context.to_string())
}

/// Where an audit log's lines are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lines {
    /// `DIR/audit/log.jsonl`, beside a node's own SQLite catalog: written and made durable
    /// under a file lock before the catalog transaction that moves the anchor commits.
    File(PathBuf),
    /// Rows of the catalog (`audit_lines`), for a catalog shared by several nodes: written
    /// in the transaction of the change they record, so every node appends to one chain and
    /// no node keeps a copy of it (a node's directory holds only keys and certificates).
    Catalog,
}

/// The writer of one escrow's audit log.
pub struct AuditLog {
    lines: Lines,
    key: Ed25519KeyPair,
    public_key: String,
    /// Serialises this process's appends (other processes are kept out by the file lock).
    local: Mutex<()>,
    /// A catalog log: where this node's last record left the chain (its last line number
    /// and head), for [`record`] to follow on in one round trip.
    followed: Mutex<Option<(i64, Head)>>,
    /// Records left to make the usual way after a follow-on failed (another node had
    /// appended): while nodes take turns, trying first would cost a round trip each time.
    pause: std::sync::atomic::AtomicU32,
}

/// Records made the usual way after a follow-on append failed.
const FOLLOW_PAUSE: u32 = 16;

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("lines", &self.lines)
            .field("public_key", &self.public_key)
            .finish()
    }
}

/// The anchor kept in the catalog: the last record's sequence number and hash.
pub fn anchor(tx: &Tx<'_>) -> Result<Head> {
    match tx.row("SELECT seq, hash FROM audit_anchor WHERE id = 1", params![])? {
        Some(r) => anchor_of(r.get(0)?, r.get(1)?),
        None => Ok(Head::GENESIS),
    }
}

/// The anchor as its row holds it.
fn anchor_of(seq: i64, hash: Vec<u8>) -> Result<Head> {
    Ok(Head {
        seq: seq as u64,
        hash: hash
            .try_into()
            .map_err(|_| Error::internal("bad audit anchor in catalog"))?,
    })
}

const SET_ANCHOR: &str = "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, ?1, ?2)
     ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash";

fn set_anchor(tx: &Tx<'_>, head: Head) -> Result<()> {
    tx.execute(SET_ANCHOR, params![head.seq as i64, head.hash.to_vec()])?;
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
    /// Open the audit log of an initialised data directory (the key must exist) whose
    /// catalog is `catalog`: a file in the directory beside its own catalog, rows of a
    /// shared one (which take over a file the directory kept before, once).
    pub fn open(dir: &DataDir, catalog: &Catalog) -> Result<Self> {
        let lines = match dir.catalog_location()? {
            Location::File(_) => Lines::File(dir.audit_log()),
            Location::Postgres(_) => Lines::Catalog,
        };
        let log = Self::open_in(dir, lines)?;
        log.take_over(catalog, &dir.audit_log())?;
        Ok(log)
    }

    /// Open the log kept in `lines`, signed with `dir`'s audit key.
    pub fn open_in(dir: &DataDir, lines: Lines) -> Result<Self> {
        let (key, public_key) = load_key(dir)?;
        if let Lines::File(path) = &lines
            && let Some(parent) = path.parent()
        {
            fs::create_dir_all(parent)?;
        }
        Ok(AuditLog {
            lines,
            key,
            public_key,
            local: Mutex::new(()),
            followed: Mutex::new(None),
            pause: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Move the lines of the log file at `path`, kept by escrow before its lines went into
    /// a shared catalog, into the catalog, if the catalog has none yet, and record the move;
    /// the file is renamed `*.moved` (kept, never read again). Every node sharing the
    /// directory may try: the first one moves it, under the write lock, which every writer
    /// of the file held too (a node of an earlier release still running finds the file gone
    /// and refuses to write: stop them all for this upgrade).
    pub fn take_over(&self, catalog: &Catalog, path: &Path) -> Result<()> {
        if self.lines != Lines::Catalog || !path.exists() {
            return Ok(());
        }
        let left_alone = || {
            tracing::warn!(file = %path.display(), "a log file beside the shared catalog's audit log is not read");
        };
        if catalog.read(|tx| Ok(catalog_tail(tx)?.0))? > 0 {
            left_alone();
            return Ok(());
        }
        // Read and checked before the write lock is taken: every node waits while it is held.
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(audit_error(format!("reading {}: {e}", path.display()))),
        };
        // A torn last line was never acknowledged: the next append would have cut it off.
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let lines: Vec<&str> = whole.lines().collect();
        let head = match lines.last() {
            Some(line) => parse_tail(line.as_bytes()).map_err(audit_error)?.head,
            None => Head::GENESIS,
        };
        let mut moved_to = path.as_os_str().to_owned();
        moved_to.push(".moved");
        let moved = catalog.write(|tx| {
            let (last, _, anchor) = catalog_tail(tx)?;
            if last > 0 {
                left_alone();
                return Ok(false);
            }
            if fs::metadata(path).map(|m| m.len()).ok() != Some(text.len() as u64) {
                return Err(audit_error(format!(
                    "{} changed while it was being moved into the catalog: start again",
                    path.display()
                )));
            }
            check_anchor(head, anchor)?;
            for (i, chunk) in lines.chunks(256).enumerate() {
                let (sql, values) = insert_lines(((i * 256) as i64, None), chunk, None);
                tx.execute(&sql, &values)?;
            }
            let note = Event::new(
                "audit_moved",
                Actor::system(),
                Outcome::Ok,
                serde_json::json!({
                    "lines": lines.len(),
                    "from": path.display().to_string(),
                    "reason": "the catalog is shared by several nodes: the log's lines are rows of it from here on",
                }),
            );
            self.append(tx, &note)?;
            // Renamed under the lock and before the commit, so no writer of the file can
            // append to it after its lines were copied.
            fs::rename(path, &moved_to)?;
            Ok(true)
        });
        match moved {
            Ok(true) => {
                tracing::info!(lines = lines.len(), from = %path.display(), "audit log moved into the shared catalog");
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                // The commit failed after the rename: the file stays where it was.
                if !path.exists() && Path::new(&moved_to).exists() {
                    let _ = fs::rename(&moved_to, path);
                }
                Err(e)
            }
        }
    }

    /// The public half of the signing key, hex.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The log as the bytes of its JSON-lines file, oldest line first, for the views and
    /// the verifier; `None` when no line was ever written to a file log.
    pub fn reader<'a>(&self, catalog: &'a Catalog) -> Result<Option<LogReader<'a>>> {
        Ok(Some(LogReader(match &self.lines {
            Lines::File(path) => match File::open(path) {
                Ok(f) => Source::File(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.into()),
            },
            Lines::Catalog => Source::Catalog {
                catalog,
                after: 0,
                page: Vec::new(),
                at: 0,
            },
        })))
    }

    /// Append `event`, durably, inside the caller's catalog write transaction `tx` (which
    /// also moves the anchor). If this fails the caller must fail its action.
    pub fn append(&self, tx: &Tx<'_>, event: &Event) -> Result<Head> {
        // Whatever this node followed is behind once this commits.
        self.followed().take();
        Ok(self.append_at(tx, event)?.0)
    }

    /// [`AuditLog::append`]; and for a catalog log, the last line number it writes.
    fn append_at(&self, tx: &Tx<'_>, event: &Event) -> Result<(Head, Option<i64>)> {
        let (target, tail, mut out) = self.begin(tx)?;
        let head = self.encode_record(&mut out, tail.head, event)?;
        let last = self.finish(tx, target, &out, head)?;
        Ok((head, last))
    }

    /// Encode `event` after `head` into `out`, with a checkpoint when one is due.
    fn encode_record(&self, out: &mut Vec<u8>, head: Head, event: &Event) -> Result<Head> {
        let head = self.encode(out, head, event)?;
        if head.seq.is_multiple_of(CHECKPOINT_EVERY) {
            self.encode_checkpoint(out, head)?;
        }
        Ok(head)
    }

    fn followed(&self) -> std::sync::MutexGuard<'_, Option<(i64, Head)>> {
        self.followed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record `event` in a catalog log right after this node's last record, in a write
    /// transaction of nothing but its lines and anchor (one round trip to a shared catalog:
    /// no tail read). `None` when it cannot be tried or did not commit: the lines' numbers
    /// are the table's key, so if any other record came in between, the insert fails and
    /// the transaction rolls back, leaving the chain as it was; the caller then records the
    /// usual way (so does every record while a fault is armed at the append: crash tests
    /// count its hits).
    ///
    /// With `assumed`, the insert is also guarded on what the request assumed
    /// ([`Assumed`]): a refusal then does not tell which guard refused.
    fn record_following(
        &self,
        catalog: &Catalog,
        event: &Event,
        assumed: Option<&Assumed>,
    ) -> Result<Option<Head>> {
        use std::sync::atomic::Ordering;
        if self.lines != Lines::Catalog || crate::faults::is_armed("audit.written") {
            return Ok(None);
        }
        if self
            .pause
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Ok(None);
        }
        // Taken, not held: another append of this node meanwhile goes the usual way.
        let Some((last, followed)) = self.followed().take() else {
            return Ok(None);
        };
        let mut out = Vec::new();
        let head = self.encode_record(&mut out, followed, event)?;
        match catalog.write(|tx| queue_lines(tx, (last, Some(followed)), &out, head, assumed)) {
            Ok(end) => {
                self.follow(end, head);
                Ok(Some(head))
            }
            Err(Error::Changed(e)) => {
                tracing::debug!(error = %e, "audit: another record came first (or the request's assumptions moved); recording again");
                self.pause.store(FOLLOW_PAUSE, Ordering::Relaxed);
                Ok(None)
            }
            // Not the guard: whether it committed is unknown (its connection went, say), so
            // it is not made again, which could record the event twice.
            Err(e) => Err(audit_error(e)),
        }
    }

    /// The last line number a record of this node would follow on from, if any.
    #[cfg(test)]
    pub(crate) fn following(&self) -> Option<i64> {
        self.followed().map(|(last, _)| last)
    }

    /// After a commit: this node's records end at line `last`, with `head`.
    fn follow(&self, last: i64, head: Head) {
        let mut followed = self.followed();
        if followed.is_none_or(|(at, _)| at <= last) {
            *followed = Some((last, head));
        }
    }

    /// Write a signed checkpoint of the current head unless the log already ends with one
    /// (or is empty). Returns the checkpoint in force afterwards, if any.
    pub fn checkpoint(&self, tx: &Tx<'_>) -> Result<Option<Checkpoint>> {
        // Whatever this node followed is behind once this commits.
        self.followed().take();
        let (target, tail, mut out) = self.begin(tx)?;
        let head = tail.head;
        if head.seq == 0 {
            return Ok(None);
        }
        if let Some(c) = tail.checkpoint {
            return Ok(Some(c));
        }
        let c = self.encode_checkpoint(&mut out, head)?;
        self.finish(tx, target, &out, head)?;
        Ok(Some(c))
    }

    /// Open and lock the log, find its head (cutting a torn last line off, and encoding the
    /// record of that repair into the returned buffer, whose head is then the returned
    /// one), and check it against the anchor.
    ///
    /// Locks are taken in one order by every writer: the catalog's write lock (with the
    /// transaction's first statement, which on PostgreSQL may be this one), then this
    /// process's mutex and the file lock (a file log only; in the catalog the write lock
    /// alone orders appends).
    fn begin(&self, tx: &Tx<'_>) -> Result<(Target<'_>, Tail, Vec<u8>)> {
        let (target, mut tail, anchor) = match &self.lines {
            Lines::File(path) => {
                let anchor = anchor(tx)?;
                let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
                let mut file = self.open_locked(anchor, path)?;
                let tail = read_tail(&mut file).map_err(audit_error)?;
                (Target::File(file, local), tail, anchor)
            }
            Lines::Catalog => {
                let (last, tail, anchor) = catalog_tail(tx).map_err(audit_error)?;
                (Target::Catalog { last }, tail, anchor)
            }
        };
        let anchored = check_anchor(tail.head, anchor)?;
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
        Ok((target, tail, out))
    }

    /// Write `out` (durably, or in `tx`) and move the anchor to `head`; a catalog log's
    /// last line number afterwards.
    fn finish(
        &self,
        tx: &Tx<'_>,
        target: Target<'_>,
        out: &[u8],
        head: Head,
    ) -> Result<Option<i64>> {
        let (mut file, _local) = match target {
            Target::File(file, local) => (file, local),
            Target::Catalog { last } => {
                // The tail and the anchor were read and checked under the write lock, in
                // this transaction: the guard needs only the line number.
                let end = queue_lines(tx, (last, None), out, head, None)?;
                crate::faults::hit("audit.written").map_err(audit_error)?;
                return Ok(Some(end));
            }
        };
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
        set_anchor(tx, head)?;
        Ok(None)
    }

    /// Open the log for appending and take the exclusive lock. A missing log is created
    /// only while the anchor is at the start: otherwise it was removed, which is refused.
    fn open_locked(&self, anchor: Head, path: &Path) -> Result<File> {
        let exists = path.exists();
        if !exists && anchor.seq > 0 {
            return Err(Error::Integrity(format!(
                "audit log {} is missing but the catalog records {} entries",
                path.display(),
                anchor.seq
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| audit_error(format!("opening {}: {e}", path.display())))?;
        file.lock()
            .map_err(|e| audit_error(format!("locking {}: {e}", path.display())))?;
        if !exists {
            crate::fsutil::sync_parent(path).map_err(audit_error)?;
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

/// Check the log's head against the catalog's `anchor`; returns the anchor's sequence
/// number.
fn check_anchor(head: Head, anchor: Head) -> Result<u64> {
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
#[derive(Debug)]
struct Tail {
    head: Head,
    /// Bytes of a torn last line that were cut off.
    torn: Option<u64>,
    /// The last line, when it is a checkpoint (of `head`).
    checkpoint: Option<Checkpoint>,
}

impl Tail {
    const EMPTY: Tail = Tail {
        head: Head::GENESIS,
        torn: None,
        checkpoint: None,
    };
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
    let mut tail = match line {
        Some(line) => parse_tail(&line)?,
        None => Tail::EMPTY,
    };
    tail.torn = torn;
    Ok(tail)
}

/// The head of the chain as it ends with `line`.
fn parse_tail(line: &[u8]) -> std::io::Result<Tail> {
    let bad = |m: &str| std::io::Error::other(format!("audit log: last line {m}"));
    let parsed: Line<'_> = serde_json::from_slice(line).map_err(|_| bad("is not a log line"))?;
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
        torn: None,
        checkpoint,
    })
}

/// Where the lines of an append go: the locked file, or the catalog after line `last`.
enum Target<'a> {
    /// The file, locked, and this process's turn to write it.
    File(File, std::sync::MutexGuard<'a, ()>),
    Catalog {
        last: i64,
    },
}

/// A catalog log's last line number, how the chain ends there, and the anchor, in one
/// statement.
fn catalog_tail(tx: &Tx<'_>) -> Result<(i64, Tail, Head)> {
    let row = tx
        .row(
            "SELECT l.pos, l.line, a.seq, a.hash FROM (SELECT 1 AS one) o
             LEFT JOIN (SELECT pos, line FROM audit_lines ORDER BY pos DESC LIMIT 1) l ON 1 = 1
             LEFT JOIN audit_anchor a ON a.id = 1",
            params![],
        )?
        .ok_or_else(|| Error::internal("audit tail: no row"))?;
    let (last, tail) = match row.get::<Option<i64>>(0)? {
        Some(pos) => {
            let line: String = row.get(1)?;
            (pos, parse_tail(line.as_bytes()).map_err(audit_error)?)
        }
        None => (0, Tail::EMPTY),
    };
    let anchor = match row.get::<Option<i64>>(2)? {
        Some(seq) => anchor_of(seq, row.get(3)?)?,
        None => Head::GENESIS,
    };
    Ok((last, tail, anchor))
}

/// Queue `out`'s lines after line `last` (guarded: `insert_lines`), and the anchor at
/// `head`, for `tx`'s commit (one round trip to a shared catalog: the last writes of the
/// change); the last line number they take.
fn queue_lines(
    tx: &Tx<'_>,
    after: (i64, Option<Head>),
    out: &[u8],
    head: Head,
    assumed: Option<&Assumed>,
) -> Result<i64> {
    let last = after.0;
    let text = std::str::from_utf8(out).map_err(Error::internal)?;
    let lines: Vec<&str> = text.lines().collect();
    let insert = insert_lines(after, &lines, assumed);
    let anchor = vec![
        Value::from(head.seq as i64),
        Value::from(head.hash.to_vec()),
    ];
    // (A backend in the process runs them now: the guard's refusal is seen here.)
    tx.execute_at_commit(vec![insert, (SET_ANCHOR.to_string(), anchor)])
        .map_err(|e| match e {
            Error::Changed(_) => e,
            other => audit_error(other),
        })?;
    Ok(last + lines.len() as i64)
}

/// The statement inserting `lines` (at least one) after line `last`, which ends the chain
/// at `head` when given (the anchor then holds `head`).
///
/// Guarded: unless `last` is the table's last line and the anchor holds `head` when it
/// runs, the first line is NULL, which the table refuses ([`Error::Changed`]), and the
/// transaction fails: never a gap or a fork in the chain, also for a writer that did not
/// read the tail in its transaction (`record_following`); and, with `assumed`, unless every
/// assumption of the request it records holds.
fn insert_lines(
    (last, head): (i64, Option<Head>),
    lines: &[&str],
    assumed: Option<&Assumed>,
) -> (String, Vec<Value>) {
    let mut sql = String::from("INSERT INTO audit_lines (pos, line) VALUES ");
    let mut values = Vec::with_capacity(lines.len() * 2 + 3);
    values.push(Value::from(last));
    let mut guard = "COALESCE((SELECT MAX(pos) FROM audit_lines), 0) = ?1".to_string();
    if let Some(head) = head {
        guard.push_str(
            " AND (SELECT seq FROM audit_anchor WHERE id = 1) = ?2
              AND (SELECT hash FROM audit_anchor WHERE id = 1) = ?3",
        );
        values.push(Value::from(head.seq as i64));
        values.push(Value::from(head.hash.to_vec()));
    }
    if let Some(assumed) = assumed.filter(|a| !a.is_empty()) {
        let condition = assumed.condition(&mut values);
        guard.push_str(&format!(" AND {condition}"));
    }
    let first = values.len() + 1;
    for (i, line) in lines.iter().enumerate() {
        let (pos, text) = (first + 2 * i, first + 2 * i + 1);
        if i == 0 {
            sql.push_str(&format!("(?{pos}, CASE WHEN {guard} THEN ?{text} END)"));
        } else {
            sql.push_str(&format!(", (?{pos}, ?{text})"));
        }
        values.push(Value::from(last + 1 + i as i64));
        values.push(Value::from(*line));
    }
    (sql, values)
}

/// A log's lines read back as the bytes of its file: the file itself, or the catalog's rows
/// a page at a time (each page one read; lines are only ever appended).
pub struct LogReader<'a>(Source<'a>);

enum Source<'a> {
    File(File),
    Catalog {
        catalog: &'a Catalog,
        /// The last line number read.
        after: i64,
        /// The current page's bytes, and how far they were read.
        page: Vec<u8>,
        at: usize,
    },
}

/// Lines read from the catalog at once.
const PAGE_LINES: i64 = 1024;

impl Read for LogReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let (catalog, after, page, at) = match &mut self.0 {
            Source::File(f) => return f.read(buf),
            Source::Catalog {
                catalog,
                after,
                page,
                at,
            } => (*catalog, after, page, at),
        };
        if *at == page.len() {
            let rows = catalog
                .read(|tx| {
                    tx.rows(
                        "SELECT pos, line FROM audit_lines WHERE pos > ?1 ORDER BY pos LIMIT ?2",
                        params![*after, PAGE_LINES],
                    )
                })
                .map_err(std::io::Error::other)?;
            page.clear();
            *at = 0;
            for r in rows {
                *after = r.get(0).map_err(std::io::Error::other)?;
                page.extend_from_slice(
                    r.get::<String>(1)
                        .map_err(std::io::Error::other)?
                        .as_bytes(),
                );
                page.push(b'\n');
            }
        }
        let n = buf.len().min(page.len() - *at);
        buf[..n].copy_from_slice(&page[*at..*at + n]);
        *at += n;
        Ok(n)
    }
}

// ---- recording actions ------------------------------------------------------------------

/// Record `event` on its own (questions, refusals), in its own catalog transaction.
pub fn record(catalog: &Catalog, log: &AuditLog, event: &Event) -> Result<Head> {
    if let Some(head) = log.record_following(catalog, event, None)? {
        return Ok(head);
    }
    let (head, last) = catalog.write(|tx| log.append_at(tx, event))?;
    if let Some(last) = last {
        log.follow(last, head);
    }
    Ok(head)
}

/// Record `event` on its own if what its request `assumed` still holds, in the same
/// transaction (one round trip to a shared catalog when the node can follow on from its last
/// record; [`Assumed`]). `None`: an assumption no longer holds, and nothing was recorded.
pub fn record_assuming(
    catalog: &Catalog,
    log: &AuditLog,
    event: &Event,
    assumed: &Assumed,
) -> Result<Option<Head>> {
    if assumed.is_empty() {
        return record(catalog, log, event).map(Some);
    }
    if let Some(head) = log.record_following(catalog, event, Some(assumed))? {
        return Ok(Some(head));
    }
    let appended = catalog.write(|tx| {
        if !assumed.hold(tx)? {
            return Ok(None);
        }
        log.append_at(tx, event).map(Some)
    })?;
    match appended {
        Some((head, last)) => {
            if let Some(last) = last {
                log.follow(last, head);
            }
            Ok(Some(head))
        }
        None => {
            // What refused the follow-on was the assumption, not another node's record.
            log.pause.store(0, std::sync::atomic::Ordering::Relaxed);
            Ok(None)
        }
    }
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
