//! SCIM's view of the store: users by their stable id (`users.uuid`, also their WebAuthn user
//! handle), and the groups the identity provider pushes, with their members.
//!
//! A SCIM user is a row of `users` that SCIM has not deleted; "active" is the row's `disabled`
//! flag turned round, so SCIM and `touchgate-gateway disable`/`enable` change the same thing.
//! Every change is one transaction and says what it did, for the audit log.

use std::collections::BTreeSet;

use super::{
    sql::{Row, Tx, args},
    *,
};

/// Which resources a SCIM query asks for (`filter=ATTR eq "VALUE"`, or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScimQuery {
    /// Every resource.
    All,
    /// `userName` (users) or `displayName` (groups), in any case.
    Name(String),
    /// `externalId`, exactly.
    ExternalId(String),
    /// `id`, exactly.
    Id(String),
}

/// A reference to another resource: a user's group or a group's member.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ScimRef {
    /// The other resource's SCIM id.
    pub id: String,
    /// Its name (`displayName` of a group, `userName` of a user).
    pub name: String,
}

/// A user as SCIM sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimUser {
    /// The SCIM id (`users.uuid`).
    pub id: String,
    /// The touchgate user name (`userName`).
    pub name: String,
    /// Not disabled.
    pub active: bool,
    /// The provider's own id for the user.
    pub external_id: Option<String>,
    /// The provider's display name for the user.
    pub display_name: Option<String>,
    /// When the row was made, seconds since the epoch.
    pub created: u64,
    /// When SCIM last changed it (else `created`).
    pub modified: u64,
    /// The SCIM groups the user is a member of, by name.
    pub groups: Vec<ScimRef>,
}

/// A SCIM group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScimGroup {
    /// The SCIM id.
    pub id: String,
    /// `displayName`: the name `allow_groups` grants by.
    pub display_name: String,
    /// The provider's own id for the group.
    pub external_id: Option<String>,
    /// When it was made, seconds since the epoch.
    pub created: u64,
    /// When it last changed.
    pub modified: u64,
    /// Its members, by user name (empty when not asked for).
    pub members: Vec<ScimRef>,
}

/// A user SCIM creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewScimUser {
    /// The user name.
    pub name: String,
    /// Whether the account starts enabled.
    pub active: bool,
    /// The provider's id for the user.
    pub external_id: Option<String>,
    /// The provider's display name for the user.
    pub display_name: Option<String>,
}

/// One change to a user, in the order the request gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEdit {
    /// Enable (`true`) or disable (`false`), as `touchgate-gateway enable`/`disable` do.
    Active(bool),
    /// The user name; only its own name in another case is accepted (names do not change).
    UserName(String),
    /// The provider's id for the user.
    ExternalId(Option<String>),
    /// The provider's display name for the user.
    DisplayName(Option<String>),
}

/// One change to a group, in the order the request gives them. Members are SCIM user ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEdit {
    /// A new `displayName`.
    DisplayName(String),
    /// The provider's id for the group.
    ExternalId(Option<String>),
    /// Adds these users (each must exist).
    AddMembers(Vec<String>),
    /// Removes these users (ids that are not members are ignored).
    RemoveMembers(Vec<String>),
    /// Makes these users the only members.
    ReplaceMembers(Vec<String>),
}

/// Why a SCIM change cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScimProblem {
    /// No resource with this id.
    #[error("no {0} with this id")]
    NotFound(&'static str),
    /// The name is taken.
    #[error("{0}")]
    Conflict(String),
    /// A member id names no user.
    #[error(
        "member {0:?} is not a user of this gateway: provision the user before adding them to a group"
    )]
    UnknownMember(String),
    /// A user name would change.
    #[error(
        "userName cannot change from {from:?} to {to:?}: touchgate names users by it (sessions, allow lists, the audit log); deprovision the old user and provision the new name"
    )]
    Rename {
        /// The stored name.
        from: String,
        /// The name asked for.
        to: String,
    },
}

/// What a change to a user did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserChange {
    /// Whether the user was active before; `None` when SCIM created (or re-created) them.
    pub was_active: Option<bool>,
    /// Whether SCIM had deleted the user before this create.
    pub recreated: bool,
    /// Other attributes that changed (`externalId`, `displayName`).
    pub attributes: Vec<&'static str>,
    /// The user now.
    pub user: ScimUser,
}

/// What a change to a group did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    /// The name before; `None` for a new group.
    pub was_named: Option<String>,
    /// Users who became members.
    pub added: Vec<String>,
    /// Users who are members no more.
    pub removed: Vec<String>,
    /// Whether `externalId` changed.
    pub external_id_changed: bool,
    /// The group now, with its members.
    pub group: ScimGroup,
}

/// What deleting a user did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedScimUser {
    /// The user name.
    pub name: String,
    /// Keys, invites and the new epoch, as `remove` reports them.
    pub removed: RemovedUser,
    /// The SCIM groups the user was taken out of.
    pub groups: Vec<String>,
}

const USER_COLUMNS: &str = "uuid, name, disabled = 0, scim_external_id, scim_display_name, \
                            created, COALESCE(scim_modified, created)";
const GROUP_COLUMNS: &str = "id, display_name, external_id, created, modified";

impl Store {
    /// The users `query` selects, by name: how many in all, and those from the 1-based
    /// `start` on, at most `count`.
    pub fn scim_users(
        &self,
        query: &ScimQuery,
        start: usize,
        count: usize,
    ) -> Result<(usize, Vec<ScimUser>), StoreError> {
        let (cond, arg) = condition(query, "lower(name)", "scim_external_id", "uuid");
        let live = "scim_deleted IS NULL";
        self.snapshot(|tx| {
            let total: usize = tx
                .one(
                    &format!("SELECT count(*) FROM users WHERE {live} AND {cond}"),
                    args![arg],
                )?
                .get(0)?;
            let mut users = tx
                .rows(
                    &format!(
                        "SELECT {USER_COLUMNS} FROM users WHERE {live} AND {cond} \
                         ORDER BY name LIMIT ?2 OFFSET ?3"
                    ),
                    args![arg, count as u64, start.saturating_sub(1) as u64],
                )?
                .iter()
                .map(user_row)
                .collect::<Result<Vec<_>, _>>()?;
            for u in &mut users {
                u.groups = groups_of(tx, &u.name)?;
            }
            Ok((total, users))
        })
    }

    /// The user with SCIM id `id`, unless SCIM deleted them.
    pub fn scim_user(&self, id: &str) -> Result<Option<ScimUser>, StoreError> {
        self.snapshot(|tx| user_by_id(tx, id))
    }

    /// Creates a user, or brings back one SCIM deleted (same id). A user of this name in any
    /// case is a [`ScimProblem::Conflict`].
    pub fn scim_create_user(
        &self,
        new: &NewScimUser,
    ) -> Result<Result<UserChange, ScimProblem>, StoreError> {
        self.write(|tx| {
            let same: Vec<(String, String, bool)> = tx
                .rows(
                    "SELECT name, uuid, scim_deleted IS NOT NULL FROM users \
                     WHERE lower(name) = lower(?1) ORDER BY name = ?1 DESC",
                    args![new.name],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<Result<_, StoreError>>()?;
            if let Some((name, id, _)) = same.iter().find(|(_, _, deleted)| !deleted) {
                return Ok(Err(ScimProblem::Conflict(format!(
                    "a user named {name:?} already exists (id {id}): look it up with filter=userName eq \"{name}\""
                ))));
            }
            let now = now_secs();
            let recreated = match same.into_iter().next() {
                Some((name, _, _)) => {
                    tx.exec(
                        "UPDATE users SET scim_deleted = NULL, idp_blocked = 0, scim_external_id = ?2, \
                         scim_display_name = ?3, scim_modified = ?4 WHERE name = ?1",
                        args![name, new.external_id, new.display_name, now],
                    )?;
                    set_active(tx, &name, new.active)?;
                    Some(name)
                }
                None => {
                    tx.exec(
                        "INSERT INTO users (name, uuid, created, disabled, scim_external_id, \
                         scim_display_name, scim_modified) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?3)",
                        args![
                            new.name,
                            uuid::Uuid::new_v4().to_string(),
                            now,
                            !new.active,
                            new.external_id,
                            new.display_name
                        ],
                    )?;
                    None
                }
            };
            let name = recreated.clone().unwrap_or_else(|| new.name.clone());
            let user = user_by_name(tx, &name)?;
            Ok(Ok(UserChange {
                was_active: None,
                recreated: recreated.is_some(),
                attributes: Vec::new(),
                user,
            }))
        })
    }

    /// Applies `edits` to the user with SCIM id `id`, in order, all or none.
    pub fn scim_update_user(
        &self,
        id: &str,
        edits: &[UserEdit],
    ) -> Result<Result<UserChange, ScimProblem>, StoreError> {
        self.write(|tx| {
            let Some(before) = user_by_id(tx, id)? else {
                return Ok(Err(ScimProblem::NotFound("user")));
            };
            let mut attributes = Vec::new();
            let mut active = before.active;
            let (mut external_id, mut display_name) =
                (before.external_id.clone(), before.display_name.clone());
            for e in edits {
                match e {
                    UserEdit::Active(a) => active = *a,
                    UserEdit::UserName(n) if n.to_lowercase() == before.name.to_lowercase() => {}
                    UserEdit::UserName(n) => {
                        return Ok(Err(ScimProblem::Rename {
                            from: before.name,
                            to: n.clone(),
                        }));
                    }
                    UserEdit::ExternalId(x) => external_id = x.clone(),
                    UserEdit::DisplayName(d) => display_name = d.clone(),
                }
            }
            if external_id != before.external_id {
                attributes.push("externalId");
            }
            if display_name != before.display_name {
                attributes.push("displayName");
            }
            let changed = set_active(tx, &before.name, active)? || !attributes.is_empty();
            if changed {
                tx.exec(
                    "UPDATE users SET scim_external_id = ?2, scim_display_name = ?3, scim_modified = ?4 \
                     WHERE name = ?1",
                    args![before.name, external_id, display_name, now_secs()],
                )?;
            }
            let user = user_by_name(tx, &before.name)?;
            Ok(Ok(UserChange {
                was_active: Some(before.active),
                recreated: false,
                attributes,
                user,
            }))
        })
    }

    /// Deletes the user with SCIM id `id` as [`Store::remove_user`] does (keys and invites
    /// deleted, sessions ended, the row kept with its epoch), takes them out of every SCIM
    /// group, and hides them from SCIM until it creates them again. `None`: no such user.
    pub fn scim_delete_user(&self, id: &str) -> Result<Option<RemovedScimUser>, StoreError> {
        self.write(|tx| {
            let Some(user) = user_by_id(tx, id)? else {
                return Ok(None);
            };
            let removed = remove_in(tx, &user.name)?;
            tx.exec(
                "DELETE FROM scim_members WHERE \"user\" = ?1",
                args![user.name],
            )?;
            tx.exec(
                "UPDATE users SET scim_deleted = ?2, scim_modified = ?2 WHERE name = ?1",
                args![user.name, now_secs()],
            )?;
            Ok(Some(RemovedScimUser {
                name: user.name,
                removed,
                groups: user.groups.into_iter().map(|g| g.name).collect(),
            }))
        })
    }

    /// The groups `query` selects, by name: how many in all, and those from the 1-based
    /// `start` on, at most `count`; with their members when `members`.
    pub fn scim_groups(
        &self,
        query: &ScimQuery,
        start: usize,
        count: usize,
        members: bool,
    ) -> Result<(usize, Vec<ScimGroup>), StoreError> {
        let (cond, arg) = condition(query, "lower(display_name)", "external_id", "id");
        self.snapshot(|tx| {
            let total: usize = tx
                .one(
                    &format!("SELECT count(*) FROM scim_groups WHERE {cond}"),
                    args![arg],
                )?
                .get(0)?;
            let mut groups = tx
                .rows(
                    &format!(
                        "SELECT {GROUP_COLUMNS} FROM scim_groups WHERE {cond} \
                         ORDER BY display_name LIMIT ?2 OFFSET ?3"
                    ),
                    args![arg, count as u64, start.saturating_sub(1) as u64],
                )?
                .iter()
                .map(group_row)
                .collect::<Result<Vec<_>, _>>()?;
            if members {
                for g in &mut groups {
                    g.members = members_of(tx, &g.id)?;
                }
            }
            Ok((total, groups))
        })
    }

    /// The group with SCIM id `id`, with its members.
    pub fn scim_group(&self, id: &str) -> Result<Option<ScimGroup>, StoreError> {
        self.snapshot(|tx| group_by_id(tx, id))
    }

    /// Creates a group named `display_name` with `members` (SCIM user ids).
    pub fn scim_create_group(
        &self,
        display_name: &str,
        external_id: Option<&str>,
        members: &[String],
    ) -> Result<Result<GroupChange, ScimProblem>, StoreError> {
        self.write(|tx| {
            if let Some(p) = name_taken(tx, display_name, None)? {
                return Ok(Err(p));
            }
            let id = uuid::Uuid::new_v4().to_string();
            tx.exec(
                "INSERT INTO scim_groups (id, display_name, external_id, created, modified) \
                 VALUES (?1, ?2, ?3, ?4, ?4)",
                args![id, display_name, external_id, now_secs()],
            )?;
            if let Err(p) = add_members(tx, &id, members)? {
                return Err(StoreError::Scim(p));
            }
            let group = group_by_id(tx, &id)?.ok_or_else(|| gone("group"))?;
            Ok(Ok(GroupChange {
                was_named: None,
                added: group.members.iter().map(|m| m.name.clone()).collect(),
                removed: Vec::new(),
                external_id_changed: false,
                group,
            }))
        })
        .or_else(StoreError::into_scim_problem)
    }

    /// Applies `edits` to the group with SCIM id `id`, in order, all or none.
    pub fn scim_update_group(
        &self,
        id: &str,
        edits: &[GroupEdit],
    ) -> Result<Result<GroupChange, ScimProblem>, StoreError> {
        self.write(|tx| {
            let Some(before) = group_by_id(tx, id)? else {
                return Ok(Err(ScimProblem::NotFound("group")));
            };
            for e in edits {
                let done = match e {
                    GroupEdit::DisplayName(n) => match name_taken(tx, n, Some(id))? {
                        Some(p) => Err(p),
                        None => {
                            tx.exec(
                                "UPDATE scim_groups SET display_name = ?2 WHERE id = ?1",
                                args![id, n],
                            )?;
                            Ok(())
                        }
                    },
                    GroupEdit::ExternalId(x) => {
                        tx.exec(
                            "UPDATE scim_groups SET external_id = ?2 WHERE id = ?1",
                            args![id, x],
                        )?;
                        Ok(())
                    }
                    GroupEdit::AddMembers(m) => add_members(tx, id, m)?,
                    GroupEdit::RemoveMembers(m) => {
                        for member in m {
                            if let Some(user) = name_of(tx, member)? {
                                tx.exec(
                                    "DELETE FROM scim_members WHERE group_id = ?1 AND \"user\" = ?2",
                                    args![id, user],
                                )?;
                            }
                        }
                        Ok(())
                    }
                    GroupEdit::ReplaceMembers(m) => {
                        tx.exec("DELETE FROM scim_members WHERE group_id = ?1", args![id])?;
                        add_members(tx, id, m)?
                    }
                };
                // All or none: undo the edits before this one.
                if let Err(p) = done {
                    return Err(StoreError::Scim(p));
                }
            }
            let mut group = group_by_id(tx, id)?.ok_or_else(|| gone("group"))?;
            let names = |g: &ScimGroup| -> BTreeSet<String> {
                g.members.iter().map(|m| m.name.clone()).collect()
            };
            let (was, now) = (names(&before), names(&group));
            let change = GroupChange {
                was_named: Some(before.display_name.clone()),
                added: now.difference(&was).cloned().collect(),
                removed: was.difference(&now).cloned().collect(),
                external_id_changed: before.external_id != group.external_id,
                group: group.clone(),
            };
            if change.added.is_empty()
                && change.removed.is_empty()
                && !change.external_id_changed
                && before.display_name == group.display_name
            {
                return Ok(Ok(change));
            }
            group.modified = now_secs();
            tx.exec(
                "UPDATE scim_groups SET modified = ?2 WHERE id = ?1",
                args![id, group.modified],
            )?;
            Ok(Ok(GroupChange { group, ..change }))
        })
        .or_else(StoreError::into_scim_problem)
    }

    /// Deletes the group with SCIM id `id`: its name and the users who were its members.
    pub fn scim_delete_group(&self, id: &str) -> Result<Option<(String, Vec<String>)>, StoreError> {
        self.write(|tx| {
            let Some(group) = group_by_id(tx, id)? else {
                return Ok(None);
            };
            tx.exec("DELETE FROM scim_members WHERE group_id = ?1", args![id])?;
            tx.exec("DELETE FROM scim_groups WHERE id = ?1", args![id])?;
            Ok(Some((
                group.display_name,
                group.members.into_iter().map(|m| m.name).collect(),
            )))
        })
    }
}

impl StoreError {
    /// A SCIM problem that rolled its transaction back, as the problem it is.
    fn into_scim_problem<T>(self) -> Result<Result<T, ScimProblem>, StoreError> {
        match self {
            StoreError::Scim(p) => Ok(Err(p)),
            e => Err(e),
        }
    }
}

/// The `WHERE` condition for `query` and its one parameter (`?1`).
fn condition(
    query: &ScimQuery,
    name: &str,
    external_id: &str,
    id: &str,
) -> (String, Option<String>) {
    match query {
        ScimQuery::All => ("?1 IS NULL".into(), None),
        ScimQuery::Name(v) => (format!("{name} = lower(?1)"), Some(v.clone())),
        ScimQuery::ExternalId(v) => (format!("{external_id} = ?1"), Some(v.clone())),
        ScimQuery::Id(v) => (format!("{id} = ?1"), Some(v.clone())),
    }
}

fn user_row(r: &Row) -> Result<ScimUser, StoreError> {
    Ok(ScimUser {
        id: r.get(0)?,
        name: r.get(1)?,
        active: r.get(2)?,
        external_id: r.get(3)?,
        display_name: r.get(4)?,
        created: r.get(5)?,
        modified: r.get(6)?,
        groups: Vec::new(),
    })
}

fn group_row(r: &Row) -> Result<ScimGroup, StoreError> {
    Ok(ScimGroup {
        id: r.get(0)?,
        display_name: r.get(1)?,
        external_id: r.get(2)?,
        created: r.get(3)?,
        modified: r.get(4)?,
        members: Vec::new(),
    })
}

fn user_by_id(tx: &Tx<'_>, id: &str) -> Result<Option<ScimUser>, StoreError> {
    let Some(r) = tx.opt(
        &format!("SELECT {USER_COLUMNS} FROM users WHERE uuid = ?1 AND scim_deleted IS NULL"),
        args![id],
    )?
    else {
        return Ok(None);
    };
    let mut u = user_row(&r)?;
    u.groups = groups_of(tx, &u.name)?;
    Ok(Some(u))
}

fn user_by_name(tx: &Tx<'_>, name: &str) -> Result<ScimUser, StoreError> {
    let mut u = user_row(&tx.one(
        &format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1"),
        args![name],
    )?)?;
    u.groups = groups_of(tx, name)?;
    Ok(u)
}

fn group_by_id(tx: &Tx<'_>, id: &str) -> Result<Option<ScimGroup>, StoreError> {
    let Some(r) = tx.opt(
        &format!("SELECT {GROUP_COLUMNS} FROM scim_groups WHERE id = ?1"),
        args![id],
    )?
    else {
        return Ok(None);
    };
    let mut g = group_row(&r)?;
    g.members = members_of(tx, id)?;
    Ok(Some(g))
}

fn groups_of(tx: &Tx<'_>, user: &str) -> Result<Vec<ScimRef>, StoreError> {
    refs(
        tx,
        "SELECT g.id, g.display_name FROM scim_members m JOIN scim_groups g ON g.id = m.group_id \
         WHERE m.\"user\" = ?1 ORDER BY g.display_name",
        user,
    )
}

fn members_of(tx: &Tx<'_>, group: &str) -> Result<Vec<ScimRef>, StoreError> {
    refs(
        tx,
        "SELECT u.uuid, u.name FROM scim_members m JOIN users u ON u.name = m.\"user\" \
         WHERE m.group_id = ?1 ORDER BY u.name",
        group,
    )
}

fn refs(tx: &Tx<'_>, sql: &str, arg: &str) -> Result<Vec<ScimRef>, StoreError> {
    tx.rows(sql, args![arg])?
        .iter()
        .map(|r| {
            Ok(ScimRef {
                id: r.get(0)?,
                name: r.get(1)?,
            })
        })
        .collect()
}

/// The user name of the live user with SCIM id `id`.
fn name_of(tx: &Tx<'_>, id: &str) -> Result<Option<String>, StoreError> {
    tx.opt(
        "SELECT name FROM users WHERE uuid = ?1 AND scim_deleted IS NULL",
        args![id],
    )?
    .map(|r| r.get(0))
    .transpose()
}

/// Adds the users with SCIM ids `ids` to `group`; an unknown id adds nobody.
fn add_members(
    tx: &Tx<'_>,
    group: &str,
    ids: &[String],
) -> Result<Result<(), ScimProblem>, StoreError> {
    let mut names = Vec::with_capacity(ids.len());
    for id in ids {
        match name_of(tx, id)? {
            Some(n) => names.push(n),
            None => return Ok(Err(ScimProblem::UnknownMember(id.clone()))),
        }
    }
    for n in names {
        tx.exec(
            "INSERT INTO scim_members (group_id, \"user\") VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            args![group, n],
        )?;
    }
    Ok(Ok(()))
}

/// A conflict when another group (not `except`) has `name` in any case.
fn name_taken(
    tx: &Tx<'_>,
    name: &str,
    except: Option<&str>,
) -> Result<Option<ScimProblem>, StoreError> {
    let Some(r) = tx.opt(
        "SELECT id, display_name FROM scim_groups \
         WHERE lower(display_name) = lower(?1) AND (?2 IS NULL OR id <> ?2)",
        args![name, except],
    )?
    else {
        return Ok(None);
    };
    let (id, n): (String, String) = (r.get(0)?, r.get(1)?);
    Ok(Some(ScimProblem::Conflict(format!(
        "a group named {n:?} already exists (id {id}): look it up with filter=displayName eq \"{n}\""
    ))))
}

/// Enables or disables `user` as [`Store::set_disabled`] does (disabling bumps the epoch);
/// whether anything changed.
fn set_active(tx: &Tx<'_>, user: &str, active: bool) -> Result<bool, StoreError> {
    let sql = if active {
        "UPDATE users SET disabled = 0 WHERE name = ?1 AND disabled <> 0"
    } else {
        "UPDATE users SET disabled = 1, epoch = epoch + 1 WHERE name = ?1 AND disabled = 0"
    };
    Ok(tx.exec(sql, args![user])? > 0)
}

fn gone(what: &str) -> StoreError {
    StoreError::Corrupt(format!("the {what} just written cannot be read back"))
}

#[cfg(test)]
mod tests;
