//! Table group `console_tokens`: the web console's sign-in links and browser sessions, kept
//! in the catalog so every node sharing it knows them and a restart ends none.

use super::sql::{Row, params};
use super::{Catalog, ConsoleIdentity, TokenKept, TokenRules, TokenUse};
use crate::Result;

impl Catalog {
    /// Keep a new console token of `kind` for `who` (`rules`: ended tokens of that kind
    /// are dropped first, then `who`'s least recently used beyond its share). Nothing is
    /// kept when `who`'s partner or the kind is full.
    pub fn console_token_insert(
        &self,
        kind: &str,
        digest: &str,
        who: &ConsoleIdentity,
        now_ms: i64,
        rules: &TokenRules,
    ) -> Result<TokenKept> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM console_tokens
                 WHERE kind = ?1 AND (?2 - seen_ms >= ?3 OR ?2 - created_ms >= ?4)",
                params![kind, now_ms, rules.idle_ms, rules.absolute_ms],
            )?;
            let own: i64 = tx.value(
                "SELECT COUNT(*) FROM console_tokens WHERE kind = ?1 AND serial = ?2",
                params![kind, who.serial.as_str()],
            )?;
            let over = own + 1 - rules.per_identity as i64;
            if over > 0 {
                tx.execute(
                    "DELETE FROM console_tokens WHERE kind = ?1 AND digest IN
                       (SELECT digest FROM console_tokens WHERE kind = ?1 AND serial = ?2
                        ORDER BY seen_ms, created_ms, digest LIMIT ?3)",
                    params![kind, who.serial.as_str(), over],
                )?;
            }
            let partner: i64 = tx.value(
                "SELECT COUNT(*) FROM console_tokens WHERE kind = ?1 AND partner = ?2",
                params![kind, who.partner.as_str()],
            )?;
            if partner >= rules.per_partner as i64 {
                return Ok(TokenKept::PartnerFull);
            }
            let all: i64 = tx.value(
                "SELECT COUNT(*) FROM console_tokens WHERE kind = ?1",
                params![kind],
            )?;
            if all >= rules.max as i64 {
                return Ok(TokenKept::Full);
            }
            tx.execute(
                "INSERT INTO console_tokens (kind, digest, serial, partner, \"user\", created_ms, seen_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![
                    kind,
                    digest,
                    who.serial.as_str(),
                    who.partner.as_str(),
                    who.user.as_str(),
                    now_ms
                ],
            )?;
            Ok(TokenKept::Kept)
        })
    }

    /// The live console token `digest` of `kind`, used as `how`; `None` if unknown or ended.
    /// Looking (`Peek`, and `Touch` within `rules.touch_ms` of the last touch) only reads;
    /// a token found ended is dropped (once: it stays ended).
    pub fn console_token(
        &self,
        kind: &str,
        digest: &str,
        now_ms: i64,
        rules: &TokenRules,
        how: TokenUse,
    ) -> Result<Option<ConsoleIdentity>> {
        let live = |r: &Row| -> Result<Option<(ConsoleIdentity, i64)>> {
            let (created, seen): (i64, i64) = (r.get(3)?, r.get(4)?);
            if now_ms - seen >= rules.idle_ms || now_ms - created >= rules.absolute_ms {
                return Ok(None);
            }
            let who = ConsoleIdentity {
                serial: r.get(0)?,
                partner: r.get(1)?,
                user: r.get(2)?,
            };
            Ok(Some((who, seen)))
        };
        const FIND: &str =
            "SELECT serial, partner, \"user\", created_ms, seen_ms FROM console_tokens
                            WHERE kind = ?1 AND digest = ?2";
        const FORGET: &str = "DELETE FROM console_tokens WHERE kind = ?1 AND digest = ?2";
        if how != TokenUse::Take {
            let Some(found) = self.read(|tx| tx.row(FIND, params![kind, digest]))? else {
                return Ok(None);
            };
            let Some((who, seen)) = live(&found)? else {
                // Ended: dropped now, so it stays ended whatever a later clock says.
                self.write(|tx| tx.execute(FORGET, params![kind, digest]))?;
                return Ok(None);
            };
            if how == TokenUse::Peek || now_ms - seen < rules.touch_ms {
                return Ok(Some(who));
            }
        }
        self.write(|tx| {
            let Some(found) = tx.row(FIND, params![kind, digest])? else {
                return Ok(None);
            };
            let Some((who, _)) = live(&found)? else {
                tx.execute(FORGET, params![kind, digest])?;
                return Ok(None);
            };
            if how == TokenUse::Take {
                tx.execute(FORGET, params![kind, digest])?;
            } else {
                tx.execute(
                    "UPDATE console_tokens SET seen_ms = ?3 WHERE kind = ?1 AND digest = ?2 AND seen_ms < ?3",
                    params![kind, digest, now_ms],
                )?;
            }
            Ok(Some(who))
        })
    }

    /// Forget the console token `digest` of `kind` (logout).
    pub fn console_token_end(&self, kind: &str, digest: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM console_tokens WHERE kind = ?1 AND digest = ?2",
                params![kind, digest],
            )?;
            Ok(())
        })
    }
}
