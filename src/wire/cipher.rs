//! ATOMIC mode's pay-to-decrypt: a chunk is encrypted under a fresh 32-byte key K whose
//! SHA-256 is the payment hash of the chunk's invoice, so paying reveals K (the preimage).

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

pub struct Sealed {
    pub key: [u8; 32],
    pub nonce: [u8; 12],
    pub ciphertext: Vec<u8>,
}

/// Encrypts `plaintext` under a fresh random key (ChaCha20-Poly1305, no associated data).
pub fn seal(plaintext: &[u8]) -> Sealed {
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    seal_with(key, plaintext)
}

/// Encrypts `plaintext` under `key`, chosen before the plaintext existed (the preimage of an
/// invoice issued ahead of its chunk), with a fresh random nonce.
pub fn seal_with(key: [u8; 32], plaintext: &[u8]) -> Sealed {
    let mut nonce = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut nonce);
    let ciphertext = ChaCha20Poly1305::new(Key::from_slice(&key))
        .encrypt(Nonce::from_slice(&nonce), plaintext)
        .expect("in-memory encryption cannot fail");
    Sealed {
        key,
        nonce,
        ciphertext,
    }
}

/// Decrypts with the key (the payment preimage). Fails if the key or data is wrong.
pub fn open(key: &[u8; 32], nonce: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
    if nonce.len() != 12 {
        return None;
    }
    ChaCha20Poly1305::new(Key::from_slice(key))
        .decrypt(Nonce::from_slice(nonce), ciphertext)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let s = seal("héllo chunk".as_bytes());
        assert_eq!(
            open(&s.key, &s.nonce, &s.ciphertext).unwrap(),
            "héllo chunk".as_bytes()
        );
        let mut bad = s.key;
        bad[0] ^= 1;
        assert!(open(&bad, &s.nonce, &s.ciphertext).is_none());
    }
}
