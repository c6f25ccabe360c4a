//! Cryptography: the AES-256-GCM wrapper, the segmented sealed-file format and key handling.
//! Nothing here is home-made crypto: AES-GCM comes from the `aes-gcm` crate, randomness
//! from the OS (`getrandom`); this module only fixes parameters and binds context.

pub mod cipher;
pub mod keys;
pub mod seal;

/// Fill a buffer with OS randomness.
pub fn random_bytes<const N: usize>() -> crate::Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| crate::Error::internal(format!("OS randomness: {e}")))?;
    Ok(out)
}

/// A new random id (128 bits, hex): dataset and version ids, the catalog's and the object
/// store's binding ids.
pub fn random_id() -> crate::Result<String> {
    Ok(hex::encode(random_bytes::<16>()?))
}
