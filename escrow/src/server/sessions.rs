//! Browser sessions of the console.
//!
//! A person with an identity bundle mints a login link over mutual TLS (`escrow console`):
//! a single-use token, valid for [`LINK_TTL`], bound to that identity (its certificate's
//! serial). Opening it shows whose it is; signing in on that page (a same-origin POST, see
//! `console.rs`) gives the browser a session: a random token in an HttpOnly, Secure,
//! SameSite=Strict cookie, ended by logout, by [`IDLE`] without a request, after
//! [`ABSOLUTE`] in any case, and by the identity's revocation (every request checks the
//! identity, as for a certificate). A state-changing request must also carry the session's
//! CSRF token in a header, which a cross-site form cannot set; it is derived from the
//! session token, so it is stored nowhere.
//!
//! Links and sessions live in the catalog (`console_tokens`), by the SHA-256 of their tokens
//! only, so a copy of the catalog cannot be replayed: every node on one catalog knows them,
//! and a restart ends none.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::Result;
use crate::catalog::{Catalog, TokenKept, TokenRules, TokenUse, now_ms};

pub use crate::catalog::ConsoleIdentity as Identity;

/// How long a login link may wait to be opened, by default.
pub const LINK_TTL: Duration = Duration::from_secs(5 * 60);
/// A session ends after this long without a request.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after login, whatever happens.
pub const ABSOLUTE: Duration = Duration::from_secs(12 * 60 * 60);
/// Pending links one identity may hold: minting another drops that identity's oldest, never
/// anyone else's (one partner cannot void other partners' links by minting many).
const LINKS_PER_IDENTITY: usize = 4;
/// Sessions one identity may hold: a new sign-in ends that identity's least recently used
/// session, never anyone else's.
const SESSIONS_PER_IDENTITY: usize = 8;
/// Links, and sessions, kept at most in all: past it (which takes thousands of identities)
/// a new one is refused with 429 rather than anyone's being dropped.
const MAX_ENTRIES: usize = 10_000;
/// Links, and sessions, one partner's identities may hold together: one partner with many
/// users cannot fill `MAX_ENTRIES` for every other partner.
const PER_PARTNER: usize = 1_000;

const LINK: &str = "link";
const SESSION: &str = "session";

/// A live session, as a request sees it.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: Identity,
    /// Token a state-changing request must carry in the `x-csrf-token` header.
    pub csrf: String,
}

/// The rules of login links and sessions of one server; they are kept in the catalog.
#[derive(Debug)]
pub struct Sessions {
    link_ttl: Duration,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(LINK_TTL)
    }
}

fn token() -> Result<String> {
    Ok(hex::encode(crate::crypto::random_bytes::<32>()?))
}

/// Whether `token` could be one this server issued (64 lowercase hex digits): anything
/// else is refused without a lookup.
fn well_formed(token: &str) -> bool {
    token.len() == 64
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A session in use restarts its idle time at most this often (one catalog write); in
/// between, a request only reads it.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The CSRF token of the session `token`: a hash of it under its own label, which the page
/// learns from the API and a cross-site form cannot.
fn csrf_of(token: &str) -> String {
    hex::encode(Sha256::digest(
        format!("escrow console csrf\0{token}").as_bytes(),
    ))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A new token's fate: kept, or a 429 naming whose limit it met.
fn kept(outcome: TokenKept) -> Result<()> {
    let (limit, scope) = match outcome {
        TokenKept::Kept => return Ok(()),
        TokenKept::PartnerFull => (PER_PARTNER, "your partner"),
        TokenKept::Full => (MAX_ENTRIES, "the server"),
    };
    Err(crate::Error::Busy {
        what: "console sign-ins",
        limit,
        scope,
        retry_after: 60,
    })
}

impl Sessions {
    /// Sessions whose login links are valid for `link_ttl`.
    pub fn new(link_ttl: Duration) -> Self {
        Sessions { link_ttl }
    }

    /// How long a login link is valid.
    pub fn link_ttl(&self) -> Duration {
        self.link_ttl
    }

    fn links(&self) -> TokenRules {
        TokenRules {
            idle_ms: ms(self.link_ttl),
            absolute_ms: ms(self.link_ttl),
            per_identity: LINKS_PER_IDENTITY,
            per_partner: PER_PARTNER,
            max: MAX_ENTRIES,
            touch_ms: 0,
        }
    }

    fn sessions() -> TokenRules {
        TokenRules {
            idle_ms: ms(IDLE),
            absolute_ms: ms(ABSOLUTE),
            per_identity: SESSIONS_PER_IDENTITY,
            per_partner: PER_PARTNER,
            max: MAX_ENTRIES,
            touch_ms: ms(TOUCH_EVERY),
        }
    }

    /// A new single-use login link token for `identity`.
    pub fn mint_link(&self, catalog: &Catalog, identity: Identity) -> Result<String> {
        self.mint_link_at(catalog, identity, now_ms())
    }

    fn mint_link_at(&self, catalog: &Catalog, identity: Identity, now: i64) -> Result<String> {
        let t = token()?;
        kept(catalog.console_token_insert(LINK, &digest(&t), &identity, now, &self.links())?)?;
        Ok(t)
    }

    /// Whose a link is, without using it (the sign-in page asks before signing in); `None`
    /// if unknown, used or expired.
    pub fn peek(&self, catalog: &Catalog, link: &str) -> Result<Option<Identity>> {
        if !well_formed(link) {
            return Ok(None);
        }
        catalog.console_token(LINK, &digest(link), now_ms(), &self.links(), TokenUse::Peek)
    }

    /// Use a link: its identity and a new session token, or `None` if the link is unknown,
    /// used already or expired. A link is gone after its first use, successful or not.
    pub fn redeem(&self, catalog: &Catalog, link: &str) -> Result<Option<(Identity, String)>> {
        self.redeem_at(catalog, link, now_ms())
    }

    fn redeem_at(
        &self,
        catalog: &Catalog,
        link: &str,
        now: i64,
    ) -> Result<Option<(Identity, String)>> {
        if !well_formed(link) {
            return Ok(None);
        }
        let Some(identity) =
            catalog.console_token(LINK, &digest(link), now, &self.links(), TokenUse::Take)?
        else {
            return Ok(None);
        };
        let t = token()?;
        kept(catalog.console_token_insert(
            SESSION,
            &digest(&t),
            &identity,
            now,
            &Self::sessions(),
        )?)?;
        Ok(Some((identity, t)))
    }

    /// The live session of `token`, its idle time restarted; `None` (and forgotten) if it
    /// ended.
    pub fn get(&self, catalog: &Catalog, token: &str) -> Result<Option<Session>> {
        self.get_at(catalog, token, now_ms())
    }

    fn get_at(&self, catalog: &Catalog, token: &str, now: i64) -> Result<Option<Session>> {
        if !well_formed(token) {
            return Ok(None);
        }
        let found = catalog.console_token(
            SESSION,
            &digest(token),
            now,
            &Self::sessions(),
            TokenUse::Touch,
        )?;
        Ok(found.map(|identity| Session {
            identity,
            csrf: csrf_of(token),
        }))
    }

    /// End the session of `token` (logout).
    pub fn end(&self, catalog: &Catalog, token: &str) -> Result<()> {
        if !well_formed(token) {
            return Ok(());
        }
        catalog.console_token_end(SESSION, &digest(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Identity {
        Identity {
            serial: "01".into(),
            partner: "acme".into(),
            user: "ann".into(),
        }
    }

    fn catalog() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().expect("tmp");
        let c = Catalog::open(&dir.path().join("catalog.db")).expect("catalog");
        (dir, c)
    }

    #[test]
    fn a_link_is_used_once() {
        let (_d, c) = catalog();
        let s = Sessions::default();
        let link = s.mint_link(&c, who()).unwrap();
        let (identity, session) = s.redeem(&c, &link).unwrap().expect("first use");
        assert_eq!(identity, who());
        assert!(s.redeem(&c, &link).unwrap().is_none(), "a second use");
        let got = s.get(&c, &session).unwrap().expect("session");
        assert_eq!(got.identity, who());
        assert_eq!(got.csrf.len(), 64);
        assert_ne!(got.csrf, session);
        assert!(s.get(&c, &link).unwrap().is_none(), "a link is no session");
        assert!(s.redeem(&c, "00").unwrap().is_none());
    }

    #[test]
    fn sessions_are_known_to_every_server_on_the_catalog_and_survive_a_restart() {
        let (d, c) = catalog();
        let a = Sessions::default();
        let (_, session) = a
            .redeem(&c, &a.mint_link(&c, who()).unwrap())
            .unwrap()
            .unwrap();
        let link = a.mint_link(&c, who()).unwrap();
        drop(c);
        // Another server (or this one restarted) on the same catalog.
        let c = Catalog::open(&d.path().join("catalog.db")).expect("catalog");
        let b = Sessions::default();
        let got = b.get(&c, &session).unwrap().expect("known on b");
        assert_eq!(got.identity, who());
        assert_eq!(got.csrf, csrf_of(&session));
        assert_eq!(b.peek(&c, &link).unwrap(), Some(who()));
        b.end(&c, &session).unwrap();
        assert!(a.get(&c, &session).unwrap().is_none(), "ended for all");
    }

    fn of(serial: &str) -> Identity {
        Identity {
            serial: serial.into(),
            partner: format!("p{serial}"),
            user: "u".into(),
        }
    }

    #[test]
    fn one_identity_minting_many_drops_only_its_own() {
        let (_d, c) = catalog();
        let s = Sessions::default();
        let theirs = s.mint_link(&c, of("aa")).unwrap();
        let (_, their_session) = s
            .redeem(&c, &s.mint_link(&c, of("aa")).unwrap())
            .unwrap()
            .unwrap();
        let mut mine = Vec::new();
        let mut sessions = Vec::new();
        for _ in 0..40 {
            mine.push(s.mint_link(&c, of("bb")).unwrap());
            let l = s.mint_link(&c, of("bb")).unwrap();
            sessions.push(s.redeem(&c, &l).unwrap().unwrap().1);
        }
        assert_eq!(
            s.peek(&c, &theirs).unwrap(),
            Some(of("aa")),
            "another identity's link stays"
        );
        assert!(
            s.get(&c, &their_session).unwrap().is_some(),
            "another identity's session stays"
        );
        let live = mine
            .iter()
            .filter(|l| s.peek(&c, l).unwrap().is_some())
            .count();
        assert!(live <= LINKS_PER_IDENTITY, "{live} links of one identity");
        let own = (sessions.iter())
            .filter(|t| s.get(&c, t).unwrap().is_some())
            .count();
        assert_eq!(own, SESSIONS_PER_IDENTITY, "sessions of one identity");
    }

    #[test]
    fn a_session_in_use_is_touched_at_most_once_a_minute_and_malformed_tokens_are_nobodys() {
        let (_d, c) = catalog();
        let s = Sessions::default();
        let t0 = 1_000_000_000;
        let link = s.mint_link_at(&c, who(), t0).unwrap();
        let (_, session) = s.redeem_at(&c, &link, t0).unwrap().unwrap();
        // Used within the minute: only read, so its idle time still counts from t0.
        assert!(s.get_at(&c, &session, t0 + 59_000).unwrap().is_some());
        assert!(s.get_at(&c, &session, t0 + ms(IDLE)).unwrap().is_none());
        // Used after a minute: touched, so it lives on past t0 + IDLE.
        let (_, session) = s
            .redeem_at(&c, &s.mint_link_at(&c, who(), t0).unwrap(), t0)
            .unwrap()
            .unwrap();
        assert!(s.get_at(&c, &session, t0 + 61_000).unwrap().is_some());
        assert!(s.get_at(&c, &session, t0 + ms(IDLE) + 1).unwrap().is_some());
        for bad in [
            "",
            "x",
            &"A".repeat(64),
            &session[..63],
            &format!("{session}0"),
        ] {
            assert!(s.get(&c, bad).unwrap().is_none(), "{bad:?}");
            assert!(s.peek(&c, bad).unwrap().is_none(), "{bad:?}");
            assert!(s.redeem(&c, bad).unwrap().is_none(), "{bad:?}");
            s.end(&c, bad).unwrap();
        }
    }

    #[test]
    fn peeking_does_not_use_a_link() {
        let (_d, c) = catalog();
        let s = Sessions::default();
        let link = s.mint_link(&c, who()).unwrap();
        assert_eq!(s.peek(&c, &link).unwrap(), Some(who()));
        assert_eq!(s.peek(&c, &link).unwrap(), Some(who()));
        assert!(s.redeem(&c, &link).unwrap().is_some());
        assert_eq!(s.peek(&c, &link).unwrap(), None, "used");
    }

    #[test]
    fn links_and_sessions_expire() {
        let (_d, c) = catalog();
        let s = Sessions::default();
        let t0 = 1_000_000;
        let link = s.mint_link_at(&c, who(), t0).unwrap();
        assert!(
            s.redeem_at(&c, &link, t0 + ms(LINK_TTL)).unwrap().is_none(),
            "expired link"
        );

        let link = s.mint_link_at(&c, who(), t0).unwrap();
        let (_, session) = s.redeem_at(&c, &link, t0).unwrap().expect("in time");
        // Idle expiry restarts with each request...
        let mut now = t0;
        for _ in 0..30 {
            now += ms(IDLE) - 1_000;
            if now - t0 >= ms(ABSOLUTE) {
                break;
            }
            assert!(s.get_at(&c, &session, now).unwrap().is_some());
        }
        // ...but the absolute expiry does not.
        assert!(
            s.get_at(&c, &session, t0 + ms(ABSOLUTE)).unwrap().is_none(),
            "past absolute"
        );
        assert!(
            s.get_at(&c, &session, t0).unwrap().is_none(),
            "an ended session stays ended"
        );

        let link = s.mint_link_at(&c, who(), t0).unwrap();
        let (_, session) = s.redeem_at(&c, &link, t0).unwrap().expect("in time");
        assert!(
            s.get_at(&c, &session, t0 + ms(IDLE)).unwrap().is_none(),
            "idle"
        );

        let link = s.mint_link_at(&c, who(), t0).unwrap();
        let (_, session) = s.redeem_at(&c, &link, t0).unwrap().expect("in time");
        s.end(&c, &session).unwrap();
        assert!(s.get_at(&c, &session, t0).unwrap().is_none(), "logged out");
    }
}
