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
