//! Gateway state in SQLite: users, invites (hashed), credentials and their counters, signing keys,
//! and SCIM's groups and memberships (`store/scim`).
//!
//! The database holds the token signing keys, so its file (and SQLite's `-wal`/`-shm` files) is
//! kept at mode 0600 and a folder the store creates for it at 0700, whatever the umask.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The database file or its folder could not be created or given private permissions.
    #[error("cannot prepare {path} with private permissions: {source}")]
    Permissions {
        /// The file or folder.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// `database` names no file: a URL, or a `scheme:` this gateway does not store in.
    #[error("{0}")]
    NotAFile(String),
    /// No user of this name (never invited).
    #[error("no user {0} on this gateway")]
    UnknownUser(String),
    /// No credential of the user has an id starting with the given prefix.
    #[error("no key of {user} has an id starting with {prefix:?}")]
    UnknownKey {
        /// The user.
        user: String,
        /// The prefix asked for.
        prefix: String,
    },
    /// Several credentials of the user have ids starting with the given prefix.
    #[error("{matches} keys of {user} have ids starting with {prefix:?}")]
    AmbiguousKey {
        /// The user.
        user: String,
        /// The prefix asked for.
        prefix: String,
        /// How many keys it matches.
        matches: usize,
    },
}

/// Why an invite cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InviteProblem {
    /// No invite with this code (or for another user).
    #[error("the invite code is not valid for this user")]
    Unknown,
    /// Already used.
    #[error("the invite code has already been used")]
    Used,
    /// Past its expiry.
    #[error("the invite code has expired")]
    Expired,
    /// The user's account is disabled (`touchgate-gateway disable`).
    #[error("the account is disabled on this gateway")]
    UserDisabled,
}

/// Why the provider's identity cannot enrol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdpProblem {
    /// The user's account is disabled (`touchgate-gateway disable`).
    #[error("the account is disabled on this gateway")]
    UserDisabled,
    /// An admin removed the user: coming back takes a new invite.
    #[error(
        "an admin removed this account from the gateway: signing in with the organisation does not bring it back; ask your admin for an invite"
    )]
    Removed,
    /// The user name belongs to another account of the provider.
    #[error(
        "this user name belongs to another account of the identity provider (an address that was reassigned?): ask your admin"
    )]
    OtherSubject,
}

/// Where users' groups come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSource {
    /// The identity provider's ID token at each check, and SCIM pushes.
    IdpAndScim,
    /// SCIM alone (a gateway with `[scim]`): a group removed there must not live on in the
    /// copy the last ID token left until the next check.
    Scim,
}

/// A stored credential.
#[derive(Debug, Clone)]
pub struct StoredCredential {
    /// Base64url credential id.
    pub cred_id: String,
    /// Owner.
    pub user: String,
    /// The webauthn-rs `SecurityKey`, as JSON.
    pub key_json: String,
    /// AAGUID of the authenticator model.
    pub aaguid: String,
}

/// A stored signing key.
#[derive(Debug, Clone)]
pub struct StoredSigningKey {
    /// Key id, as in JWT headers.
    pub kid: String,
    /// PKCS#8 DER of the private key.
    pub pkcs8: Vec<u8>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// One user as the admin commands list them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    /// The user name.
    pub name: String,
    /// Whether the account is disabled.
    pub disabled: bool,
    /// When the user was first invited, seconds since the epoch.
    pub created: u64,
    /// The last successful sign-in, seconds since the epoch.
    pub last_sign_in: Option<u64>,
    /// Enrolled credentials, oldest first.
    pub credentials: Vec<CredentialSummary>,
    /// Invites neither used nor expired, soonest expiry first.
    pub open_invites: Vec<InviteSummary>,
}

/// One enrolled credential, without its key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialSummary {
    /// Base64url credential id.
    pub cred_id: String,
    /// AAGUID of the authenticator model.
    pub aaguid: String,
    /// When it was enrolled, seconds since the epoch.
    pub enrolled_at: u64,
    /// When it last signed in, seconds since the epoch.
    pub last_used: Option<u64>,
}

/// An open invite (its code is never readable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteSummary {
    /// When it was made, seconds since the epoch.
    pub created: u64,
    /// When it expires, seconds since the epoch.
    pub expires: u64,
}

/// What [`Store::remove_user`] deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedUser {
    /// Credentials deleted.
    pub credentials: usize,
    /// Invites deleted (used, expired or open).
    pub invites: usize,
    /// The user's new revocation epoch.
    pub epoch: u64,
}

/// What [`Store::remove_key`] deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedKey {
    /// The whole credential id.
    pub cred_id: String,
    /// Its AAGUID.
    pub aaguid: String,
    /// Credentials the user has left.
    pub keys_left: usize,
    /// The user's new revocation epoch.
    pub epoch: u64,
}

/// The SQLite store. Every call is a short transaction on a local file.
pub struct Store {
    conn: Mutex<Connection>,
}

const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        uuid TEXT NOT NULL,
        created INTEGER NOT NULL
    );
    CREATE TABLE invites (
        code_hash TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        created INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        used INTEGER
    );
    CREATE TABLE credentials (
        cred_id TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name),
        key_json TEXT NOT NULL,
        aaguid TEXT NOT NULL,
        created INTEGER NOT NULL,
        last_used INTEGER
    );
    CREATE INDEX credentials_user ON credentials(user);
    CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        pkcs8 BLOB NOT NULL,
        created INTEGER NOT NULL
    );
"#,
    r#"
    ALTER TABLE users ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL
    );
"#,
    // SCIM groups as the identity provider pushes them, and their members by user name.
    r#"
    CREATE TABLE IF NOT EXISTS scim_groups (
        id TEXT PRIMARY KEY,
        display_name TEXT NOT NULL,
        external_id TEXT,
        created INTEGER NOT NULL,
        modified INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX IF NOT EXISTS scim_groups_name ON scim_groups(display_name COLLATE NOCASE);
    CREATE TABLE IF NOT EXISTS scim_members (
        group_id TEXT NOT NULL REFERENCES scim_groups(id) ON DELETE CASCADE,
        user TEXT NOT NULL REFERENCES users(name),
        PRIMARY KEY (group_id, user)
    );
    CREATE INDEX IF NOT EXISTS scim_members_user ON scim_members(user);
"#,
];

/// Columns added after the versioned migrations, each added only where missing, so a database
/// made by any earlier schema gains them. (`users.created`, `credentials.created` and
/// `credentials.last_used` already exist from the first migration.)
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("users", "disabled", "INTEGER NOT NULL DEFAULT 0"),
    ("users", "last_sign_in", "INTEGER"),
    // The organisation's identity provider: its subject for the user (an email handed to
    // someone else later is not the same account), the groups it last said, and when.
    ("users", "idp_subject", "TEXT"),
    ("users", "idp_groups", "TEXT"),
    ("users", "idp_checked", "INTEGER"),
    // Set by `remove` (and SCIM's delete): the provider's word alone no longer enrols the user;
    // a new invite (or SCIM creating them again) clears it.
    ("users", "idp_blocked", "INTEGER NOT NULL DEFAULT 0"),
    // The key's signature counter as last accepted, beside the key JSON that holds it too: one
    // conditional update decides which of two racing sign-ins (a cloned key, two gateways on
    // one store) wins.
    ("credentials", "counter", "INTEGER NOT NULL DEFAULT 0"),
    // SCIM: the provider's own id and display name for the user, when SCIM last changed the
    // user, and when SCIM deleted them (the row stays, as `remove` keeps it).
    ("users", "scim_external_id", "TEXT"),
    ("users", "scim_display_name", "TEXT"),
    ("users", "scim_modified", "INTEGER"),
    ("users", "scim_deleted", "INTEGER"),
];

/// Owner read and write only: the database holds the token signing keys.
const FILE_MODE: u32 = 0o600;
/// Owner only, for a folder the store creates.
const DIR_MODE: u32 = 0o700;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why `database` is not a SQLite file path, if it is not: a PostgreSQL URL (which this
/// version does not store in) or another URL. Taken as a path, `postgres://host/db` would
/// silently make a file named `postgres:`.
pub fn not_a_file(path: &Path) -> Option<String> {
    let text = path.to_string_lossy();
    let (scheme, _) = text.split_once("://")?;
    Some(if matches!(scheme, "postgres" | "postgresql") {
        format!(
            "database {text}: this gateway stores its state in a SQLite file; PostgreSQL is not supported by this version"
        )
    } else {
        format!("database {text}: not a file path (a {scheme}:// URL); give the SQLite file's path")
    })
}

/// The signing keys, newest first.
fn read_signing_keys(conn: &Connection) -> Result<Vec<StoredSigningKey>, rusqlite::Error> {
    let mut stmt =
        conn.prepare("SELECT kid, pkcs8, created FROM signing_keys ORDER BY created DESC, kid")?;
    let rows = stmt.query_map([], |r| {
        Ok(StoredSigningKey {
            kid: r.get(0)?,
            pkcs8: r.get(1)?,
            created: r.get::<_, i64>(2)? as u64,
        })
    })?;
    rows.collect()
}

/// Switches `conn` to WAL. On a new file another gateway starting at the same moment may be
/// switching it too, and SQLite then answers "busy" at once instead of waiting (its busy
/// handler is not asked for this lock): retried for up to five seconds.
fn wal(conn: &Connection) -> Result<(), StoreError> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < until =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            done => return Ok(done?),
        }
    }
}

/// What `touchgate-gateway check` says of the database at `path`, without creating or
/// changing it: the SQLite version and the schema's, or that it is made at the first start;
/// `Err` for a file this gateway cannot use (not SQLite, or made by a newer version).
pub fn describe(path: &Path) -> Result<String, String> {
    if !path.exists() {
        return Ok(format!(
            "database {}: not created yet (made, private, at the first start)",
            path.display()
        ));
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("database {}: {e}", path.display()))?;
    let read = || -> Result<(i64, String), rusqlite::Error> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let sqlite: String = conn.query_row("SELECT sqlite_version()", [], |r| r.get(0))?;
        Ok((version, sqlite))
    };
    let (version, sqlite) = read().map_err(|e| format!("database {}: {e}", path.display()))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(format!(
            "database {}: schema version {version} was made by a newer gateway (this one knows {known})",
            path.display()
        ));
    }
    let state = if version == known {
        "current".to_owned()
    } else {
        format!("{} migration(s) to run at the next start", known - version)
    };
    Ok(format!(
        "database {}: SQLite {sqlite}, schema version {version} of {known} ({state})",
        path.display()
    ))
}

/// Stores a newly enrolled credential.
fn insert_credential(conn: &Connection, cred: &StoredCredential) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO credentials (cred_id, user, key_json, aaguid, created) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![cred.cred_id, cred.user, cred.key_json, cred.aaguid, now_secs() as i64],
    )?;
    Ok(())
}

/// SHA-256 of an invite code, hex: the only form in which codes are stored.
pub fn hash_code(code: &str) -> String {
    hex::encode(Sha256::digest(code.trim().as_bytes()))
}

impl Store {
    /// Opens (creating and migrating as needed) the database at `path`.
    ///
    /// A missing folder is created at mode 0700 and a missing file at 0600, whatever the umask;
    /// an existing file (or `-wal`/`-shm` file) readable by others is tightened to 0600 with a
    /// warning.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(why) = not_a_file(path) {
            return Err(StoreError::NotAFile(why));
        }
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            create_private_dirs(dir)?;
        }
        create_private_file(path)?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        wal(&conn)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Self {
            conn: Mutex::new(conn),
        };
        store.migrate()?;
        // SQLite gives its side files the database file's mode; these catch files left wider
        // by an older version.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            tighten(Path::new(&side))?;
        }
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the schema up to date. Each step takes the write lock first (an immediate
    /// transaction) and reads the version under it, so gateways started at the same moment on
    /// one file take turns instead of running the same step twice.
    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            let Some(sql) = MIGRATIONS.get(version as usize) else {
                break;
            };
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version + 1)?;
            tx.commit()?;
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (table, column, decl) in ADDED_COLUMNS {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
                params![table, column],
                |r| r.get(0),
            )?;
            if !exists {
                tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            }
        }
        // The revocation poller reads the disabled users every second: a partial index keeps
        // that to the few disabled rows however many users there are.
        // SCIM finds users by their id (`uuid`) and by name in any case.
        tx.execute_batch(
            "CREATE INDEX IF NOT EXISTS users_disabled ON users(name) WHERE disabled <> 0;
             CREATE INDEX IF NOT EXISTS invites_user ON invites(user);
             CREATE INDEX IF NOT EXISTS users_uuid ON users(uuid);
             CREATE INDEX IF NOT EXISTS users_name_nocase ON users(name COLLATE NOCASE);",
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Creates a user if missing and returns their WebAuthn user handle.
    pub fn ensure_user(&self, name: &str) -> Result<uuid::Uuid, StoreError> {
        let conn = self.lock();
        let existing: Option<String> = conn
            .query_row("SELECT uuid FROM users WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(u) = existing {
            return uuid::Uuid::parse_str(&u).map_err(|e| StoreError::Corrupt(e.to_string()));
        }
        let id = uuid::Uuid::new_v4();
        conn.execute(
            "INSERT INTO users (name, uuid, created) VALUES (?1, ?2, ?3)",
            params![name, id.to_string(), now_secs() as i64],
        )?;
        Ok(id)
    }

    /// Stores a new invite for `user` (only its hash) valid until `expires`.
    pub fn add_invite(&self, user: &str, code: &str, expires: u64) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO invites (code_hash, user, created, expires) VALUES (?1, ?2, ?3, ?4)",
            params![hash_code(code), user, now_secs() as i64, expires as i64],
        )?;
        // An admin's invite says the user may come back, whichever way they enrol.
        conn.execute("UPDATE users SET idp_blocked = 0 WHERE name = ?1", [user])?;
        Ok(())
    }

    /// Checks an invite without using it up. A disabled user's invites are refused
    /// ([`InviteProblem::UserDisabled`]).
    pub fn check_invite(
        &self,
        user: &str,
        code: &str,
    ) -> Result<Result<(), InviteProblem>, StoreError> {
        let conn = self.lock();
        Self::invite_state(&conn, user, code)
    }

    fn invite_state(
        conn: &Connection,
        user: &str,
        code: &str,
    ) -> Result<Result<(), InviteProblem>, StoreError> {
        let row: Option<(String, i64, Option<i64>)> = conn
            .query_row(
                "SELECT user, expires, used FROM invites WHERE code_hash = ?1",
                [hash_code(code)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let disabled: bool = conn
            .query_row(
                "SELECT disabled <> 0 FROM users WHERE name = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false);
        Ok(match row {
            None => Err(InviteProblem::Unknown),
            Some((u, _, _)) if u != user => Err(InviteProblem::Unknown),
            Some(_) if disabled => Err(InviteProblem::UserDisabled),
            Some((_, _, Some(_))) => Err(InviteProblem::Used),
            Some((_, exp, None)) if (exp as u64) <= now_secs() => Err(InviteProblem::Expired),
            Some(_) => Ok(()),
        })
    }

    /// Uses up the invite and stores the credential, in one transaction: either both happen or
    /// neither does. Refused for a disabled user, as [`Store::check_invite`] is.
    pub fn enrol(
        &self,
        code: &str,
        cred: &StoredCredential,
    ) -> Result<Result<(), InviteProblem>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if let Err(p) = Self::invite_state(&tx, &cred.user, code)? {
            return Ok(Err(p));
        }
        tx.execute(
            "UPDATE invites SET used = ?1 WHERE code_hash = ?2",
            params![now_secs() as i64, hash_code(code)],
        )?;
        insert_credential(&tx, cred)?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// Whether the provider's identity may enrol as its user: refused for a disabled user, and
    /// for a user the provider knew under another subject (the address was reassigned).
    pub fn check_idp_identity(
        &self,
        id: &crate::oidc::Identity,
    ) -> Result<Result<(), IdpProblem>, StoreError> {
        Self::idp_state(&self.lock(), id)
    }

    fn idp_state(
        conn: &Connection,
        id: &crate::oidc::Identity,
    ) -> Result<Result<(), IdpProblem>, StoreError> {
        let row: Option<(bool, bool, Option<String>)> = conn
            .query_row(
                "SELECT disabled <> 0, idp_blocked <> 0, idp_subject FROM users WHERE name = ?1",
                [&id.user],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(match row {
            Some((true, _, _)) => Err(IdpProblem::UserDisabled),
            Some((_, true, _)) => Err(IdpProblem::Removed),
            Some((_, _, Some(sub))) if sub != id.subject => Err(IdpProblem::OtherSubject),
            _ => Ok(()),
        })
    }

    /// Stores a credential enrolled on the provider's word, with what the provider said about
    /// the user, in one transaction (checked again, as [`Store::check_idp_identity`]).
    pub fn enrol_via_idp(
        &self,
        id: &crate::oidc::Identity,
        cred: &StoredCredential,
    ) -> Result<Result<(), IdpProblem>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if let Err(p) = Self::idp_state(&tx, id)? {
            return Ok(Err(p));
        }
        let groups = serde_json::to_string(&id.groups).unwrap_or_else(|_| "[]".into());
        tx.execute(
            "UPDATE users SET idp_subject = ?1, idp_groups = ?2, idp_checked = ?3 WHERE name = ?4",
            params![id.subject, groups, now_secs() as i64, id.user],
        )?;
        insert_credential(&tx, cred)?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// The identity provider's subject for `user` and when it last vouched for them; `None`
    /// for a user it never did (invited).
    pub fn idp_state_of(&self, user: &str) -> Result<Option<(String, u64)>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                "SELECT idp_subject, idp_checked FROM users WHERE name = ?1 AND idp_subject IS NOT NULL",
                [user],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64)),
            )
            .optional()?)
    }

    /// Records a fresh check by the identity provider: when, and the groups it said.
    pub fn record_idp_check(&self, id: &crate::oidc::Identity) -> Result<(), StoreError> {
        let groups = serde_json::to_string(&id.groups).unwrap_or_else(|_| "[]".into());
        self.lock().execute(
            "UPDATE users SET idp_groups = ?1, idp_checked = ?2 WHERE name = ?3 AND idp_subject = ?4",
            params![groups, now_secs() as i64, id.user, id.subject],
        )?;
        Ok(())
    }

    /// All credentials of `user`.
    pub fn credentials(&self, user: &str) -> Result<Vec<StoredCredential>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT cred_id, user, key_json, aaguid FROM credentials WHERE user = ?1 ORDER BY created",
        )?;
        let rows = stmt.query_map([user], |r| {
            Ok(StoredCredential {
                cred_id: r.get(0)?,
                user: r.get(1)?,
                key_json: r.get(2)?,
                aaguid: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a credential's state after a sign-in whose signature counter was `counter`,
    /// only if that counter is above the one stored: `false` when another sign-in with the
    /// same or a higher counter got there first (a cloned key, raced through another gateway
    /// on this store). A counter of 0 (keys without one) always passes.
    pub fn advance_credential(
        &self,
        cred_id: &str,
        key_json: &str,
        counter: u32,
    ) -> Result<bool, StoreError> {
        let n = self.lock().execute(
            "UPDATE credentials SET key_json = ?1, last_used = ?2, counter = ?3 \
             WHERE cred_id = ?4 AND (?3 = 0 OR counter < ?3)",
            params![key_json, now_secs() as i64, counter, cred_id],
        )?;
        Ok(n == 1)
    }

    /// Ends every session of `user`: bumps the user's revocation epoch, which every session
    /// token carries. Returns the new epoch, or `None` when there is no such user.
    pub fn revoke_user(&self, user: &str) -> Result<Option<u64>, StoreError> {
        let conn = self.lock();
        let n = conn.execute("UPDATE users SET epoch = epoch + 1 WHERE name = ?1", [user])?;
        if n == 0 {
            return Ok(None);
        }
        let e: i64 = conn.query_row("SELECT epoch FROM users WHERE name = ?1", [user], |r| {
            r.get(0)
        })?;
        Ok(Some(e as u64))
    }

    /// Every user's revocation epoch.
    pub fn epochs(&self) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT name, epoch FROM users")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Each user's groups, for those who have any: the groups the identity provider's ID token
    /// last gave (unless `source` says SCIM alone decides), then the display names of the SCIM
    /// groups they are a member of.
    pub fn user_groups(
        &self,
        source: GroupSource,
    ) -> Result<std::collections::HashMap<String, Vec<String>>, StoreError> {
        let conn = self.lock();
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        if source == GroupSource::IdpAndScim {
            let mut stmt = conn.prepare_cached(
                "SELECT name, idp_groups FROM users WHERE idp_groups IS NOT NULL AND idp_groups <> '[]'",
            )?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (name, json) = row?;
                out.insert(name, serde_json::from_str(&json).unwrap_or_default());
            }
        }
        let mut stmt = conn.prepare_cached(
            "SELECT m.user, g.display_name FROM scim_members m \
             JOIN scim_groups g ON g.id = m.group_id ORDER BY g.display_name",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (name, group) = row?;
            let groups = out.entry(name).or_default();
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        Ok(out)
    }

    /// Every user, by name: state, last sign-in, enrolled credentials and open invites. Users
    /// who were only invited are listed, and so are removed users, who keep their row (see
    /// [`Store::remove_user`]).
    pub fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        let mut conn = self.lock();
        // One read transaction: a consistent picture while a gateway writes beside us.
        let tx = conn.transaction()?;
        let mut users: Vec<UserSummary> = {
            let mut stmt = tx.prepare(
                "SELECT name, disabled <> 0, created, last_sign_in FROM users ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(UserSummary {
                    name: r.get(0)?,
                    disabled: r.get(1)?,
                    created: r.get::<_, i64>(2)? as u64,
                    last_sign_in: r.get::<_, Option<i64>>(3)?.map(|t| t as u64),
                    credentials: Vec::new(),
                    open_invites: Vec::new(),
                })
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let index: HashMap<String, usize> = users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.clone(), i))
            .collect();
        {
            let mut stmt = tx.prepare(
                "SELECT user, cred_id, aaguid, created, last_used FROM credentials \
                 ORDER BY created, rowid",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let user: String = r.get(0)?;
                if let Some(&i) = index.get(&user) {
                    users[i].credentials.push(CredentialSummary {
                        cred_id: r.get(1)?,
                        aaguid: r.get(2)?,
                        enrolled_at: r.get::<_, i64>(3)? as u64,
                        last_used: r.get::<_, Option<i64>>(4)?.map(|t| t as u64),
                    });
                }
            }
        }
        {
            let mut stmt = tx.prepare(
                "SELECT user, created, expires FROM invites WHERE used IS NULL AND expires > ?1 \
                 ORDER BY expires",
            )?;
            let mut rows = stmt.query([now_secs() as i64])?;
            while let Some(r) = rows.next()? {
                let user: String = r.get(0)?;
                if let Some(&i) = index.get(&user) {
                    users[i].open_invites.push(InviteSummary {
                        created: r.get::<_, i64>(1)? as u64,
                        expires: r.get::<_, i64>(2)? as u64,
                    });
                }
            }
        }
        Ok(users)
    }

    /// Disables or enables `user`. Disabling also bumps the user's revocation epoch, as
    /// [`Store::revoke_user`] does, so running gateways end every session of the user within
    /// their revocation poll; while disabled, the user's invites are refused. Enabling leaves the
    /// epoch alone: sessions ended by disabling stay ended.
    pub fn set_disabled(&self, user: &str, disabled: bool) -> Result<(), StoreError> {
        let sql = if disabled {
            "UPDATE users SET disabled = 1, epoch = epoch + 1 WHERE name = ?1"
        } else {
            "UPDATE users SET disabled = 0 WHERE name = ?1"
        };
        if self.lock().execute(sql, [user])? == 0 {
            return Err(StoreError::UnknownUser(user.to_owned()));
        }
        Ok(())
    }

    /// The names of every disabled user. Cheap enough to call every second (a partial index
    /// holds only the disabled rows).
    pub fn disabled_users(&self) -> Result<HashSet<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached("SELECT name FROM users WHERE disabled <> 0")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether `user` is disabled; `false` for a name the gateway does not know (callers on the
    /// sign-in path must not tell unknown users apart).
    pub fn is_disabled(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .query_row(
                "SELECT disabled <> 0 FROM users WHERE name = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// Removes `user`'s credentials and invites (used or not) and bumps their revocation epoch,
    /// in one transaction: their sessions end and they must enrol again with a new invite. The
    /// user row stays, with its epoch, so a session token issued before can never become valid
    /// again (a fresh row would start again at epoch 0); a disabled user stays disabled.
    pub fn remove_user(&self, user: &str) -> Result<RemovedUser, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let removed = remove_in(&tx, user)?;
        tx.commit()?;
        Ok(removed)
    }

    /// Removes the one credential of `user` whose id starts with `prefix` (a whole id always
    /// names its own credential) and bumps the user's revocation epoch, so sessions signed in
    /// with any key end. No match, or an empty prefix, is [`StoreError::UnknownKey`]; several
    /// matches are [`StoreError::AmbiguousKey`].
    pub fn remove_key(&self, user: &str, prefix: &str) -> Result<RemovedKey, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let epoch = bump_epoch(&tx, user)?;
        let unknown = || StoreError::UnknownKey {
            user: user.to_owned(),
            prefix: prefix.to_owned(),
        };
        if prefix.is_empty() {
            return Err(unknown());
        }
        // substr, not LIKE: `_` is both a LIKE wildcard and a base64url letter.
        let candidates: Vec<(String, String)> = {
            let mut stmt = tx.prepare(
                "SELECT cred_id, aaguid FROM credentials \
                 WHERE user = ?1 AND substr(cred_id, 1, length(?2)) = ?2",
            )?;
            let rows = stmt.query_map(params![user, prefix], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let (cred_id, aaguid) = match candidates.iter().find(|(id, _)| id == prefix) {
            Some(exact) => exact.clone(),
            None => match candidates.as_slice() {
                [] => return Err(unknown()),
                [one] => one.clone(),
                many => {
                    return Err(StoreError::AmbiguousKey {
                        user: user.to_owned(),
                        prefix: prefix.to_owned(),
                        matches: many.len(),
                    });
                }
            },
        };
        tx.execute("DELETE FROM credentials WHERE cred_id = ?1", [&cred_id])?;
        let keys_left: i64 = tx.query_row(
            "SELECT count(*) FROM credentials WHERE user = ?1",
            [user],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(RemovedKey {
            cred_id,
            aaguid,
            keys_left: keys_left as usize,
            epoch,
        })
    }

    /// Records a successful sign-in of `user` with the credential `cred_id` (base64url, as
    /// stored) at `at` (seconds since the epoch): the user's last sign-in and the credential's
    /// last use. Nothing is written when either is unknown ([`StoreError::UnknownUser`],
    /// [`StoreError::UnknownKey`]), e.g. removed by an admin meanwhile.
    pub fn record_sign_in(&self, user: &str, cred_id: &str, at: u64) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if tx.execute(
            "UPDATE users SET last_sign_in = ?2 WHERE name = ?1",
            params![user, at as i64],
        )? == 0
        {
            return Err(StoreError::UnknownUser(user.to_owned()));
        }
        if tx.execute(
            "UPDATE credentials SET last_used = ?3 WHERE user = ?1 AND cred_id = ?2",
            params![user, cred_id, at as i64],
        )? == 0
        {
            return Err(StoreError::UnknownKey {
                user: user.to_owned(),
                prefix: cred_id.to_owned(),
            });
        }
        tx.commit()?;
        Ok(())
    }

    /// The secret called `name`, made with `make` and stored the first time it is asked for.
    pub fn secret(
        &self,
        name: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let mut conn = self.lock();
        // Under the write lock: of gateways started together, one makes it, all read it.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<Vec<u8>> = tx
            .query_row("SELECT value FROM secrets WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(v) = existing {
            return Ok(v);
        }
        let v = make();
        tx.execute(
            "INSERT INTO secrets (name, value) VALUES (?1, ?2)",
            params![name, v],
        )?;
        tx.commit()?;
        Ok(v)
    }

    /// Signing keys, newest first.
    pub fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError> {
        Ok(read_signing_keys(&self.lock())?)
    }

    /// Adds a signing key.
    pub fn add_signing_key(&self, key: &StoredSigningKey) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO signing_keys (kid, pkcs8, created) VALUES (?1, ?2, ?3)",
            params![key.kid, key.pkcs8, key.created as i64],
        )?;
        Ok(())
    }

    /// The signing keys, newest first, after adding the one `make` makes when the newest is
    /// missing or `stale`: under the write lock, so gateways started together on one file
    /// rotate once and all sign with the same key.
    pub fn signing_keys_rotated<E: From<StoreError>>(
        &self,
        stale: impl Fn(&StoredSigningKey) -> bool,
        make: impl FnOnce() -> Result<StoredSigningKey, E>,
    ) -> Result<Vec<StoredSigningKey>, E> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let mut keys = read_signing_keys(&tx).map_err(StoreError::from)?;
        if keys.first().is_none_or(&stale) {
            let key = make()?;
            tx.execute(
                "INSERT INTO signing_keys (kid, pkcs8, created) VALUES (?1, ?2, ?3)",
                params![key.kid, key.pkcs8, key.created as i64],
            )
            .map_err(StoreError::from)?;
            keys.insert(0, key);
        }
        tx.commit().map_err(StoreError::from)?;
        Ok(keys)
    }
}

/// [`Store::remove_user`] inside `tx`.
fn remove_in(tx: &Connection, user: &str) -> Result<RemovedUser, StoreError> {
    let epoch = bump_epoch(tx, user)?;
    tx.execute("UPDATE users SET idp_blocked = 1 WHERE name = ?1", [user])?;
    let credentials = tx.execute("DELETE FROM credentials WHERE user = ?1", [user])?;
    let invites = tx.execute("DELETE FROM invites WHERE user = ?1", [user])?;
    Ok(RemovedUser {
        credentials,
        invites,
        epoch,
    })
}

/// Bumps `user`'s revocation epoch inside `tx` and returns the new one.
fn bump_epoch(tx: &Connection, user: &str) -> Result<u64, StoreError> {
    tx.query_row(
        "UPDATE users SET epoch = epoch + 1 WHERE name = ?1 RETURNING epoch",
        [user],
        |r| r.get::<_, i64>(0),
    )
    .optional()?
    .map(|e| e as u64)
    .ok_or_else(|| StoreError::UnknownUser(user.to_owned()))
}

mod files;
mod scim;
#[cfg(test)]
mod tests;

pub use scim::{
    GroupChange, GroupEdit, NewScimUser, RemovedScimUser, ScimGroup, ScimProblem, ScimQuery,
    ScimRef, ScimUser, UserChange, UserEdit,
};

use files::{create_private_dirs, create_private_file, tighten};
