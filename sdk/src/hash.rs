//! A stable 64-bit hash: the same bytes give the same number in every process, on every
//! gateway replica and in every version of this SDK.
//!
//! Use it for anything that must agree across replicas (consistent hashing, ring points,
//! sharding keys). `std`'s `RandomState` is seeded per process, so two replicas would
//! disagree; it also needs randomness that `wasm32-unknown-unknown` does not have.
//!
//! The function is FNV-1a 64 over the bytes followed by the 64-bit finaliser of
//! MurmurHash3 (`fmix64`), which spreads FNV's weak low bits over the whole word so that
//! nearby keys (`10.0.0.1`, `10.0.0.2`) land far apart. **It must never change**: doing so
//! would move every consistently hashed key at once.
//!
//! ```
//! use gateway_sdk::hash::{hash64, StableHasher};
//! use std::hash::Hasher;
//!
//! let a = hash64(b"203.0.113.7");
//! let mut h = StableHasher::new();
//! h.write(b"203.0.113.7");
//! assert_eq!(h.finish(), a);
//! ```

use core::hash::{BuildHasherDefault, Hasher};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The stable hash of `bytes` (FNV-1a 64, then `fmix64`).
pub fn hash64(bytes: &[u8]) -> u64 {
    fmix64(fnv1a64(bytes))
}

/// The stable hash of `bytes` under `seed`: independent hash functions for the same key
/// (Maglev's offset and skip, for example). `hash64_seeded(0, b)` differs from
/// [`hash64`]`(b)`.
pub fn hash64_seeded(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = StableHasher::new();
    h.write_u64(seed);
    h.write(bytes);
    h.finish()
}

/// Plain FNV-1a 64 of `bytes`, without the finaliser.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    fnv_update(FNV_OFFSET, bytes)
}

/// MurmurHash3's 64-bit finaliser: a bijection that mixes every input bit into every
/// output bit.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

fn fnv_update(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// A [`Hasher`] computing the same stable hash as [`hash64`], incrementally: writing
/// `a` then `b` equals `hash64` of their concatenation. Integers are written
/// little-endian, so results do not depend on the platform.
///
/// As the hasher of a `HashMap` (see [`StableBuildHasher`]) it needs no random seed,
/// which `wasm32-unknown-unknown` could not provide.
#[derive(Debug, Clone, Copy)]
pub struct StableHasher(u64);

impl StableHasher {
    /// A hasher with nothing written yet.
    pub fn new() -> Self {
        StableHasher(FNV_OFFSET)
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = fnv_update(self.0, bytes);
    }

    fn write_u8(&mut self, i: u8) {
        self.write(&[i]);
    }

    fn write_u16(&mut self, i: u16) {
        self.write(&i.to_le_bytes());
    }

    fn write_u32(&mut self, i: u32) {
        self.write(&i.to_le_bytes());
    }

    fn write_u64(&mut self, i: u64) {
        self.write(&i.to_le_bytes());
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    fn finish(&self) -> u64 {
        fmix64(self.0)
    }
}

/// Builds [`StableHasher`]s: `HashMap<K, V, StableBuildHasher>` works on every target
/// without randomness. Keys are not attacker-proof (no seed), so use it for maps built
/// from configuration or the backend list, not from request data.
pub type StableBuildHasher = BuildHasherDefault<StableHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn hash64_is_pinned() {
        // These values are part of the contract: consistent hashing on every replica and
        // every release depends on them. If this test fails, the hash changed: revert.
        assert_eq!(hash64(b""), fmix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(hash64(b"203.0.113.7"), 0x987c_7c19_2396_5ade);
        assert_eq!(hash64_seeded(7, b"backend-1"), 0x549a_839a_ca1f_210a);
    }

    #[test]
    fn hasher_is_incremental_and_seeds_differ() {
        let mut h = StableHasher::new();
        h.write(b"foo");
        h.write(b"bar");
        assert_eq!(h.finish(), hash64(b"foobar"));
        assert_ne!(hash64_seeded(0, b"x"), hash64_seeded(1, b"x"));
        assert_ne!(hash64_seeded(0, b"x"), hash64(b"x"));
    }

    #[test]
    fn nearby_keys_spread_over_the_whole_range() {
        // Top bits of consecutive IPs should look uniform: count the top-4-bit buckets.
        let mut buckets = [0u32; 16];
        for i in 0..16_000u32 {
            let ip = format!("10.0.{}.{}", i / 256, i % 256);
            buckets[(hash64(ip.as_bytes()) >> 60) as usize] += 1;
        }
        for (b, &n) in buckets.iter().enumerate() {
            assert!((800..=1200).contains(&n), "bucket {b} has {n} of 16000");
        }
    }

    #[test]
    fn works_as_a_hash_map_hasher() {
        let mut m: HashMap<String, u32, StableBuildHasher> = HashMap::default();
        m.insert("a".into(), 1);
        m.insert("b".into(), 2);
        assert_eq!(m.get("b"), Some(&2));
    }
}
