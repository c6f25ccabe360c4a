//! Verifying a log or an export: the chain, every digest and signature, the checkpoints.

use std::io::{BufRead, BufReader, Read};

use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};
use serde::Serialize;

use super::{
    CHECKPOINT_DOMAIN, Checkpoint, Head, Line, Record, SIGNATURE_DOMAIN, chain_hash, decode32,
    digest_of, signed_message,
};

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

fn check_sig(key: &[u8], domain: &[u8], body: &[u8], sig: &[u8]) -> Result<(), ()> {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(&signed_message(domain, body), sig)
        .map_err(|_| ())
}
