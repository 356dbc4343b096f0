//! Gateway state in SQLite: users, invites (hashed), credentials and their counters, signing keys.

use std::{
    path::Path,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};
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
];

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// SHA-256 of an invite code, hex: the only form in which codes are stored.
pub fn hash_code(code: &str) -> String {
    hex::encode(Sha256::digest(code.trim().as_bytes()))
}

impl Store {
    /// Opens (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let store = Self {
            conn: Mutex::new(conn),
        };
        store.migrate()?;
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
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
        self.lock().execute(
            "INSERT INTO invites (code_hash, user, created, expires) VALUES (?1, ?2, ?3, ?4)",
            params![hash_code(code), user, now_secs() as i64, expires as i64],
        )?;
        Ok(())
    }

    /// Checks an invite without using it up.
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
        Ok(match row {
            None => Err(InviteProblem::Unknown),
            Some((u, _, _)) if u != user => Err(InviteProblem::Unknown),
            Some((_, _, Some(_))) => Err(InviteProblem::Used),
            Some((_, exp, None)) if (exp as u64) <= now_secs() => Err(InviteProblem::Expired),
            Some(_) => Ok(()),
        })
    }

    /// Uses up the invite and stores the credential, in one transaction: either both happen or
    /// neither does.
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
        tx.execute(
            "INSERT INTO credentials (cred_id, user, key_json, aaguid, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![cred.cred_id, cred.user, cred.key_json, cred.aaguid, now_secs() as i64],
        )?;
        tx.commit()?;
        Ok(Ok(()))
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

    /// Replaces a credential's stored state (its counter, after a sign-in).
    pub fn update_credential(&self, cred_id: &str, key_json: &str) -> Result<(), StoreError> {
        self.lock().execute(
            "UPDATE credentials SET key_json = ?1, last_used = ?2 WHERE cred_id = ?3",
            params![key_json, now_secs() as i64, cred_id],
        )?;
        Ok(())
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

    /// The secret called `name`, made with `make` and stored the first time it is asked for.
    pub fn secret(
        &self,
        name: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let conn = self.lock();
        let existing: Option<Vec<u8>> = conn
            .query_row("SELECT value FROM secrets WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(v) = existing {
            return Ok(v);
        }
        let v = make();
        conn.execute(
            "INSERT INTO secrets (name, value) VALUES (?1, ?2)",
            params![name, v],
        )?;
        Ok(v)
    }

    /// Signing keys, newest first.
    pub fn signing_keys(&self) -> Result<Vec<StoredSigningKey>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT kid, pkcs8, created FROM signing_keys ORDER BY created DESC, kid")?;
        let rows = stmt.query_map([], |r| {
            Ok(StoredSigningKey {
                kid: r.get(0)?,
                pkcs8: r.get(1)?,
                created: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds a signing key.
    pub fn add_signing_key(&self, key: &StoredSigningKey) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO signing_keys (kid, pkcs8, created) VALUES (?1, ?2, ?3)",
            params![key.kid, key.pkcs8, key.created as i64],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("gw.db")).expect("open");
        (dir, s)
    }

    fn cred(user: &str) -> StoredCredential {
        StoredCredential {
            cred_id: format!("cred-{user}"),
            user: user.into(),
            key_json: "{}".into(),
            aaguid: "00000000-0000-0000-0000-000000000000".into(),
        }
    }

    #[test]
    fn invite_is_single_use_and_stored_hashed() {
        let (dir, s) = store();
        s.ensure_user("alice").expect("user");
        s.add_invite("alice", "secret-code", now_secs() + 60)
            .expect("invite");
        assert_eq!(s.check_invite("alice", "secret-code").expect("db"), Ok(()));
        assert_eq!(s.enrol("secret-code", &cred("alice")).expect("db"), Ok(()));
        assert_eq!(
            s.enrol("secret-code", &cred("alice")).expect("db"),
            Err(InviteProblem::Used)
        );
        drop(s);
        let raw = std::fs::read(dir.path().join("gw.db")).expect("read db");
        assert!(!raw.windows(11).any(|w| w == b"secret-code"));
    }

    #[test]
    fn expired_and_foreign_invites_are_refused() {
        let (_dir, s) = store();
        s.ensure_user("bob").expect("user");
        s.add_invite("bob", "old", now_secs() - 1).expect("invite");
        assert_eq!(
            s.check_invite("bob", "old").expect("db"),
            Err(InviteProblem::Expired)
        );
        s.add_invite("bob", "bobs", now_secs() + 60)
            .expect("invite");
        assert_eq!(
            s.check_invite("mallory", "bobs").expect("db"),
            Err(InviteProblem::Unknown)
        );
        assert_eq!(
            s.check_invite("bob", "nope").expect("db"),
            Err(InviteProblem::Unknown)
        );
    }

    #[test]
    fn revoking_bumps_the_epoch_of_that_user_only() {
        let (_dir, s) = store();
        s.ensure_user("alice").expect("user");
        s.ensure_user("bob").expect("user");
        assert_eq!(s.revoke_user("alice").expect("db"), Some(1));
        assert_eq!(s.revoke_user("alice").expect("db"), Some(2));
        assert_eq!(s.revoke_user("nobody").expect("db"), None);
        let e = s.epochs().expect("db");
        assert_eq!((e["alice"], e["bob"]), (2, 0));
    }

    #[test]
    fn state_survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gw.db");
        let id = {
            let s = Store::open(&path).expect("open");
            let id = s.ensure_user("carol").expect("user");
            s.add_invite("carol", "c", now_secs() + 60).expect("invite");
            s.enrol("c", &cred("carol")).expect("db").expect("ok");
            id
        };
        let s = Store::open(&path).expect("reopen");
        assert_eq!(s.ensure_user("carol").expect("user"), id);
        assert_eq!(s.credentials("carol").expect("creds").len(), 1);
    }
}
