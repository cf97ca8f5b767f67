//! Bearer secrets of sessions and accounts: 32 random bytes handed to the owner once, only
//! their SHA-256 stored, compared in constant time.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A fresh secret: 32 random bytes, and its hex form handed to the owner.
pub fn new_secret() -> ([u8; 32], String) {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    (raw, hex::encode(raw))
}

/// What the store keeps of a secret.
pub fn hash_secret(raw: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(raw).into()
}

/// Equality in constant time (a secret's hash compared byte by byte would leak its prefix).
pub fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
