//! Who inside a partner may do what: the casbin role policy (policies/roles.conf and
//! roles.csv) over the grouping rule of the caller's identity (`g, user, role, partner`).
//! Handlers name the action; the policy decides. A refusal is audited. Engine code: no HTTP.
//!
//! A partner's user holds one active identity, whose role the request read from the catalog
//! when it authenticated the caller (`Caller`), or took from its node's copy (a question:
//! `server::api::Asking`, confirmed before anything is given): the decision for that user
//! depends on its own grouping rule alone, so it is made from that role, on a role set built
//! once per role, with no further read (a role change or revocation applies from the next
//! request, on every node).

use std::collections::HashMap;
use std::sync::Arc;

use escrow_policies::roles::{Action, RoleAssignment, RoleSet};

use crate::audit::{Actor, Event, Outcome};
use crate::store::Store;
use crate::{Error, Result};

/// The one user of the role sets built per role.
const HOLDER: (&str, &str) = ("partner", "holder");

/// The role decisions of one running service.
pub struct Access {
    store: Arc<Store>,
    /// A role set holding one user with the role, by role.
    by_role: tokio::sync::Mutex<HashMap<String, Arc<RoleSet>>>,
}

impl Access {
    pub fn new(store: Arc<Store>) -> Self {
        Access {
            store,
            by_role: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The role set whose one user holds `role` (built on first use).
    async fn holding(&self, role: &str) -> Result<Arc<RoleSet>> {
        let mut by_role = self.by_role.lock().await;
        if let Some(set) = by_role.get(role) {
            return Ok(set.clone());
        }
        let (partner, user) = HOLDER;
        let set = Arc::new(
            RoleSet::build(&[RoleAssignment {
                partner: partner.into(),
                user: user.into(),
                role: role.into(),
            }])
            .await
            .map_err(|e| Error::internal(format!("role set: {e}")))?,
        );
        by_role.insert(role.to_string(), set.clone());
        Ok(set)
    }

    /// Allow `actor` to take `action`, or refuse (`forbidden`, audited, naming the role).
    pub async fn require(&self, actor: &Actor, action: Action) -> Result<()> {
        let partner = actor.partner_name()?;
        let (holder_partner, holder) = HOLDER;
        let decision = self
            .holding(&actor.role)
            .await?
            .authorize(holder_partner, holder, action)
            .map_err(|e| Error::internal(format!("role decision: {e}")))?;
        if decision.is_some() {
            return Ok(());
        }
        let e = Error::Forbidden(format!(
            "role {} of {partner} may not {action} (policies/roles.csv)",
            actor.role
        ));
        let event = Event::new(
            "access",
            actor.clone(),
            Outcome::Ok,
            serde_json::json!({ "action": action.as_str() }),
        )
        .failed(&e);
        // Recorded (and given) only if the caller the request assumed still holds
        // (`crate::assumed`): else the request reads its caller again.
        let (store, caller) = (self.store.clone(), crate::assumed::take_assumed_caller());
        if !crate::queries::blocking(move || store.record_assuming(&event, &caller)).await? {
            return Err(Error::Stale);
        }
        Err(e)
    }
}
