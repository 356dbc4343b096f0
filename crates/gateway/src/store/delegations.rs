//! Delegated grants (`touchgate delegate`): what a user approved with a touch, for whom, until
//! when, and whether it was revoked. A grant's token is checked without the database (as a
//! session's is); the database says which grants were revoked (reloaded with the revocation
//! epochs, so a revoke reaches every replica within seconds), keeps each grant's last use, and
//! lists them for the user and the admin.

use touchgate_proto::{DelegationInfo, Grant};

use super::{
    sql::{Row, Tx, args},
    *,
};

/// Grants revoked or expired longer ago than this are no longer listed (their audit lines stay).
pub const LISTED_AFTER_END_SECS: u64 = 7 * 24 * 3600;

fn info(r: &Row) -> Result<DelegationInfo, StoreError> {
    let scope: String = r.get(2)?;
    let grant: Grant = serde_json::from_str(&scope)
        .map_err(|e| StoreError::Corrupt(format!("delegation scope: {e}")))?;
    Ok(DelegationInfo {
        id: r.get(0)?,
        user: r.get(1)?,
        grant,
        created_at: r.get(3)?,
        last_used_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

const COLUMNS: &str = "id, \"user\", scope, created, last_used, revoked";

fn list(tx: &Tx<'_>, user: Option<&str>, now: u64) -> Result<Vec<DelegationInfo>, StoreError> {
    let since = now.saturating_sub(LISTED_AFTER_END_SECS);
    let rows = match user {
        Some(u) => tx.rows(
            &format!(
                "SELECT {COLUMNS} FROM delegations WHERE \"user\" = ?1 AND expires > ?2 \
                 AND (revoked IS NULL OR revoked > ?2) ORDER BY created DESC, id"
            ),
            args![u, since],
        )?,
        None => tx.rows(
            &format!(
                "SELECT {COLUMNS} FROM delegations WHERE expires > ?1 \
                 AND (revoked IS NULL OR revoked > ?1) ORDER BY created DESC, id"
            ),
            args![since],
        )?,
    };
    rows.iter().map(info).collect()
}

/// One grant by id.
fn by_id(tx: &Tx<'_>, id: &str) -> Result<Option<DelegationInfo>, StoreError> {
    tx.opt(
        &format!("SELECT {COLUMNS} FROM delegations WHERE id = ?1"),
        args![id],
    )?
    .as_ref()
    .map(info)
    .transpose()
}

impl Store {
    /// Records a grant `user` approved with a touch of `cred_id`; the grant's id is `id`.
    pub fn add_delegation(
        &self,
        id: &str,
        user: &str,
        grant: &Grant,
        cred_id: &str,
    ) -> Result<DelegationInfo, StoreError> {
        let scope = serde_json::to_string(grant)
            .map_err(|e| StoreError::Corrupt(format!("delegation scope: {e}")))?;
        let now = now_secs();
        self.write(|tx| {
            tx.exec(
                "INSERT INTO delegations (id, \"user\", label, scope, cred_id, created, expires) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                args![id, user, grant.label, scope, cred_id, now, grant.expires_at],
            )?;
            Ok(())
        })?;
        Ok(DelegationInfo {
            id: id.to_owned(),
            user: user.to_owned(),
            grant: grant.clone(),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
        })
    }

    /// `user`'s grants (every user's with `None`): live ones, and those ended in the last
    /// week, newest first.
    pub fn delegations(&self, user: Option<&str>) -> Result<Vec<DelegationInfo>, StoreError> {
        self.read(|tx| list(tx, user, now_secs()))
    }

    /// Revokes the live grant `id_or_label` (its id, or the label of one live grant) of `user`
    /// (any user's with `None`: the admin). Returns the grant, or `None` when no live grant
    /// matches; a label that names several live grants is [`StoreError::Conflict`].
    pub fn revoke_delegation(
        &self,
        user: Option<&str>,
        id_or_label: &str,
    ) -> Result<Option<DelegationInfo>, StoreError> {
        let now = now_secs();
        self.write(|tx| {
            let live: Vec<DelegationInfo> = list(tx, user, now)?
                .into_iter()
                .filter(|d| d.revoked_at.is_none() && d.grant.expires_at > now)
                .collect();
            let by_id: Vec<&DelegationInfo> = live.iter().filter(|d| d.id == id_or_label).collect();
            let chosen: Vec<&DelegationInfo> = if by_id.is_empty() {
                live.iter()
                    .filter(|d| d.grant.label == id_or_label)
                    .collect()
            } else {
                by_id
            };
            let d = match chosen.as_slice() {
                [] => return Ok(None),
                [d] => (*d).clone(),
                many => {
                    return Err(StoreError::Conflict(format!(
                        "{} live grants are labelled {id_or_label:?}: revoke one by its id ({})",
                        many.len(),
                        many.iter()
                            .map(|d| d.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            };
            tx.exec(
                "UPDATE delegations SET revoked = ?1 WHERE id = ?2 AND revoked IS NULL",
                args![now, d.id],
            )?;
            Ok(Some(DelegationInfo {
                revoked_at: Some(now),
                ..d
            }))
        })
    }

    /// Revokes the grant `id` (the admin's `revoke-delegation`), if it is live; returns it.
    pub fn revoke_delegation_by_id(&self, id: &str) -> Result<Option<DelegationInfo>, StoreError> {
        let now = now_secs();
        self.write(|tx| {
            let n = tx.exec(
                "UPDATE delegations SET revoked = ?1 WHERE id = ?2 AND revoked IS NULL AND expires > ?1",
                args![now, id],
            )?;
            if n == 0 {
                return Ok(None);
            }
            by_id(tx, id)
        })
    }

    /// The ids of grants revoked and not yet expired: what the gateway refuses and closes.
    pub fn revoked_delegations(&self) -> Result<HashSet<String>, StoreError> {
        self.read(|tx| {
            tx.rows(
                "SELECT id FROM delegations WHERE revoked IS NOT NULL AND expires > ?1",
                args![now_secs()],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect()
        })
    }

    /// Notes that a delegate used grant `id` at `at`.
    pub fn record_delegation_use(&self, id: &str, at: u64) -> Result<(), StoreError> {
        self.read(|tx| {
            tx.exec(
                "UPDATE delegations SET last_used = ?1 WHERE id = ?2 \
                 AND (last_used IS NULL OR last_used < ?1)",
                args![at, id],
            )
        })?;
        Ok(())
    }
}
