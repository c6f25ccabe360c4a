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
        Self::from_secret(&load_secret(path, "key-encryption key")?)
    }

    /// Key the cipher with `key` (the caller wipes it).
    pub fn from_secret(key: &SecretKey) -> Result<Self> {
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

/// Salt bytes of a derived key ([`derived_key`]).
pub const SALT_LEN: usize = 32;

/// The key of one object derived from a version's plaintext and sealed beside it
/// (`Store::seal_derived`): HKDF-SHA256 of the version's data key, with the object's own
/// random salt and its name as context. A fresh key per object written (the salt), so the
/// sealed format's counter nonces never repeat under one key, even when an object is written
/// again; and the object goes with its version's data key (a delete crypto-shreds both, a
/// rotation, which rewraps the data key only, keeps both readable).
pub fn derived_key(dek: &SecretKey, salt: &[u8; SALT_LEN], name: &str) -> Result<SecretKey> {
    let mut info = b"escrow derived object v1\0".to_vec();
    info.extend_from_slice(name.as_bytes());
    let mut key: SecretKey = Zeroizing::new([0u8; KEY_LEN]);
    hkdf::Hkdf::<Sha256>::new(Some(salt), &dek[..])
        .expand(&info, &mut key[..])
        .map_err(|e| Error::internal(format!("derived key: {e}")))?;
    Ok(key)
}

/// Where a key-encryption key is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLocation {
    /// A 32-byte file (`keys/kek`, `keys/kek.next`): the default.
    File(PathBuf),
    /// An environment variable holding the key as 64 hex digits.
    Env(&'static str),
    /// A shell command that prints the key as 64 hex digits on stdout: an external KMS or
    /// Vault (`vault kv get -field=kek secret/escrow`, `aws secretsmanager ...`).
    Command(String),
}

/// Environment variables naming the KEK's source (docs/OPERATIONS.md, "Keys").
pub const ENV_KEK: &str = "ESCROW_KEK";
pub const ENV_KEK_NEXT: &str = "ESCROW_KEK_NEXT";
pub const ENV_KEK_COMMAND: &str = "ESCROW_KEK_COMMAND";
pub const ENV_KEK_NEXT_COMMAND: &str = "ESCROW_KEK_NEXT_COMMAND";
/// How long a key command may run.
const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl KeyLocation {
    /// The key, or `None` if a file location does not exist. Key bytes are wiped as soon as
    /// the cipher is keyed; nothing here logs or echoes key material.
    pub fn load(&self) -> Result<Option<Kek>> {
        match self {
            KeyLocation::File(p) => match p.exists() {
                true => Kek::load(p).map(Some),
                false => Ok(None),
            },
            KeyLocation::Env(var) => {
                let value =
                    Zeroizing::new(std::env::var(var).map_err(|_| {
                        Error::internal(format!("{var} is not set (or not UTF-8)"))
                    })?);
                Kek::from_secret(&parse_hex_key(&value, var)?).map(Some)
            }
            KeyLocation::Command(cmd) => {
                Kek::from_secret(&parse_hex_key(&run_key_command(cmd)?, "the key command")?)
                    .map(Some)
            }
        }
    }

    /// How the location is named in messages (never the key).
    pub fn describe(&self) -> String {
        match self {
            KeyLocation::File(p) => format!("file {}", p.display()),
            KeyLocation::Env(var) => format!("environment variable {var}"),
            KeyLocation::Command(_) => "key command".into(),
        }
    }
}

/// The key-encryption key's source: where the current key is, and where the next one is
/// during a rotation. Chosen by environment variables: `ESCROW_KEK_COMMAND` or `ESCROW_KEK`
/// (current), `ESCROW_KEK_NEXT_COMMAND` or `ESCROW_KEK_NEXT` (next); unset, the data
/// directory's `keys/kek` and `keys/kek.next`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekSource {
    pub current: KeyLocation,
    pub next: KeyLocation,
}

impl KekSource {
    /// The source configured by the environment for the key files `kek` / `kek_next`.
    pub fn from_env(kek: &Path, kek_next: &Path) -> Result<KekSource> {
        let pick = |cmd: &'static str, var: &'static str, file: &Path| {
            let cmd_value = std::env::var(cmd).ok().filter(|v| !v.trim().is_empty());
            match (cmd_value, std::env::var_os(var).is_some()) {
                (Some(_), true) => Err(Error::bad(
                    "invalid_config",
                    format!("set {cmd} or {var}, not both"),
                )),
                (Some(c), false) => Ok(KeyLocation::Command(c)),
                (None, true) => Ok(KeyLocation::Env(var)),
                (None, false) => Ok(KeyLocation::File(file.to_path_buf())),
            }
        };
        Ok(KekSource {
            current: pick(ENV_KEK_COMMAND, ENV_KEK, kek)?,
            next: pick(ENV_KEK_NEXT_COMMAND, ENV_KEK_NEXT, kek_next)?,
        })
    }

    /// The keys the source holds now: next (if any) and current (if any), with their ids.
    pub fn load_all(&self) -> Result<Loaded> {
        let mut loaded = Loaded::default();
        // `next` first: a promotion (rename next -> current) between the two reads then
        // finds the new key in one place or the other, never in neither.
        if let Some(k) = self.next.load()? {
            loaded.next = Some(k.id.clone());
            loaded.keys.push(Arc::new(k));
        }
        match self.current.load() {
            Ok(Some(k)) => {
                loaded.current = Some(k.id.clone());
                if !loaded.keys.iter().any(|n| n.id == k.id) {
                    loaded.keys.push(Arc::new(k));
                }
            }
            Ok(None) => {}
            // A file promoted or retired between the reads: the key is in `keys` already.
            Err(_) if matches!(self.current, KeyLocation::File(ref p) if !p.exists()) => {}
            Err(e) => return Err(e),
        }
        Ok(loaded)
    }

    /// Whether both keys are kept outside the data directory.
    pub fn is_external(&self) -> bool {
        !matches!(self.current, KeyLocation::File(_))
    }
}

/// Run a key command (`sh -c`) with a time limit; its stdout, wiped on drop. Its stderr goes
/// to ours (the operator's tool, for the operator to read); its stdout is never shown.
fn run_key_command(cmd: &str) -> Result<Zeroizing<String>> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| Error::internal(format!("starting the key command: {e}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::internal("key command stdout"))?;
    // The key is 65 bytes: it fits in the pipe, so waiting before reading cannot deadlock;
    // a command that prints more than the pipe holds is killed at the time limit.
    let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::internal(format!(
                "the key command did not finish within {} s",
                COMMAND_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut out = Zeroizing::new(String::new());
    stdout
        .take(4096)
        .read_to_string(&mut out)
        .map_err(|e| Error::internal(format!("reading the key command's output: {e}")))?;
    if !status.success() {
        return Err(Error::internal(format!(
            "the key command failed ({status})"
        )));
    }
    Ok(out)
}

/// A 32-byte key from 64 hex digits (surrounding whitespace ignored).
fn parse_hex_key(text: &str, from: &str) -> Result<SecretKey> {
    let mut key: SecretKey = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(text.trim(), &mut key[..]).map_err(|_| {
        Error::internal(format!(
            "{from} must hold the key as {} hex digits (escrow keys generate prints one)",
            2 * KEY_LEN
        ))
    })?;
    Ok(key)
}

/// A new random key as hex, for an external source (`escrow keys generate`).
pub fn generate_hex() -> Result<Zeroizing<String>> {
    let key: SecretKey = Zeroizing::new(random_bytes()?);
    Ok(Zeroizing::new(hex::encode(&key[..])))
}

/// What one read of a [`KekSource`] found: its keys, and the ids of the current and the next.
#[derive(Default)]
pub struct Loaded {
    keys: Vec<Arc<Kek>>,
    current: Option<String>,
    next: Option<String>,
}

/// The key-encryption keys a process knows: the source's current one and, between a
/// rotation's catalog commit and its promotion, the next one. Which key wraps new data keys
/// is the catalog's record (`Catalog::current_kek`), not the source; a key a catalog row
/// names but this process has not loaded (another process rotated) is found by reloading
/// the source. A reload drops keys the source no longer holds: a retired key leaves memory
/// too.
pub struct Keyring {
    source: KekSource,
    loaded: RwLock<Loaded>,
}

impl Keyring {
    pub fn load(source: KekSource) -> Result<Self> {
        let loaded = RwLock::new(source.load_all()?);
        Ok(Keyring { source, loaded })
    }

    fn reload(&self) -> Result<()> {
        let loaded = self.source.load_all()?;
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(())
    }

    fn find(&self, id: &str) -> Option<Arc<Kek>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .iter()
            .find(|k| k.id == id)
            .cloned()
    }

    /// The key with this id, reloading the source once if it is not loaded.
    pub fn get(&self, id: &str) -> Result<Arc<Kek>> {
        if let Some(k) = self.find(id) {
            return Ok(k);
        }
        self.reload()?;
        self.find(id).ok_or_else(|| {
            Error::internal(format!(
                "data keys are wrapped under key-encryption key {id}, which neither the {} nor the {} holds",
                self.source.current.describe(),
                self.source.next.describe()
            ))
        })
    }

    /// The id of the source's current key as last read, if it has one (no I/O: a key
    /// command runs once per read of the source, not once per question about it).
    pub fn current_id(&self) -> Option<String> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .current
            .clone()
    }

    /// The id of the source's next key as last read, if it has one.
    pub fn next_id(&self) -> Option<String> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .next
            .clone()
    }

    pub fn source(&self) -> &KekSource {
        &self.source
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
