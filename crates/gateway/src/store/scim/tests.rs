//! Tests of SCIM's view of the store.

use super::*;
use crate::store::tests::store;

fn new_user(name: &str) -> NewScimUser {
    NewScimUser {
        name: name.into(),
        active: true,
        external_id: Some(format!("ext-{name}")),
        display_name: None,
    }
}

fn create(s: &Store, name: &str) -> ScimUser {
    s.scim_create_user(&new_user(name))
        .expect("db")
        .expect("created")
        .user
}

#[test]
fn a_created_user_is_found_by_id_by_name_in_any_case_and_by_external_id() {
    let (_dir, s) = store();
    let alice = create(&s, "alice@example.com");
    assert!(alice.active);
    assert_eq!(s.scim_user(&alice.id).expect("db"), Some(alice.clone()));
    let by = |q: ScimQuery| s.scim_users(&q, 1, 10).expect("db");
    assert_eq!(by(ScimQuery::Name("Alice@Example.COM".into())).0, 1);
    assert_eq!(
        by(ScimQuery::ExternalId("ext-alice@example.com".into())).0,
        1
    );
    assert_eq!(by(ScimQuery::Id(alice.id.clone())).1, vec![alice]);
    assert_eq!(by(ScimQuery::Name("bob@example.com".into())).0, 0);
}

#[test]
fn a_second_user_of_the_same_name_in_any_case_is_a_conflict() {
    let (_dir, s) = store();
    create(&s, "alice@example.com");
    let again = s
        .scim_create_user(&new_user("ALICE@example.com"))
        .expect("db");
    assert!(matches!(again, Err(ScimProblem::Conflict(_))), "{again:?}");
}

#[test]
fn an_invited_user_is_a_scim_user_with_the_same_id() {
    let (_dir, s) = store();
    let handle = s.ensure_user("carol@example.com").expect("user");
    let (n, users) = s.scim_users(&ScimQuery::All, 1, 10).expect("db");
    assert_eq!(n, 1);
    assert_eq!(users[0].id, handle.to_string());
}

#[test]
fn deactivating_disables_and_bumps_the_epoch_and_activating_enables() {
    let (_dir, s) = store();
    let alice = create(&s, "alice@example.com");
    let off = s
        .scim_update_user(&alice.id, &[UserEdit::Active(false)])
        .expect("db")
        .expect("ok");
    assert_eq!((off.was_active, off.user.active), (Some(true), false));
    assert!(s.is_disabled("alice@example.com").expect("db"));
    assert_eq!(s.epochs().expect("db")["alice@example.com"], 1);
    // Deactivating again changes nothing, not even the epoch.
    s.scim_update_user(&alice.id, &[UserEdit::Active(false)])
        .expect("db")
        .expect("ok");
    assert_eq!(s.epochs().expect("db")["alice@example.com"], 1);
    let on = s
        .scim_update_user(&alice.id, &[UserEdit::Active(true)])
        .expect("db")
        .expect("ok");
    assert_eq!((on.was_active, on.user.active), (Some(false), true));
    assert!(!s.is_disabled("alice@example.com").expect("db"));
}

#[test]
fn a_user_name_may_change_case_but_not_name() {
    let (_dir, s) = store();
    let alice = create(&s, "alice@example.com");
    let same = s
        .scim_update_user(&alice.id, &[UserEdit::UserName("Alice@Example.com".into())])
        .expect("db");
    assert_eq!(same.expect("ok").user.name, "alice@example.com");
    let other = s
        .scim_update_user(&alice.id, &[UserEdit::UserName("eve@example.com".into())])
        .expect("db");
    assert!(
        matches!(other, Err(ScimProblem::Rename { .. })),
        "{other:?}"
    );
}

#[test]
fn groups_add_to_the_id_token_groups_and_leave_with_their_members() {
    let (_dir, s) = store();
    let alice = create(&s, "alice@example.com");
    let bob = create(&s, "bob@example.com");
    let oncall = s
        .scim_create_group("oncall", None, std::slice::from_ref(&alice.id))
        .expect("db")
        .expect("created");
    assert_eq!(oncall.added, ["alice@example.com"]);
    let g = oncall.group.id;
    let change = s
        .scim_update_group(
            &g,
            &[
                GroupEdit::AddMembers(vec![bob.id.clone()]),
                GroupEdit::RemoveMembers(vec![alice.id.clone(), "not-an-id".into()]),
            ],
        )
        .expect("db")
        .expect("ok");
    assert_eq!(change.added, ["bob@example.com"]);
    assert_eq!(change.removed, ["alice@example.com"]);
    let groups = s
        .user_groups(crate::store::GroupSource::IdpAndScim)
        .expect("db");
    assert_eq!(groups.get("bob@example.com"), Some(&vec!["oncall".into()]));
    assert_eq!(groups.get("alice@example.com"), None);
    // The ID token's groups first, then SCIM's, each once.
    s.read(|tx| {
        tx.exec(
            "UPDATE users SET idp_groups = '[\"eng\", \"oncall\"]' WHERE name = ?1",
            crate::store::sql::args!["bob@example.com"],
        )
    })
    .expect("idp groups");
    s.scim_create_group("staff", None, std::slice::from_ref(&bob.id))
        .expect("db")
        .expect("created");
    assert_eq!(
        s.user_groups(crate::store::GroupSource::IdpAndScim)
            .expect("db")["bob@example.com"],
        ["eng", "oncall", "staff"]
    );
    assert_eq!(
        s.scim_user(&bob.id).expect("db").expect("bob").groups[0].name,
        "oncall"
    );

    let unknown = s
        .scim_update_group(&g, &[GroupEdit::AddMembers(vec!["nobody".into()])])
        .expect("db");
    assert_eq!(unknown, Err(ScimProblem::UnknownMember("nobody".into())));
    let (name, members) = s.scim_delete_group(&g).expect("db").expect("deleted");
    assert_eq!(
        (name.as_str(), members),
        ("oncall", vec!["bob@example.com".into()])
    );
    assert_eq!(
        s.user_groups(crate::store::GroupSource::IdpAndScim)
            .expect("db")["bob@example.com"],
        ["eng", "oncall", "staff"],
        "oncall still comes from the ID token"
    );
}

#[test]
fn deleting_a_user_removes_keys_and_memberships_and_hides_them_until_created_again() {
    let (_dir, s) = store();
    let alice = create(&s, "alice@example.com");
    s.scim_create_group("oncall", None, std::slice::from_ref(&alice.id))
        .expect("db")
        .expect("created");
    s.add_invite("alice@example.com", "code", now_secs() + 60)
        .expect("invite");
    let removed = s.scim_delete_user(&alice.id).expect("db").expect("deleted");
    assert_eq!(removed.removed.invites, 1);
    assert_eq!(removed.groups, ["oncall"]);
    assert_eq!(s.scim_user(&alice.id).expect("db"), None);
    assert_eq!(s.scim_users(&ScimQuery::All, 1, 10).expect("db").0, 0);
    assert!(
        s.user_groups(crate::store::GroupSource::IdpAndScim)
            .expect("db")
            .is_empty()
    );
    assert_eq!(s.scim_delete_user(&alice.id).expect("db"), None);

    let back = s
        .scim_create_user(&new_user("alice@example.com"))
        .expect("db")
        .expect("created");
    assert!(back.recreated);
    assert_eq!(back.user.id, alice.id, "the row and its id are kept");
    assert_eq!(s.epochs().expect("db")["alice@example.com"], 1);
}
