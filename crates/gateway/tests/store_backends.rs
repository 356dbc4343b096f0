//! The store's promises, kept the same on both databases: each check runs on a fresh SQLite
//! file and on a fresh database of a real PostgreSQL server (Debian's, started by the test).
//! The races are real: several threads (standing for several gateways) at once, each with a
//! store of its own on the same database.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use touchgate_gateway::store::{
    GroupEdit, GroupSource, InviteProblem, NewScimUser, ScimProblem, Store, StoreError,
    StoredCredential, StoredSigningKey, now_secs,
};
use touchgate_testkit::postgres::Postgres;

/// Makes fresh, empty databases and names them (a path or a URL).
trait Databases {
    fn fresh(&mut self) -> PathBuf;
}

struct SqliteFiles(tempfile::TempDir, usize);

impl Databases for SqliteFiles {
    fn fresh(&mut self) -> PathBuf {
        self.1 += 1;
        self.0.path().join(format!("gw{}.db", self.1))
    }
}

struct PgDatabases<'a>(&'a Postgres, &'a tokio::runtime::Runtime, usize);

impl Databases for PgDatabases<'_> {
    fn fresh(&mut self) -> PathBuf {
        self.2 += 1;
        let name = format!("case{}", self.2);
        PathBuf::from(
            self.1
                .block_on(self.0.database(&name))
                .expect("a fresh database"),
        )
    }
}

fn cred(user: &str, id: &str) -> StoredCredential {
    StoredCredential {
        cred_id: id.into(),
        user: user.into(),
        key_json: "{}".into(),
        aaguid: "00000000-0000-0000-0000-000000000000".into(),
    }
}

fn open(db: &Path) -> Store {
    Store::open(db).expect("open the store")
}

/// Runs `f` on `n` threads released together; their answers, in thread order.
fn at_once<T: Send + 'static>(n: usize, f: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let (barrier, f) = (Arc::new(Barrier::new(n)), Arc::new(f));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, f) = (barrier.clone(), f.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f(i)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect()
}

fn every_check(dbs: &mut dyn Databases) {
    invites_are_single_use_and_checked(&open(&dbs.fresh()));
    an_invite_raced_through_several_gateways_is_used_once(dbs.fresh());
    a_cloned_keys_counter_is_accepted_once_across_gateways(dbs.fresh());
    gateways_starting_together_agree_on_secrets_and_signing_keys(dbs.fresh());
    revocation_disable_and_removal_keep_their_rules(&open(&dbs.fresh()));
    users_are_listed_with_keys_and_invites(&open(&dbs.fresh()));
    scim_groups_grant_and_roll_back_as_one(&open(&dbs.fresh()));
}

#[test]
fn sqlite_keeps_every_promise() {
    every_check(&mut SqliteFiles(tempfile::tempdir().expect("dir"), 0));
}

#[test]
fn postgres_keeps_every_promise() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(Postgres::start()).expect("PostgreSQL");
    every_check(&mut PgDatabases(&pg, &rt, 0));
}

fn invites_are_single_use_and_checked(s: &Store) {
    s.ensure_user("alice").expect("user");
    assert_eq!(
        s.ensure_user("alice").expect("again"),
        s.ensure_user("alice").expect("and again"),
        "one handle per user"
    );
    s.add_invite("alice", "code-1", now_secs() + 60)
        .expect("invite");
    assert_eq!(s.check_invite("alice", "code-1").expect("db"), Ok(()));
    assert_eq!(
        s.check_invite("mallory", "code-1").expect("db"),
        Err(InviteProblem::Unknown)
    );
    assert_eq!(s.enrol("code-1", &cred("alice", "k1")).expect("db"), Ok(()));
    assert_eq!(
        s.enrol("code-1", &cred("alice", "k2")).expect("db"),
        Err(InviteProblem::Used)
    );
    s.add_invite("alice", "old", now_secs() - 1)
        .expect("invite");
    assert_eq!(
        s.check_invite("alice", "old").expect("db"),
        Err(InviteProblem::Expired)
    );
    s.add_invite("alice", "code-2", now_secs() + 60)
        .expect("invite");
    s.set_disabled("alice", true).expect("disable");
    assert_eq!(
        s.enrol("code-2", &cred("alice", "k3")).expect("db"),
        Err(InviteProblem::UserDisabled)
    );
    let ids: Vec<String> = s
        .credentials("alice")
        .expect("creds")
        .into_iter()
        .map(|c| c.cred_id)
        .collect();
    assert_eq!(ids, ["k1"], "refused enrolments stored nothing");
}

fn an_invite_raced_through_several_gateways_is_used_once(db: PathBuf) {
    let s = open(&db);
    s.ensure_user("bob").expect("user");
    s.add_invite("bob", "race", now_secs() + 60)
        .expect("invite");
    drop(s);
    let answers = at_once(6, move |i| {
        let s = open(&db);
        s.enrol("race", &cred("bob", &format!("key-{i}")))
            .expect("db")
    });
    let won = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(won, 1, "exactly one enrolment uses the invite: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Ok(()) | Err(InviteProblem::Used))),
        "{answers:?}"
    );
}

fn a_cloned_keys_counter_is_accepted_once_across_gateways(db: PathBuf) {
    let s = open(&db);
    s.ensure_user("carol").expect("user");
    s.add_invite("carol", "c", now_secs() + 60).expect("invite");
    s.enrol("c", &cred("carol", "cloned"))
        .expect("db")
        .expect("enrolled");
    drop(s);
    let db2 = db.clone();
    let answers = at_once(6, move |_| {
        open(&db2)
            .advance_credential("cloned", "{\"n\":7}", 7)
            .expect("db")
    });
    assert_eq!(
        answers.iter().filter(|a| **a).count(),
        1,
        "one of the sign-ins with counter 7 is stored: {answers:?}"
    );
    let s = open(&db);
    assert!(
        !s.advance_credential("cloned", "{}", 6).expect("db"),
        "lower"
    );
    assert!(
        s.advance_credential("cloned", "{}", 8).expect("db"),
        "higher"
    );
    assert!(
        s.advance_credential("cloned", "{}", 0).expect("db"),
        "no counter"
    );
}

fn gateways_starting_together_agree_on_secrets_and_signing_keys(db: PathBuf) {
    let answers = at_once(4, move |i| {
        let s = open(&db);
        let secret = s
            .secret("quic_stateless_reset_key", || vec![i as u8; 32])
            .expect("secret");
        let keys = s
            .signing_keys_rotated::<StoreError>(
                |_| false,
                || {
                    Ok(StoredSigningKey {
                        kid: format!("kid-{i}"),
                        pkcs8: vec![i as u8; 8],
                        created: now_secs(),
                    })
                },
            )
            .expect("keys");
        (secret, keys.into_iter().map(|k| k.kid).collect::<Vec<_>>())
    });
    let distinct: HashSet<_> = answers.iter().collect();
    assert_eq!(
        distinct.len(),
        1,
        "every gateway sees the same: {answers:?}"
    );
    assert_eq!(answers[0].1.len(), 1, "one signing key was made");
}

fn revocation_disable_and_removal_keep_their_rules(s: &Store) {
    for u in ["dave", "erin"] {
        s.ensure_user(u).expect("user");
    }
    assert_eq!(s.revoke_user("dave").expect("db"), Some(1));
    assert_eq!(s.revoke_user("nobody").expect("db"), None);
    s.set_disabled("erin", true).expect("disable");
    let epochs = s.epochs().expect("epochs");
    assert_eq!((epochs["dave"], epochs["erin"]), (1, 1));
    assert_eq!(
        s.disabled_users().expect("disabled"),
        HashSet::from(["erin".to_owned()])
    );
    assert!(s.is_disabled("erin").expect("db"));
    assert!(!s.is_disabled("nobody").expect("db"));
    s.set_disabled("erin", false).expect("enable");
    assert_eq!(
        s.epochs().expect("epochs")["erin"],
        1,
        "enabling keeps the epoch"
    );
    assert!(matches!(
        s.set_disabled("nobody", true),
        Err(StoreError::UnknownUser(_))
    ));

    s.add_invite("dave", "d", now_secs() + 60).expect("invite");
    s.enrol("d", &cred("dave", "abc-1"))
        .expect("db")
        .expect("ok");
    s.add_invite("dave", "d2", now_secs() + 60).expect("invite");
    s.enrol("d2", &cred("dave", "abc-2"))
        .expect("db")
        .expect("ok");
    s.record_sign_in("dave", "abc-1", 1_000).expect("sign-in");
    assert!(matches!(
        s.record_sign_in("dave", "zzz", 1_001),
        Err(StoreError::UnknownKey { .. })
    ));
    assert!(matches!(
        s.remove_key("dave", "abc"),
        Err(StoreError::AmbiguousKey { matches: 2, .. })
    ));
    let removed = s.remove_key("dave", "abc-2").expect("remove key");
    assert_eq!(
        (removed.keys_left, removed.epoch),
        (1, 2),
        "the refused removal changed nothing, this one bumped the epoch"
    );
    let gone = s.remove_user("dave").expect("remove user");
    assert_eq!((gone.credentials, gone.invites, gone.epoch), (1, 2, 3));
    assert!(s.credentials("dave").expect("creds").is_empty());
}

fn users_are_listed_with_keys_and_invites(s: &Store) {
    s.ensure_user("frank").expect("user");
    s.ensure_user("alice").expect("user");
    s.add_invite("frank", "f", now_secs() + 60).expect("invite");
    s.enrol("f", &cred("frank", "f-1"))
        .expect("db")
        .expect("ok");
    s.add_invite("frank", "f2", now_secs() + 600)
        .expect("open invite");
    s.add_invite("frank", "f3", now_secs() + 600)
        .expect("open invite");
    s.enrol("f3", &cred("frank", "f-2"))
        .expect("db")
        .expect("ok");
    let users = s.list_users().expect("list");
    let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["alice", "frank"]);
    let frank = &users[1];
    let keys: Vec<&str> = frank
        .credentials
        .iter()
        .map(|c| c.cred_id.as_str())
        .collect();
    assert_eq!(keys, ["f-1", "f-2"], "in enrolment order");
    assert_eq!(frank.open_invites.len(), 1);
}

fn scim_groups_grant_and_roll_back_as_one(s: &Store) {
    let new = |name: &str| NewScimUser {
        name: name.into(),
        active: true,
        external_id: None,
        display_name: None,
    };
    let grace = s
        .scim_create_user(&new("grace@corp"))
        .expect("db")
        .expect("created")
        .user;
    assert!(matches!(
        s.scim_create_user(&new("GRACE@corp")).expect("db"),
        Err(ScimProblem::Conflict(_))
    ));
    let eng = s
        .scim_create_group("eng", None, std::slice::from_ref(&grace.id))
        .expect("db")
        .expect("group")
        .group;
    assert!(matches!(
        s.scim_create_group("ENG", None, &[]).expect("db"),
        Err(ScimProblem::Conflict(_))
    ));
    assert_eq!(
        s.user_groups(GroupSource::Scim).expect("groups")["grace@corp"],
        ["eng"]
    );
    // A rename followed by an unknown member: all or none.
    let refused = s
        .scim_update_group(
            &eng.id,
            &[
                GroupEdit::DisplayName("platform".into()),
                GroupEdit::AddMembers(vec!["no-such-id".into()]),
            ],
        )
        .expect("db");
    assert!(
        matches!(refused, Err(ScimProblem::UnknownMember(_))),
        "{refused:?}"
    );
    let (total, groups) = s
        .scim_groups(&touchgate_gateway::store::ScimQuery::All, 1, 10, true)
        .expect("groups");
    assert_eq!(total, 1);
    assert_eq!(groups[0].display_name, "eng", "the rename was rolled back");
    // A group made with an unknown member is not made at all.
    assert!(matches!(
        s.scim_create_group("ops", None, &["no-such-id".into()])
            .expect("db"),
        Err(ScimProblem::UnknownMember(_))
    ));
    let (total, _) = s
        .scim_groups(&touchgate_gateway::store::ScimQuery::All, 1, 10, false)
        .expect("groups");
    assert_eq!(total, 1);
    let removed = s.scim_delete_user(&grace.id).expect("db").expect("deleted");
    assert_eq!(removed.groups, ["eng"]);
    assert!(s.user_groups(GroupSource::Scim).expect("groups").is_empty());
}

/// A revocation made through one replica reaches another's listener at once; a listener whose
/// connection is cut reconnects and hears the next one.
#[test]
fn postgres_announces_revocations_to_every_replica() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(Postgres::start()).expect("PostgreSQL");
    let db = PathBuf::from(&pg.url);
    let (a, b) = (open(&db), open(&db));
    a.ensure_user("heidi").expect("user");
    let heard = a.changes().expect("a listener on PostgreSQL");
    rt.block_on(async {
        wait_until(|| heard.listening()).await;
        drain(&heard).await;
        let start = Instant::now();
        let waiting = heard.changed();
        b.revoke_user("heidi").expect("revoke through b");
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("replica a hears the revocation");
        eprintln!("notified in {:?}", start.elapsed());

        pg.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
        )
        .await
        .expect("cut the listeners");
        wait_until(|| !heard.listening()).await;
        wait_until(|| heard.listening()).await;
        drain(&heard).await;
        let waiting = heard.changed();
        b.set_disabled("heidi", true).expect("disable through b");
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("heard after reconnecting");
    });
    assert!(Store::open(Path::new("mysql://x/y")).is_err());
}

/// The database going away: calls fail with words saying so, quickly; when it is back, the
/// same store works again and nothing written before is lost.
#[test]
fn postgres_going_away_is_reported_and_recovered_from() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut pg = rt.block_on(Postgres::start()).expect("PostgreSQL");
    let s = open(Path::new(&pg.url));
    s.ensure_user("ivan").expect("user");
    s.revoke_user("ivan").expect("revoke");
    rt.block_on(pg.stop()).expect("stop");
    let start = Instant::now();
    let e = s.epochs().expect_err("no database");
    assert!(matches!(e, StoreError::Unreachable(_)), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("the gateway cannot reach its database"),
        "{e}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    rt.block_on(pg.restart()).expect("restart");
    let epochs = s.epochs().expect("the same store works again");
    assert_eq!(epochs["ivan"], 1, "nothing written before is lost");
}

/// Takes the wake-up a (re)connection leaves, so the next one is a change's.
async fn drain(l: &touchgate_gateway::store::pg::Listener) {
    let _ = tokio::time::timeout(Duration::from_millis(200), l.changed()).await;
}

async fn wait_until(f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Another role of the database cannot prepare the gateway's tables for it: a `touchgate`
/// schema the gateway's role does not own is refused, in words, before anything is read.
#[test]
fn postgres_refuses_a_schema_another_role_owns() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let pg = rt.block_on(Postgres::start()).expect("PostgreSQL");
    let url = rt.block_on(pg.database("squatted")).expect("database");
    // As another role would: a schema of the gateway's name, in the gateway's database.
    rt.block_on(pg.psql_in(
        "squatted",
        "CREATE ROLE squatter; CREATE SCHEMA touchgate AUTHORIZATION squatter",
    ))
    .expect("the squatter's schema");
    let e = Store::open(Path::new(&url))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("belongs to another role"), "{e}");
}
