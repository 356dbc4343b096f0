//! What Okta, Entra ID and the RFC send, read as the store's edits.

use serde_json::json;

use super::*;

const ID: &str = "7f1e2b0a-3c4d-4e5f-8a9b-0c1d2e3f4a5b";

#[test]
fn entra_deactivates_with_a_pathless_replace_and_a_false_string() {
    let body = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "Replace", "value": {"active": "False"}}]
    });
    assert_eq!(user_patch(&body), Ok(vec![UserEdit::Active(false)]));
}

#[test]
fn entra_sends_a_path_and_a_true_string_and_okta_a_pathless_boolean() {
    let entra = json!({"Operations": [{"op": "Replace", "path": "active", "value": "True"}]});
    assert_eq!(user_patch(&entra), Ok(vec![UserEdit::Active(true)]));
    let okta = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "value": {"active": false}}]
    });
    assert_eq!(user_patch(&okta), Ok(vec![UserEdit::Active(false)]));
}

#[test]
fn op_names_and_attribute_names_are_read_in_any_case() {
    let body = json!({"operations": [
        {"OP": "REPLACE", "PATH": "Active", "Value": false},
        {"op": "add", "path": "ExternalID", "value": "00u1"},
        {"op": "replace", "path": "urn:ietf:params:scim:schemas:core:2.0:User:displayName", "value": "Alice"}
    ]});
    assert_eq!(
        user_patch(&body),
        Ok(vec![
            UserEdit::Active(false),
            UserEdit::ExternalId(Some("00u1".into())),
            UserEdit::DisplayName(Some("Alice".into())),
        ])
    );
}

#[test]
fn attributes_touchgate_does_not_keep_are_ignored() {
    let body = json!({"Operations": [
        {"op": "Add", "path": "emails[type eq \"work\"].value", "value": "a@example.com"},
        {"op": "Replace", "path": "name.givenName", "value": "Alice"},
        {"op": "Replace", "value": {
            "title": "Engineer",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department": "R&D",
            "active": true
        }}
    ]});
    assert_eq!(user_patch(&body), Ok(vec![UserEdit::Active(true)]));
}

#[test]
fn an_active_that_is_not_a_boolean_is_an_invalid_value() {
    for bad in [json!("yes"), json!(1), json!(null), json!({"value": true})] {
        let body = json!({"Operations": [{"op": "replace", "path": "active", "value": bad}]});
        let e = user_patch(&body).expect_err("refused");
        assert_eq!(e.scim_type(), Some("invalidValue"), "{bad}: {e}");
    }
}

#[test]
fn malformed_patches_are_invalid_syntax_and_a_pathless_remove_has_no_target() {
    for (body, kind) in [
        (json!([]), "invalidSyntax"),
        (json!({"schemas": []}), "invalidSyntax"),
        (json!({"Operations": {"op": "replace"}}), "invalidSyntax"),
        (
            json!({"Operations": [{"op": "move", "path": "active"}]}),
            "invalidSyntax",
        ),
        (
            json!({"Operations": [{"path": "active", "value": true}]}),
            "invalidSyntax",
        ),
        (
            json!({"Operations": [{"op": "replace", "path": 5}]}),
            "invalidSyntax",
        ),
        (
            json!({"Operations": [{"op": "replace", "value": true}]}),
            "invalidSyntax",
        ),
        (json!({"Operations": [{"op": "remove"}]}), "noTarget"),
    ] {
        let e = user_patch(&body).expect_err("refused");
        assert_eq!(e.scim_type(), Some(kind), "{body}: {e}");
    }
}

#[test]
fn okta_adds_and_removes_group_members() {
    let add = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "add", "path": "members", "value": [{"value": ID, "display": "alice@example.com"}]}]
    });
    assert_eq!(
        group_patch(&add),
        Ok(vec![GroupEdit::AddMembers(vec![ID.into()])])
    );
    let remove =
        json!({"Operations": [{"op": "remove", "path": format!("members[value eq \"{ID}\"]")}]});
    assert_eq!(
        group_patch(&remove),
        Ok(vec![GroupEdit::RemoveMembers(vec![ID.into()])])
    );
}

#[test]
fn entra_removes_members_by_filter_or_by_a_value_list_and_ids_are_normalised() {
    let upper = ID.to_ascii_uppercase();
    let by_filter =
        json!({"Operations": [{"op": "Remove", "path": format!("members[value eq \"{upper}\"]")}]});
    assert_eq!(
        group_patch(&by_filter),
        Ok(vec![GroupEdit::RemoveMembers(vec![ID.into()])])
    );
    let by_list =
        json!({"Operations": [{"op": "Remove", "path": "members", "value": [{"value": upper}]}]});
    assert_eq!(
        group_patch(&by_list),
        Ok(vec![GroupEdit::RemoveMembers(vec![ID.into()])])
    );
    let all = json!({"Operations": [{"op": "Remove", "path": "members"}]});
    assert_eq!(
        group_patch(&all),
        Ok(vec![GroupEdit::ReplaceMembers(Vec::new())])
    );
}

#[test]
fn okta_renames_a_group_with_a_pathless_replace() {
    let body =
        json!({"Operations": [{"op": "replace", "value": {"id": ID, "displayName": "oncall-eu"}}]});
    assert_eq!(
        group_patch(&body),
        Ok(vec![GroupEdit::DisplayName("oncall-eu".into())])
    );
}

#[test]
fn bad_member_lists_and_paths_are_refused() {
    for (body, kind) in [
        (
            json!({"Operations": [{"op": "add", "path": "members", "value": "alice"}]}),
            "invalidValue",
        ),
        (
            json!({"Operations": [{"op": "add", "path": "members", "value": [{"display": "alice"}]}]}),
            "invalidValue",
        ),
        (
            json!({"Operations": [{"op": "add", "path": "members[value eq \"x\"]", "value": []}]}),
            "invalidPath",
        ),
        (
            json!({"Operations": [{"op": "remove", "path": "members[display eq \"x\"]"}]}),
            "invalidPath",
        ),
        (
            json!({"Operations": [{"op": "remove", "path": "members[value sw \"x\"]"}]}),
            "invalidFilter",
        ),
        (
            json!({"Operations": [{"op": "replace", "path": "displayName", "value": ""}]}),
            "invalidValue",
        ),
    ] {
        let e = group_patch(&body).expect_err("refused");
        assert_eq!(e.scim_type(), Some(kind), "{body}: {e}");
    }
}

#[test]
fn filters_are_attribute_eq_quoted_value() {
    assert_eq!(
        filter(r#"userName eq "alice@example.com""#),
        Ok(Filter {
            attribute: "username".into(),
            value: "alice@example.com".into()
        })
    );
    assert_eq!(
        filter(r#"  displayName EQ "R&D \"core\"" "#).map(|f| f.value),
        Ok(r#"R&D "core""#.into())
    );
    for bad in [
        r#"userName sw "a""#,
        r#"userName eq "a" and active eq true"#,
        r#"userName eq a"#,
        "userName",
        "",
    ] {
        let e = filter(bad).expect_err(bad);
        assert_eq!(e.scim_type(), Some("invalidFilter"), "{bad}: {e}");
    }
}

#[test]
fn user_and_group_queries_name_their_attributes() {
    assert_eq!(
        user_query(Some(r#"userName eq "Alice@Example.com""#)),
        Ok(ScimQuery::Name("Alice@Example.com".into()))
    );
    assert_eq!(
        user_query(Some(&format!("id eq \"{}\"", ID.to_ascii_uppercase()))),
        Ok(ScimQuery::Id(ID.into()))
    );
    assert_eq!(user_query(None), Ok(ScimQuery::All));
    assert_eq!(
        group_query(Some(r#"displayName eq "oncall""#)),
        Ok(ScimQuery::Name("oncall".into()))
    );
    assert_eq!(
        group_query(Some(r#"externalId eq "g1""#)),
        Ok(ScimQuery::ExternalId("g1".into()))
    );
    let e = group_query(Some(r#"userName eq "x""#)).expect_err("not for groups");
    assert_eq!(e.scim_type(), Some("invalidFilter"));
}

#[test]
fn list_queries_read_paging_and_excluded_members() {
    let q = list_query(
        "filter=displayName+eq+%22oncall%22&excludedAttributes=members&startIndex=0&count=5000&aadOptscim062020",
    )
    .expect("query");
    assert_eq!(q.filter.as_deref(), Some(r#"displayName eq "oncall""#));
    assert_eq!(
        q.paging,
        Paging {
            start: 1,
            count: MAX_COUNT
        }
    );
    assert!(!q.members);
    assert!(list_query("").expect("empty").members);
    let e = list_query("count=many").expect_err("refused");
    assert_eq!(e.scim_type(), Some("invalidValue"));
}

#[test]
fn user_bodies_need_a_user_name_and_read_active_strings() {
    let okta = json!({
        "schemas": [USER_SCHEMA],
        "userName": "alice@example.com",
        "name": {"givenName": "Alice", "familyName": "Liddell"},
        "emails": [{"primary": true, "value": "alice@example.com", "type": "work"}],
        "displayName": "Alice Liddell",
        "externalId": "00u1",
        "active": "False",
        "password": "never kept"
    });
    let u = user_body(&okta).expect("user");
    assert_eq!(
        u,
        UserBody {
            user_name: "alice@example.com".into(),
            active: Some(false),
            external_id: Some("00u1".into()),
            display_name: Some("Alice Liddell".into()),
        }
    );
    // A PUT without `active` leaves the account's state alone.
    let put = user_body(&json!({"userName": "alice@example.com"})).expect("user");
    assert!(!put.edits().iter().any(|e| matches!(e, UserEdit::Active(_))));
    for bad in [
        json!({"active": true}),
        json!({"userName": ""}),
        json!({"userName": 5}),
        json!({"userName": "a\u{0}b"}),
        json!({"userName": "x".repeat(MAX_USER_LEN + 1)}),
        json!({"userName": "alice", "active": "maybe"}),
    ] {
        let e = user_body(&bad).expect_err("refused");
        assert_eq!(e.scim_type(), Some("invalidValue"), "{bad}: {e}");
    }
    let e = user_body(&json!("alice")).expect_err("refused");
    assert_eq!(e.scim_type(), Some("invalidSyntax"));
}

#[test]
fn group_bodies_need_a_display_name_and_read_members() {
    let g = group_body(&json!({
        "schemas": [GROUP_SCHEMA],
        "displayName": "oncall",
        "members": [{"value": ID.to_ascii_uppercase(), "display": "alice@example.com"}]
    }))
    .expect("group");
    assert_eq!(g.display_name, "oncall");
    assert_eq!(g.members, [ID]);
    let e = group_body(&json!({"members": []})).expect_err("refused");
    assert_eq!(e.scim_type(), Some("invalidValue"));
}
