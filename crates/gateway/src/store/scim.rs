//! SCIM's view of the store: users by their stable id (`users.uuid`, also their WebAuthn user
//! handle), and the groups the identity provider pushes, with their members.
//!
//! A SCIM user is a row of `users` that SCIM has not deleted; "active" is the row's `disabled`
//! flag turned round, so SCIM and `touchgate-gateway disable`/`enable` change the same thing.
//! Every change is one transaction and says what it did, for the audit log.

use std::collections::BTreeSet;

use super::*;

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
        let conn = self.lock();
        let (cond, arg) = condition(query, "name COLLATE NOCASE", "scim_external_id", "uuid");
        let live = "scim_deleted IS NULL";
        let total: i64 = conn.query_row(
            &format!("SELECT count(*) FROM users WHERE {live} AND {cond}"),
            params![arg],
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE {live} AND {cond} ORDER BY name LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = stmt.query_map(
            params![arg, count as i64, start.saturating_sub(1) as i64],
            user_row,
        )?;
        let mut users: Vec<ScimUser> = rows.collect::<Result<_, _>>()?;
        for u in &mut users {
            u.groups = groups_of(&conn, &u.name)?;
        }
        Ok((total as usize, users))
    }

    /// The user with SCIM id `id`, unless SCIM deleted them.
    pub fn scim_user(&self, id: &str) -> Result<Option<ScimUser>, StoreError> {
        user_by_id(&self.lock(), id)
    }

    /// Creates a user, or brings back one SCIM deleted (same id). A user of this name in any
    /// case is a [`ScimProblem::Conflict`].
    pub fn scim_create_user(
        &self,
        new: &NewScimUser,
    ) -> Result<Result<UserChange, ScimProblem>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let same: Vec<(String, String, bool)> = {
            let mut stmt = tx.prepare(
                "SELECT name, uuid, scim_deleted IS NOT NULL FROM users \
                 WHERE name = ?1 COLLATE NOCASE ORDER BY name = ?1 DESC",
            )?;
            let rows = stmt.query_map([&new.name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        if let Some((name, id, _)) = same.iter().find(|(_, _, deleted)| !deleted) {
            return Ok(Err(ScimProblem::Conflict(format!(
                "a user named {name:?} already exists (id {id}): look it up with filter=userName eq \"{name}\""
            ))));
        }
        let now = now_secs() as i64;
        let recreated = match same.into_iter().next() {
            Some((name, _, _)) => {
                tx.execute(
                    "UPDATE users SET scim_deleted = NULL, idp_blocked = 0, scim_external_id = ?2, \
                     scim_display_name = ?3, scim_modified = ?4 WHERE name = ?1",
                    params![name, new.external_id, new.display_name, now],
                )?;
                set_active(&tx, &name, new.active)?;
                Some(name)
            }
            None => {
                tx.execute(
                    "INSERT INTO users (name, uuid, created, disabled, scim_external_id, \
                     scim_display_name, scim_modified) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?3)",
                    params![
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
        let user = user_by_name(&tx, &name)?;
        tx.commit()?;
        Ok(Ok(UserChange {
            was_active: None,
            recreated: recreated.is_some(),
            attributes: Vec::new(),
            user,
        }))
    }

    /// Applies `edits` to the user with SCIM id `id`, in order, all or none.
    pub fn scim_update_user(
        &self,
        id: &str,
        edits: &[UserEdit],
    ) -> Result<Result<UserChange, ScimProblem>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let Some(before) = user_by_id(&tx, id)? else {
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
        let changed = set_active(&tx, &before.name, active)? || !attributes.is_empty();
        if changed {
            tx.execute(
                "UPDATE users SET scim_external_id = ?2, scim_display_name = ?3, scim_modified = ?4 \
                 WHERE name = ?1",
                params![before.name, external_id, display_name, now_secs() as i64],
            )?;
        }
        let user = user_by_name(&tx, &before.name)?;
        tx.commit()?;
        Ok(Ok(UserChange {
            was_active: Some(before.active),
            recreated: false,
            attributes,
            user,
        }))
    }

    /// Deletes the user with SCIM id `id` as [`Store::remove_user`] does (keys and invites
    /// deleted, sessions ended, the row kept with its epoch), takes them out of every SCIM
    /// group, and hides them from SCIM until it creates them again. `None`: no such user.
    pub fn scim_delete_user(&self, id: &str) -> Result<Option<RemovedScimUser>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let Some(user) = user_by_id(&tx, id)? else {
            return Ok(None);
        };
        let removed = remove_in(&tx, &user.name)?;
        tx.execute("DELETE FROM scim_members WHERE user = ?1", [&user.name])?;
        tx.execute(
            "UPDATE users SET scim_deleted = ?2, scim_modified = ?2 WHERE name = ?1",
            params![user.name, now_secs() as i64],
        )?;
        tx.commit()?;
        Ok(Some(RemovedScimUser {
            name: user.name,
            removed,
            groups: user.groups.into_iter().map(|g| g.name).collect(),
        }))
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
        let conn = self.lock();
        let (cond, arg) = condition(query, "display_name COLLATE NOCASE", "external_id", "id");
        let total: i64 = conn.query_row(
            &format!("SELECT count(*) FROM scim_groups WHERE {cond}"),
            params![arg],
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {GROUP_COLUMNS} FROM scim_groups WHERE {cond} \
             ORDER BY display_name LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = stmt.query_map(
            params![arg, count as i64, start.saturating_sub(1) as i64],
            group_row,
        )?;
        let mut groups: Vec<ScimGroup> = rows.collect::<Result<_, _>>()?;
        if members {
            for g in &mut groups {
                g.members = members_of(&conn, &g.id)?;
            }
        }
        Ok((total as usize, groups))
    }

    /// The group with SCIM id `id`, with its members.
    pub fn scim_group(&self, id: &str) -> Result<Option<ScimGroup>, StoreError> {
        group_by_id(&self.lock(), id)
    }

    /// Creates a group named `display_name` with `members` (SCIM user ids).
    pub fn scim_create_group(
        &self,
        display_name: &str,
        external_id: Option<&str>,
        members: &[String],
    ) -> Result<Result<GroupChange, ScimProblem>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if let Some(p) = name_taken(&tx, display_name, None)? {
            return Ok(Err(p));
        }
        let id = uuid::Uuid::new_v4().to_string();
        tx.execute(
            "INSERT INTO scim_groups (id, display_name, external_id, created, modified) \
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![id, display_name, external_id, now_secs() as i64],
        )?;
        if let Err(p) = add_members(&tx, &id, members)? {
            return Ok(Err(p));
        }
        let group = group_by_id(&tx, &id)?.ok_or_else(|| gone("group"))?;
        tx.commit()?;
        Ok(Ok(GroupChange {
            was_named: None,
            added: group.members.iter().map(|m| m.name.clone()).collect(),
            removed: Vec::new(),
            external_id_changed: false,
            group,
        }))
    }

    /// Applies `edits` to the group with SCIM id `id`, in order, all or none.
    pub fn scim_update_group(
        &self,
        id: &str,
        edits: &[GroupEdit],
    ) -> Result<Result<GroupChange, ScimProblem>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let Some(before) = group_by_id(&tx, id)? else {
            return Ok(Err(ScimProblem::NotFound("group")));
        };
        for e in edits {
            let done = match e {
                GroupEdit::DisplayName(n) => match name_taken(&tx, n, Some(id))? {
                    Some(p) => Err(p),
                    None => {
                        tx.execute(
                            "UPDATE scim_groups SET display_name = ?2 WHERE id = ?1",
                            params![id, n],
                        )?;
                        Ok(())
                    }
                },
                GroupEdit::ExternalId(x) => {
                    tx.execute(
                        "UPDATE scim_groups SET external_id = ?2 WHERE id = ?1",
                        params![id, x],
                    )?;
                    Ok(())
                }
                GroupEdit::AddMembers(m) => add_members(&tx, id, m)?,
                GroupEdit::RemoveMembers(m) => {
                    for user in m.iter().filter_map(|m| name_of(&tx, m).transpose()) {
                        tx.execute(
                            "DELETE FROM scim_members WHERE group_id = ?1 AND user = ?2",
                            params![id, user?],
                        )?;
                    }
                    Ok(())
                }
                GroupEdit::ReplaceMembers(m) => {
                    tx.execute("DELETE FROM scim_members WHERE group_id = ?1", [id])?;
                    add_members(&tx, id, m)?
                }
            };
            if let Err(p) = done {
                return Ok(Err(p));
            }
        }
        let mut group = group_by_id(&tx, id)?.ok_or_else(|| gone("group"))?;
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
        tx.execute(
            "UPDATE scim_groups SET modified = ?2 WHERE id = ?1",
            params![id, group.modified as i64],
        )?;
        tx.commit()?;
        Ok(Ok(GroupChange { group, ..change }))
    }

    /// Deletes the group with SCIM id `id`: its name and the users who were its members.
    pub fn scim_delete_group(&self, id: &str) -> Result<Option<(String, Vec<String>)>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let Some(group) = group_by_id(&tx, id)? else {
            return Ok(None);
        };
        tx.execute("DELETE FROM scim_members WHERE group_id = ?1", [id])?;
        tx.execute("DELETE FROM scim_groups WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(Some((
            group.display_name,
            group.members.into_iter().map(|m| m.name).collect(),
        )))
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
        ScimQuery::Name(v) => (format!("{name} = ?1"), Some(v.clone())),
        ScimQuery::ExternalId(v) => (format!("{external_id} = ?1"), Some(v.clone())),
        ScimQuery::Id(v) => (format!("{id} = ?1"), Some(v.clone())),
    }
}

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ScimUser> {
    Ok(ScimUser {
        id: r.get(0)?,
        name: r.get(1)?,
        active: r.get(2)?,
        external_id: r.get(3)?,
        display_name: r.get(4)?,
        created: r.get::<_, i64>(5)? as u64,
        modified: r.get::<_, i64>(6)? as u64,
        groups: Vec::new(),
    })
}

fn group_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ScimGroup> {
    Ok(ScimGroup {
        id: r.get(0)?,
        display_name: r.get(1)?,
        external_id: r.get(2)?,
        created: r.get::<_, i64>(3)? as u64,
        modified: r.get::<_, i64>(4)? as u64,
        members: Vec::new(),
    })
}

fn user_by_id(conn: &Connection, id: &str) -> Result<Option<ScimUser>, StoreError> {
    let user = conn
        .query_row(
            &format!("SELECT {USER_COLUMNS} FROM users WHERE uuid = ?1 AND scim_deleted IS NULL"),
            [id],
            user_row,
        )
        .optional()?;
    user.map(|mut u| {
        u.groups = groups_of(conn, &u.name)?;
        Ok(u)
    })
    .transpose()
}

fn user_by_name(conn: &Connection, name: &str) -> Result<ScimUser, StoreError> {
    let mut u = conn.query_row(
        &format!("SELECT {USER_COLUMNS} FROM users WHERE name = ?1"),
        [name],
        user_row,
    )?;
    u.groups = groups_of(conn, name)?;
    Ok(u)
}

fn group_by_id(conn: &Connection, id: &str) -> Result<Option<ScimGroup>, StoreError> {
    let group = conn
        .query_row(
            &format!("SELECT {GROUP_COLUMNS} FROM scim_groups WHERE id = ?1"),
            [id],
            group_row,
        )
        .optional()?;
    group
        .map(|mut g| {
            g.members = members_of(conn, id)?;
            Ok(g)
        })
        .transpose()
}

fn groups_of(conn: &Connection, user: &str) -> Result<Vec<ScimRef>, StoreError> {
    refs(
        conn,
        "SELECT g.id, g.display_name FROM scim_members m JOIN scim_groups g ON g.id = m.group_id \
         WHERE m.user = ?1 ORDER BY g.display_name",
        user,
    )
}

fn members_of(conn: &Connection, group: &str) -> Result<Vec<ScimRef>, StoreError> {
    refs(
        conn,
        "SELECT u.uuid, u.name FROM scim_members m JOIN users u ON u.name = m.user \
         WHERE m.group_id = ?1 ORDER BY u.name",
        group,
    )
}

fn refs(conn: &Connection, sql: &str, arg: &str) -> Result<Vec<ScimRef>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([arg], |r| {
        Ok(ScimRef {
            id: r.get(0)?,
            name: r.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The user name of the live user with SCIM id `id`.
fn name_of(conn: &Connection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT name FROM users WHERE uuid = ?1 AND scim_deleted IS NULL",
            [id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Adds the users with SCIM ids `ids` to `group`; an unknown id adds nobody.
fn add_members(
    tx: &Connection,
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
        tx.execute(
            "INSERT OR IGNORE INTO scim_members (group_id, user) VALUES (?1, ?2)",
            params![group, n],
        )?;
    }
    Ok(Ok(()))
}

/// A conflict when another group (not `except`) has `name` in any case.
fn name_taken(
    conn: &Connection,
    name: &str,
    except: Option<&str>,
) -> Result<Option<ScimProblem>, StoreError> {
    let other: Option<(String, String)> = conn
        .query_row(
            "SELECT id, display_name FROM scim_groups \
             WHERE display_name = ?1 COLLATE NOCASE AND id IS NOT ?2",
            params![name, except],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(other.map(|(id, n)| {
        ScimProblem::Conflict(format!(
            "a group named {n:?} already exists (id {id}): look it up with filter=displayName eq \"{n}\""
        ))
    }))
}

/// Enables or disables `user` as [`Store::set_disabled`] does (disabling bumps the epoch);
/// whether anything changed.
fn set_active(tx: &Connection, user: &str, active: bool) -> Result<bool, StoreError> {
    let sql = if active {
        "UPDATE users SET disabled = 0 WHERE name = ?1 AND disabled <> 0"
    } else {
        "UPDATE users SET disabled = 1, epoch = epoch + 1 WHERE name = ?1 AND disabled = 0"
    };
    Ok(tx.execute(sql, [user])? > 0)
}

fn gone(what: &str) -> StoreError {
    StoreError::Corrupt(format!("the {what} just written cannot be read back"))
}

#[cfg(test)]
mod tests;
