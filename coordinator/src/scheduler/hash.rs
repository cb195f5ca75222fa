//! Deterministic 64-bit hashing for the scheduler: the prefix-cache chain hash of a KV block,
//! and a cheap hasher for maps keyed by `u64` (sequence ids, block hashes).
//!
//! The block hash is a wyhash-style multiply-fold over the parent hash, the cache salt and the
//! block's token ids; it depends on nothing but its inputs (no random keys, no process state),
//! so the same prefix hashes alike in every run and on every coordinator replica. It is not
//! cryptographic: two different prefixes collide with probability about 2^-64 per pair, the
//! same trade vLLM makes with its default (non-sha256) hash. Cost: one 128-bit multiply per two
//! tokens.

use std::hash::{BuildHasher, Hasher};

/// Parent hash of a sequence's first block.
pub const ROOT_HASH: u64 = 0;

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;
const P3: u64 = 0x5899_65cc_7537_4cc3;

#[inline]
fn mum(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

/// Hash of one full block in a prefix chain: `hash(parent, tokens, salt)`. `salt` separates
/// tenants and adapters, so equal prompts under different salts never share blocks.
pub fn block_hash(parent: u64, tokens: &[u32], salt: u64) -> u64 {
    let mut h = mum(parent ^ P0, salt ^ P1);
    let mut pairs = tokens.chunks_exact(2);
    for pair in &mut pairs {
        let word = u64::from(pair[0]) | (u64::from(pair[1]) << 32);
        h = mum(h ^ P2, word ^ P3);
    }
    if let [last] = pairs.remainder() {
        h = mum(h ^ P2, u64::from(*last) ^ P1);
    }
    mum(h ^ tokens.len() as u64, P0 ^ P3)
}

/// A `BuildHasher` for `u64` keys: one multiply and a fold. Sequential ids spread over the
/// table; keys that are already hashes pass through well mixed. Not DoS-resistant, which does
/// not matter for ids the coordinator assigns itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct U64HashState;

impl BuildHasher for U64HashState {
    type Hasher = U64Hasher;

    fn build_hasher(&self) -> U64Hasher {
        U64Hasher(0)
    }
}

/// The hasher of `U64HashState`.
#[derive(Debug, Clone, Copy, Default)]
pub struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only used if a non-u64 key sneaks in; correct, just slower.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.0 = mum(self.0 ^ x ^ P0, P1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_hash_is_deterministic_and_sensitive_to_each_input() {
        let tokens = [1u32, 2, 3, 4, 5];
        let h = block_hash(ROOT_HASH, &tokens, 0);
        assert_eq!(h, block_hash(ROOT_HASH, &tokens, 0));
        assert_ne!(h, block_hash(1, &tokens, 0), "parent");
        assert_ne!(h, block_hash(ROOT_HASH, &tokens, 7), "salt");
        assert_ne!(h, block_hash(ROOT_HASH, &[1, 2, 3, 4, 6], 0), "last token");
        assert_ne!(h, block_hash(ROOT_HASH, &[2, 1, 3, 4, 5], 0), "order");
        assert_ne!(
            block_hash(ROOT_HASH, &[1, 2, 3, 4], 0),
            block_hash(ROOT_HASH, &[1, 2, 3, 4, 0], 0),
            "length"
        );
    }

    #[test]
    fn block_hash_has_a_pinned_value() {
        // Pins the function: a change here changes every prefix hash (fine, but deliberate).
        // The value was computed independently (a Python transcription of the function).
        assert_eq!(block_hash(ROOT_HASH, &[1, 2, 3], 0), 0x1930_acb0_cfa5_77de);
    }
}
