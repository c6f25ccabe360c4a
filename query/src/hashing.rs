//! Hashing of keys that are already uniform: entity ids (keyed hashes under the escrow's
//! secret, which nobody who chooses rows can aim at one bucket) and small packed keys.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes keys that are already uniform (keyed entity ids) or small packed cell keys: one
/// folded multiply, good enough for hashbrown's use of both the high and the low bits.
#[derive(Default)]
pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b) ^ self.0.rotate_left(8));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let full = u128::from(n ^ self.0) * 0x9E37_79B9_7F4A_7C15_u128;
        self.0 = (full as u64) ^ ((full >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FastMap<V> = HashMap<u64, V, BuildHasherDefault<MixHasher>>;

/// A set of entity ids.
pub(crate) type FastSet = std::collections::HashSet<u64, BuildHasherDefault<MixHasher>>;

/// What a map of one shard's companies reserves before its `rows` staged rows go in, where
/// [`reserved_for_ids`] cannot tell better: room for half of them. A list holds a company
/// in several rows often (its CRM's duplicates), and a table reserved for every row would
/// stand mostly empty: its memory is what a restarted server's first question pays most
/// for, a page fault per 4 KiB first touched. A shard whose companies outgrow it grows as a
/// map does (to twice its room each time).
fn reserved_for(rows: usize) -> usize {
    rows / 2
}

/// Bits of the sketch [`reserved_for_ids`] counts with: 2 KiB, which tells up to about
/// 50,000 ids within 2%.
const SKETCH_BITS: usize = 1 << 14;

/// What a map of the distinct entity `ids` of one shard's rows reserves: how many there
/// are, estimated, and 5% more, never more than the rows. Reserved too small, a map grows:
/// it moves every company into a table twice the size, freshly mapped, which was the
/// costliest part of a restarted server's first reduction. Reserved for every row, a list
/// with many rows per company leaves it mostly empty, its memory touched all the same.
///
/// The estimate is linear counting: one bit per id, chosen by its low bits, and the share
/// of bits left clear (its error is about 1% up to 30,000 ids). Ids are keyed hashes under
/// the escrow's secret, so their low bits are even whatever the rows (a shard's own bits,
/// [`shard_of`], are the high ones). Where nearly every bit is set, the estimate is a floor
/// only: then at least [`reserved_for`] the rows.
pub(crate) fn reserved_for_ids(ids: impl IntoIterator<Item = u64>) -> usize {
    let mut bits = [0u64; SKETCH_BITS / 64];
    let mut rows = 0usize;
    for id in ids {
        rows += 1;
        let bit = id as usize & (SKETCH_BITS - 1);
        bits[bit / 64] |= 1 << (bit % 64);
    }
    let clear: usize = bits.iter().map(|w| w.count_zeros() as usize).sum();
    let m = SKETCH_BITS as f64;
    let estimate = match clear {
        0 => rows,
        _ => (-m * (clear as f64 / m).ln() * 1.05).ceil() as usize,
    };
    let estimate = match clear < SKETCH_BITS / 20 {
        true => estimate.max(reserved_for(rows)),
        false => estimate,
    };
    estimate.min(rows)
}

/// Bits of an entity id that choose its shard. Ids are keyed hashes under the escrow's
/// secret, so shards are even whatever the rows: a shard's companies fit in a core's cache
/// while it is built and probed, and shards can be worked on by separate threads.
const SHARD_BITS: u32 = 6;
pub(crate) const SHARDS: usize = 1 << SHARD_BITS;

/// `work(lane, shards)` on `lanes` scoped threads, lane `i` taking every `lanes`-th shard
/// from `i`; each lane's outcome (`Err` if it panicked), in lane order.
pub(crate) fn on_lanes<T: Send>(
    lanes: usize,
    work: impl Fn(usize, std::iter::StepBy<std::ops::Range<usize>>) -> T + Sync,
) -> Vec<std::thread::Result<T>> {
    let lanes = lanes.clamp(1, SHARDS);
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = (0..lanes)
            .map(|lane| scope.spawn(move || work(lane, (lane..SHARDS).step_by(lanes))))
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    })
}

/// The shard of entity id `id`.
pub(crate) fn shard_of(id: u64) -> usize {
    (id >> (64 - SHARD_BITS)) as usize
}

/// A map from entity ids in [`SHARDS`] maps by [`shard_of`]: one id's lookups go to one
/// shard, and walking the map goes shard by shard, so looking up what one walk meets in
/// another such map stays within one shard of each at a time.
#[derive(Debug)]
pub(crate) struct Sharded<V> {
    shards: Vec<FastMap<V>>,
}

impl<V> Default for Sharded<V> {
    fn default() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| FastMap::default()).collect(),
        }
    }
}

impl<V> Sharded<V> {
    pub fn shard(&self, shard: usize) -> &FastMap<V> {
        &self.shards[shard]
    }

    pub fn shard_mut(&mut self, shard: usize) -> &mut FastMap<V> {
        &mut self.shards[shard]
    }

    pub fn get(&self, id: &u64) -> Option<&V> {
        self.shards[shard_of(*id)].get(id)
    }

    pub fn get_mut(&mut self, id: &u64) -> Option<&mut V> {
        self.shards[shard_of(*id)].get_mut(id)
    }

    pub fn contains_key(&self, id: &u64) -> bool {
        self.shards[shard_of(*id)].contains_key(id)
    }

    pub fn remove(&mut self, id: &u64) -> Option<V> {
        self.shards[shard_of(*id)].remove(id)
    }

    pub fn entry(&mut self, id: u64) -> std::collections::hash_map::Entry<'_, u64, V> {
        self.shards[shard_of(id)].entry(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn capacity(&self) -> usize {
        self.shards.iter().map(HashMap::capacity).sum()
    }
}

impl<V> std::ops::Index<&u64> for Sharded<V> {
    type Output = V;

    fn index(&self, id: &u64) -> &V {
        &self.shards[shard_of(*id)][id]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entity ids as a question reads them: keyed hashes of key texts.
    fn ids(n: u64, salt: u8) -> impl Iterator<Item = u64> {
        let hasher = crate::source::EntityHasher::new([salt; 16]);
        (0..n).map(move |i| hasher.id(&format!("company-{i}.example")))
    }

    #[test]
    fn a_map_reserves_about_the_ids_its_rows_have() {
        for n in [100u64, 1_000, 10_000, 14_000, 30_000] {
            // Each id in three rows: what is reserved follows the ids, not the rows.
            let rows = ids(n, 7).flat_map(|id| [id, id, id]);
            let reserved = reserved_for_ids(rows) as f64;
            assert!(
                reserved >= n as f64 * 1.02 && reserved <= n as f64 * 1.08,
                "{n} ids: {reserved}"
            );
        }
        // Never more than the rows.
        assert_eq!(reserved_for_ids(ids(10, 1)), 10);
        assert_eq!(reserved_for_ids(std::iter::empty()), 0);
        // Past what the bits tell: at least half the rows.
        let many = 400_000u64;
        assert!(reserved_for_ids(ids(many, 3)) >= many as usize / 2);
        assert!(reserved_for_ids(ids(many, 3)) <= many as usize);
    }
}
