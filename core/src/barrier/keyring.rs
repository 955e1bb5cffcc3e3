//! The barrier keyring: AES-256-GCM keys by term, and the envelope every stored value wears.
//!
//! Envelope: `0x01 | term (u32 BE) | nonce (12) | ciphertext+tag`, with the storage path as
//! associated data, so a ciphertext copied to another path, encrypted under another key, or
//! with any bit flipped fails to open. New writes use the active term; older terms stay to
//! read old entries (rotation-ready). Key bytes are zeroized on drop.

use std::collections::BTreeMap;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::BarrierError;

/// Envelope format version byte.
const ENVELOPE_V1: u8 = 1;
/// AES-GCM's standard 96-bit nonce; random per encryption (2^-32 collision bound holds far
/// beyond the number of writes one term sees; rotate the term for more).
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
/// AES-GCM's authentication tag, at the end of an envelope.
const TAG_LEN: usize = 16;
/// AES-256.
pub const KEY_LEN: usize = 32;

/// One AES-256 key.
#[derive(Clone, Zeroize, ZeroizeOnDrop, Serialize, Deserialize)]
struct TermKey {
    #[serde(with = "b64key")]
    key: [u8; KEY_LEN],
    /// Unix seconds when the term was installed.
    installed: u64,
}

/// The set of barrier keys.
#[derive(Clone, Serialize, Deserialize)]
pub struct Keyring {
    keys: BTreeMap<u32, TermKey>,
    active: u32,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keyring")
            .field("terms", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Fresh random bytes for a key.
pub fn random_key() -> Zeroizing<[u8; KEY_LEN]> {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    rand::rngs::OsRng.fill_bytes(k.as_mut());
    k
}

impl Keyring {
    /// A keyring with one fresh random key at term 1.
    pub fn generate() -> Keyring {
        Keyring::from_key(1, &random_key())
    }

    /// A keyring holding exactly `key` at `term` (used for the root key, term 0).
    pub fn from_key(term: u32, key: &[u8; KEY_LEN]) -> Keyring {
        let mut keys = BTreeMap::new();
        keys.insert(
            term,
            TermKey {
                key: *key,
                installed: now_secs(),
            },
        );
        Keyring { keys, active: term }
    }

    pub fn active_term(&self) -> u32 {
        self.active
    }

    /// Adds a new random key as the active term; returns it.
    pub fn rotate(&mut self) -> u32 {
        let term = self.active + 1;
        self.keys.insert(
            term,
            TermKey {
                key: *random_key(),
                installed: now_secs(),
            },
        );
        self.active = term;
        term
    }

    /// Encrypts `plaintext` for storage at `path` with the active term. The envelope is
    /// built in one buffer and encrypted in place: a large value is held twice at most
    /// (plaintext and envelope), never three times.
    pub fn encrypt(&self, path: &str, plaintext: &[u8]) -> Vec<u8> {
        let tk = &self.keys[&self.active];
        let cipher = Aes256Gcm::new_from_slice(&tk.key).expect("32-byte key");
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.push(ENVELOPE_V1);
        out.extend_from_slice(&self.active.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), path.as_bytes(), &mut out[HEADER_LEN..])
            .expect("AES-GCM encryption cannot fail for in-memory buffers");
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a ciphertext read from `path`.
    pub fn decrypt(&self, path: &str, envelope: &[u8]) -> Result<Vec<u8>, BarrierError> {
        self.decrypt_owned(path, envelope.to_vec())
    }

    /// Opens a ciphertext read from `path` in its own buffer (no second copy of a large
    /// value). A failed open leaves nothing readable: the buffer is zeroized.
    pub fn decrypt_owned(&self, path: &str, mut envelope: Vec<u8>) -> Result<Vec<u8>, BarrierError> {
        if envelope.len() < HEADER_LEN + TAG_LEN || envelope[0] != ENVELOPE_V1 {
            return Err(BarrierError::Malformed { path: path.to_string() });
        }
        let term = u32::from_be_bytes([envelope[1], envelope[2], envelope[3], envelope[4]]);
        let tk = self.keys.get(&term).ok_or(BarrierError::UnknownTerm {
            path: path.to_string(),
            term,
        })?;
        let cipher = Aes256Gcm::new_from_slice(&tk.key).expect("32-byte key");
        let nonce: [u8; NONCE_LEN] = envelope[5..HEADER_LEN].try_into().expect("nonce length");
        let body_end = envelope.len() - TAG_LEN;
        let tag = Tag::clone_from_slice(&envelope[body_end..]);
        if cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                path.as_bytes(),
                &mut envelope[HEADER_LEN..body_end],
                &tag,
            )
            .is_err()
        {
            envelope.zeroize();
            return Err(BarrierError::Integrity { path: path.to_string() });
        }
        envelope.truncate(body_end);
        envelope.drain(..HEADER_LEN);
        Ok(envelope)
    }

    /// Serialized form (for storing encrypted under the root key, and for handing to the
    /// local proxy over its private socket). The caller must keep it off disk in plaintext.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(serde_json::to_vec(self).expect("keyring serializes"))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Keyring, BarrierError> {
        let k: Keyring =
            serde_json::from_slice(bytes).map_err(|e| BarrierError::InvalidKey(format!("keyring: {e}")))?;
        if !k.keys.contains_key(&k.active) {
            return Err(BarrierError::InvalidKey("keyring: active term has no key".into()));
        }
        Ok(k)
    }
}

mod b64key {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let enc = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(v));
        s.serialize_str(&enc)
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        let v = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(serde::de::Error::custom)?,
        );
        v.as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::custom("key must be 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encrypt then decrypt at the same path returns the plaintext.
    #[test]
    fn roundtrip() {
        let k = Keyring::generate();
        let ct = k.encrypt("secret/foo", b"hello");
        assert_ne!(&ct[HEADER_LEN..], b"hello");
        assert_eq!(k.decrypt("secret/foo", &ct).unwrap(), b"hello");
    }

    /// Every single flipped bit anywhere in the envelope is detected.
    #[test]
    fn tamper_any_bit_detected() {
        let k = Keyring::generate();
        let ct = k.encrypt("p", b"some plaintext value");
        for i in 0..ct.len() * 8 {
            let mut bad = ct.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(k.decrypt("p", &bad).is_err(), "flip of bit {i} went unnoticed");
        }
    }

    /// A ciphertext moved to another path is refused (path is associated data).
    #[test]
    fn moved_ciphertext_refused() {
        let k = Keyring::generate();
        let ct = k.encrypt("core/leader/a", b"x");
        assert!(matches!(
            k.decrypt("core/leader/b", &ct),
            Err(BarrierError::Integrity { .. })
        ));
    }

    /// A ciphertext under an unknown term, or under another keyring's key, is refused.
    #[test]
    fn wrong_term_and_wrong_key() {
        let mut k = Keyring::generate();
        let ct = k.encrypt("p", b"x");
        let mut forged = ct.clone();
        forged[1..5].copy_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            k.decrypt("p", &forged),
            Err(BarrierError::UnknownTerm { term: 9, .. })
        ));
        let other = Keyring::generate();
        assert!(matches!(other.decrypt("p", &ct), Err(BarrierError::Integrity { .. })));
        // Rotation: old entries stay readable, new ones use the new term.
        let t2 = k.rotate();
        assert_eq!(t2, 2);
        assert_eq!(k.decrypt("p", &ct).unwrap(), b"x");
        let ct2 = k.encrypt("p", b"y");
        assert_eq!(u32::from_be_bytes(ct2[1..5].try_into().unwrap()), 2);
    }

    /// Serialization round-trips and never shows keys in Debug output.
    #[test]
    fn serialize_and_debug() {
        let k = Keyring::generate();
        let back = Keyring::from_bytes(&k.to_bytes()).unwrap();
        let ct = k.encrypt("p", b"v");
        assert_eq!(back.decrypt("p", &ct).unwrap(), b"v");
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("key"), "{dbg}");
        assert!(Keyring::from_bytes(b"{}").is_err());
    }
}
