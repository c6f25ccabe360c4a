//! A version's companies ([`crate::exec::reduce_keys`]) as bytes, and back: what the service
//! seals beside the version, so that a restarted server's first join over it reads its
//! companies instead of reducing its key column again.
//!
//! ```text
//! "ESCROWSK" | format u32 | rows without a key: chain head u32, len u32, u32 n, n x next u32
//! SHARDS x u32 (companies per shard), then every shard's entity ids (u64), in shard order
//! ```

use super::{Chain, Companies, Entries, NONE, Reduction, Shard, internal};
use crate::QueryError;
use crate::hashing::{FastSet, SHARDS, on_lanes, shard_of};
use crate::kept::{Reader, Writer};

const MAGIC: &[u8; 8] = b"ESCROWSK";

/// Threads that build the decoded companies' sets.
const DECODE_THREADS: usize = 2;

/// The format written; another is not read (the companies are reduced again). Bumped whenever
/// what the companies hold, or how they are reduced, changes.
pub const FORMAT: u32 = 1;

/// A reduction of keys alone: no GROUP BY column, no metric.
fn keys_entries() -> Entries {
    Entries {
        limit: 1,
        dims: 0,
        metrics: 0,
        codes: Vec::new(),
        sums: Vec::new(),
        counts: Vec::new(),
        next: Vec::new(),
    }
}

impl Reduction {
    /// Its companies as bytes, if it is a reduction of keys alone (every shard a set of
    /// companies); `None` otherwise.
    pub(crate) fn encode_keys(&self) -> Option<Vec<u8>> {
        let sets: Vec<&FastSet> = (self.shards.iter())
            .map(|s| match &s.companies {
                Companies::Keys(keys) => Some(keys),
                Companies::Chains(_) => None,
            })
            .collect::<Option<_>>()?;
        let (chain, entries) = &self.null;
        if !self.values.is_empty() || entries.dims != 0 || entries.metrics != 0 {
            return None;
        }
        let companies: usize = sets.iter().map(|s| s.len()).sum();
        let mut w = Writer(Vec::with_capacity(64 + SHARDS * 4 + companies * 8));
        w.0.extend_from_slice(MAGIC);
        w.u32(FORMAT);
        w.u32(chain.head);
        w.u32(chain.len);
        w.len(entries.next.len());
        for n in &entries.next {
            w.u32(*n);
        }
        for s in &sets {
            w.len(s.len());
        }
        for s in &sets {
            for id in s.iter() {
                w.u64(*id);
            }
        }
        Some(w.0)
    }

    /// Companies from [`Reduction::encode_keys`]'s bytes.
    pub(crate) fn decode_keys(bytes: &[u8]) -> Result<Reduction, QueryError> {
        let mut r = Reader::new(bytes);
        if r.take(MAGIC.len())? != MAGIC || r.u32()? != FORMAT {
            return Err(internal("kept companies: another format"));
        }
        let chain = Chain {
            head: r.u32()?,
            len: r.u32()?,
        };
        let mut null = keys_entries();
        null.next = (0..r.len(4)?).map(|_| r.u32()).collect::<Result<_, _>>()?;
        let fits = |e: u32| e == NONE || (e as usize) < null.next.len();
        if !fits(chain.head)
            || chain.len as usize > null.next.len()
            || !null.next.iter().all(|&e| fits(e))
        {
            return Err(internal("kept companies: an entry past the entries"));
        }
        let mut lengths = [0usize; SHARDS];
        for l in &mut lengths {
            *l = r.u32()? as usize;
        }
        let total: usize = lengths.iter().sum();
        if total.saturating_mul(8) != r.left() {
            return Err(internal("kept companies: not the companies it counts"));
        }
        let ids = r.column::<8>(total)?;
        // Where each shard's ids begin; the shards' sets are built on DECODE_THREADS threads
        // (a restarted server's first join waits for them).
        let starts: Vec<usize> = (lengths.iter())
            .scan(0, |at, len| {
                let start = *at;
                *at += len;
                Some(start)
            })
            .collect();
        let set = |s: usize| -> Result<FastSet, QueryError> {
            let mut keys = FastSet::default();
            keys.reserve(lengths[s]);
            for id in &ids[starts[s]..starts[s] + lengths[s]] {
                let id = u64::from_le_bytes(*id);
                if shard_of(id) != s {
                    return Err(internal("kept companies: a company in another shard"));
                }
                keys.insert(id);
            }
            Ok(keys)
        };
        let mut sets = Vec::with_capacity(SHARDS);
        for lane in on_lanes(DECODE_THREADS, |_, shards| {
            shards
                .map(|s| set(s).map(|keys| (s, keys)))
                .collect::<Result<Vec<_>, _>>()
        }) {
            sets.extend(lane.map_err(|_| internal("kept companies: a thread decoding them"))??);
        }
        // Lanes take every other shard: back in shard order.
        sets.sort_unstable_by_key(|(s, _)| *s);
        let shards = (sets.into_iter())
            .map(|(_, keys)| {
                let mut entries = keys_entries();
                entries.next.push(NONE);
                Shard {
                    companies: Companies::Keys(keys),
                    entries,
                }
            })
            .collect();
        Ok(Reduction {
            values: Vec::new(),
            shards,
            null: (chain, null),
        })
    }
}
