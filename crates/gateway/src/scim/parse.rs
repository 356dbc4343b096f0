//! Reading what provisioning clients send, as the store's edits: bodies, PATCH operations,
//! filters and paging. Pure functions, no IO.
//!
//! Real clients differ from the RFC and from each other, and each form here is one of them:
//! attribute names in any case (RFC 7643 §2.1), `active` as `"True"`/`"False"` strings and
//! PATCH ops as `Replace`/`Add`/`Remove` (Entra ID), a PATCH without `path` whose value is an
//! object of attributes (Entra ID and Okta), members removed by `members[value eq "ID"]`
//! (Okta, Entra ID) or by `path: members` with a value list (Entra ID). User attributes
//! touchgate does not keep (names, emails, titles, extensions) are accepted and ignored.

use serde_json::{Map, Value};

use super::ScimError;
use crate::{
    server::MAX_USER_LEN,
    store::{GroupEdit, ScimQuery, UserEdit},
};

/// The SCIM core schema of users.
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
/// The SCIM core schema of groups.
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

/// Longest `displayName` or `externalId` kept (bytes).
pub const MAX_ATTRIBUTE_LEN: usize = 512;
/// Results per page when the client does not say.
pub const DEFAULT_COUNT: usize = 100;
/// Most results per page, whatever the client asks.
pub const MAX_COUNT: usize = 1000;

/// A user as `POST` and `PUT` send it (what touchgate keeps of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserBody {
    /// `userName`.
    pub user_name: String,
    /// `active`, when given.
    pub active: Option<bool>,
    /// `externalId`.
    pub external_id: Option<String>,
    /// `displayName`.
    pub display_name: Option<String>,
}

impl UserBody {
    /// A `PUT`'s edits: every attribute replaced, except `active`, which is left alone when
    /// the body has none (a client that forgets it must not enable a disabled user).
    pub fn edits(self) -> Vec<UserEdit> {
        let mut e = vec![
            UserEdit::UserName(self.user_name),
            UserEdit::ExternalId(self.external_id),
            UserEdit::DisplayName(self.display_name),
        ];
        e.extend(self.active.map(UserEdit::Active));
        e
    }
}

/// A group as `POST` and `PUT` send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBody {
    /// `displayName`.
    pub display_name: String,
    /// `externalId`.
    pub external_id: Option<String>,
    /// The members' SCIM ids (none when the body has no `members`).
    pub members: Vec<String>,
}

/// A page of a list: the 1-based index of its first result and how many at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    /// `startIndex`.
    pub start: usize,
    /// `count`.
    pub count: usize,
}

/// The query string of a list request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// `filter`, if any.
    pub filter: Option<String>,
    /// `startIndex` and `count`.
    pub paging: Paging,
    /// Whether group members are wanted (not when `excludedAttributes` names them, or
    /// `attributes` leaves them out).
    pub members: bool,
}

/// Reads a list request's query string.
pub fn list_query(query: &str) -> Result<ListQuery, ScimError> {
    let mut q = ListQuery {
        filter: None,
        paging: Paging {
            start: 1,
            count: DEFAULT_COUNT,
        },
        members: true,
    };
    let names = |v: &str| v.split(',').any(|a| attribute(a.trim()) == "members");
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.to_ascii_lowercase().as_str() {
            "filter" => q.filter = Some(v.into_owned()),
            "startindex" => q.paging.start = number(&v, "startIndex")?.max(1) as usize,
            "count" => q.paging.count = number(&v, "count")?.clamp(0, MAX_COUNT as i64) as usize,
            "excludedattributes" if names(&v) => q.members = false,
            "attributes" if !names(&v) => q.members = false,
            "sortby" => {
                return Err(ScimError::NotImplemented(
                    "sorting is not supported: results come by name".into(),
                ));
            }
            _ => {}
        }
    }
    Ok(q)
}

fn number(v: &str, what: &str) -> Result<i64, ScimError> {
    v.trim()
        .parse()
        .map_err(|_| ScimError::InvalidValue(format!("{what} must be an integer, not {v:?}")))
}

/// `ATTRIBUTE eq "VALUE"`: the only filter form provisioning clients need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The attribute, lowercase, without the core schema's URN.
    pub attribute: String,
    /// The value.
    pub value: String,
}

/// Reads an `ATTRIBUTE eq "VALUE"` filter (operator in any case).
pub fn filter(text: &str) -> Result<Filter, ScimError> {
    let unsupported = || {
        ScimError::InvalidFilter(format!(
            "unsupported filter {}: only ATTRIBUTE eq \"VALUE\" is supported",
            crate::browser::untrusted(text)
        ))
    };
    let text = text.trim();
    let (attr, rest) = text
        .split_once(char::is_whitespace)
        .ok_or_else(unsupported)?;
    let (op, value) = rest
        .trim_start()
        .split_once(char::is_whitespace)
        .ok_or_else(unsupported)?;
    if !op.eq_ignore_ascii_case("eq") || attr.is_empty() {
        return Err(unsupported());
    }
    // The value is a JSON string: quotes and escapes as JSON has them, nothing after it.
    let value: String = serde_json::from_str(value.trim()).map_err(|_| unsupported())?;
    Ok(Filter {
        attribute: attribute(attr),
        value,
    })
}

/// The users a `filter` selects: by `userName`, `externalId` or `id`.
pub fn user_query(filter_text: Option<&str>) -> Result<ScimQuery, ScimError> {
    query(filter_text, "userName")
}

/// The groups a `filter` selects: by `displayName`, `externalId` or `id`.
pub fn group_query(filter_text: Option<&str>) -> Result<ScimQuery, ScimError> {
    query(filter_text, "displayName")
}

fn query(filter_text: Option<&str>, name: &str) -> Result<ScimQuery, ScimError> {
    let Some(text) = filter_text.filter(|t| !t.trim().is_empty()) else {
        return Ok(ScimQuery::All);
    };
    let f = filter(text)?;
    Ok(match f.attribute.as_str() {
        a if a == name.to_ascii_lowercase() => ScimQuery::Name(f.value),
        "externalid" => ScimQuery::ExternalId(f.value),
        "id" => ScimQuery::Id(normal_id(&f.value)),
        other => {
            return Err(ScimError::InvalidFilter(format!(
                "filtering by {} is not supported: use {name}, externalId or id",
                crate::browser::untrusted(other)
            )));
        }
    })
}

/// An id as the store keeps it: a UUID in lowercase with hyphens (anything else is kept as
/// it is, and names nothing).
pub fn normal_id(id: &str) -> String {
    uuid::Uuid::parse_str(id.trim())
        .map(|u| u.to_string())
        .unwrap_or_else(|_| id.to_owned())
}

/// Reads a user body (`POST`, `PUT`).
pub fn user_body(body: &Value) -> Result<UserBody, ScimError> {
    let obj = object(body, "a User")?;
    let user_name = match member(obj, "userName") {
        Some(Value::String(s)) => user_name(s)?,
        Some(_) => return Err(ScimError::InvalidValue("userName must be a string".into())),
        None => {
            return Err(ScimError::InvalidValue(
                "userName is required: the user's email address as the identity provider gives it"
                    .into(),
            ));
        }
    };
    Ok(UserBody {
        user_name,
        active: member(obj, "active")
            .filter(|v| !v.is_null())
            .map(|v| boolean(v, "active"))
            .transpose()?,
        external_id: optional_string(member(obj, "externalId"), "externalId")?,
        display_name: optional_string(member(obj, "displayName"), "displayName")?,
    })
}

/// Reads a group body (`POST`, `PUT`).
pub fn group_body(body: &Value) -> Result<GroupBody, ScimError> {
    let obj = object(body, "a Group")?;
    let display_name = match member(obj, "displayName") {
        Some(v) => group_name(v)?,
        None => {
            return Err(ScimError::InvalidValue(
                "displayName is required: the group's name, as allow_groups names it".into(),
            ));
        }
    };
    Ok(GroupBody {
        display_name,
        external_id: optional_string(member(obj, "externalId"), "externalId")?,
        members: match member(obj, "members") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => members(v)?,
        },
    })
}

/// A PATCH operation's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Replace,
}

/// One PATCH operation: its kind, its path (lowercase attribute, or `None`), its value.
struct Operation<'a> {
    op: Op,
    path: Option<String>,
    value: Option<&'a Value>,
}

/// Reads a user PATCH (`Operations`) as edits, in order.
pub fn user_patch(body: &Value) -> Result<Vec<UserEdit>, ScimError> {
    patch(body, user_attribute)
}

/// Reads PATCH `Operations` as edits, in order, each attribute read by `edit` (a pathless
/// operation's value is an object of attributes).
fn patch<E>(
    body: &Value,
    edit: impl Fn(&str, Option<&Value>, Op) -> Result<Option<E>, ScimError>,
) -> Result<Vec<E>, ScimError> {
    let mut edits = Vec::new();
    for o in operations(body)? {
        match (&o.path, o.op) {
            (None, Op::Remove) => return Err(no_target()),
            (None, _) => {
                for (k, v) in object(required(o.value)?, "an object of attributes")? {
                    edits.extend(edit(&attribute(k), Some(v), o.op)?);
                }
            }
            (Some(p), op) => edits.extend(edit(p, o.value, op)?),
        }
    }
    Ok(edits)
}

/// One user attribute of a PATCH; `None` for attributes touchgate does not keep.
fn user_attribute(
    name: &str,
    value: Option<&Value>,
    op: Op,
) -> Result<Option<UserEdit>, ScimError> {
    Ok(Some(match (name, op) {
        // Removing `active` leaves the account as it is.
        ("active", Op::Remove) => return Ok(None),
        ("active", _) => UserEdit::Active(boolean(required(value)?, "active")?),
        ("username", Op::Remove) => {
            return Err(ScimError::Mutability("userName cannot be removed".into()));
        }
        ("username", _) => match required(value)? {
            Value::String(s) => UserEdit::UserName(user_name(s)?),
            _ => return Err(ScimError::InvalidValue("userName must be a string".into())),
        },
        ("externalid", Op::Remove) => UserEdit::ExternalId(None),
        ("externalid", _) => UserEdit::ExternalId(optional_string(value, "externalId")?),
        ("displayname", Op::Remove) => UserEdit::DisplayName(None),
        ("displayname", _) => UserEdit::DisplayName(optional_string(value, "displayName")?),
        (other, _) => {
            tracing::debug!(attribute = other, "SCIM user attribute not kept: ignored");
            return Ok(None);
        }
    }))
}

/// Reads a group PATCH (`Operations`) as edits, in order.
pub fn group_patch(body: &Value) -> Result<Vec<GroupEdit>, ScimError> {
    patch(body, group_attribute)
}

/// One group attribute of a PATCH; `None` for attributes touchgate does not keep.
fn group_attribute(
    path: &str,
    value: Option<&Value>,
    op: Op,
) -> Result<Option<GroupEdit>, ScimError> {
    if let Some(inner) = path
        .strip_prefix("members[")
        .and_then(|p| p.strip_suffix(']'))
    {
        let f = filter(inner)?;
        if f.attribute != "value" || op != Op::Remove {
            return Err(ScimError::InvalidPath(format!(
                "unsupported path {}: only remove members[value eq \"ID\"] is supported",
                crate::browser::untrusted(path)
            )));
        }
        return Ok(Some(GroupEdit::RemoveMembers(vec![normal_id(&f.value)])));
    }
    Ok(Some(match (path, op) {
        ("members", Op::Add) => GroupEdit::AddMembers(members(required(value)?)?),
        ("members", Op::Replace) => GroupEdit::ReplaceMembers(members(required(value)?)?),
        // With no value every member goes; with a list, those (Entra ID's form).
        ("members", Op::Remove) => match value.filter(|v| !v.is_null()) {
            None => GroupEdit::ReplaceMembers(Vec::new()),
            Some(v) => GroupEdit::RemoveMembers(members(v)?),
        },
        ("displayname", Op::Remove) => {
            return Err(ScimError::Mutability(
                "displayName cannot be removed".into(),
            ));
        }
        ("displayname", _) => GroupEdit::DisplayName(group_name(required(value)?)?),
        ("externalid", Op::Remove) => GroupEdit::ExternalId(None),
        ("externalid", _) => GroupEdit::ExternalId(optional_string(value, "externalId")?),
        (other, _) => {
            tracing::debug!(attribute = other, "SCIM group attribute not kept: ignored");
            return Ok(None);
        }
    }))
}

/// The `Operations` of a PATCH body.
fn operations(body: &Value) -> Result<Vec<Operation<'_>>, ScimError> {
    let obj = object(body, "a PatchOp")?;
    let Some(Value::Array(ops)) = member(obj, "Operations") else {
        return Err(ScimError::InvalidSyntax(
            "a PATCH body needs Operations: a list of {op, path, value}".into(),
        ));
    };
    ops.iter()
        .map(|o| {
            let o = object(o, "an operation")?;
            let op = match member(o, "op").and_then(Value::as_str) {
                Some(s) if s.eq_ignore_ascii_case("add") => Op::Add,
                Some(s) if s.eq_ignore_ascii_case("remove") => Op::Remove,
                Some(s) if s.eq_ignore_ascii_case("replace") => Op::Replace,
                other => {
                    return Err(ScimError::InvalidSyntax(format!(
                        "op must be add, remove or replace, not {}",
                        crate::browser::untrusted(&format!("{other:?}"))
                    )));
                }
            };
            let path = match member(o, "path") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) if p.trim().is_empty() => None,
                Some(Value::String(p)) => Some(attribute(p.trim())),
                Some(_) => return Err(ScimError::InvalidSyntax("path must be a string".into())),
            };
            Ok(Operation {
                op,
                path,
                value: member(o, "value"),
            })
        })
        .collect()
}

/// A member list: `[{"value": ID}, …]` or one such object.
fn members(v: &Value) -> Result<Vec<String>, ScimError> {
    let one = std::slice::from_ref(v);
    let list = match v {
        Value::Array(a) => a.as_slice(),
        Value::Object(_) => one,
        _ => return Err(member_shape()),
    };
    list.iter()
        .map(|m| match m.as_object().and_then(|o| member(o, "value")) {
            Some(Value::String(id)) => Ok(normal_id(id)),
            _ => Err(member_shape()),
        })
        .collect()
}

fn member_shape() -> ScimError {
    ScimError::InvalidValue(
        "members must be a list of {\"value\": USER_ID}, the ids this endpoint gave the users"
            .into(),
    )
}

/// `true`/`false`, or the strings `"True"`/`"False"` in any case (Entra ID).
pub fn boolean(v: &Value, what: &str) -> Result<bool, ScimError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Ok(false),
        other => Err(ScimError::InvalidValue(format!(
            "{what} must be true or false, not {}",
            crate::browser::untrusted(&other.to_string())
        ))),
    }
}

/// A JSON object's member `name` in any case (RFC 7643 §2.1: attribute names are
/// case-insensitive); the exact spelling first.
pub fn member<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// An attribute name or path, lowercase, without the core schemas' URN
/// (`urn:ietf:params:scim:schemas:core:2.0:User:active` is `active`).
fn attribute(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    for schema in [USER_SCHEMA, GROUP_SCHEMA] {
        if let Some(rest) = lower
            .strip_prefix(&schema.to_ascii_lowercase())
            .and_then(|r| r.strip_prefix(':'))
        {
            return rest.to_owned();
        }
    }
    lower
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, ScimError> {
    v.as_object()
        .ok_or_else(|| ScimError::InvalidSyntax(format!("expected {what} as a JSON object")))
}

fn required(v: Option<&Value>) -> Result<&Value, ScimError> {
    v.filter(|v| !v.is_null())
        .ok_or_else(|| ScimError::InvalidValue("this operation needs a value".into()))
}

fn no_target() -> ScimError {
    ScimError::NoTarget("a remove operation needs a path: what to remove".into())
}

fn user_name(s: &str) -> Result<String, ScimError> {
    let s = s.trim();
    if s.is_empty() || s.len() > MAX_USER_LEN || s.chars().any(char::is_control) {
        return Err(ScimError::InvalidValue(format!(
            "userName must be 1 to {MAX_USER_LEN} bytes without control characters"
        )));
    }
    Ok(s.to_owned())
}

fn group_name(v: &Value) -> Result<String, ScimError> {
    match v {
        Value::String(s)
            if !s.trim().is_empty()
                && s.len() <= MAX_USER_LEN
                && !s.chars().any(char::is_control) =>
        {
            Ok(s.trim().to_owned())
        }
        _ => Err(ScimError::InvalidValue(format!(
            "displayName must be a string of 1 to {MAX_USER_LEN} bytes without control characters"
        ))),
    }
}

fn optional_string(v: Option<&Value>, what: &str) -> Result<Option<String>, ScimError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_ATTRIBUTE_LEN => Ok(Some(s.clone())),
        Some(_) => Err(ScimError::InvalidValue(format!(
            "{what} must be a string of at most {MAX_ATTRIBUTE_LEN} bytes"
        ))),
    }
}

#[cfg(test)]
mod tests;
