//! Keys: the key-encryption key (KEK) of the escrow and per-version data keys (DEKs).
//!
//! The KEK lives in `DIR/keys/kek` (32 random bytes, mode 0600, never overwritten). Each
//! dataset version gets a fresh random DEK, stored only wrapped: AES-256-GCM under the KEK
//! with a random nonce and the dataset/version ids as AAD, so a wrapped key copied onto
//! another version's catalog row does not unwrap. Destroying the wrapped DEK crypto-shreds
//! the version.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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
    /// Load the KEK file; it must be exactly 32 bytes. The key bytes are wiped once the
    /// cipher is keyed.
    pub fn load(path: &Path) -> Result<Self> {
        let key = load_secret(path, "key-encryption key")?;
        Ok(Kek {
            aead: Aead::new(&key[..]).map_err(Error::internal)?,
            id: key_id(&key[..]),
        })
    }

    /// Re-wrap a DEK wrapped under `self` for `binding` under `to` (rotation). The DEK is
    /// wiped when this returns.
    pub fn rewrap(&self, to: &Kek, wrapped: &[u8], binding: &Binding) -> Result<Vec<u8>> {
        let dek = self.unwrap(wrapped, binding)?;
        to.wrap(&dek, binding)
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

/// The key-encryption keys of a data directory: the current one (`keys/kek`) and, between a
/// rotation's catalog commit and its promotion, the next one (`keys/kek.next`). Which key
/// wraps new data keys is the catalog's record (`Catalog::current_kek`), not the files; a
/// key a catalog row names but this process has not loaded (another process rotated) is
/// found by reloading the files. A reload drops keys no longer on disk: a retired key leaves
/// memory too.
pub struct Keyring {
    current: PathBuf,
    next: PathBuf,
    keys: RwLock<Vec<Arc<Kek>>>,
}

impl Keyring {
    pub fn load(current: &Path, next: &Path) -> Result<Self> {
        let ring = Keyring {
            current: current.to_path_buf(),
            next: next.to_path_buf(),
            keys: RwLock::new(Vec::new()),
        };
        ring.reload()?;
        Ok(ring)
    }

    fn reload(&self) -> Result<()> {
        // `next` first: a promotion (rename next -> current) between the two reads then
        // finds the new key in one place or the other, never in neither.
        let mut keys = Vec::new();
        if self.next.exists() {
            match Kek::load(&self.next) {
                Ok(k) => keys.push(Arc::new(k)),
                Err(_) if !self.next.exists() => {}
                Err(e) => return Err(e),
            }
        }
        let current = Kek::load(&self.current)?;
        if !keys.iter().any(|k| k.id == current.id) {
            keys.push(Arc::new(current));
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }

    fn find(&self, id: &str) -> Option<Arc<Kek>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|k| k.id == id)
            .cloned()
    }

    /// The key with this id, reloading the key files once if it is not loaded.
    pub fn get(&self, id: &str) -> Result<Arc<Kek>> {
        if let Some(k) = self.find(id) {
            return Ok(k);
        }
        self.reload()?;
        self.find(id).ok_or_else(|| {
            Error::internal(format!(
                "a data key is wrapped under key-encryption key {id}, which is not in {}",
                self.current.display()
            ))
        })
    }

    /// The id of the key in `keys/kek`.
    pub fn file_id(&self) -> Result<String> {
        Ok(Kek::load(&self.current)?.id)
    }
}

/// What startup (or the next rotation) found of an interrupted rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// No rotation was in progress.
    Nothing,
    /// The catalog had switched to the next key: the key file was promoted.
    Promoted(String),
    /// The rotation never committed: the unused next key was removed.
    Discarded(String),
}

/// Finish or undo a rotation a crash interrupted, given the catalog's current key id: the
/// next key is promoted if the catalog uses it, removed otherwise (nothing is wrapped by it).
pub fn settle_rotation(current: &Path, next: &Path, catalog_current: &str) -> Result<Settled> {
    if !next.exists() {
        return Ok(Settled::Nothing);
    }
    let id = Kek::load(next)?.id;
    if id == catalog_current {
        fs::rename(next, current)?;
        crate::fsutil::sync_parent(current)?;
        Ok(Settled::Promoted(id))
    } else {
        fs::remove_file(next)?;
        crate::fsutil::sync_parent(next)?;
        Ok(Settled::Discarded(id))
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
