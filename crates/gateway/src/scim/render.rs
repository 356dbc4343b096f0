//! The SCIM resources this endpoint answers with, as JSON: users, groups, lists, errors, and
//! the discovery documents (`ServiceProviderConfig`, `ResourceTypes`, `Schemas`). Pure
//! functions of the store's records and the endpoint's base URL (`https://HOST/scim/v2`).

use serde_json::{Value, json};

use super::{
    ScimError,
    parse::{GROUP_SCHEMA, MAX_COUNT, USER_SCHEMA},
};
use crate::store::{ScimGroup, ScimUser};

/// The schema of a list.
pub const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
/// The schema of an error.
pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

const CONFIG_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig";
const RESOURCE_TYPE_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ResourceType";
const SCHEMA_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Schema";

/// A user resource. `emails` is the user name when it is an address.
pub fn user(u: &ScimUser, base: &str) -> Value {
    let mut v = json!({
        "schemas": [USER_SCHEMA],
        "id": u.id,
        "userName": u.name,
        "active": u.active,
        "groups": u.groups.iter().map(|g| json!({
            "value": g.id,
            "display": g.name,
            "$ref": format!("{base}/Groups/{}", g.id),
        })).collect::<Vec<_>>(),
        "meta": meta("User", base, "Users", &u.id, u.created, u.modified),
    });
    if u.name.contains('@') {
        v["emails"] = json!([{"value": u.name, "type": "work", "primary": true}]);
    }
    if let Some(x) = &u.external_id {
        v["externalId"] = json!(x);
    }
    if let Some(d) = &u.display_name {
        v["displayName"] = json!(d);
    }
    v
}

/// A group resource; `members` only when asked for.
pub fn group(g: &ScimGroup, base: &str, members: bool) -> Value {
    let mut v = json!({
        "schemas": [GROUP_SCHEMA],
        "id": g.id,
        "displayName": g.display_name,
        "meta": meta("Group", base, "Groups", &g.id, g.created, g.modified),
    });
    if members {
        v["members"] = g
            .members
            .iter()
            .map(|m| {
                json!({
                    "value": m.id,
                    "display": m.name,
                    "type": "User",
                    "$ref": format!("{base}/Users/{}", m.id),
                })
            })
            .collect();
    }
    if let Some(x) = &g.external_id {
        v["externalId"] = json!(x);
    }
    v
}

/// A `ListResponse` of one page.
pub fn list(total: usize, start: usize, resources: Vec<Value>) -> Value {
    json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": total,
        "startIndex": start,
        "itemsPerPage": resources.len(),
        "Resources": resources,
    })
}

/// An error body (RFC 7644 §3.12): the status as a string, the `scimType` where it has one,
/// and the reason in words.
pub fn error(e: &ScimError) -> Value {
    let mut v = json!({
        "schemas": [ERROR_SCHEMA],
        "status": e.status().as_u16().to_string(),
        "detail": e.to_string(),
    });
    if let Some(t) = e.scim_type() {
        v["scimType"] = json!(t);
    }
    v
}

/// What this endpoint supports: PATCH and `eq` filters, no bulk, sorting, ETags or password
/// changes; one bearer token.
pub fn service_provider_config(base: &str) -> Value {
    json!({
        "schemas": [CONFIG_SCHEMA],
        "documentationUri": "https://datatracker.ietf.org/doc/html/rfc7644",
        "patch": {"supported": true},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": true, "maxResults": MAX_COUNT},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": false},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "Bearer token",
            "description": "The token in the gateway's [scim] token_file, as Authorization: Bearer TOKEN",
            "primary": true,
        }],
        "meta": {"resourceType": "ServiceProviderConfig", "location": format!("{base}/ServiceProviderConfig")},
    })
}

/// The resource type called `name` (`User` or `Group`).
pub fn resource_type(name: &str, base: &str) -> Option<Value> {
    let (endpoint, schema, description) = match name {
        "User" => (
            "/Users",
            USER_SCHEMA,
            "A touchgate user, named by their email address",
        ),
        "Group" => (
            "/Groups",
            GROUP_SCHEMA,
            "A group that allow_groups grants services to",
        ),
        _ => return None,
    };
    Some(json!({
        "schemas": [RESOURCE_TYPE_SCHEMA],
        "id": name,
        "name": name,
        "endpoint": endpoint,
        "description": description,
        "schema": schema,
        "meta": {"resourceType": "ResourceType", "location": format!("{base}/ResourceTypes/{name}")},
    }))
}

/// Both resource types, as a list.
pub fn resource_types(base: &str) -> Value {
    let all: Vec<Value> = ["User", "Group"]
        .iter()
        .filter_map(|n| resource_type(n, base))
        .collect();
    list(all.len(), 1, all)
}

/// The schema with id `urn`, with the attributes this endpoint keeps.
pub fn schema(urn: &str, base: &str) -> Option<Value> {
    let s = |name: &str, mutability: &str, uniqueness: &str, required: bool| {
        json!({
            "name": name, "type": "string", "multiValued": false, "required": required,
            "caseExact": false, "mutability": mutability, "returned": "default",
            "uniqueness": uniqueness,
        })
    };
    let reference = |name: &str, mutability: &str, to: &str| {
        json!({
            "name": name, "type": "complex", "multiValued": true, "required": false,
            "mutability": mutability, "returned": "default",
            "subAttributes": [
                s("value", "immutable", "none", false),
                s("display", "readOnly", "none", false),
                {"name": "$ref", "type": "reference", "referenceTypes": [to], "multiValued": false,
                 "required": false, "caseExact": true, "mutability": "readOnly", "returned": "default",
                 "uniqueness": "none"},
            ],
        })
    };
    let (name, attributes) = match urn {
        USER_SCHEMA => (
            "User",
            json!([
                s("userName", "readWrite", "server", true),
                {"name": "active", "type": "boolean", "multiValued": false, "required": false,
                 "mutability": "readWrite", "returned": "default"},
                s("displayName", "readWrite", "none", false),
                s("externalId", "readWrite", "none", false),
                reference("groups", "readOnly", "Group"),
            ]),
        ),
        GROUP_SCHEMA => (
            "Group",
            json!([
                s("displayName", "readWrite", "server", true),
                s("externalId", "readWrite", "none", false),
                reference("members", "readWrite", "User"),
            ]),
        ),
        _ => return None,
    };
    Some(json!({
        "schemas": [SCHEMA_SCHEMA],
        "id": urn,
        "name": name,
        "attributes": attributes,
        "meta": {"resourceType": "Schema", "location": format!("{base}/Schemas/{urn}")},
    }))
}

/// Both schemas, as a list.
pub fn schemas(base: &str) -> Value {
    let all: Vec<Value> = [USER_SCHEMA, GROUP_SCHEMA]
        .iter()
        .filter_map(|u| schema(u, base))
        .collect();
    list(all.len(), 1, all)
}

fn meta(kind: &str, base: &str, endpoint: &str, id: &str, created: u64, modified: u64) -> Value {
    json!({
        "resourceType": kind,
        "created": time(created),
        "lastModified": time(modified.max(created)),
        "location": format!("{base}/{endpoint}/{id}"),
    })
}

/// RFC 3339 in UTC, to the second.
fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ScimRef;

    #[test]
    fn a_user_has_its_schema_id_emails_groups_and_meta_with_location() {
        let u = ScimUser {
            id: "u1".into(),
            name: "alice@example.com".into(),
            active: false,
            external_id: Some("00u1".into()),
            display_name: None,
            created: 0,
            modified: 60,
            groups: vec![ScimRef {
                id: "g1".into(),
                name: "oncall".into(),
            }],
        };
        let v = user(&u, "https://gw.example.com/scim/v2");
        assert_eq!(v["schemas"][0], USER_SCHEMA);
        assert_eq!(v["active"], false);
        assert_eq!(v["emails"][0]["value"], "alice@example.com");
        assert_eq!(v["externalId"], "00u1");
        assert!(v.get("displayName").is_none());
        assert_eq!(v["groups"][0]["display"], "oncall");
        assert_eq!(v["meta"]["resourceType"], "User");
        assert_eq!(v["meta"]["created"], "1970-01-01T00:00:00Z");
        assert_eq!(v["meta"]["lastModified"], "1970-01-01T00:01:00Z");
        assert_eq!(
            v["meta"]["location"],
            "https://gw.example.com/scim/v2/Users/u1"
        );
    }

    #[test]
    fn errors_carry_the_status_as_a_string_and_the_scim_type() {
        let v = error(&ScimError::InvalidFilter("only eq".into()));
        assert_eq!(v["schemas"][0], ERROR_SCHEMA);
        assert_eq!(v["status"], "400");
        assert_eq!(v["scimType"], "invalidFilter");
        assert_eq!(v["detail"], "only eq");
        let v = error(&ScimError::NotFound("no user".into()));
        assert_eq!(v["status"], "404");
        assert!(v.get("scimType").is_none());
    }

    #[test]
    fn discovery_says_patch_and_filter_yes_and_bulk_no() {
        let c = service_provider_config("https://h/scim/v2");
        assert_eq!(c["patch"]["supported"], true);
        assert_eq!(c["filter"]["supported"], true);
        assert_eq!(c["bulk"]["supported"], false);
        assert_eq!(resource_types("b")["totalResults"], 2);
        assert_eq!(schemas("b")["Resources"][1]["id"], GROUP_SCHEMA);
        assert!(schema("urn:x", "b").is_none());
    }
}
