//! The audit log: every upload, delete, query, overlap, policy change, user and partner
//! change, startup and recovery, as one append-only, hash-chained, signed sequence of JSON
//! lines. Beside a node's own SQLite catalog the lines are a file (`DIR/audit/log.jsonl`);
//! with a catalog shared by several nodes (PostgreSQL) they are rows of the catalog
//! (`audit_lines`), written in the transaction of the change they record, so the nodes
//! share one chain and no file. Both read back as the same bytes, which the views, exports
//! and the verifier take. Engine code: no HTTP.
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
//! Writing is fail-closed: the record is durable (fsync, or the catalog's commit) before the
//! action it describes is answered, and an append that fails fails the action
//! (`audit_unavailable`).
//! Appends run inside a catalog write transaction that also moves the catalog's anchor (the
//! last record's sequence number and hash): the log file may never fall behind the anchor,
//! so a truncated or replaced log is refused instead of being continued (for lines in the
//! catalog, the anchor is checked the same way against rows removed). Several processes
//! (the server and operator commands) append under an exclusive file lock. An append torn
//! by a crash (a last line without its newline) is cut off by the next append, which first
//! records the repair.

mod events;
mod verifier;
mod views;
mod writer;

pub use events::{Actor, Event, Outcome, Record};
pub use verifier::{Verified, VerifyFailure, VerifyOptions, verify};
pub use views::{Viewer, export, list, parse_since};
pub use writer::{
    AuditLog, Change, Lines, LogReader, anchor, public_key_of, record, record_assuming,
};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

const RECORD_DOMAIN: &[u8] = b"escrow/audit/record/v1\0";
const CHAIN_DOMAIN: &[u8] = b"escrow/audit/chain/v1\0";
const SIGNATURE_DOMAIN: &[u8] = b"escrow/audit/signature/v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"escrow/audit/checkpoint/v1\0";

/// A checkpoint follows every record whose sequence number is a multiple of this.
pub const CHECKPOINT_EVERY: u64 = 64;

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

fn decode32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests;
