//! Browser sessions of the console.
//!
//! A person with an identity bundle mints a login link over mutual TLS (`escrow console`):
//! a single-use token, valid for [`LINK_TTL`], bound to that identity (its certificate's
//! serial). Opening it shows whose it is; signing in on that page (a same-origin POST, see
//! `console.rs`) gives the browser a session: a random token in an HttpOnly, Secure,
//! SameSite=Strict cookie, ended by logout, by [`IDLE`] without a request, after
//! [`ABSOLUTE`] in any case, and by the identity's revocation (every request checks the
//! identity, as for a certificate). A state-changing request must also carry the session's
//! CSRF token in a header, which a cross-site form cannot set.
//!
//! Tokens are kept by their SHA-256 only, so a memory dump of the map cannot be replayed.
//! Sessions live in this process: a restart ends them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::Result;

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

/// The identity a link or session acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Serial of the certificate the link was minted with (checked as active per request).
    pub serial: String,
    pub partner: String,
    pub user: String,
}

/// A live session, as a request sees it.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: Identity,
    /// Token a state-changing request must carry in the `x-csrf-token` header.
    pub csrf: String,
}

#[derive(Debug)]
struct Entry {
    identity: Identity,
    csrf: String,
    created: Instant,
    last_seen: Instant,
}

/// Login links and sessions of one server.
#[derive(Debug)]
pub struct Sessions {
    link_ttl: Duration,
    links: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
    sessions: Mutex<HashMap<[u8; 32], Entry>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(LINK_TTL)
    }
}

fn token() -> Result<String> {
    Ok(hex::encode(crate::crypto::random_bytes::<32>()?))
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Make room for one more entry of `serial`: drop its own oldest beyond `per_identity`;
/// refuse when the whole map is full (nobody else's entry is dropped).
fn bound<V>(
    map: &mut HashMap<[u8; 32], V>,
    serial: &str,
    per_identity: usize,
    of: impl Fn(&V) -> (&Identity, Instant),
) -> Result<()> {
    loop {
        let own: Vec<([u8; 32], Instant)> = map
            .iter()
            .filter(|(_, v)| of(v).0.serial == serial)
            .map(|(k, v)| (*k, of(v).1))
            .collect();
        if own.len() < per_identity {
            break;
        }
        if let Some((oldest, _)) = own.iter().min_by_key(|(_, at)| *at) {
            map.remove(oldest);
        }
    }
    if map.len() >= MAX_ENTRIES {
        return Err(crate::Error::Busy {
            what: "console sign-ins",
            limit: MAX_ENTRIES,
            scope: "the server",
            retry_after: 60,
        });
    }
    Ok(())
}

impl Sessions {
    /// Sessions whose login links are valid for `link_ttl`.
    pub fn new(link_ttl: Duration) -> Self {
        Sessions {
            link_ttl,
            links: Mutex::default(),
            sessions: Mutex::default(),
        }
    }

    /// How long a login link is valid.
    pub fn link_ttl(&self) -> Duration {
        self.link_ttl
    }

    /// A new single-use login link token for `identity`.
    pub fn mint_link(&self, identity: Identity) -> Result<String> {
        self.mint_link_at(identity, Instant::now())
    }

    fn mint_link_at(&self, identity: Identity, now: Instant) -> Result<String> {
        let t = token()?;
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|_, (_, at)| now.duration_since(*at) < self.link_ttl);
        bound(
            &mut links,
            &identity.serial,
            LINKS_PER_IDENTITY,
            |(i, at)| (i, *at),
        )?;
        links.insert(digest(&t), (identity, now));
        Ok(t)
    }

    /// Whose a link is, without using it (the sign-in page asks before signing in); `None`
    /// if unknown, used or expired.
    pub fn peek(&self, link: &str) -> Option<Identity> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links
            .get(&digest(link))
            .filter(|(_, at)| at.elapsed() < self.link_ttl)
            .map(|(i, _)| i.clone())
    }

    /// Use a link: its identity and a new session token, or `None` if the link is unknown,
    /// used already or expired. A link is gone after its first use, successful or not.
    pub fn redeem(&self, link: &str) -> Result<Option<(Identity, String)>> {
        self.redeem_at(link, Instant::now())
    }

    fn redeem_at(&self, link: &str, now: Instant) -> Result<Option<(Identity, String)>> {
        let removed = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest(link));
        let Some((identity, at)) = removed else {
            return Ok(None);
        };
        if now.duration_since(at) >= self.link_ttl {
            return Ok(None);
        }
        let (t, csrf) = (token()?, token()?);
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, e| {
            now.duration_since(e.last_seen) < IDLE && now.duration_since(e.created) < ABSOLUTE
        });
        bound(
            &mut sessions,
            &identity.serial,
            SESSIONS_PER_IDENTITY,
            |e| (&e.identity, e.last_seen),
        )?;
        sessions.insert(
            digest(&t),
            Entry {
                identity: identity.clone(),
                csrf,
                created: now,
                last_seen: now,
            },
        );
        Ok(Some((identity, t)))
    }

    /// The live session of `token`, its idle time restarted; `None` (and forgotten) if it
    /// ended.
    pub fn get(&self, token: &str) -> Option<Session> {
        self.get_at(token, Instant::now())
    }

    fn get_at(&self, token: &str, now: Instant) -> Option<Session> {
        let key = digest(token);
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let e = sessions.get_mut(&key)?;
        if now.duration_since(e.last_seen) >= IDLE || now.duration_since(e.created) >= ABSOLUTE {
            sessions.remove(&key);
            return None;
        }
        e.last_seen = now;
        Some(Session {
            identity: e.identity.clone(),
            csrf: e.csrf.clone(),
        })
    }

    /// End the session of `token` (logout).
    pub fn end(&self, token: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest(token));
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

    #[test]
    fn a_link_is_used_once() {
        let s = Sessions::default();
        let link = s.mint_link(who()).unwrap();
        let (identity, session) = s.redeem(&link).unwrap().expect("first use");
        assert_eq!(identity, who());
        assert!(s.redeem(&link).unwrap().is_none(), "a second use");
        let got = s.get(&session).expect("session");
        assert_eq!(got.identity, who());
        assert_eq!(got.csrf.len(), 64);
        assert!(s.get(&link).is_none(), "a link is no session");
        assert!(s.redeem("00").unwrap().is_none());
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
        let s = Sessions::default();
        let theirs = s.mint_link(of("aa")).unwrap();
        let (_, their_session) = s.redeem(&s.mint_link(of("aa")).unwrap()).unwrap().unwrap();
        let mut mine = Vec::new();
        for _ in 0..200 {
            let link = s.mint_link(of("bb")).unwrap();
            mine.push(link.clone());
            let _ = s.redeem(&s.mint_link(of("bb")).unwrap()).unwrap().unwrap();
        }
        assert_eq!(
            s.peek(&theirs),
            Some(of("aa")),
            "another identity's link stays"
        );
        assert!(
            s.get(&their_session).is_some(),
            "another identity's session stays"
        );
        let live = mine.iter().filter(|l| s.peek(l).is_some()).count();
        assert!(live <= LINKS_PER_IDENTITY, "{live} links of one identity");
        let sessions = s.sessions.lock().unwrap();
        let own = sessions
            .values()
            .filter(|e| e.identity.serial == "bb")
            .count();
        assert!(
            own <= SESSIONS_PER_IDENTITY,
            "{own} sessions of one identity"
        );
    }

    #[test]
    fn peeking_does_not_use_a_link() {
        let s = Sessions::default();
        let link = s.mint_link(who()).unwrap();
        assert_eq!(s.peek(&link), Some(who()));
        assert_eq!(s.peek(&link), Some(who()));
        assert!(s.redeem(&link).unwrap().is_some());
        assert_eq!(s.peek(&link), None, "used");
    }

    #[test]
    fn links_and_sessions_expire() {
        let s = Sessions::default();
        let t0 = Instant::now();
        let link = s.mint_link_at(who(), t0).unwrap();
        assert!(
            s.redeem_at(&link, t0 + LINK_TTL).unwrap().is_none(),
            "expired link"
        );

        let link = s.mint_link_at(who(), t0).unwrap();
        let (_, session) = s.redeem_at(&link, t0).unwrap().expect("in time");
        // Idle expiry restarts with each request...
        let mut now = t0;
        for _ in 0..30 {
            now += IDLE - Duration::from_secs(1);
            if now.duration_since(t0) >= ABSOLUTE {
                break;
            }
            assert!(s.get_at(&session, now).is_some());
        }
        // ...but the absolute expiry does not.
        assert!(s.get_at(&session, t0 + ABSOLUTE).is_none(), "past absolute");
        assert!(
            s.get_at(&session, t0).is_none(),
            "an ended session stays ended"
        );

        let link = s.mint_link_at(who(), t0).unwrap();
        let (_, session) = s.redeem_at(&link, t0).unwrap().expect("in time");
        assert!(s.get_at(&session, t0 + IDLE).is_none(), "idle");

        let link = s.mint_link_at(who(), t0).unwrap();
        let (_, session) = s.redeem_at(&link, t0).unwrap().expect("in time");
        s.end(&session);
        assert!(s.get_at(&session, t0).is_none(), "logged out");
    }
}
