//! Roles inside a partner: which actions a user may take, decided by casbin from grouping
//! rules (`g, user, role, partner`) over the role permissions in `policies/roles.csv`. The
//! code names actions; which role may do what lives only in the policy.

use std::fmt;
use std::str::FromStr;

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, MgmtApi};

use crate::{PolicyError, is_valid_name};

/// The casbin model of roles (policies/roles.conf).
pub const ROLES_MODEL: &str = include_str!("../roles.conf");
/// What each role may do (policies/roles.csv).
pub const ROLE_PERMISSIONS: &str = include_str!("../roles.csv");

/// The roles a user can hold.
pub const ROLES: [&str; 4] = ["admin", "compliance", "analyst", "uploader"];

/// Something a user asks the service to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    DatasetList,
    DatasetUpload,
    DatasetDelete,
    PolicyRead,
    PolicyChange,
    PopulationRead,
    PopulationChange,
    QueryRun,
    OverlapRun,
    AuditRead,
    UserManage,
}

impl Action {
    pub const ALL: [Action; 11] = [
        Action::DatasetList,
        Action::DatasetUpload,
        Action::DatasetDelete,
        Action::PolicyRead,
        Action::PolicyChange,
        Action::PopulationRead,
        Action::PopulationChange,
        Action::QueryRun,
        Action::OverlapRun,
        Action::AuditRead,
        Action::UserManage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::DatasetList => "dataset.list",
            Action::DatasetUpload => "dataset.upload",
            Action::DatasetDelete => "dataset.delete",
            Action::PolicyRead => "policy.read",
            Action::PolicyChange => "policy.change",
            Action::PopulationRead => "population.read",
            Action::PopulationChange => "population.change",
            Action::QueryRun => "query.run",
            Action::OverlapRun => "overlap.run",
            Action::AuditRead => "audit.read",
            Action::UserManage => "user.manage",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| PolicyError::InvalidRule(format!("unknown action {s:?}")))
    }
}

/// A user holding a role inside its partner (one per active identity).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleAssignment {
    pub partner: String,
    pub user: String,
    pub role: String,
}

/// Check a role name.
pub fn check_role(role: &str) -> Result<(), PolicyError> {
    if ROLES.contains(&role) {
        Ok(())
    } else {
        Err(PolicyError::InvalidRule(format!(
            "unknown role {role:?} (one of {})",
            ROLES.join(", ")
        )))
    }
}

/// The role permissions and assignments, loaded into casbin.
pub struct RoleSet {
    enforcer: Enforcer,
}

impl fmt::Debug for RoleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoleSet").finish_non_exhaustive()
    }
}

/// The compiled-in role permissions as casbin `p` lines (role, action), checked.
pub fn permissions() -> Result<Vec<Vec<String>>, PolicyError> {
    let mut out = Vec::new();
    for line in ROLE_PERMISSIONS.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<String> = line.split(',').map(|f| f.trim().to_string()).collect();
        match fields.as_slice() {
            [p, role, action] if p == "p" => {
                check_role(role)?;
                action.parse::<Action>()?;
                out.push(vec![role.clone(), action.clone()]);
            }
            _ => {
                return Err(PolicyError::InvalidRule(format!(
                    "bad role permission line {line:?}"
                )));
            }
        }
    }
    Ok(out)
}

impl RoleSet {
    /// Load the role permissions and every assignment (validated: names and roles).
    pub async fn build(assignments: &[RoleAssignment]) -> Result<Self, PolicyError> {
        let model = DefaultModel::from_str(ROLES_MODEL).await?;
        let mut enforcer = Enforcer::new(model, MemoryAdapter::default()).await?;
        enforcer.add_policies(permissions()?).await?;
        let mut groups = Vec::with_capacity(assignments.len());
        for a in assignments {
            if !is_valid_name(&a.partner) || !is_valid_name(&a.user) {
                return Err(PolicyError::InvalidRule(format!(
                    "invalid user {}/{}",
                    a.partner, a.user
                )));
            }
            check_role(&a.role)?;
            groups.push(vec![a.user.clone(), a.role.clone(), a.partner.clone()]);
        }
        groups.sort();
        groups.dedup();
        if !groups.is_empty() {
            enforcer.add_grouping_policies(groups).await?;
        }
        Ok(RoleSet { enforcer })
    }

    /// May `user` of `partner` take `action`? `Some(role)` names the role that allows it.
    pub fn authorize(
        &self,
        partner: &str,
        user: &str,
        action: Action,
    ) -> Result<Option<String>, PolicyError> {
        let (allowed, rules) = self.enforcer.enforce_ex((user, partner, action.as_str()))?;
        if !allowed {
            return Ok(None);
        }
        Ok(Some(
            rules
                .first()
                .and_then(|r| r.first())
                .cloned()
                .ok_or_else(|| PolicyError::Engine("allowed without a matching rule".into()))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(partner: &str, user: &str, role: &str) -> RoleAssignment {
        RoleAssignment {
            partner: partner.into(),
            user: user.into(),
            role: role.into(),
        }
    }

    #[tokio::test]
    async fn roles_are_held_inside_one_partner() {
        let set = RoleSet::build(&[
            a("acme", "ann", "analyst"),
            a("acme", "carl", "compliance"),
            a("globex", "ann", "admin"),
        ])
        .await
        .expect("build");
        assert_eq!(
            set.authorize("acme", "ann", Action::QueryRun).expect("ok"),
            Some("analyst".into())
        );
        assert_eq!(
            set.authorize("acme", "ann", Action::PolicyChange)
                .expect("ok"),
            None
        );
        // globex's admin ann is not acme's admin.
        assert_eq!(
            set.authorize("acme", "ann", Action::UserManage)
                .expect("ok"),
            None
        );
        assert_eq!(
            set.authorize("globex", "ann", Action::UserManage)
                .expect("ok"),
            Some("admin".into())
        );
        assert_eq!(
            set.authorize("globex", "carl", Action::AuditRead)
                .expect("ok"),
            None
        );
        assert!(RoleSet::build(&[a("acme", "x", "root")]).await.is_err());
    }
}
