//! Tests of the store.

use super::*;

/// A new store in a temporary folder.
pub(super) fn store() -> (tempfile::TempDir, Store) {
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

/// A user with an invite, enrolled with the given credential ids.
fn enrolled(s: &Store, user: &str, cred_ids: &[&str]) {
    s.ensure_user(user).expect("user");
    for (n, id) in cred_ids.iter().enumerate() {
        let code = format!("{user}-{n}");
        s.add_invite(user, &code, now_secs() + 60).expect("invite");
        let c = StoredCredential {
            cred_id: (*id).to_owned(),
            ..cred(user)
        };
        s.enrol(&code, &c).expect("db").expect("enrolled");
    }
}

#[test]
fn list_users_shows_keys_invites_and_invited_only_users() {
    let (_dir, s) = store();
    enrolled(&s, "alice", &["AAAA1111", "BBBB2222"]);
    s.record_sign_in("alice", "BBBB2222", 1_700_000_000)
        .expect("record");
    s.ensure_user("bob").expect("user");
    s.add_invite("bob", "open", now_secs() + 600)
        .expect("invite");
    s.add_invite("bob", "stale", now_secs() - 1)
        .expect("invite");

    let users = s.list_users().expect("list");

    assert_eq!(
        users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    let alice = &users[0];
    assert!(!alice.disabled);
    assert_eq!(alice.last_sign_in, Some(1_700_000_000));
    assert_eq!(alice.credentials.len(), 2);
    assert_eq!(alice.credentials[0].cred_id, "AAAA1111");
    assert_eq!(alice.credentials[0].last_used, None);
    assert_eq!(alice.credentials[1].last_used, Some(1_700_000_000));
    assert!(alice.credentials[0].enrolled_at >= now_secs() - 5);
    assert!(alice.open_invites.is_empty(), "used invites are not open");
    let bob = &users[1];
    assert_eq!(bob.last_sign_in, None);
    assert!(bob.credentials.is_empty());
    assert_eq!(bob.open_invites.len(), 1, "the expired invite is not open");
}

#[test]
fn disabling_bumps_the_epoch_and_refuses_invites_until_enabled() {
    let (_dir, s) = store();
    s.ensure_user("alice").expect("user");
    s.ensure_user("bob").expect("user");
    s.add_invite("alice", "code", now_secs() + 60)
        .expect("invite");

    s.set_disabled("alice", true).expect("disable");

    assert_eq!(s.epochs().expect("epochs")["alice"], 1);
    assert!(s.is_disabled("alice").expect("db"));
    assert!(!s.is_disabled("bob").expect("db"));
    assert!(!s.is_disabled("nobody").expect("db"));
    assert_eq!(
        s.disabled_users().expect("db"),
        HashSet::from(["alice".to_owned()])
    );
    assert_eq!(
        s.check_invite("alice", "code").expect("db"),
        Err(InviteProblem::UserDisabled)
    );
    assert_eq!(
        s.enrol("code", &cred("alice")).expect("db"),
        Err(InviteProblem::UserDisabled)
    );
    assert!(s.credentials("alice").expect("creds").is_empty());

    s.set_disabled("alice", false).expect("enable");

    assert_eq!(
        s.epochs().expect("epochs")["alice"],
        1,
        "old sessions stay ended"
    );
    assert!(s.disabled_users().expect("db").is_empty());
    assert_eq!(s.enrol("code", &cred("alice")).expect("db"), Ok(()));
}

#[test]
fn unknown_users_are_a_typed_error() {
    let (_dir, s) = store();
    for r in [
        s.set_disabled("nobody", true),
        s.set_disabled("nobody", false),
        s.remove_user("nobody").map(drop),
        s.remove_key("nobody", "AAAA").map(drop),
        s.record_sign_in("nobody", "AAAA", 1),
    ] {
        assert!(
            matches!(r, Err(StoreError::UnknownUser(ref u)) if u == "nobody"),
            "{r:?}"
        );
    }
    assert!(s.epochs().expect("epochs").is_empty(), "no row was made");
}

#[test]
fn removing_a_user_deletes_keys_and_invites_but_keeps_the_epoch_rising() {
    let (_dir, s) = store();
    enrolled(&s, "alice", &["AAAA1111"]);
    s.add_invite("alice", "spare", now_secs() + 60)
        .expect("invite");
    s.revoke_user("alice").expect("revoke");

    let removed = s.remove_user("alice").expect("remove");

    assert_eq!(
        removed,
        RemovedUser {
            credentials: 1,
            invites: 2,
            epoch: 2
        }
    );
    assert!(s.credentials("alice").expect("creds").is_empty());
    assert_eq!(
        s.check_invite("alice", "spare").expect("db"),
        Err(InviteProblem::Unknown)
    );
    // Invited again, the user keeps an epoch above every token issued before removal.
    s.ensure_user("alice").expect("user");
    assert_eq!(s.epochs().expect("epochs")["alice"], 2);
}

#[test]
fn a_key_is_removed_by_a_unique_prefix_of_its_id() {
    let (_dir, s) = store();
    enrolled(&s, "alice", &["ab_1xyz", "ab_2xyz", "abc"]);
    enrolled(&s, "bob", &["ab_9bob"]);

    let ambiguous = s.remove_key("alice", "ab_").expect_err("two match");
    assert!(
        matches!(ambiguous, StoreError::AmbiguousKey { matches: 2, .. }),
        "{ambiguous:?}"
    );
    // `_` is matched literally, not as a LIKE wildcard.
    let none = s.remove_key("alice", "a_").expect_err("none match");
    assert!(matches!(none, StoreError::UnknownKey { .. }), "{none:?}");
    let empty = s.remove_key("alice", "").expect_err("empty prefix");
    assert!(matches!(empty, StoreError::UnknownKey { .. }), "{empty:?}");
    assert!(matches!(
        s.remove_key("alice", "ab_9"),
        Err(StoreError::UnknownKey { .. })
    ));
    assert_eq!(
        s.epochs().expect("epochs")["alice"],
        0,
        "refusals change nothing"
    );

    let removed = s.remove_key("alice", "ab_2").expect("remove");

    assert_eq!(removed.cred_id, "ab_2xyz");
    assert_eq!(removed.keys_left, 2);
    assert_eq!(removed.epoch, 1);
    // A whole id names its own key even when it prefixes another's.
    assert_eq!(s.remove_key("alice", "abc").expect("remove").cred_id, "abc");
    let left: Vec<_> = s
        .credentials("alice")
        .expect("creds")
        .into_iter()
        .map(|c| c.cred_id)
        .collect();
    assert_eq!(left, ["ab_1xyz"]);
    assert_eq!(s.credentials("bob").expect("creds").len(), 1);
}

#[test]
fn recording_a_sign_in_of_an_unknown_key_writes_nothing() {
    let (_dir, s) = store();
    enrolled(&s, "alice", &["AAAA1111"]);

    let r = s.record_sign_in("alice", "gone", 42);

    assert!(matches!(r, Err(StoreError::UnknownKey { .. })), "{r:?}");
    assert_eq!(s.list_users().expect("list")[0].last_sign_in, None);
}

#[test]
fn a_database_of_the_previous_schema_gains_the_new_columns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("old.db");
    {
        let conn = Connection::open(&path).expect("open");
        for sql in MIGRATIONS {
            conn.execute_batch(sql).expect("old schema");
        }
        conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64)
            .expect("version");
        conn.execute(
            "INSERT INTO users (name, uuid, created, epoch) VALUES ('old', ?1, 5, 3)",
            [uuid::Uuid::new_v4().to_string()],
        )
        .expect("user");
    }

    let s = Store::open(&path).expect("migrate");

    let users = s.list_users().expect("list");
    assert_eq!(users.len(), 1);
    assert_eq!((users[0].disabled, users[0].last_sign_in), (false, None));
    s.set_disabled("old", true).expect("disable");
    assert_eq!(s.epochs().expect("epochs")["old"], 4);
    drop(s);
    // Opening again finds the columns in place.
    let s = Store::open(&path).expect("reopen");
    assert!(s.is_disabled("old").expect("db"));
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[cfg(unix)]
#[test]
fn a_new_database_and_its_folders_are_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state/nested/gw.db");

    let s = Store::open(&path).expect("open");
    s.ensure_user("alice").expect("write");

    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert_eq!(mode(&dir.path().join("state/nested")), 0o700);
    assert_eq!(mode(&path), 0o600);
    for side in ["gw.db-wal", "gw.db-shm"] {
        let p = dir.path().join("state/nested").join(side);
        assert!(p.exists(), "{side} is made in WAL mode");
        assert_eq!(mode(&p), 0o600, "{side}");
    }
}

#[cfg(unix)]
#[test]
fn an_existing_database_readable_by_others_is_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("shared");
    std::fs::create_dir(&folder).expect("folder");
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = folder.join("gw.db");
    drop(Store::open(&path).expect("create"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let wal = folder.join("gw.db-wal");
    std::fs::write(&wal, b"").expect("wal");
    std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o666)).expect("chmod");

    let s = Store::open(&path).expect("reopen");

    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&wal), 0o600);
    // The folder existed already: it is the admin's, and left alone.
    assert_eq!(mode(&folder), 0o755);
    s.ensure_user("alice").expect("still usable");
}

/// Gateways started at the same moment on one new file (a deploy of several replicas, or a
/// restart racing a command): each migrates, makes or reads the secrets and the signing key,
/// and they all end up with the same ones. Separate connections lock the file as separate
/// processes do.
#[test]
fn gateways_started_together_on_one_new_file_agree_on_everything() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gateway.db");
    let start = std::sync::Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (path, start) = (path.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let s = Store::open(&path).expect("open");
                let secret = s.secret("reset", || vec![i; 32]).expect("secret");
                let keys = s
                    .signing_keys_rotated::<StoreError>(
                        |_| false,
                        || {
                            Ok(StoredSigningKey {
                                kid: format!("key-{i}"),
                                pkcs8: vec![i],
                                created: now_secs(),
                            })
                        },
                    )
                    .expect("keys");
                (secret, keys.into_iter().map(|k| k.kid).collect::<Vec<_>>())
            })
        })
        .collect();
    let opened: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    assert!(
        opened.windows(2).all(|w| w[0] == w[1]),
        "the gateways disagree: {opened:?}"
    );
    assert_eq!(opened[0].1.len(), 1, "one signing key, made once");
}

#[test]
fn a_url_is_not_taken_for_a_file_name() {
    let dir = tempfile::tempdir().expect("dir");
    // Nothing listens on port 1: a PostgreSQL URL is tried as one, and says so.
    for url in [
        "postgres://gw@127.0.0.1:1/touchgate",
        "postgresql://gw@127.0.0.1:1/x",
    ] {
        let e = Store::open(Path::new(url))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("the gateway cannot reach its database: "),
            "{url}: {e}"
        );
        assert!(!dir.path().join(url).exists());
    }
    let e = Store::open(Path::new("mysql://db/x"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.starts_with("database mysql://db/x: a mysql:// URL"),
        "{e}"
    );
    assert!(!Path::new("postgres:").exists(), "no stray file");
    assert!(!Path::new("mysql:").exists(), "no stray file");
}

/// Two sign-ins with the same counter (a cloned key, verified by two gateways on one store at
/// once): one conditional update wins, the other is refused; a key without a counter (always
/// 0) always passes.
#[test]
fn only_one_of_two_sign_ins_with_the_same_counter_is_stored() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("gw.db");
    let (a, b) = (
        Store::open(&path).expect("a"),
        Store::open(&path).expect("b"),
    );
    a.ensure_user("alice").expect("user");
    a.add_invite("alice", "code", now_secs() + 60)
        .expect("invite");
    a.enrol("code", &cred("alice")).expect("db").expect("enrol");
    let id = "cred-alice";
    let start = std::sync::Arc::new(std::sync::Barrier::new(2));
    let racers: Vec<_> = [a, b]
        .into_iter()
        .map(|s| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                s.advance_credential(id, "{\"n\":7}", 7).expect("db")
            })
        })
        .collect();
    let won: Vec<bool> = racers
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    let s = Store::open(&path).expect("again");
    assert!(
        !s.advance_credential(id, "{}", 6).expect("db"),
        "a lower counter"
    );
    assert!(s.advance_credential(id, "{}", 8).expect("db"));
    assert!(s.advance_credential(id, "{}", 0).expect("db"), "no counter");
}
