//! A reduced side as bytes, and back: what the service seals beside a dataset version so that
//! a restarted server reads a side's entities instead of reducing its rows again.
//!
//! ```text
//! "ESCROWSD" | format u32 | sealed for (str: the side's name) | peak u64 | named u8
//! place kinds (u8 present, str)
//! values: u32 n, n x str                        (str := u32 length | UTF-8 bytes)
//! members: SHARDS x u32 (per shard, in shard order), then column by column over them all:
//!          ids u64 | masks u64 | values u32 | names u64 | places u64 | flags u8
//! folded: u32 n, n x (from u64, into u64)
//! more values: u32 n, n x (id u64, u32 k, k x value u32)
//! ```
//!
//! Little-endian throughout. The bytes come back only through the sealed format's
//! authentication (they are what this module wrote), but are still read with every length
//! checked: a mismatch is an internal error, never a panic or an allocation the bytes chose.

use super::{Member, Membership, NO_VALUE, internal, over_limit};
use crate::QueryError;
use crate::hashing::{FastMap, SHARDS, shard_of};
use crate::kept::{Reader, Writer};

const MAGIC: &[u8; 8] = b"ESCROWSD";

/// The format written; another is not read (the side is reduced again). Bumped whenever what
/// a side holds, or how a side is reduced from its rows, changes: a side sealed by an earlier
/// release is then reduced again rather than read as this release would not have made it.
pub const FORMAT: u32 = 1;

const LINKABLE: u8 = 1;
const NAME_ONLY: u8 = 2;

impl Membership {
    /// The side as bytes, named `sealed_for` (what the side is of: [`Membership::decode`]
    /// gives it back with the side).
    pub fn encode(&self, sealed_for: &str) -> Vec<u8> {
        let members = self.members.len();
        let mut w = Writer(Vec::with_capacity(
            64 + sealed_for.len() + members * 37 + self.folded.len() * 16,
        ));
        w.0.extend_from_slice(MAGIC);
        w.u32(FORMAT);
        w.str(sealed_for);
        w.u64(self.peak as u64);
        w.u8(u8::from(self.named));
        w.u8(u8::from(self.place_kinds.is_some()));
        w.str(self.place_kinds.as_deref().unwrap_or_default());
        w.len(self.values.len());
        for v in &self.values {
            w.str(v);
        }
        for s in 0..SHARDS {
            w.len(self.members.shard(s).len());
        }
        let each = |w: &mut Writer, f: &dyn Fn(&Member, u64, &mut Writer)| {
            for s in 0..SHARDS {
                for (id, m) in self.members.shard(s) {
                    f(m, *id, w);
                }
            }
        };
        each(&mut w, &|_, id, w| w.u64(id));
        each(&mut w, &|m, _, w| w.u64(m.mask));
        each(&mut w, &|m, _, w| w.u32(m.value));
        each(&mut w, &|m, _, w| w.u64(m.name));
        each(&mut w, &|m, _, w| w.u64(m.place));
        each(&mut w, &|m, _, w| {
            w.u8((u8::from(m.linkable) * LINKABLE) | (u8::from(m.name_only) * NAME_ONLY))
        });
        w.len(self.folded.len());
        for (from, into) in &self.folded {
            w.u64(*from);
            w.u64(*into);
        }
        w.len(self.more_values.len());
        for (id, values) in &self.more_values {
            w.u64(*id);
            w.len(values.len());
            for v in values {
                w.u32(*v);
            }
        }
        w.0
    }

    /// A side from [`Membership::encode`]'s bytes, with the name it was sealed for (the
    /// caller tells whether that is the side it wants, or one of other populations of the
    /// same rows to derive it from: [`Membership::repopulated`]). Fails as reducing it would
    /// when the reduction needed more than `memory_limit` bytes at its peak (so a side is
    /// refused, or not, whether it was kept or not; without a breakdown the peak is the same
    /// whatever the populations).
    pub fn decode(bytes: &[u8], memory_limit: usize) -> Result<(String, Membership), QueryError> {
        let mut r = Reader::new(bytes);
        if r.take(MAGIC.len())? != MAGIC || r.u32()? != FORMAT {
            return Err(internal("kept overlap side: another format"));
        }
        let sealed_for = r.str()?;
        let peak = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
        if peak > memory_limit {
            return Err(over_limit(memory_limit));
        }
        let named = r.u8()? != 0;
        let has_kinds = r.u8()? != 0;
        let kinds = r.str()?;
        let mut out = Membership {
            named,
            place_kinds: has_kinds.then_some(kinds),
            peak,
            ..Membership::default()
        };
        for _ in 0..r.len(4)? {
            let v = r.str()?;
            out.intern(&v);
        }
        let mut lengths = [0usize; SHARDS];
        for l in &mut lengths {
            *l = r.u32()? as usize;
        }
        let n: usize = lengths.iter().sum();
        if n.saturating_mul(37) > r.left() {
            return Err(internal("kept overlap side: members past its end"));
        }
        let (ids, masks, values) = (r.column::<8>(n)?, r.column::<8>(n)?, r.column::<4>(n)?);
        let (names, places, flags) = (r.column::<8>(n)?, r.column::<8>(n)?, r.column::<1>(n)?);
        let mut at = 0;
        for (s, len) in lengths.into_iter().enumerate() {
            let shard = out.members.shard_mut(s);
            shard.reserve(len);
            for i in at..at + len {
                let id = u64::from_le_bytes(ids[i]);
                if shard_of(id) != s {
                    return Err(internal("kept overlap side: a member in another shard"));
                }
                let [f] = flags[i];
                let value = u32::from_le_bytes(values[i]);
                if value != NO_VALUE && value as usize >= out.values.len() {
                    return Err(internal("kept overlap side: a value past the values"));
                }
                shard.insert(
                    id,
                    Member {
                        mask: u64::from_le_bytes(masks[i]),
                        value,
                        linkable: f & LINKABLE != 0,
                        name_only: f & NAME_ONLY != 0,
                        name: u64::from_le_bytes(names[i]),
                        place: u64::from_le_bytes(places[i]),
                    },
                );
            }
            at += len;
        }
        let folded = r.len(16)?;
        out.folded = FastMap::default();
        out.folded.reserve(folded);
        for _ in 0..folded {
            let (from, into) = (r.u64()?, r.u64()?);
            out.folded.insert(from, into);
        }
        for _ in 0..r.len(12)? {
            let id = r.u64()?;
            let k = r.len(4)?;
            let values = (0..k).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            if values.iter().any(|v| *v as usize >= out.values.len()) {
                return Err(internal("kept overlap side: a value past the values"));
            }
            out.more_values.insert(id, values);
        }
        if r.left() != 0 {
            return Err(internal("kept overlap side: bytes past its end"));
        }
        Ok((sealed_for, out))
    }
}
