//! Enrollment tokens: what `partner invite` and `user invite` print and `escrow enroll`
//! takes, to let a partner's machine make its own key and have its certificate signed.
//!
//! `escrow1.PARTNER.USER.SECRET.CA`: the identity the token enrolls (names are
//! `[a-z][a-z0-9_]*`, so the dots cannot be confused), a 256-bit secret, and the SHA-256
//! fingerprint of the escrow's CA certificate (both base64url). The fingerprint lets the
//! enrolling machine check the CA it is given before it trusts the server with the secret.
//! The catalog keeps only the secret's SHA-256 ([`Token::digest`]).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::{Error, Result};

const PREFIX: &str = "escrow1";

/// An enrollment token. Its secret is never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub partner: String,
    pub user: String,
    secret: [u8; 32],
    /// SHA-256 of the escrow CA certificate's DER.
    pub ca: [u8; 32],
}

impl Token {
    /// A new token for `user` of `partner` with a fresh secret, under the CA whose
    /// fingerprint is `ca`.
    pub fn new(partner: &str, user: &str, ca: [u8; 32]) -> Result<Token> {
        Ok(Token {
            partner: partner.to_string(),
            user: user.to_string(),
            secret: crate::crypto::random_bytes()?,
            ca,
        })
    }

    /// Read a token (`bad_token` if it is not one; the message never repeats it).
    pub fn parse(text: &str) -> Result<Token> {
        let bad = || {
            Error::bad(
                "bad_token",
                "not an enrollment token (it reads escrow1.PARTNER.USER.SECRET.CA, as `escrow partner invite` or `escrow user invite` printed it)",
            )
        };
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [prefix, partner, user, secret, ca] = parts[..] else {
            return Err(bad());
        };
        if prefix != PREFIX
            || !escrow_policies::is_valid_name(partner)
            || !escrow_policies::is_valid_name(user)
        {
            return Err(bad());
        }
        let bytes = |s: &str| -> Result<[u8; 32]> {
            URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(bad)
        };
        Ok(Token {
            partner: partner.to_string(),
            user: user.to_string(),
            secret: bytes(secret)?,
            ca: bytes(ca)?,
        })
    }

    /// SHA-256 of the secret, hex: how the catalog knows the token.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.secret))
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}.{}.{}.{}.{}",
            self.partner,
            self.user,
            URL_SAFE_NO_PAD.encode(self.secret),
            URL_SAFE_NO_PAD.encode(self.ca)
        )
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("partner", &self.partner)
            .field("user", &self.user)
            .field("secret", &"…")
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_hides_its_secret() {
        let t = Token::new("acme", "ana", [7; 32]).expect("token");
        let text = t.to_string();
        assert!(text.starts_with("escrow1.acme.ana."), "{text}");
        assert_eq!(Token::parse(&text).expect("parse"), t);
        assert_eq!(Token::parse(&format!(" {text}\n")).expect("trimmed"), t);
        assert!(!format!("{t:?}").contains(&text.split('.').nth(3).expect("secret").to_string()));
        let other = Token::new("acme", "ana", [7; 32]).expect("token");
        assert_ne!(t.digest(), other.digest());
        for bad in [
            "",
            "escrow1.acme.ana",
            &text.replacen("escrow1", "escrow2", 1),
            &text.replacen("acme", "Acme", 1),
            &format!("{text}.x"),
            &text[..text.len() - 2],
        ] {
            let e = Token::parse(bad).expect_err(bad);
            assert_eq!(e.code(), "bad_token");
            assert!(!e.to_string().contains(&text[20..40]));
        }
    }
}
