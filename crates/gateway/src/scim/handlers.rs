//! A SCIM request routed to the store (on a blocking thread) and the audit log: one function
//! per method and resource, each reading the request with `parse` and answering with `render`.

use std::{net::SocketAddr, sync::Arc};

use http::{Method, StatusCode};
use serde_json::Value;

use super::{Answer, ScimError, parse, render};
use crate::{
    Gateway,
    audit::{AuditEvent, AuditKind},
    browser::untrusted,
    store::{GroupChange, GroupEdit, NewScimUser, ScimProblem, Store, StoreError, UserChange},
};

/// A request, past the bearer token and the body limits.
pub(super) struct Call {
    /// The method.
    pub method: Method,
    /// The path under `/scim/v2/`, e.g. `Users/ID`.
    pub path: String,
    /// The query string.
    pub query: String,
    /// `https://HOST/scim/v2`, for locations.
    pub base: String,
    /// The client's address, for the audit log.
    pub peer: SocketAddr,
    /// The JSON body of a `POST`, `PUT` or `PATCH`.
    pub body: Option<Value>,
}

/// Answers `c`.
pub(super) async fn route(gw: &Arc<Gateway>, c: Call) -> Result<Answer, ScimError> {
    let (resource, id) = match c.path.split_once('/') {
        Some((r, id)) => (r.to_ascii_lowercase(), Some(id.to_owned())),
        None => (c.path.to_ascii_lowercase(), None),
    };
    let m = &c.method;
    match (resource.as_str(), id) {
        ("users" | "groups", Some(id)) if id == ".search" => Err(ScimError::NotImplemented(
            "POST .search is not supported: use GET with filter=".into(),
        )),
        ("users", None) if m == Method::GET => list_users(gw, &c).await,
        ("users", None) if m == Method::POST => create_user(gw, &c).await,
        ("users", Some(id)) if m == Method::GET => get_user(gw, &c, &id).await,
        ("users", Some(id)) if m == Method::PUT => {
            let edits = parse::user_body(body(&c)?)?.edits();
            update_user(gw, &c, &id, edits).await
        }
        ("users", Some(id)) if m == Method::PATCH => {
            let edits = parse::user_patch(body(&c)?)?;
            update_user(gw, &c, &id, edits).await
        }
        ("users", Some(id)) if m == Method::DELETE => delete_user(gw, &c, &id).await,
        ("groups", None) if m == Method::GET => list_groups(gw, &c).await,
        ("groups", None) if m == Method::POST => create_group(gw, &c).await,
        ("groups", Some(id)) if m == Method::GET => get_group(gw, &c, &id).await,
        ("groups", Some(id)) if m == Method::PUT => {
            let g = parse::group_body(body(&c)?)?;
            let edits = vec![
                GroupEdit::DisplayName(g.display_name),
                GroupEdit::ExternalId(g.external_id),
                GroupEdit::ReplaceMembers(g.members),
            ];
            update_group(gw, &c, &id, edits, StatusCode::OK).await
        }
        ("groups", Some(id)) if m == Method::PATCH => {
            let edits = parse::group_patch(body(&c)?)?;
            update_group(gw, &c, &id, edits, StatusCode::NO_CONTENT).await
        }
        ("groups", Some(id)) if m == Method::DELETE => delete_group(gw, &c, &id).await,
        ("serviceproviderconfig", None) if m == Method::GET => {
            Ok(ok(render::service_provider_config(&c.base)))
        }
        ("resourcetypes", None) if m == Method::GET => Ok(ok(render::resource_types(&c.base))),
        ("resourcetypes", Some(name)) if m == Method::GET => render::resource_type(&name, &c.base)
            .map(ok)
            .ok_or_else(|| not_found("resource type", &name)),
        ("schemas", None) if m == Method::GET => Ok(ok(render::schemas(&c.base))),
        ("schemas", Some(urn)) if m == Method::GET => render::schema(&urn, &c.base)
            .map(ok)
            .ok_or_else(|| not_found("schema", &urn)),
        ("bulk", _) => Err(ScimError::NotImplemented(
            "bulk operations are not supported (see ServiceProviderConfig)".into(),
        )),
        ("users" | "groups" | "serviceproviderconfig" | "resourcetypes" | "schemas", _) => Err(
            ScimError::MethodNotAllowed(format!("{m} is not served on {}", untrusted(&c.path))),
        ),
        _ => Err(ScimError::NotFound(format!(
            "no SCIM endpoint {}: try Users, Groups, ServiceProviderConfig, ResourceTypes or Schemas",
            untrusted(&c.path)
        ))),
    }
}

async fn list_users(gw: &Arc<Gateway>, c: &Call) -> Result<Answer, ScimError> {
    let q = parse::list_query(&c.query)?;
    let query = parse::user_query(q.filter.as_deref())?;
    let p = q.paging;
    let (total, users) = db(gw, move |s| s.scim_users(&query, p.start, p.count)).await?;
    let resources = users.iter().map(|u| render::user(u, &c.base)).collect();
    Ok(ok(render::list(total, p.start, resources)))
}

async fn get_user(gw: &Arc<Gateway>, c: &Call, id: &str) -> Result<Answer, ScimError> {
    let u = on(gw, id, |s, id| {
        Ok(s.scim_user(id)?.ok_or(ScimProblem::NotFound("user")))
    })
    .await?;
    Ok(ok(render::user(&u, &c.base)))
}

async fn create_user(gw: &Arc<Gateway>, c: &Call) -> Result<Answer, ScimError> {
    let b = parse::user_body(body(c)?)?;
    let new = NewScimUser {
        // An email address names the same person in any case; the identity provider's
        // sign-in keeps it lower case, so SCIM does too (one row per person).
        name: if b.user_name.contains('@') {
            b.user_name.to_lowercase()
        } else {
            b.user_name
        },
        active: b.active.unwrap_or(true),
        external_id: b.external_id,
        display_name: b.display_name,
    };
    let change = db(gw, move |s| s.scim_create_user(&new))
        .await?
        .map_err(|p| problem(p, ""))?;
    audit_user(gw, c.peer, &change);
    let v = render::user(&change.user, &c.base);
    Ok(created(v, format!("{}/Users/{}", c.base, change.user.id)))
}

async fn update_user(
    gw: &Arc<Gateway>,
    c: &Call,
    id: &str,
    edits: Vec<crate::store::UserEdit>,
) -> Result<Answer, ScimError> {
    let change = on(gw, id, move |s, id| s.scim_update_user(id, &edits)).await?;
    audit_user(gw, c.peer, &change);
    Ok(ok(render::user(&change.user, &c.base)))
}

async fn delete_user(gw: &Arc<Gateway>, c: &Call, id: &str) -> Result<Answer, ScimError> {
    let gone = on(gw, id, |s, id| {
        Ok(s.scim_delete_user(id)?.ok_or(ScimProblem::NotFound("user")))
    })
    .await?;
    let r = &gone.removed;
    let groups = if gone.groups.is_empty() {
        String::new()
    } else {
        format!("; out of groups {}", gone.groups.join(", "))
    };
    record(
        gw,
        c.peer,
        AuditKind::ScimUserRemoved,
        Some(&gone.name),
        None,
        "removed",
        format!(
            "deleted {} and {}{groups}; revocation epoch {}: their sessions end within {}",
            plural(r.credentials, "key"),
            plural(r.invites, "invite"),
            r.epoch,
            poll()
        ),
    );
    Ok(no_content())
}

async fn list_groups(gw: &Arc<Gateway>, c: &Call) -> Result<Answer, ScimError> {
    let q = parse::list_query(&c.query)?;
    let query = parse::group_query(q.filter.as_deref())?;
    let (p, members) = (q.paging, q.members);
    let (total, groups) = db(gw, move |s| {
        s.scim_groups(&query, p.start, p.count, members)
    })
    .await?;
    let resources = groups
        .iter()
        .map(|g| render::group(g, &c.base, members))
        .collect();
    Ok(ok(render::list(total, p.start, resources)))
}

async fn get_group(gw: &Arc<Gateway>, c: &Call, id: &str) -> Result<Answer, ScimError> {
    let members = parse::list_query(&c.query)?.members;
    let g = on(gw, id, |s, id| {
        Ok(s.scim_group(id)?.ok_or(ScimProblem::NotFound("group")))
    })
    .await?;
    Ok(ok(render::group(&g, &c.base, members)))
}

async fn create_group(gw: &Arc<Gateway>, c: &Call) -> Result<Answer, ScimError> {
    let g = parse::group_body(body(c)?)?;
    let change = db(gw, move |s| {
        s.scim_create_group(&g.display_name, g.external_id.as_deref(), &g.members)
    })
    .await?
    .map_err(|p| problem(p, ""))?;
    let group = &change.group;
    record(
        gw,
        c.peer,
        AuditKind::ScimGroupCreated,
        None,
        Some(&group.display_name),
        "created",
        format!("id {}; {}", group.id, plural(group.members.len(), "member")),
    );
    audit_group(gw, c.peer, &change);
    let v = render::group(group, &c.base, true);
    Ok(created(v, format!("{}/Groups/{}", c.base, group.id)))
}

async fn update_group(
    gw: &Arc<Gateway>,
    c: &Call,
    id: &str,
    edits: Vec<GroupEdit>,
    status: StatusCode,
) -> Result<Answer, ScimError> {
    let change = on(gw, id, move |s, id| s.scim_update_group(id, &edits)).await?;
    audit_group(gw, c.peer, &change);
    if status == StatusCode::NO_CONTENT {
        return Ok(no_content());
    }
    Ok(ok(render::group(&change.group, &c.base, true)))
}

async fn delete_group(gw: &Arc<Gateway>, c: &Call, id: &str) -> Result<Answer, ScimError> {
    let (name, members) = on(gw, id, |s, id| {
        Ok(s.scim_delete_group(id)?
            .ok_or(ScimProblem::NotFound("group")))
    })
    .await?;
    record(
        gw,
        c.peer,
        AuditKind::ScimGroupRemoved,
        None,
        Some(&name),
        "removed",
        format!(
            "id {}; {}",
            parse::normal_id(id),
            plural(members.len(), "member")
        ),
    );
    for m in &members {
        let why = format!("the group was deleted; effective within {}", poll());
        let kind = AuditKind::ScimGroupChanged;
        record(
            gw,
            c.peer,
            kind,
            Some(m),
            Some(&name),
            "member_removed",
            why,
        );
    }
    Ok(no_content())
}

/// The audit lines of a user change: created, disabled, enabled, other attributes.
fn audit_user(gw: &Gateway, peer: SocketAddr, ch: &UserChange) {
    let u = &ch.user;
    let state = if u.active { "active" } else { "disabled" };
    let line = |kind, outcome: &str, reason: String| {
        record(gw, peer, kind, Some(&u.name), None, outcome, reason);
    };
    match ch.was_active {
        None => line(
            AuditKind::ScimUserCreated,
            state,
            format!(
                "id {}{}; they enrol a key through the identity provider",
                u.id,
                if ch.recreated {
                    "; provisioned again after a SCIM delete"
                } else {
                    ""
                }
            ),
        ),
        Some(true) if !u.active => line(
            AuditKind::ScimUserDisabled,
            state,
            format!(
                "deactivated: sessions end within {}; sign-in refused until reactivated",
                poll()
            ),
        ),
        Some(false) if u.active => line(
            AuditKind::ScimUserEnabled,
            state,
            "reactivated: their enrolled keys sign in again".into(),
        ),
        Some(_) => {}
    }
    if !ch.attributes.is_empty() {
        let reason = format!("changed {}", ch.attributes.join(", "));
        line(AuditKind::ScimUserChanged, state, reason);
    }
}

/// The audit lines of a group change: renamed, then one line per member added or removed.
fn audit_group(gw: &Gateway, peer: SocketAddr, ch: &GroupChange) {
    let name = ch.group.display_name.as_str();
    let line = |user: Option<&str>, outcome: &str, reason: String| {
        let kind = AuditKind::ScimGroupChanged;
        record(gw, peer, kind, user, Some(name), outcome, reason);
    };
    if let Some(old) = ch.was_named.as_deref().filter(|o| *o != name) {
        line(
            None,
            "renamed",
            format!("renamed from {old:?}: allow_groups grants by the new name"),
        );
    }
    if ch.external_id_changed && ch.was_named.is_some() {
        line(None, "external_id_changed", "externalId changed".into());
    }
    let when = format!("effective at the user's next stream, within {}", poll());
    for u in &ch.added {
        line(Some(u), "member_added", when.clone());
    }
    for u in &ch.removed {
        line(Some(u), "member_removed", when.clone());
    }
}

fn record(
    gw: &Gateway,
    peer: SocketAddr,
    kind: AuditKind,
    user: Option<&str>,
    group: Option<&str>,
    outcome: &str,
    reason: String,
) {
    tracing::info!(event = kind.as_str(), user, group, outcome, reason = %reason, "SCIM change");
    gw.audit.record(AuditEvent {
        user: user.map(str::to_owned),
        group: group.map(str::to_owned),
        peer: Some(peer.to_string()),
        outcome: Some(outcome.to_owned()),
        reason: Some(reason),
        ..AuditEvent::new(kind)
    });
}

/// Runs a store call on the resource with SCIM id `id` (normalised) on a blocking thread; a
/// problem becomes the client's error.
async fn on<T: Send + 'static>(
    gw: &Gateway,
    id: &str,
    f: impl FnOnce(&Store, &str) -> Result<Result<T, ScimProblem>, StoreError> + Send + 'static,
) -> Result<T, ScimError> {
    let id = parse::normal_id(id);
    let key = id.clone();
    db(gw, move |s| f(s, &key))
        .await?
        .map_err(|p| problem(p, &id))
}

/// Runs a store call on a blocking thread.
async fn db<T: Send + 'static>(
    gw: &Gateway,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ScimError> {
    let store = gw.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| ScimError::Internal(format!("the store task failed: {e}")))?
        .map_err(|e| {
            tracing::error!(error = %e, "SCIM: the store failed");
            ScimError::Internal("its database failed; the gateway's log says why".into())
        })
}

fn problem(p: ScimProblem, id: &str) -> ScimError {
    match p {
        ScimProblem::NotFound(what) => not_found(what, id),
        ScimProblem::Conflict(s) => ScimError::Uniqueness(s),
        ScimProblem::UnknownMember(_) => ScimError::InvalidValue(p.to_string()),
        ScimProblem::Rename { .. } => ScimError::Mutability(p.to_string()),
    }
}

fn not_found(what: &str, id: &str) -> ScimError {
    ScimError::NotFound(format!(
        "no {what} with id {} on this gateway (never provisioned, or deleted)",
        untrusted(id)
    ))
}

fn body(c: &Call) -> Result<&Value, ScimError> {
    c.body
        .as_ref()
        .ok_or_else(|| ScimError::InvalidSyntax("this request needs a JSON body".into()))
}

fn ok(v: Value) -> Answer {
    Answer {
        status: StatusCode::OK,
        body: Some(v),
        location: None,
    }
}

fn created(v: Value, location: String) -> Answer {
    Answer {
        status: StatusCode::CREATED,
        body: Some(v),
        location: Some(location),
    }
}

fn no_content() -> Answer {
    Answer {
        status: StatusCode::NO_CONTENT,
        body: None,
        location: None,
    }
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// How soon the gateway acts on a change, e.g. "1s".
fn poll() -> humantime::FormattedDuration {
    humantime::format_duration(crate::server::REVOCATION_POLL)
}
