//! Who inside a partner may do what: the casbin role policy (policies/roles.conf and
//! roles.csv) over the grouping rules of every active identity (`g, user, role, partner`).
//! Handlers name the action; the policy decides. A refusal is audited. Engine code: no HTTP.

use std::sync::Arc;

use escrow_policies::roles::{Action, RoleAssignment, RoleSet};

use crate::audit::{Actor, Event, Outcome};
use crate::queries::blocking;
use crate::store::Store;
use crate::{Error, Result};

/// The role decisions of one running service.
pub struct Access {
    store: Arc<Store>,
    /// The loaded role set and the identity generation it was built from.
    cached: tokio::sync::Mutex<Option<(Generation, Arc<RoleSet>)>>,
}

/// Identities added and revoked so far (see `Catalog::identity_generation`).
type Generation = (i64, i64);

impl Access {
    pub fn new(store: Arc<Store>) -> Self {
        Access {
            store,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The role set of the current identities, rebuilt when one was added or revoked
    /// (also by an operator command in another process).
    async fn roles(&self) -> Result<Arc<RoleSet>> {
        let mut cached = self.cached.lock().await;
        let store = self.store.clone();
        let generation = blocking(move || store.catalog().identity_generation()).await?;
        if let Some((g, set)) = cached.as_ref()
            && *g == generation
        {
            return Ok(set.clone());
        }
        let store = self.store.clone();
        let (rows, generation) = blocking(move || store.catalog().role_assignments()).await?;
        let assignments: Vec<RoleAssignment> = rows
            .into_iter()
            .map(|r| RoleAssignment {
                partner: r.partner,
                user: r.user,
                role: r.role,
            })
            .collect();
        let set = Arc::new(
            RoleSet::build(&assignments)
                .await
                .map_err(|e| Error::internal(format!("role set: {e}")))?,
        );
        *cached = Some((generation, set.clone()));
        Ok(set)
    }

    /// Allow `actor` to take `action`, or refuse (`forbidden`, audited, naming the role).
    pub async fn require(&self, actor: &Actor, action: Action) -> Result<()> {
        let partner = actor.partner_name()?;
        let decision = self
            .roles()
            .await?
            .authorize(partner, &actor.user, action)
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
        crate::queries::record(self.store.clone(), event).await?;
        Err(e)
    }
}
