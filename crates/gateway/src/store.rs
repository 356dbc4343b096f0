//! Gateway state: users, invites (hashed), credentials and their counters, signing keys, and
//! SCIM's groups and memberships (`store/scim`), in a SQLite file (one gateway, the default) or
//! in PostgreSQL (`store/pg`: replicas sharing one database).
//!
//! One interface, two databases: every statement is written once ([`sql`]) and runs on either.
//! What must hold when several gateways share the state is written into the statements
//! themselves: using an invite up and advancing a key's signature counter are conditional
//! updates, first-start work (migrations, secrets, signing-key rotation) runs under a lock.
//!
//! The database holds the token signing keys, so a SQLite file (and its `-wal`/`-shm` files) is
//! kept at mode 0600 and a folder the store creates for it at 0700, whatever the umask.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use sql::{Tx, args};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused a statement.
    #[error("database error: {0}")]
    Postgres(tokio_postgres::Error),
    /// The database cannot be reached (down, restarting, or the network).
    #[error("the gateway cannot reach its database: {0}")]
    Unreachable(String),
    /// The database is set up in a way the gateway must not trust (another role owns its schema).
    #[error("{0}")]
    Untrusted(String),
    /// The schema was made by a newer gateway.
    #[error(
        "the database's schema version {found} was made by a newer gateway (this one knows {known})"
    )]
    Newer {
        /// The database's version.
        found: i64,
        /// The newest this gateway knows.
        known: i64,
    },
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
    /// `database` is neither a SQLite file's path nor a usable PostgreSQL URL.
    #[error("{0}")]
    NotAFile(String),
    /// A SCIM change refused part-way, so that its transaction rolls back; the SCIM calls
    /// answer it as the [`ScimProblem`] it is.
    #[error("{0}")]
    Scim(ScimProblem),
    /// No user of this name (never invited).
    #[error("no user {0} on this gateway")]
    UnknownUser(String),
    /// The request names more than one thing where it must name one.
    #[error("{0}")]
    Conflict(String),
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

/// The store. Every call is one statement or one short transaction.
pub struct Store {
    backend: Backend,
}

enum Backend {
    /// One SQLite file; gateways on the same machine may share it.
    Lite(Mutex<Connection>),
    /// PostgreSQL, shared by replicas.
    Pg(Box<pg::PgStore>),
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
    // Delegated grants: the scope as the key signed it (JSON), until when, and their ends.
    r#"
    CREATE TABLE IF NOT EXISTS delegations (
        id TEXT PRIMARY KEY,
        "user" TEXT NOT NULL REFERENCES users(name),
        label TEXT NOT NULL,
        scope TEXT NOT NULL,
        cred_id TEXT NOT NULL,
        created INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        last_used INTEGER,
        revoked INTEGER
    );
    CREATE INDEX IF NOT EXISTS delegations_user ON delegations("user");
    CREATE INDEX IF NOT EXISTS delegations_revoked ON delegations(expires) WHERE revoked IS NOT NULL;
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

/// Why `database` is neither a SQLite file's path nor a PostgreSQL URL, if it is not: a URL of
/// another kind. Taken as a path, `mysql://host/db` would silently make a file named `mysql:`.
pub fn not_a_file(path: &Path) -> Option<String> {
    let text = path.to_string_lossy();
    if pg::is_url(&text) {
        return None;
    }
    let (scheme, _) = text.split_once("://")?;
    Some(format!(
        "database {text}: a {scheme}:// URL; give a SQLite file's path or a postgres:// URL"
    ))
}

/// The signing keys, newest first.
fn read_signing_keys(tx: &Tx<'_>) -> Result<Vec<StoredSigningKey>, StoreError> {
    tx.rows(
        "SELECT kid, pkcs8, created FROM signing_keys ORDER BY created DESC, kid",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(StoredSigningKey {
            kid: r.get(0)?,
            pkcs8: r.get(1)?,
            created: r.get(2)?,
        })
    })
    .collect()
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

/// What `touchgate-gateway check` says of the database, without creating or changing it: for
/// SQLite the library's version and the schema's, or that it is made at the first start; for
/// PostgreSQL the server's version, TLS and the schema's. `Err` for a database this gateway
/// cannot use (not SQLite, unreachable, or made by a newer version).
pub fn describe(database: &Path, password_file: Option<&Path>) -> Result<String, String> {
    if let Some(url) = pg_url(database) {
        return pg::describe(url, password_file);
    }
    if let Some(why) = not_a_file(database) {
        return Err(why);
    }
    let path = database;
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
fn insert_credential(tx: &Tx<'_>, cred: &StoredCredential) -> Result<(), StoreError> {
    tx.exec(
        "INSERT INTO credentials (cred_id, \"user\", key_json, aaguid, created) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
        args![
            cred.cred_id,
            cred.user,
            cred.key_json,
            cred.aaguid,
            now_secs()
        ],
    )?;
    Ok(())
}

/// SHA-256 of an invite code, hex: the only form in which codes are stored.
pub fn hash_code(code: &str) -> String {
    hex::encode(Sha256::digest(code.trim().as_bytes()))
}

/// `database` as a PostgreSQL URL, if it is one.
fn pg_url(database: &Path) -> Option<&str> {
    database.to_str().filter(|s| pg::is_url(s))
}

/// `database` for messages: a SQLite path as it is, a PostgreSQL URL without its password.
pub fn shown(database: &Path) -> String {
    match pg_url(database).map(url::Url::parse) {
        Some(Ok(u)) => pg::shown_url(&u),
        Some(Err(_)) => "(a postgres:// URL that does not parse)".into(),
        None => database.display().to_string(),
    }
}

/// Whether `database` names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres(database: &Path) -> bool {
    pg_url(database).is_some()
}

impl Store {
    /// Opens the database `database` names — a SQLite file's path, or a PostgreSQL URL whose
    /// password, if not in it, comes from `PGPASSWORD` — creating and migrating it as needed.
    ///
    /// For SQLite, a missing folder is created at mode 0700 and a missing file at 0600,
    /// whatever the umask; an existing file (or `-wal`/`-shm` file) readable by others is
    /// tightened to 0600 with a warning.
    pub fn open(database: &Path) -> Result<Self, StoreError> {
        Self::open_with(database, None)
    }

    /// [`Store::open`], with the PostgreSQL password read from `password_file` when the URL
    /// has none.
    pub fn open_with(database: &Path, password_file: Option<&Path>) -> Result<Self, StoreError> {
        if let Some(url) = pg_url(database) {
            return Ok(Self {
                backend: Backend::Pg(Box::new(pg::PgStore::open(url, password_file)?)),
            });
        }
        let path = database;
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
            backend: Backend::Lite(Mutex::new(conn)),
        };
        store.migrate_sqlite()?;
        // SQLite gives its side files the database file's mode; these catch files left wider
        // by an older version.
        for suffix in ["-wal", "-shm"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            tighten(Path::new(&side))?;
        }
        Ok(store)
    }

    /// Whether this store is on PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Pg(_))
    }

    /// On PostgreSQL, the listener woken by every change that ends sessions or changes access,
    /// whichever replica (or admin command) made it; `None` on SQLite, where the gateway polls.
    pub fn changes(&self) -> Option<std::sync::Arc<pg::Listener>> {
        match &self.backend {
            Backend::Pg(p) => Some(p.listener()),
            Backend::Lite(_) => None,
        }
    }

    fn lite(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` outside a transaction: for single statements and reads.
    fn read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Lite(m) => f(&Tx::Lite(&Self::lite(m))),
            Backend::Pg(p) => p.read(|c| f(&Tx::Pg(c))),
        }
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`. On SQLite the write lock
    /// is taken first (other gateways on the file wait their turn); on PostgreSQL each change
    /// that must not race is a conditional statement.
    fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.write_locked(None, f)
    }

    /// Runs `f` in one read-only transaction: a consistent picture of several tables while
    /// gateways write beside it, without taking SQLite's write lock.
    fn snapshot<T>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Lite(m) => {
                let mut conn = Self::lite(m);
                let tx = conn.transaction()?;
                let value = f(&Tx::Lite(&tx))?;
                tx.commit()?;
                Ok(value)
            }
            Backend::Pg(p) => p.snapshot(|c| f(&Tx::Pg(c))),
        }
    }

    /// [`Store::write`], first taking the advisory lock `lock` on PostgreSQL (SQLite's write
    /// lock already excludes every other writer): for work that replicas starting together
    /// must do once.
    fn write_locked<T>(
        &self,
        lock: Option<i64>,
        f: impl FnOnce(&Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Lite(m) => {
                let mut conn = Self::lite(m);
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let value = f(&Tx::Lite(&tx))?;
                tx.commit()?;
                Ok(value)
            }
            Backend::Pg(p) => p.write(lock, |c| f(&Tx::Pg(c))),
        }
    }

    /// Brings a SQLite schema up to date. Each step takes the write lock first (an immediate
    /// transaction) and reads the version under it, so gateways started at the same moment on
    /// one file take turns instead of running the same step twice.
    fn migrate_sqlite(&self) -> Result<(), StoreError> {
        let Backend::Lite(m) = &self.backend else {
            return Ok(());
        };
        let mut conn = Self::lite(m);
        loop {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if version > MIGRATIONS.len() as i64 {
                return Err(StoreError::Newer {
                    found: version,
                    known: MIGRATIONS.len() as i64,
                });
            }
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
             CREATE INDEX IF NOT EXISTS users_name_nocase ON users(name COLLATE NOCASE);
             CREATE INDEX IF NOT EXISTS users_name_lower ON users(lower(name));",
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Creates a user if missing and returns their WebAuthn user handle. Two gateways making
    /// the same new user at once agree on one handle.
    pub fn ensure_user(&self, name: &str) -> Result<uuid::Uuid, StoreError> {
        let id = self.read(|tx| {
            tx.exec(
                "INSERT INTO users (name, uuid, created) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO NOTHING",
                args![name, uuid::Uuid::new_v4().to_string(), now_secs()],
            )?;
            tx.one("SELECT uuid FROM users WHERE name = ?1", args![name])?
                .get::<String>(0)
        })?;
        uuid::Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Stores a new invite for `user` (only its hash) valid until `expires`.
    pub fn add_invite(&self, user: &str, code: &str, expires: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.exec(
                "INSERT INTO invites (code_hash, \"user\", created, expires) VALUES (?1, ?2, ?3, ?4)",
                args![hash_code(code), user, now_secs(), expires],
            )?;
            // An admin's invite says the user may come back, whichever way they enrol.
            tx.exec("UPDATE users SET idp_blocked = 0 WHERE name = ?1", args![user])?;
            Ok(())
        })
    }

    /// Checks an invite without using it up. A disabled user's invites are refused
    /// ([`InviteProblem::UserDisabled`]).
    pub fn check_invite(
        &self,
        user: &str,
        code: &str,
    ) -> Result<Result<(), InviteProblem>, StoreError> {
        self.read(|tx| Self::invite_state(tx, user, code))
    }

    fn invite_state(
        tx: &Tx<'_>,
        user: &str,
        code: &str,
    ) -> Result<Result<(), InviteProblem>, StoreError> {
        let row = tx.opt(
            "SELECT \"user\", expires, used FROM invites WHERE code_hash = ?1",
            args![hash_code(code)],
        )?;
        let disabled: bool = match tx.opt(
            "SELECT disabled <> 0 FROM users WHERE name = ?1",
            args![user],
        )? {
            Some(r) => r.get(0)?,
            None => false,
        };
        let Some(row) = row else {
            return Ok(Err(InviteProblem::Unknown));
        };
        let (owner, expires, used): (String, u64, Option<i64>) =
            (row.get(0)?, row.get(1)?, row.get(2)?);
        Ok(if owner != user {
            Err(InviteProblem::Unknown)
        } else if disabled {
            Err(InviteProblem::UserDisabled)
        } else if used.is_some() {
            Err(InviteProblem::Used)
        } else if expires <= now_secs() {
            Err(InviteProblem::Expired)
        } else {
            Ok(())
        })
    }

    /// Uses up the invite and stores the credential, in one transaction: either both happen or
    /// neither does. Refused for a disabled user, as [`Store::check_invite`] is. Of two
    /// enrolments racing one invite (through two gateways), one wins and the other is told
    /// [`InviteProblem::Used`]: using it up is one conditional update.
    pub fn enrol(
        &self,
        code: &str,
        cred: &StoredCredential,
    ) -> Result<Result<(), InviteProblem>, StoreError> {
        self.write(|tx| {
            lock_user(tx, &cred.user)?;
            if let Err(p) = Self::invite_state(tx, &cred.user, code)? {
                return Ok(Err(p));
            }
            if tx.exec(
                "UPDATE invites SET used = ?1 WHERE code_hash = ?2 AND used IS NULL",
                args![now_secs(), hash_code(code)],
            )? == 0
            {
                return Ok(Err(InviteProblem::Used));
            }
            insert_credential(tx, cred)?;
            Ok(Ok(()))
        })
    }

    /// Whether the provider's identity may enrol as its user: refused for a disabled user, and
    /// for a user the provider knew under another subject (the address was reassigned).
    pub fn check_idp_identity(
        &self,
        id: &crate::oidc::Identity,
    ) -> Result<Result<(), IdpProblem>, StoreError> {
        self.read(|tx| Self::idp_state(tx, id))
    }

    fn idp_state(
        tx: &Tx<'_>,
        id: &crate::oidc::Identity,
    ) -> Result<Result<(), IdpProblem>, StoreError> {
        let Some(row) = tx.opt(
            "SELECT disabled <> 0, idp_blocked <> 0, idp_subject FROM users WHERE name = ?1",
            args![id.user],
        )?
        else {
            return Ok(Ok(()));
        };
        let (disabled, blocked, subject): (bool, bool, Option<String>) =
            (row.get(0)?, row.get(1)?, row.get(2)?);
        Ok(if disabled {
            Err(IdpProblem::UserDisabled)
        } else if blocked {
            Err(IdpProblem::Removed)
        } else if subject.is_some_and(|s| s != id.subject) {
            Err(IdpProblem::OtherSubject)
        } else {
            Ok(())
        })
    }

    /// Stores a credential enrolled on the provider's word, with what the provider said about
    /// the user, in one transaction (checked again, as [`Store::check_idp_identity`]).
    pub fn enrol_via_idp(
        &self,
        id: &crate::oidc::Identity,
        cred: &StoredCredential,
    ) -> Result<Result<(), IdpProblem>, StoreError> {
        self.write(|tx| {
            lock_user(tx, &id.user)?;
            if let Err(p) = Self::idp_state(tx, id)? {
                return Ok(Err(p));
            }
            let groups = serde_json::to_string(&id.groups).unwrap_or_else(|_| "[]".into());
            tx.exec(
                "UPDATE users SET idp_subject = ?1, idp_groups = ?2, idp_checked = ?3 WHERE name = ?4",
                args![id.subject, groups, now_secs(), id.user],
            )?;
            insert_credential(tx, cred)?;
            Ok(Ok(()))
        })
    }

    /// The identity provider's subject for `user` and when it last vouched for them; `None`
    /// for a user it never did (invited).
    pub fn idp_state_of(&self, user: &str) -> Result<Option<(String, u64)>, StoreError> {
        self.read(|tx| {
            tx.opt(
                "SELECT idp_subject, idp_checked FROM users WHERE name = ?1 AND idp_subject IS NOT NULL",
                args![user],
            )?
            .map(|r| Ok((r.get(0)?, r.get::<Option<u64>>(1)?.unwrap_or(0))))
            .transpose()
        })
    }

    /// Records a fresh check by the identity provider: when, and the groups it said.
    pub fn record_idp_check(&self, id: &crate::oidc::Identity) -> Result<(), StoreError> {
        let groups = serde_json::to_string(&id.groups).unwrap_or_else(|_| "[]".into());
        self.read(|tx| {
            tx.exec(
                "UPDATE users SET idp_groups = ?1, idp_checked = ?2 WHERE name = ?3 AND idp_subject = ?4",
                args![groups, now_secs(), id.user, id.subject],
            )
        })?;
        Ok(())
    }

    /// All credentials of `user`.
    pub fn credentials(&self, user: &str) -> Result<Vec<StoredCredential>, StoreError> {
        self.read(|tx| {
            tx.rows(
                "SELECT cred_id, \"user\", key_json, aaguid FROM credentials WHERE \"user\" = ?1 \
                 ORDER BY created",
                args![user],
            )?
            .iter()
            .map(|r| {
                Ok(StoredCredential {
                    cred_id: r.get(0)?,
                    user: r.get(1)?,
                    key_json: r.get(2)?,
                    aaguid: r.get(3)?,
                })
            })
            .collect()
        })
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
        let n = self.read(|tx| {
            tx.exec(
                "UPDATE credentials SET key_json = ?1, last_used = ?2, counter = ?3 \
                 WHERE cred_id = ?4 AND (?3 = 0 OR counter < ?3)",
                args![key_json, now_secs(), counter, cred_id],
            )
        })?;
        Ok(n == 1)
    }

    /// Ends every session of `user`: bumps the user's revocation epoch, which every session
    /// token carries. Returns the new epoch, or `None` when there is no such user.
    pub fn revoke_user(&self, user: &str) -> Result<Option<u64>, StoreError> {
        self.write(|tx| match bump_epoch(tx, user) {
            Ok(e) => Ok(Some(e)),
            Err(StoreError::UnknownUser(_)) => Ok(None),
            Err(e) => Err(e),
        })
    }

    /// Every user's revocation epoch.
    pub fn epochs(&self) -> Result<HashMap<String, u64>, StoreError> {
        self.read(|tx| {
            tx.rows("SELECT name, epoch FROM users", &[])?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect()
        })
    }

    /// Each user's groups, for those who have any: the groups the identity provider's ID token
    /// last gave (unless `source` says SCIM alone decides), then the display names of the SCIM
    /// groups they are a member of.
    pub fn user_groups(
        &self,
        source: GroupSource,
    ) -> Result<HashMap<String, Vec<String>>, StoreError> {
        self.read(|tx| {
            let mut out: HashMap<String, Vec<String>> = HashMap::new();
            if source == GroupSource::IdpAndScim {
                for r in tx.rows(
                    "SELECT name, idp_groups FROM users \
                     WHERE idp_groups IS NOT NULL AND idp_groups <> '[]'",
                    &[],
                )? {
                    let json: String = r.get(1)?;
                    out.insert(r.get(0)?, serde_json::from_str(&json).unwrap_or_default());
                }
            }
            for r in tx.rows(
                "SELECT m.\"user\", g.display_name FROM scim_members m \
                 JOIN scim_groups g ON g.id = m.group_id ORDER BY g.display_name",
                &[],
            )? {
                let group: String = r.get(1)?;
                let groups = out.entry(r.get(0)?).or_default();
                if !groups.contains(&group) {
                    groups.push(group);
                }
            }
            Ok(out)
        })
    }

    /// Every user, by name: state, last sign-in, enrolled credentials and open invites. Users
    /// who were only invited are listed, and so are removed users, who keep their row (see
    /// [`Store::remove_user`]).
    pub fn list_users(&self) -> Result<Vec<UserSummary>, StoreError> {
        self.snapshot(|tx| {
            let mut users: Vec<UserSummary> = tx
                .rows(
                    "SELECT name, disabled <> 0, created, last_sign_in FROM users ORDER BY name",
                    &[],
                )?
                .iter()
                .map(|r| {
                    Ok(UserSummary {
                        name: r.get(0)?,
                        disabled: r.get(1)?,
                        created: r.get(2)?,
                        last_sign_in: r.get(3)?,
                        credentials: Vec::new(),
                        open_invites: Vec::new(),
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            let index: HashMap<String, usize> = users
                .iter()
                .enumerate()
                .map(|(i, u)| (u.name.clone(), i))
                .collect();
            // Enrolment order among keys enrolled in the same second.
            let order = if tx.is_pg() { "seq" } else { "rowid" };
            for r in tx.rows(
                &format!(
                    "SELECT \"user\", cred_id, aaguid, created, last_used FROM credentials \
                     ORDER BY created, {order}"
                ),
                &[],
            )? {
                if let Some(&i) = index.get(&r.get::<String>(0)?) {
                    users[i].credentials.push(CredentialSummary {
                        cred_id: r.get(1)?,
                        aaguid: r.get(2)?,
                        enrolled_at: r.get(3)?,
                        last_used: r.get(4)?,
                    });
                }
            }
            for r in tx.rows(
                "SELECT \"user\", created, expires FROM invites WHERE used IS NULL AND expires > ?1 \
                 ORDER BY expires",
                args![now_secs()],
            )? {
                if let Some(&i) = index.get(&r.get::<String>(0)?) {
                    users[i].open_invites.push(InviteSummary {
                        created: r.get(1)?,
                        expires: r.get(2)?,
                    });
                }
            }
            Ok(users)
        })
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
        if self.read(|tx| tx.exec(sql, args![user]))? == 0 {
            return Err(StoreError::UnknownUser(user.to_owned()));
        }
        Ok(())
    }

    /// The names of every disabled user. Cheap enough to call every second (a partial index
    /// holds only the disabled rows).
    pub fn disabled_users(&self) -> Result<HashSet<String>, StoreError> {
        self.read(|tx| {
            tx.rows("SELECT name FROM users WHERE disabled <> 0", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect()
        })
    }

    /// Whether `user` is disabled; `false` for a name the gateway does not know (callers on the
    /// sign-in path must not tell unknown users apart).
    pub fn is_disabled(&self, user: &str) -> Result<bool, StoreError> {
        self.read(|tx| {
            tx.opt(
                "SELECT disabled <> 0 FROM users WHERE name = ?1",
                args![user],
            )?
            .map_or(Ok(false), |r| r.get(0))
        })
    }

    /// Removes `user`'s credentials and invites (used or not) and bumps their revocation epoch,
    /// in one transaction: their sessions end and they must enrol again with a new invite. The
    /// user row stays, with its epoch, so a session token issued before can never become valid
    /// again (a fresh row would start again at epoch 0); a disabled user stays disabled.
    pub fn remove_user(&self, user: &str) -> Result<RemovedUser, StoreError> {
        self.write(|tx| remove_in(tx, user))
    }

    /// Removes the one credential of `user` whose id starts with `prefix` (a whole id always
    /// names its own credential) and bumps the user's revocation epoch, so sessions signed in
    /// with any key end. No match, or an empty prefix, is [`StoreError::UnknownKey`]; several
    /// matches are [`StoreError::AmbiguousKey`].
    pub fn remove_key(&self, user: &str, prefix: &str) -> Result<RemovedKey, StoreError> {
        self.write(|tx| {
            let epoch = bump_epoch(tx, user)?;
            let unknown = || StoreError::UnknownKey {
                user: user.to_owned(),
                prefix: prefix.to_owned(),
            };
            if prefix.is_empty() {
                return Err(unknown());
            }
            // substr, not LIKE: `_` is both a LIKE wildcard and a base64url letter.
            let candidates: Vec<(String, String)> = tx
                .rows(
                    "SELECT cred_id, aaguid FROM credentials \
                     WHERE \"user\" = ?1 AND substr(cred_id, 1, length(?2)) = ?2",
                    args![user, prefix],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?)))
                .collect::<Result<_, StoreError>>()?;
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
            tx.exec("DELETE FROM credentials WHERE cred_id = ?1", args![cred_id])?;
            let keys_left: usize = tx
                .one(
                    "SELECT count(*) FROM credentials WHERE \"user\" = ?1",
                    args![user],
                )?
                .get(0)?;
            Ok(RemovedKey {
                cred_id,
                aaguid,
                keys_left,
                epoch,
            })
        })
    }

    /// Records a successful sign-in of `user` with the credential `cred_id` (base64url, as
    /// stored) at `at` (seconds since the epoch): the user's last sign-in and the credential's
    /// last use. Nothing is written when either is unknown ([`StoreError::UnknownUser`],
    /// [`StoreError::UnknownKey`]), e.g. removed by an admin meanwhile.
    pub fn record_sign_in(&self, user: &str, cred_id: &str, at: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            if tx.exec(
                "UPDATE users SET last_sign_in = ?2 WHERE name = ?1",
                args![user, at],
            )? == 0
            {
                return Err(StoreError::UnknownUser(user.to_owned()));
            }
            if tx.exec(
                "UPDATE credentials SET last_used = ?3 WHERE \"user\" = ?1 AND cred_id = ?2",
                args![user, cred_id, at],
            )? == 0
            {
                return Err(StoreError::UnknownKey {
                    user: user.to_owned(),
                    prefix: cred_id.to_owned(),
                });
            }
            Ok(())
        })
    }

    /// The secret called `name`, made with `make` and stored the first time it is asked for.
    pub fn secret(
        &self,
        name: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        // Under the lock: of gateways started together, one makes it, all read it.
        self.write_locked(Some(pg::locks::SECRET), |tx| {
            if let Some(r) = tx.opt("SELECT value FROM secrets WHERE name = ?1", args![name])? {
                return r.get(0);
            }
            let v = make();
            tx.exec(
                "INSERT INTO secrets (name, value) VALUES (?1, ?2)",
                args![name, v],
            )?;
            Ok(v)
        })
    }

    /// Signing keys, newest first.
    pub fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError> {
        self.read(read_signing_keys)
    }

    /// Adds a signing key.
    pub fn add_signing_key(&self, key: &StoredSigningKey) -> Result<(), StoreError> {
        self.read(|tx| insert_signing_key(tx, key))
    }

    /// The signing keys, newest first, after adding the one `make` makes when the newest is
    /// missing or `stale`: under a lock, so gateways started together on one store rotate once
    /// and all sign with the same key.
    pub fn signing_keys_rotated<E: From<StoreError>>(
        &self,
        stale: impl Fn(&StoredSigningKey) -> bool,
        make: impl FnOnce() -> Result<StoredSigningKey, E>,
    ) -> Result<Vec<StoredSigningKey>, E> {
        let mut made = None;
        let keys = self.write_locked(Some(pg::locks::SIGNING_KEY), |tx| {
            let mut keys = read_signing_keys(tx)?;
            if keys.first().is_none_or(&stale) {
                match make() {
                    Ok(key) => {
                        insert_signing_key(tx, &key)?;
                        keys.insert(0, key);
                    }
                    Err(e) => {
                        made = Some(e);
                        return Err(StoreError::Corrupt("no new signing key".into()));
                    }
                }
            }
            Ok(keys)
        });
        match (keys, made) {
            (_, Some(e)) => Err(e),
            (keys, None) => Ok(keys?),
        }
    }
}

fn insert_signing_key(tx: &Tx<'_>, key: &StoredSigningKey) -> Result<(), StoreError> {
    tx.exec(
        "INSERT INTO signing_keys (kid, pkcs8, created) VALUES (?1, ?2, ?3)",
        args![key.kid, key.pkcs8, key.created],
    )?;
    Ok(())
}

/// [`Store::remove_user`] inside `tx`.
fn remove_in(tx: &Tx<'_>, user: &str) -> Result<RemovedUser, StoreError> {
    let epoch = bump_epoch(tx, user)?;
    tx.exec(
        "UPDATE users SET idp_blocked = 1 WHERE name = ?1",
        args![user],
    )?;
    let credentials = tx.exec("DELETE FROM credentials WHERE \"user\" = ?1", args![user])?;
    let invites = tx.exec("DELETE FROM invites WHERE \"user\" = ?1", args![user])?;
    Ok(RemovedUser {
        credentials,
        invites,
        epoch,
    })
}

/// Takes `user`'s row lock on PostgreSQL for the rest of the transaction, so an enrolment and a
/// removal of the same user (both start by locking the row: removal by bumping the epoch)
/// happen one after the other, each seeing what the other wrote. SQLite's write lock already
/// orders them.
fn lock_user(tx: &Tx<'_>, user: &str) -> Result<(), StoreError> {
    if tx.is_pg() {
        tx.rows(
            "SELECT 1 FROM users WHERE name = ?1 FOR UPDATE",
            args![user],
        )?;
    }
    Ok(())
}

/// Bumps `user`'s revocation epoch inside `tx` and returns the new one.
fn bump_epoch(tx: &Tx<'_>, user: &str) -> Result<u64, StoreError> {
    tx.opt(
        "UPDATE users SET epoch = epoch + 1 WHERE name = ?1 RETURNING epoch",
        args![user],
    )?
    .ok_or_else(|| StoreError::UnknownUser(user.to_owned()))?
    .get(0)
}

mod delegations;
mod files;
pub mod pg;
mod scim;
pub(crate) mod sql;
#[cfg(test)]
mod tests;

pub use scim::{
    GroupChange, GroupEdit, NewScimUser, RemovedScimUser, ScimGroup, ScimProblem, ScimQuery,
    ScimRef, ScimUser, UserChange, UserEdit,
};

use files::{create_private_dirs, create_private_file, tighten};
