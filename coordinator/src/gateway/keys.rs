//! API keys: the SHA-256 a policy stores for each, and new keys for `tpserve gateway hash-key`.
//! A plain key exists only in the client's header and in this module's arguments: the gateway
//! hashes it at once and looks the hash up, so no key reaches a log, a metric or the policy.
//! Cost: one SHA-256 of the header per request (under a microsecond).

use rand::RngCore;
use sha2::{Digest, Sha256};

/// The lowercase hex SHA-256 of `key`.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// A new random key: `sk-tp-` and 32 random bytes in hex (256 bits of entropy).
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("sk-tp-{}", hex(&bytes))
}

/// The first eight bytes of SHA-256 of `parts`, joined by NUL: a stable 64-bit hash for the
/// sticky A/B split and the tenant's prefix-cache salt (the same on every replica and run).
pub fn hash64(parts: &[&str]) -> u64 {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 has 32 bytes"))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_the_sha256_of_the_key() {
        // `printf abc | sha256sum`
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn new_keys_differ_and_hash_to_64_hex_digits() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(a.starts_with("sk-tp-") && a.len() == 6 + 64);
        assert_eq!(hash_key(&a).len(), 64);
    }
}
