//! The one AES-GCM entry point of escrow: AES-256, 96-bit nonces, 128-bit tags, nothing else.
//!
//! Any other key, nonce or tag size is refused here (checked against Wycheproof vectors in
//! the tests), so no caller can accidentally use a weaker parameter set.

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Nonce, Tag};

/// Key length in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Nonce length in bytes (96 bits, the only size GCM handles without hashing the IV).
pub const NONCE_LEN: usize = 12;
/// Tag length in bytes (128 bits; truncated tags are refused).
pub const TAG_LEN: usize = 16;

/// Why the cipher refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CipherError {
    #[error("key must be {KEY_LEN} bytes")]
    KeySize,
    #[error("nonce must be {NONCE_LEN} bytes")]
    NonceSize,
    #[error("ciphertext shorter than the {TAG_LEN}-byte tag")]
    Truncated,
    #[error("authentication failed")]
    Auth,
}

/// AES-256-GCM with a fixed key. The key schedule is zeroised on drop (aes-gcm `zeroize`).
pub struct Aead {
    cipher: Aes256Gcm,
}

impl Aead {
    /// Build from raw key bytes; anything but 32 bytes is refused.
    pub fn new(key: &[u8]) -> Result<Self, CipherError> {
        let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| CipherError::KeySize)?;
        Ok(Aead { cipher })
    }

    /// Encrypt `buf` in place and append the 16-byte tag.
    pub fn seal_in_place(
        &self,
        nonce: &[u8],
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), CipherError> {
        let nonce = nonce_of(nonce)?;
        let tag = self
            .cipher
            .encrypt_inout_detached(nonce, aad, buf.as_mut_slice().into())
            .map_err(|_| CipherError::Auth)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Verify and decrypt `buf` (ciphertext || tag) in place, leaving the plaintext.
    /// On failure `buf` is cleared: no unauthenticated plaintext is ever left behind.
    pub fn open_in_place(
        &self,
        nonce: &[u8],
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), CipherError> {
        nonce_of(nonce)?;
        if buf.len() < TAG_LEN {
            buf.clear();
            return Err(CipherError::Truncated);
        }
        let split = buf.len() - TAG_LEN;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&buf[split..]);
        buf.truncate(split);
        self.open_detached(nonce, aad, buf, &tag)
            .inspect_err(|_| buf.clear())
    }

    /// Verify `buf` (ciphertext) against `tag` and decrypt it in place. On failure `buf` is
    /// zeroed: no unauthenticated plaintext is ever left behind.
    pub fn open_detached(
        &self,
        nonce: &[u8],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), CipherError> {
        let nonce = nonce_of(nonce)?;
        self.cipher
            .decrypt_inout_detached(nonce, aad, buf.into(), &Tag::from(*tag))
            .map_err(|_| {
                buf.fill(0);
                CipherError::Auth
            })
    }

    /// Convenience: seal a copy of `plaintext`.
    pub fn seal(&self, nonce: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CipherError> {
        let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
        buf.extend_from_slice(plaintext);
        self.seal_in_place(nonce, aad, &mut buf)?;
        Ok(buf)
    }

    /// Convenience: open a copy of `ciphertext` (with its tag).
    pub fn open(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CipherError> {
        let mut buf = ciphertext.to_vec();
        self.open_in_place(nonce, aad, &mut buf)?;
        Ok(buf)
    }
}

fn nonce_of(nonce: &[u8]) -> Result<&Nonce<aes_gcm::aes::cipher::consts::U12>, CipherError> {
    <&Nonce<_>>::try_from(nonce).map_err(|_| CipherError::NonceSize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wycheproof::TestResult;
    use wycheproof::aead::{TestName, TestSet};

    /// Every Wycheproof AES-GCM vector: groups with escrow's parameters must match exactly;
    /// every other group (other key, nonce or tag sizes) must be refused by the wrapper.
    #[test]
    fn wycheproof_aes_gcm() {
        let set = TestSet::load(TestName::AesGcm).expect("wycheproof AES-GCM set loads");
        let (mut checked, mut refused) = (0usize, 0usize);
        for group in &set.test_groups {
            let ours = group.key_size == 256 && group.nonce_size == 96 && group.tag_size == 128;
            for t in &group.tests {
                let mut ct_tag = t.ct.to_vec();
                ct_tag.extend_from_slice(&t.tag);
                if !ours {
                    // A tag of another size can reach the wrapper only as a longer/shorter
                    // ciphertext, which must not verify; other key/nonce sizes fail up front.
                    let outcome = Aead::new(&t.key).and_then(|a| a.open(&t.nonce, &t.aad, &ct_tag));
                    assert!(
                        outcome.is_err(),
                        "tc {} with foreign parameters was accepted",
                        t.tc_id
                    );
                    refused += 1;
                    continue;
                }
                let aead = Aead::new(&t.key).expect("256-bit key");
                let opened = aead.open(&t.nonce, &t.aad, &ct_tag);
                match t.result {
                    TestResult::Valid | TestResult::Acceptable => {
                        assert_eq!(opened.as_deref(), Ok(&t.pt[..]), "tc {}", t.tc_id);
                        let sealed = aead.seal(&t.nonce, &t.aad, &t.pt).expect("seal");
                        assert_eq!(sealed, ct_tag, "tc {} encrypt", t.tc_id);
                    }
                    TestResult::Invalid => assert!(opened.is_err(), "tc {} must fail", t.tc_id),
                }
                checked += 1;
            }
        }
        assert!(
            checked > 50,
            "only {checked} vectors matched escrow's parameters"
        );
        assert!(
            refused > 50,
            "only {refused} vectors had foreign parameters"
        );
    }

    #[test]
    fn refuses_wrong_sizes() {
        assert_eq!(Aead::new(&[0u8; 16]).err(), Some(CipherError::KeySize));
        let a = Aead::new(&[7u8; 32]).expect("key");
        assert_eq!(
            a.seal(&[0u8; 8], b"", b"x").err(),
            Some(CipherError::NonceSize)
        );
        assert_eq!(
            a.open(&[0u8; 12], b"", &[0u8; 15]).err(),
            Some(CipherError::Truncated)
        );
    }
}
