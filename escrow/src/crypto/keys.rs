//! Keys: the key-encryption key (KEK) of the escrow and per-version data keys (DEKs).
//!
//! The KEK lives in `DIR/keys/kek` (32 random bytes, mode 0600, never overwritten). Each
//! dataset version gets a fresh random DEK, stored only wrapped: AES-256-GCM under the KEK
//! with a random nonce and the dataset/version ids as AAD, so a wrapped key copied onto
//! another version's catalog row does not unwrap. Destroying the wrapped DEK crypto-shreds
//! the version.

use std::fs;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::cipher::{Aead, KEY_LEN, NONCE_LEN};
use super::random_bytes;
use super::seal::Binding;
use crate::{Error, Result};

/// Secret key bytes, wiped from memory on drop.
pub type SecretKey = Zeroizing<[u8; KEY_LEN]>;

/// The key-encryption key and its public identifier.
pub struct Kek {
    aead: Aead,
    id: String,
}

impl Kek {
    /// Load the KEK file; it must be exactly 32 bytes.
    pub fn load(path: &Path) -> Result<Self> {
        let key = load_secret(path, "key-encryption key")?;
        Ok(Kek {
            aead: Aead::new(&key[..]).map_err(Error::internal)?,
            id: key_id(&key[..]),
        })
    }

    /// Create a new random KEK at `path` unless one exists. Returns true if created.
    pub fn create_if_missing(path: &Path) -> Result<bool> {
        create_secret_if_missing(path)
    }

    /// Public identifier of this KEK (a hash prefix, safe to store and log).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A fresh random data key for one dataset version.
    pub fn new_dek() -> Result<SecretKey> {
        Ok(Zeroizing::new(random_bytes()?))
    }

    /// Wrap a DEK for the version `binding`: nonce || ciphertext || tag.
    pub fn wrap(&self, dek: &SecretKey, binding: &Binding) -> Result<Vec<u8>> {
        let nonce: [u8; NONCE_LEN] = random_bytes()?;
        let mut out = nonce.to_vec();
        let sealed = self
            .aead
            .seal(&nonce, &wrap_aad(binding), &dek[..])
            .map_err(Error::internal)?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Unwrap a DEK; fails if it was wrapped for another version or under another KEK.
    pub fn unwrap(&self, wrapped: &[u8], binding: &Binding) -> Result<SecretKey> {
        if wrapped.len() < NONCE_LEN {
            return Err(Error::Integrity("wrapped data key too short".into()));
        }
        let (nonce, ct) = wrapped.split_at(NONCE_LEN);
        let plain = Zeroizing::new(
            self.aead
                .open(nonce, &wrap_aad(binding), ct)
                .map_err(|_| Error::Integrity("data key does not unwrap".into()))?,
        );
        let mut key: SecretKey = Zeroizing::new([0u8; KEY_LEN]);
        if plain.len() != KEY_LEN {
            return Err(Error::Integrity("data key has the wrong length".into()));
        }
        key.copy_from_slice(&plain);
        Ok(key)
    }
}

/// Load a 32-byte secret key file.
pub fn load_secret(path: &Path, what: &str) -> Result<SecretKey> {
    let bytes = Zeroizing::new(
        fs::read(path)
            .map_err(|e| Error::internal(format!("reading {what} {}: {e}", path.display())))?,
    );
    let key: [u8; KEY_LEN] = bytes[..].try_into().map_err(|_| {
        Error::internal(format!(
            "{what} {} must be {KEY_LEN} bytes, found {}",
            path.display(),
            bytes.len()
        ))
    })?;
    Ok(Zeroizing::new(key))
}

/// Create a random 32-byte secret key file (0600) unless one exists. Returns true if created.
pub fn create_secret_if_missing(path: &Path) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let key: SecretKey = Zeroizing::new(random_bytes()?);
    let mut f = match crate::fsutil::create_private(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    f.write_all(&key[..])?;
    f.sync_all()?;
    crate::fsutil::sync_parent(path)?;
    Ok(true)
}

fn wrap_aad(binding: &Binding) -> Vec<u8> {
    let mut aad = b"escrow/dek/v1".to_vec();
    aad.extend_from_slice(&binding.dataset);
    aad.extend_from_slice(&binding.version);
    aad
}

fn key_id(key: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"escrow/kek-id/v1");
    h.update(key);
    hex::encode(&h.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_is_bound_to_the_version() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("kek");
        assert!(Kek::create_if_missing(&p).expect("create"));
        assert!(
            !Kek::create_if_missing(&p).expect("exists"),
            "must never overwrite"
        );
        let kek = Kek::load(&p).expect("load");
        let a = Binding {
            dataset: [1; 16],
            version: [2; 16],
        };
        let b = Binding {
            dataset: [1; 16],
            version: [3; 16],
        };
        let dek = Kek::new_dek().expect("dek");
        let w = kek.wrap(&dek, &a).expect("wrap");
        assert_eq!(kek.unwrap(&w, &a).expect("unwrap")[..], dek[..]);
        assert!(kek.unwrap(&w, &b).is_err());
        let mut t = w.clone();
        t[20] ^= 1;
        assert!(kek.unwrap(&t, &a).is_err());
    }
}
